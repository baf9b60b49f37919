"""The nftables rendering, judged by its shape: what grows with the cluster
and what does not, what a change rewrites, names and set elements nft
accepts. What the rules do to packets is checked by the semantic tables of
test_compile.py and the others, which run on this rendering too."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest

from lib import nft_plan, nft_render
from lib.compile import intend_node
from lib.cycle import intent_families
from lib.model import EGRESS, INGRESS
from lib.nft_state import Chain, Rule, Table, name_family, tagged, valid_name
from lib.ruleset import HASH_NET, IpSet
from tests.unit.builders import block, cluster, namespace, pod, pods_peer, policy, pport, rule, sel
from tests.unit.nft_tracer import ALLOW, REJECT, Packet, TraceError, Tracer

NODE = "n1"
NAMESPACES = [namespace("x"), namespace("y")]
CLIENT = pod("x/client", "n2", ("10.0.2.10", "fd00:2::10"), {"role": "client"})
WEB_FROM_CLIENTS = policy("x/web", sel({"app": "web"}),
                          ingress=[rule([pods_peer({"role": "client"})], [pport(80)])])
DB_DENY = policy("x/db", sel({"app": "db"}), types=[INGRESS, EGRESS])


def webs(n: int, app: str = "web") -> list:
    return [pod(f"x/{app}-{i}", NODE, (f"10.0.{1 + i // 250}.{1 + i % 250}",
                                       f"fd00:1::{i + 1:x}"), {"app": app}) for i in range(n)]


def render(*objects, families=(4, 6)) -> Table:
    c = cluster(NAMESPACES, CLIENT, *objects)
    return nft_render.render(intent_families(intend_node(c, NODE), families))


def rules(table: Table) -> int:
    return sum(len(c.rules) for c in table.chains)


def pod_chain_names(table: Table) -> set[str]:
    return {c.name for c in table.chains if re.match(r"kpm-[ie][46]-", c.name)}


def dispatch(table: Table, name: str) -> dict[str, str]:
    return dict(table.map_map()[name].elements)


# --------------------------------------------------------------------------
# what grows, what is shared


def test_rule_count_does_not_grow_with_the_local_pods_a_policy_selects():
    ten, thousand = render(webs(10), WEB_FROM_CLIENTS), render(webs(1000), WEB_FROM_CLIENTS)
    assert rules(ten) == rules(thousand)
    assert len(thousand.chains) == len(ten.chains)
    assert len(dispatch(thousand, "kpm-ingress4")) == 1000
    assert len(dispatch(thousand, "kpm-ingress6")) == 1000


def test_pods_with_the_same_policies_share_one_chain():
    table = render(webs(3), WEB_FROM_CLIENTS)
    assert len(set(dispatch(table, "kpm-ingress4").values())) == 1
    assert len(set(dispatch(table, "kpm-ingress6").values())) == 1
    assert len(pod_chain_names(table)) == 2                   # one per family
    assert dispatch(table, "kpm-egress4") == {}              # ingress policies only


def test_a_pod_changing_policies_changes_only_its_map_element():
    """x/web-0 leaves the web policy for the db one, whose chain exists:
    the plan moves its map elements and rewrites no chain."""
    db = pod("x/db", NODE, ("10.0.9.1", "fd00:1::901"), {"app": "db"})
    pods = webs(3)
    before = render(pods, db, WEB_FROM_CLIENTS, DB_DENY)
    moved = replace(pods[0], labels={"app": "db"})
    after = render(moved, pods[1:], db, WEB_FROM_CLIENTS, DB_DENY)
    plan = nft_plan.diff(after, before)
    assert {c.kind for c in plan.changes} == {"map-elements"}
    assert not [line for line in plan.payload.splitlines()
                if line.startswith(("flush chain", "add rule", "add chain", "delete chain"))]
    ingress = dispatch(after, "kpm-ingress4")
    assert ingress["10.0.1.1"] == ingress["10.0.9.1"] != ingress["10.0.1.2"]


def test_a_pod_joining_new_policies_adds_a_chain_and_rewrites_none():
    pods = webs(2)
    extra = policy("x/web-0-too", sel({"app": "web", "n": "0"}), ingress=[rule([], [pport(81)])])
    before = render(pods, WEB_FROM_CLIENTS, extra)
    after = render(replace(pods[0], labels={"app": "web", "n": "0"}), pods[1], WEB_FROM_CLIENTS, extra)
    plan = nft_plan.diff(after, before)
    kinds = sorted(c.kind for c in plan.changes)
    assert "chain-rewrite" not in kinds and "chain-add" in kinds
    assert not [line for line in plan.payload.splitlines() if line.startswith("flush chain")]


def test_an_unchanged_cluster_renders_an_equal_table_and_an_empty_plan():
    first = render(webs(5), WEB_FROM_CLIENTS, DB_DENY)
    assert render(webs(5), WEB_FROM_CLIENTS, DB_DENY) == first
    assert nft_plan.diff(first, first).empty


# --------------------------------------------------------------------------
# what nft accepts


def test_every_name_is_valid_and_of_its_family():
    long_ns = "n" * 63
    c = cluster(namespace(long_ns), pod(f"{long_ns}/{'p' * 253}", NODE, ("10.0.0.1", "fd00::1")),
                policy(f"{long_ns}/{'q' * 253}", sel(), ingress=[rule([pods_peer()], [pport("x" * 15)])],
                       egress=[rule([pods_peer()], [pport("y" * 15)])]))
    table = nft_render.render(intend_node(c, NODE))
    names = [x.name for x in table.chains + table.sets + table.maps]
    assert len(names) == len(set(names))
    assert all(valid_name(n) for n in names), [n for n in names if not valid_name(n)]
    families = {n: name_family(n) for n in names}
    assert {f for f in families.values()} == {0, 4, 6}
    assert {n for n, f in families.items() if f == 0} == {"kpm-forward", "kpm-input"}
    for s in table.sets:
        assert s.family == name_family(s.name), s.name
    nft_plan.diff(table, Table(exists=False))               # its own checks pass


def test_ip_block_with_except_is_one_interval_set_of_disjoint_elements():
    holes = policy("x/world", sel({"app": "web"}), ingress=[rule([block(
        "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.200.0.0/15", "10.255.255.255/32")])])
    table = render(webs(1), holes)
    (nets,) = [s for s in table.sets if s.interval and s.family == 4]
    spans = sorted((ipaddress.ip_network(e).network_address, ipaddress.ip_network(e).broadcast_address)
                   for e in nets.elements)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    t = Tracer(table, 4)
    for src, want in (("10.0.0.1", ALLOW), ("10.1.2.3", REJECT), ("10.1.0.1", REJECT),
                      ("10.201.0.1", REJECT), ("10.199.255.255", ALLOW), ("10.255.255.255", REJECT),
                      ("10.255.255.254", ALLOW), ("11.0.0.1", REJECT)):
        assert t.verdict("FORWARD", Packet(src, "10.0.1.1", "tcp", 80)) == want, src


def test_peer_pods_are_a_plain_set_and_networks_an_interval_set():
    pods_and_world = policy("x/mixed", sel({"app": "web"}), ingress=[
        rule([pods_peer({"role": "client"})], [pport(80)]), rule([block("192.168.0.0/16")])])
    neighbour = pod("x/client-2", "n3", ("10.0.2.11", "fd00:2::11"), {"role": "client"})
    table = render(webs(1), pods_and_world, neighbour, families=(4,))
    by_shape = {s.interval: s for s in table.sets}
    plain, interval = by_shape[False], by_shape[True]
    # adjacent pod addresses stay two elements: nothing to merge in a plain set
    assert plain.name.startswith("kpm-an4-") and plain.elements == {"10.0.2.10", "10.0.2.11"}
    assert interval.name.startswith("kpm-n4-") and interval.elements == {"192.168.0.0/16"}
    statements = [r.statement for c in table.chains for r in c.rules]
    assert any(f"@{plain.name}" in st for st in statements)
    assert any(f"@{interval.name}" in st for st in statements)
    t = Tracer(table, 4)
    for src, want in (("10.0.2.11", ALLOW), ("10.0.2.12", REJECT), ("192.168.7.7", ALLOW)):
        assert t.verdict("FORWARD", Packet(src, "10.0.1.1", "tcp", 80)) == want, src


def test_a_set_whose_members_change_shape_becomes_another_set():
    """nft cannot change a set's flags in place: the same intent set holding
    a network where it held single addresses is another nft set, created
    in the transaction that deletes the old one."""
    hosts = nft_render.render_set(IpSet("KPM-N4-abc", HASH_NET, 4, frozenset({"10.9.0.1"})))
    nets = nft_render.render_set(IpSet("KPM-N4-abc", HASH_NET, 4, frozenset({"10.9.0.0/31"})))
    assert (hosts.name, hosts.interval) == ("kpm-an4-abc", False)
    assert (nets.name, nets.interval) == ("kpm-n4-abc", True)
    payload = nft_plan.diff(Table(sets=(nets,)), Table(sets=(hosts,))).payload
    assert "add set inet kube-policy-manager kpm-n4-abc { type ipv4_addr; flags interval; }" in payload
    assert "delete set inet kube-policy-manager kpm-an4-abc" in payload


def test_ipv6_gets_its_own_chains_maps_and_sets():
    six = policy("x/six", sel({"app": "web"}), ingress=[rule([block("2001:db8::/32", "2001:db8:1::/48")])])
    table = render(webs(2), six)
    assert {m.name for m in table.maps} == {"kpm-egress4", "kpm-ingress4", "kpm-egress6", "kpm-ingress6"}
    assert "fd00:1::1" in dispatch(table, "kpm-ingress6")
    (v6,) = [s for s in table.sets if s.family == 6]
    assert v6.key == "ipv6_addr" and v6.interval and "2001:db8:1::/48" not in v6.elements
    t = Tracer(table, 6)
    assert t.verdict("FORWARD", Packet("2001:db8:2::1", "fd00:1::1", "tcp", 80)) == ALLOW
    assert t.verdict("FORWARD", Packet("2001:db8:1::1", "fd00:1::1", "tcp", 80)) == REJECT
    # neighbour discovery passes an isolated pod
    assert t.verdict("FORWARD", Packet("fd00:9::1", "fd00:1::1", "ipv6-icmp", icmpv6_type=135)) == ALLOW
    assert t.verdict("FORWARD", Packet("fd00:9::1", "fd00:1::1", "ipv6-icmp", icmpv6_type=128)) == REJECT


@pytest.mark.parametrize("families, absent", [((4,), 6), ((6,), 4)])
def test_a_family_the_node_lacks_renders_nothing(families, absent):
    table = render(webs(2), WEB_FROM_CLIENTS, families=families)
    assert not [x.name for x in table.chains + table.sets + table.maps if name_family(x.name) == absent]
    for base in ("kpm-forward", "kpm-input"):
        (jump,) = table.chain_map()[base].rules
        assert jump.statement.startswith(f"meta nfproto ipv{families[0]} jump ")


def test_no_family_renders_the_bare_base_chains():
    table = render(webs(2), WEB_FROM_CLIENTS, families=())
    assert [(c.name, c.rules) for c in table.chains] == [("kpm-forward", ()), ("kpm-input", ())]
    assert table.sets == () and table.maps == ()


# --------------------------------------------------------------------------
# the tracer itself: it must be able to tell a broken table from a good one


def test_the_tracer_sees_a_flushed_pod_chain_and_a_lost_map_element():
    table = render(webs(2), WEB_FROM_CLIENTS)
    refused = Packet("10.0.9.9", "10.0.1.1", "tcp", 80)
    assert Tracer(table, 4).verdict("FORWARD", refused) == REJECT
    assert Tracer(table, 4).verdict("FORWARD", Packet("10.0.2.10", "10.0.1.1", "tcp", 80)) == ALLOW
    chain = dispatch(table, "kpm-ingress4")["10.0.1.1"].split()[1]
    flushed = replace(table, chains=tuple(replace(c, rules=()) if c.name == chain else c
                                          for c in table.chains))
    assert Tracer(flushed, 4).verdict("FORWARD", refused) == ALLOW
    lost = replace(table, maps=tuple(
        replace(m, elements={k: v for k, v in m.elements.items() if k != "10.0.1.1"})
        for m in table.maps))
    assert Tracer(lost, 4).verdict("FORWARD", refused) == ALLOW
    assert Tracer(lost, 4).verdict("FORWARD", Packet("10.0.9.9", "10.0.1.2", "tcp", 80)) == REJECT


def _one_chain(*statements: str, sets=()) -> Table:
    base = Chain("kpm-forward", (tagged("meta nfproto ipv4 jump kpm-forward4"),),
                 nft_render.BASE["kpm-forward"])
    return Table((base, Chain("kpm-forward4", tuple(tagged(s) for s in statements)),
                  Chain("kpm-x4-a", (tagged("reject with icmpx port-unreachable"),))), tuple(sets))


def test_goto_returns_past_the_caller_and_jump_comes_back():
    packet = Packet("10.0.0.1", "10.0.0.2", "tcp", 80)
    tracer = Tracer(_one_chain("ip saddr 10.0.0.1 jump kpm-x4-a"), 4)
    assert tracer.verdict("FORWARD", packet) == REJECT
    assert tracer.path == ["kpm-forward", "kpm-forward4", "kpm-x4-a"]
    # kpm-x4-b returns: after a goto, to the base chain (the reject is skipped);
    # after a jump, to the next rule
    for verb, want in (("goto", ALLOW), ("jump", REJECT)):
        table = _one_chain(f"ip saddr 10.0.0.1 {verb} kpm-x4-b", "reject with icmpx port-unreachable")
        table = replace(table, chains=table.chains + (Chain("kpm-x4-b", (tagged("return"),)),))
        assert Tracer(table, 4).verdict("FORWARD", packet) == want, verb


@pytest.mark.parametrize("statement", [
    "ip saddr 10.0.0.1 accept",                        # we never accept
    "ip saddr 10.0.0.1 drop",
    "ip saddr 10.0.0.1/32 return",                     # nft lists a host bare
    "ip6 saddr fd00::1 return",                        # the other family
    "ip saddr @kpm-n4-missing return",
    "tcp dport 80-80 return",
    "meta l4proto tcp tcp dport 80 return",            # the protocol twice
    "reject with tcp reset",                           # without a tcp match
    "limit rate 10/minute burst 5 packets return",     # a limited verdict
    'log prefix "x"',                                  # a log without a limit
    'limit rate 10/minute burst 5 packets log prefix "say \\"hi\\""',
    "jump kpm-x4-nowhere",
    "ct state established,related",                    # no verdict
    "ct mark 1 return",
    'iifname "eth0" return',
])
def test_the_tracer_refuses_what_nft_render_does_not_write(statement):
    with pytest.raises(TraceError):
        Tracer(_one_chain(statement), 4).verdict("FORWARD", Packet("10.0.0.1", "10.0.0.2", "tcp", 80))


def test_the_tracer_refuses_overlapping_interval_elements():
    from lib.nft_state import AddressSet
    overlapping = AddressSet("kpm-n4-a", "ipv4_addr", True, frozenset({"10.0.0.0/8", "10.1.0.0/16"}))
    with pytest.raises(TraceError, match="overlap"):
        Tracer(_one_chain("ip saddr @kpm-n4-a return", sets=(overlapping,)), 4)


def test_a_rule_without_our_comment_is_refused():
    table = _one_chain("ip saddr 10.0.0.1 return")
    chains = tuple(replace(c, rules=(Rule(c.rules[0].statement),)) if c.name == "kpm-forward4" else c
                   for c in table.chains)
    with pytest.raises(TraceError):
        Tracer(replace(table, chains=chains), 4)


def test_one_address_of_two_pods_meets_both_pods_policies_as_on_iptables():
    """The API may show a new pod with the address of one not yet gone:
    the address is under both pods' policies on either dataplane."""
    from tests.unit.dataplanes import DATAPLANES, node_state, tracer_for
    c = cluster(NAMESPACES, pod("x/old", NODE, ("10.0.1.5", "fd00:1::5"), {"app": "a"}),
                pod("x/new", NODE, ("10.0.1.5", "fd00:1::5"), {"app": "b"}),
                policy("x/a", sel({"app": "a"}), ingress=[rule(None, [pport(80), pport(81)])]),
                policy("x/b", sel({"app": "b"}), ingress=[rule(None, [pport(81), pport(82)])]))
    for family, dst in ((4, "10.0.1.5"), (6, "fd00:1::5")):
        src = "10.0.2.1" if family == 4 else "fd00:2::1"
        for dataplane in DATAPLANES:
            t = tracer_for(node_state(dataplane, c, NODE), family)
            got = [t.verdict("FORWARD", Packet(src, dst, "tcp", p)) for p in (80, 81, 82)]
            assert got == [REJECT, ALLOW, REJECT], (dataplane, family)
    table = nft_render.render(intend_node(c, NODE))
    nft_plan.diff(table, Table(exists=False))
    (shared,) = set(dispatch(table, "kpm-ingress4").values())
    assert [r.statement.split()[0] for r in table.chain_map()[shared.split()[1]].rules] == ["jump", "jump"]


def test_a_render_reusing_the_last_ones_sets_is_the_same_render():
    memo = nft_render.SetMemo()
    before = cluster(NAMESPACES, CLIENT, *webs(2), WEB_FROM_CLIENTS)
    neighbour = pod("x/client-2", "n3", ("10.0.2.11", "fd00:2::11"), {"role": "client"})
    after = cluster(NAMESPACES, CLIENT, neighbour, *webs(2), WEB_FROM_CLIENTS)
    for c in (before, after, before):
        intent = intend_node(c, NODE)
        assert nft_render.render(intent, memo) == nft_render.render(intent)
