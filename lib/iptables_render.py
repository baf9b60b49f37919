"""A node's intent in iptables terms: KPM- chains of tagged rules, hooked
first into FORWARD and INPUT, testing ipsets.

Every argument list is built in one fixed order, so that a rule renders
the same from one cycle to the next and its hash (lib.ruleset.Rule) stays
put: an unchanged rule is never rewritten.
"""
from __future__ import annotations

from dataclasses import replace

from lib.intent import (GOTO, JUMP, LOG, LOG_TARGET, REJECT, RETURN, Dispatch, FamilyIntent,
                        FilterRule, LogSpec, Match, NodeIntent)
from lib.model import EGRESS
from lib.ruleset import PREFIX, Chain, DesiredState, FamilyState, Hook, Rule

FORWARD_CHAIN = PREFIX + "FORWARD"
INPUT_CHAIN = PREFIX + "INPUT"

HOOKS = (
    Hook("FORWARD", Rule(("-j", FORWARD_CHAIN), "hook")),
    Hook("INPUT", Rule(("-j", INPUT_CHAIN), "hook")),
)

_HOST_LEN = {4: 32, 6: 128}
_UNREACHABLE = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}
_DIRECTION = {EGRESS: "egress"}


def match_args(m: Match) -> tuple[str, ...]:
    out: list[str] = []
    if m.in_loopback:
        out += ["-i", "lo"]
    if m.src_net is not None:
        out += ["-s", m.src_net]
    if m.dst_net is not None:
        out += ["-d", m.dst_net]
    if m.established:
        out += ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]
    if m.src_set is not None:
        out += ["-m", "set", "--match-set", m.src_set, "src"]
    if m.dst_set is not None:
        out += ["-m", "set", "--match-set", m.dst_set, "dst"]
    if m.dst_port_set is not None:
        out += ["-m", "set", "--match-set", m.dst_port_set, "dst,dst"]
    if m.protocol is not None:
        out += ["-p", m.protocol]
    if m.dports is not None:
        first, last = m.dports
        out += ["--dport", str(first) if first == last else f"{first}:{last}"]
    if m.icmpv6_type is not None:
        out += ["--icmpv6-type", str(m.icmpv6_type)]
    return tuple(out)


def log_args(log: LogSpec) -> tuple[str, ...]:
    limit = ("-m", "limit", "--limit", f"{log.rate}/minute", "--limit-burst", str(log.burst))
    if log.target == LOG_TARGET:
        return limit + ("-j", "LOG", "--log-prefix", log.prefix)
    return limit + ("-j", "NFLOG", "--nflog-group", str(log.group), "--nflog-prefix", log.prefix)


def render_rule(rule: FilterRule, family: int) -> list[Rule]:
    """One rule, or two for a REJECT that tests no protocol: a TCP reset
    for TCP, port unreachable for the rest."""
    v = rule.verdict
    if v.kind == REJECT:
        out = []
        if rule.match.protocol in (None, "tcp"):
            tcp = replace(rule.match, protocol="tcp")
            out.append(Rule(match_args(tcp) + ("-j", "REJECT", "--reject-with", "tcp-reset"),
                            rule.full_text))
        if rule.match.protocol != "tcp":
            out.append(Rule(match_args(rule.match) + ("-j", "REJECT", "--reject-with",
                                                      _UNREACHABLE[family]), rule.full_text))
        return out
    if v.kind == LOG:
        return [Rule(match_args(rule.match) + log_args(v.log), rule.full_text)]
    if v.kind == RETURN:
        target = ("-j", "RETURN")
    elif v.kind == JUMP:
        target = ("-j", v.chain)
    else:
        assert v.kind == GOTO
        target = ("-g", v.chain)
    return [Rule(match_args(rule.match) + target, rule.full_text)]


class _Renderer:
    """Renders each distinct rule object once: the pods a policy selects
    share its rule objects, and so share the rendered ones too."""

    def __init__(self, family: int):
        self.family = family
        self._done: dict[int, tuple[FilterRule, list[Rule]]] = {}

    def rules(self, rules) -> tuple[Rule, ...]:
        out: list[Rule] = []
        for rule in rules:
            hit = self._done.get(id(rule))
            if hit is None:
                hit = self._done[id(rule)] = (rule, render_rule(rule, self.family))
            out.extend(hit[1])
        return tuple(out)


def _dispatch_rule(d: Dispatch, family: int) -> Rule:
    flag = "-s" if d.direction == EGRESS else "-d"
    return Rule((flag, f"{d.address}/{_HOST_LEN[family]}", "-j", d.chain),
                f"{d.pod} {_DIRECTION.get(d.direction, 'ingress')} dispatch")


def render_family(fi: FamilyIntent) -> FamilyState:
    r = _Renderer(fi.family)
    head = r.rules(fi.head)
    egress = tuple(_dispatch_rule(d, fi.family) for d in fi.dispatch if d.direction == EGRESS)
    ingress = tuple(_dispatch_rule(d, fi.family) for d in fi.dispatch if d.direction != EGRESS)
    chains = [Chain(c.name, r.rules(c.rules)) for c in fi.chains]
    chains.append(Chain(FORWARD_CHAIN, head + egress + ingress + r.rules(fi.forward_tail)))
    chains.append(Chain(INPUT_CHAIN, head + egress + r.rules(fi.input_tail)))
    return FamilyState(fi.family, tuple(sorted(chains, key=lambda c: c.name)), HOOKS)


def render(intent: NodeIntent) -> DesiredState:
    return DesiredState(v4=render_family(intent.v4), v6=render_family(intent.v6), sets=intent.sets)
