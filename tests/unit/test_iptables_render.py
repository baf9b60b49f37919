"""The iptables renderer: rules-as-data to iptables arguments, in one fixed
order, so that an unchanged rule keeps its hash from cycle to cycle."""
from __future__ import annotations

import pytest

from lib.intent import (ALLOWED, ANY, GOTO, JUMP, LOG, REFUSED, Dispatch, FamilyIntent, FilterChain,
                        FilterRule, LogSpec, Match, NodeIntent, Verdict)
from lib.iptables_render import FORWARD_CHAIN, INPUT_CHAIN, render, render_rule
from lib.model import EGRESS, INGRESS


def args(rule: FilterRule, family: int = 4) -> list[tuple[str, ...]]:
    return [r.args for r in render_rule(rule, family)]


def test_a_reject_that_tests_no_protocol_is_a_reset_for_tcp_and_unreachable_for_the_rest():
    assert args(FilterRule(ANY, REFUSED)) == [
        ("-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"),
        ("-j", "REJECT", "--reject-with", "icmp-port-unreachable")]
    assert args(FilterRule(ANY, REFUSED), 6)[1] == (
        "-j", "REJECT", "--reject-with", "icmp6-port-unreachable")


@pytest.mark.parametrize("protocol, expected", [
    ("tcp", [("-m", "set", "--match-set", "S", "src", "-p", "tcp", "--dport", "80",
              "-j", "REJECT", "--reject-with", "tcp-reset")]),
    ("udp", [("-m", "set", "--match-set", "S", "src", "-p", "udp", "--dport", "80",
              "-j", "REJECT", "--reject-with", "icmp-port-unreachable")]),
])
def test_a_reject_of_one_protocol_is_one_rule_that_iptables_can_load(protocol, expected):
    """`-p udp -p tcp` would not load: a refusal narrowed to a protocol gets
    only the answer that protocol takes."""
    rule = FilterRule(Match(src_set="S", protocol=protocol, dports=(80, 80)), REFUSED)
    assert args(rule) == expected


def test_every_match_renders_in_one_order():
    m = Match(in_loopback=True, src_net="10.0.0.0/8", dst_net="10.1.0.5/32", established=True,
              src_set="A", dst_set="B", dst_port_set="P", protocol="tcp", dports=(80, 90))
    assert args(FilterRule(m, ALLOWED)) == [(
        "-i", "lo", "-s", "10.0.0.0/8", "-d", "10.1.0.5/32",
        "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
        "-m", "set", "--match-set", "A", "src", "-m", "set", "--match-set", "B", "dst",
        "-m", "set", "--match-set", "P", "dst,dst", "-p", "tcp", "--dport", "80:90",
        "-j", "RETURN")]
    assert args(FilterRule(Match(protocol="ipv6-icmp", icmpv6_type=135), ALLOWED), 6) == [
        ("-p", "ipv6-icmp", "--icmpv6-type", "135", "-j", "RETURN")]


def test_jumps_gotos_and_logs():
    assert args(FilterRule(ANY, Verdict(JUMP, "KPM-X"))) == [("-j", "KPM-X")]
    assert args(FilterRule(ANY, Verdict(GOTO, "KPM-X"))) == [("-g", "KPM-X")]
    nflog = Verdict(LOG, log=LogSpec("nflog", "KPM DROP in x/a ", 10, 5, 100))
    assert args(FilterRule(ANY, nflog)) == [(
        "-m", "limit", "--limit", "10/minute", "--limit-burst", "5",
        "-j", "NFLOG", "--nflog-group", "100", "--nflog-prefix", "KPM DROP in x/a ")]
    log = Verdict(LOG, log=LogSpec("log", "KPM DROP in x/a ", 1, 2))
    assert args(FilterRule(ANY, log))[0][-4:] == ("-j", "LOG", "--log-prefix", "KPM DROP in x/a ")


@pytest.mark.parametrize("kind, chain, log", [
    (JUMP, None, None), (GOTO, None, None), ("return", "KPM-X", None), ("accept", None, None),
    (LOG, None, None), ("reject", None, LogSpec("nflog", "p", 1, 1))])
def test_a_verdict_that_makes_no_sense_is_refused(kind, chain, log):
    with pytest.raises(ValueError):
        Verdict(kind, chain, log)


def test_dispatch_sends_egress_by_source_on_both_paths_and_ingress_by_destination_on_forward():
    intent = NodeIntent(v4=FamilyIntent(
        4, head=(FilterRule(Match(established=True), ALLOWED, "replies"),),
        dispatch=(Dispatch("10.0.0.1", "KPM-E-a", "x/a", EGRESS),
                  Dispatch("10.0.0.1", "KPM-I-a", "x/a", INGRESS)),
        chains=(FilterChain("KPM-E-a", (FilterRule(ANY, REFUSED, "x/a reject"),)),
                FilterChain("KPM-I-a", (FilterRule(ANY, REFUSED, "x/a reject"),)))))
    state = render(intent).v4.chain_map()
    forward = [r.args for r in state[FORWARD_CHAIN].rules]
    incoming = [r.args for r in state[INPUT_CHAIN].rules]
    assert forward[1:] == [("-s", "10.0.0.1/32", "-j", "KPM-E-a"), ("-d", "10.0.0.1/32", "-j", "KPM-I-a")]
    assert incoming[1:] == [("-s", "10.0.0.1/32", "-j", "KPM-E-a")]
    assert [c for c in state] == sorted(state)
