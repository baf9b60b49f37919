"""Isolating new pods: an address of this node's pod ranges that no cycle has
seen as a local pod is refused both ways, and nothing else changes.

Verdicts come from tests/unit/tracer.py (and, for the semantic checks,
tests/unit/nft_tracer.py on the nftables rendering) over the test cluster of
test_compile.py, whose nodes n1 and n2 hold their pods in 10.1.0.0/16 +
fd00:1::/64 and 10.2.0.0/16 + fd00:2::/64. The apply order of lib/plan.py
(sets filled first, rules in one transaction per family, stale members
removed last) is replayed step by step to show that no packet slips through
while a cycle applies.
"""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.compile import (LOCAL_DST_CHAIN, LOCAL_SRC_CHAIN, UNKNOWN_CHAIN, CompileOptions,
                         compile_node, local_set_name)
from lib.model import EGRESS, INGRESS, Cluster
from lib.objects import parse_node_pod_cidrs
from lib.ruleset import DesiredState, IpSet
from tests.unit.builders import cluster, namespace, pod, policy, pods_peer, rule, sel
from tests.unit.test_compile import (CASES, EXTERNAL, NAMESPACES, NODE_IPS, NS_LABELS, POD_SPECS,
                                     PODS, POLICIES, End, Net, PodEnd, mismatches)
from tests.unit.dataplanes import IPTABLES, each_dataplane, node_state, tracer_for
from tests.unit.tracer import ALLOW, REJECT, Packet, Tracer

RANGES = {"n1": ("10.1.0.0/16", "fd00:1::/64"), "n2": ("10.2.0.0/16", "fd00:2::/64")}
OPTIONS = {n: CompileOptions(isolate_new_pods=True, pod_cidrs=r) for n, r in RANGES.items()}
NEW = {"n1": ("10.1.0.99", "fd00:1::99"), "n2": ("10.2.0.99", "fd00:2::99")}
GATEWAY = ("10.1.0.1", "fd00:1::1")        # n1's own address inside its pod range


class GuardedNet(Net):
    """Net with every node isolating new pods, and unknown endpoints."""

    def __init__(self, c: Cluster, options=OPTIONS, dataplane: str = IPTABLES):
        super().__init__(c, dataplane)
        self.options = options
        for node, ips in NEW.items():
            self.ends[f"new:{node}"] = End(f"new:{node}", ips, node, False)

    def state(self, node: str):
        if node not in self._states:
            self._states[node] = node_state(self.dataplane, self.cluster, node, self.index,
                                            self.options[node])
        return self._states[node]


def deny_all(ns: str):
    return policy(f"{ns}/deny", sel(), types=[INGRESS, EGRESS])


# --------------------------------------------------------------------------
# known pods are unaffected


@each_dataplane
@pytest.mark.parametrize("name", list(CASES))
def test_every_semantic_case_keeps_its_verdicts(name, dataplane):
    policies, expects = CASES[name]
    net = GuardedNet(cluster(NAMESPACES, PODS, policies), dataplane=dataplane)
    problems = [m for e in expects for m in mismatches(net, e)]
    assert not problems, "\n".join(problems)


@each_dataplane
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NS_LABELS, POD_SPECS, st.lists(POLICIES, min_size=0, max_size=4, unique_by=lambda p: p.key))
def test_known_endpoints_get_the_same_verdicts_as_without(dataplane, ns_labels, pod_specs, pols):
    namespaces = [namespace("x", **ns_labels[0]), namespace("y", **ns_labels[1])]
    pods = [pod(f"{ns}/p{i}", node, (f"10.{node[1]}.0.{10 + i}", f"fd00:{node[1]}::{10 + i:x}"),
                labels, ports) for i, (ns, node, labels, ports) in enumerate(pod_specs)]
    c = cluster(namespaces, pods, pols)
    plain, guarded = Net(c, dataplane), GuardedNet(c, dataplane=dataplane)
    ends = [PodEnd(p.key, p.ips, p.node, False, p) for p in pods]
    ends += [PodEnd("node:n1", NODE_IPS["n1"], "n1", True), PodEnd("ext", EXTERNAL, None, False)]
    for e in ends:
        guarded.ends.setdefault(e.name, e)
        plain.ends.setdefault(e.name, e)
    for src in ends:
        for dst in ends:
            if src is dst or (src.node is None and dst.node is None) or (src.host and dst.host):
                continue
            for family in (4, 6):
                for port, proto in ((80, "tcp"), (81, "udp")):
                    assert guarded.connect(src.name, dst.name, port, proto, family) == \
                        plain.connect(src.name, dst.name, port, proto, family), (src.name, dst.name)


# --------------------------------------------------------------------------
# unknown addresses are refused both ways


OTHERS = ["x/a", "x/c", "y/a", "x/b", "y/b", "node:n1", "node:n2", "ext"]


@each_dataplane
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("policies", [[], [deny_all("x")]], ids=["open", "x-isolated"])
def test_an_unknown_address_in_the_pod_range_is_refused_both_ways(family, policies, dataplane):
    net = GuardedNet(cluster(NAMESPACES, PODS, policies), dataplane=dataplane)
    for other in OTHERS:
        for port, proto in ((80, "tcp"), (53, "udp")):
            assert not net.connect("new:n1", other, port, proto, family), f"new:n1 -> {other}"
            if other != "node:n1":
                assert not net.connect(other, "new:n1", port, proto, family), f"{other} -> new:n1"
    # the node itself reaches it (OUTPUT is not hooked: kubelet probes), and replies pass
    assert net.connect("node:n1", "new:n1", 80, "tcp", family)
    assert net.connect("new:n1", "node:n1", 80, "tcp", family, "ESTABLISHED")
    assert net.connect("new:n1", "y/a", 80, "tcp", family, "ESTABLISHED")
    # the same address without the option is open (when nothing isolates the other end)
    plain = Net(cluster(NAMESPACES, PODS, policies), dataplane)
    plain.ends["new:n1"] = net.ends["new:n1"]
    assert plain.connect("new:n1", "y/a", 80, "tcp", family)
    assert plain.connect("y/a", "new:n1", 80, "tcp", family)


@each_dataplane
def test_each_node_guards_only_its_own_range(dataplane):
    """A pod of n2 is not known to n1: n1 must not refuse it, n2 refuses unknown ones."""
    net = GuardedNet(cluster(NAMESPACES, PODS), dataplane=dataplane)
    n1 = net.tracer("n1", 4)
    assert n1.verdict("FORWARD", Packet("10.2.0.99", "10.1.0.10", "tcp", 80)) == ALLOW
    assert n1.verdict("FORWARD", Packet("10.1.0.10", "10.2.0.99", "tcp", 80)) == ALLOW
    assert net.tracer("n2", 4).verdict("FORWARD", Packet("10.2.0.99", "10.1.0.10", "tcp", 80)) == REJECT
    assert not net.connect("new:n2", "x/a") and not net.connect("x/a", "new:n2")


@each_dataplane
@pytest.mark.parametrize("family", [4, 6])
def test_the_nodes_own_address_inside_the_pod_range_is_not_cut(family, dataplane):
    net = GuardedNet(cluster(NAMESPACES, PODS, deny_all("y")), dataplane=dataplane)
    gw = GATEWAY[0 if family == 4 else 1]
    x_a = net.ends["x/a"].ip(family)
    n1 = net.tracer("n1", family)
    # a known pod to the gateway address (INPUT: the destination is never checked there)
    assert n1.verdict("INPUT", Packet(x_a, gw, "tcp", 53)) == ALLOW
    # the node to itself from that address: back in on lo
    for dst in (gw, NODE_IPS["n1"][0 if family == 4 else 1]):
        assert n1.verdict("INPUT", Packet(gw, dst, "tcp", 10250, in_iface="lo")) == ALLOW
    # the same source from outside the node is an unknown address
    assert n1.verdict("INPUT", Packet(gw, NODE_IPS["n1"][0 if family == 4 else 1], "tcp", 10250,
                                      in_iface="eth0")) == REJECT
    # a pod isolated for egress still needs an ipBlock for it, as for any node address
    y_a = net.ends["y/a"].ip(family)
    assert n1.verdict("INPUT", Packet(y_a, gw, "tcp", 53)) == REJECT


# --------------------------------------------------------------------------
# structure: where the rules go, and what a new pod changes


def rules_of(state: DesiredState, chain: str, family: int = 4) -> list[tuple[str, ...]]:
    return [r.args for r in state.family(family).chain_map()[chain].rules]


def set_of(state: DesiredState, family: int) -> IpSet:
    return state.set_map()[local_set_name(family)]


def test_nothing_changes_without_the_option():
    c = cluster(NAMESPACES, PODS, deny_all("x"))
    state = compile_node(c, "n1")
    names = {ch.name for f in (4, 6) for ch in state.family(f).chains}
    assert not names & {LOCAL_SRC_CHAIN, LOCAL_DST_CHAIN, UNKNOWN_CHAIN}
    assert not any(s.name.startswith("KPM-L") for s in state.sets)


def test_layout_checks_follow_the_dispatch_rules():
    c = cluster(NAMESPACES, PODS, deny_all("x"))
    state = compile_node(c, "n1", options=OPTIONS["n1"])
    forward = rules_of(state, "KPM-FORWARD")
    assert forward[-2:] == [("-s", "10.1.0.0/16", "-j", LOCAL_SRC_CHAIN),
                            ("-d", "10.1.0.0/16", "-j", LOCAL_DST_CHAIN)]
    assert all(a[-1].startswith(("KPM-E-", "KPM-I-")) for a in forward[1:-2])
    assert rules_of(state, "KPM-INPUT")[-2:] == [("-i", "lo", "-j", "RETURN"),
                                                 ("-s", "10.1.0.0/16", "-j", LOCAL_SRC_CHAIN)]
    # x/a and x/c have chains: listed by address; y/a has none: in the set
    assert rules_of(state, LOCAL_SRC_CHAIN) == [
        ("-s", "10.1.0.10/32", "-j", "RETURN"), ("-s", "10.1.0.11/32", "-j", "RETURN"),
        ("-m", "set", "--match-set", local_set_name(4), "src", "-j", "RETURN"),
        ("-j", UNKNOWN_CHAIN)]
    assert rules_of(state, LOCAL_DST_CHAIN, 6)[1] == ("-d", "fd00:1::11/128", "-j", "RETURN")
    assert set_of(state, 4).members == {"10.1.0.12"} and set_of(state, 6).members == {"fd00:1::12"}
    assert [a[-1] for a in rules_of(state, UNKNOWN_CHAIN)] == ["tcp-reset", "icmp-port-unreachable"]


def test_one_family_only_when_only_its_range_is_given():
    c = cluster(NAMESPACES, PODS)
    state = compile_node(c, "n1", options=CompileOptions(isolate_new_pods=True,
                                                         pod_cidrs=("10.1.0.0/16", "10.9.0.0/16")))
    assert [s.name for s in state.sets] == [local_set_name(4)]
    assert rules_of(state, "KPM-FORWARD")[-4:] == [
        ("-s", "10.1.0.0/16", "-j", LOCAL_SRC_CHAIN), ("-s", "10.9.0.0/16", "-j", LOCAL_SRC_CHAIN),
        ("-d", "10.1.0.0/16", "-j", LOCAL_DST_CHAIN), ("-d", "10.9.0.0/16", "-j", LOCAL_DST_CHAIN)]
    assert {c.name for c in state.v6.chains} == {"KPM-FORWARD", "KPM-INPUT"}


@each_dataplane
def test_unknown_drops_are_logged_with_the_global_switch_only(dataplane):
    c = cluster(NAMESPACES, PODS)
    quiet = compile_node(c, "n1", options=OPTIONS["n1"])
    loud = compile_node(c, "n1", options=CompileOptions(isolate_new_pods=True, pod_cidrs=RANGES["n1"],
                                                        log_drops=True))
    assert len(rules_of(quiet, UNKNOWN_CHAIN)) == 2
    assert rules_of(loud, UNKNOWN_CHAIN)[0][-1] == "KPM DROP unknown "
    tracer = tracer_for(node_state(dataplane, c, "n1", options=CompileOptions(
        isolate_new_pods=True, pod_cidrs=RANGES["n1"], log_drops=True)), 4)
    assert tracer.verdict("FORWARD", Packet("10.1.0.99", "10.1.0.12", "udp", 53)) == REJECT
    assert tracer.logged == [("NFLOG", "KPM DROP unknown ")]


def test_a_new_pod_without_policies_changes_only_set_members():
    before = compile_node(cluster(NAMESPACES, PODS, deny_all("x")), "n1", options=OPTIONS["n1"])
    newcomer = pod("y/new", "n1", NEW["n1"], {"app": "new"})
    after = compile_node(cluster(NAMESPACES, PODS, newcomer, deny_all("x")), "n1", options=OPTIONS["n1"])
    assert after.v4 == before.v4 and after.v6 == before.v6
    assert set_of(after, 4).members - set_of(before, 4).members == {"10.1.0.99"}
    assert set_of(after, 6).members - set_of(before, 6).members == {"fd00:1::99"}


@pytest.mark.parametrize("options, message", [
    ({"isolate_new_pods": True}, "isolating new pods needs this node's pod CIDRs"),
    ({"pod_cidrs": ("10.1.0.0/33",)}, "pod CIDR '10.1.0.0/33': not a network in CIDR form"),
    ({"pod_cidrs": ("0.0.0.0/0",)},
     "pod CIDR 0.0.0.0/0: covers every address; give this node's own pod range"),
])
def test_bad_range_options_are_refused(options, message):
    with pytest.raises(ValueError) as err:
        CompileOptions(**options)
    assert str(err.value) == message


def test_ranges_are_normalised_and_deduplicated():
    options = CompileOptions(pod_cidrs=("10.1.0.7/16", "10.1.0.0/16", "FD00:1::/64"))
    assert options.pod_cidrs == ("10.1.0.0/16", "fd00:1::/64")
    assert options.cidrs(6) == ("fd00:1::/64",)


# --------------------------------------------------------------------------
# the apply order, replayed: nothing slips through, nothing known flips


def applying(before: DesiredState, after: DesiredState) -> list[DesiredState]:
    """The kernel's state after each step of lib.plan's apply order."""
    sets = before.set_map()
    for s in after.sets:                     # step 1: create sets, add members
        old = sets.get(s.name)
        sets[s.name] = s if old is None else IpSet(s.name, s.kind, s.family, old.members | s.members)
    grown = tuple(sorted(sets.values(), key=lambda s: s.name))
    step1 = DesiredState(before.v4, before.v6, grown)
    step2 = DesiredState(after.v4, after.v6, grown)     # rules, both families (3: stale chains)
    return [before, step1, step2, after]                # 4: stale members and sets go


def verdicts(state: DesiredState, family: int, packets) -> list[str]:
    tracer = Tracer(state, family)
    return [tracer.verdict(hook, p) for hook, p in packets]


PROBES_FROM_NEW = [("FORWARD", Packet("10.1.0.99", "10.1.0.12", "tcp", 80)),     # to y/a, same node
                   ("FORWARD", Packet("10.1.0.99", "10.2.0.10", "tcp", 80)),     # to x/b, other node
                   ("FORWARD", Packet("10.1.0.99", "192.0.2.10", "udp", 53)),    # outside
                   ("INPUT", Packet("10.1.0.99", "172.18.0.1", "tcp", 10250)),   # the node
                   ("FORWARD", Packet("10.1.0.12", "10.1.0.99", "tcp", 80)),     # from y/a
                   ("FORWARD", Packet("192.0.2.10", "10.1.0.99", "tcp", 80))]    # from outside


def test_a_new_isolated_pod_is_never_open_while_its_rules_are_applied():
    newcomer = pod("x/new", "n1", NEW["n1"], {"app": "new"})
    before = compile_node(cluster(NAMESPACES, PODS, deny_all("x")), "n1", options=OPTIONS["n1"])
    after = compile_node(cluster(NAMESPACES, PODS, newcomer, deny_all("x")), "n1", options=OPTIONS["n1"])
    for step, state in enumerate(applying(before, after)):
        assert verdicts(state, 4, PROBES_FROM_NEW) == [REJECT] * len(PROBES_FROM_NEW), f"step {step}"


def test_a_new_open_pod_is_refused_until_its_address_is_known_then_open():
    newcomer = pod("y/new", "n1", NEW["n1"], {"app": "new"})
    before = compile_node(cluster(NAMESPACES, PODS, deny_all("x")), "n1", options=OPTIONS["n1"])
    after = compile_node(cluster(NAMESPACES, PODS, newcomer, deny_all("x")), "n1", options=OPTIONS["n1"])
    got = [verdicts(state, 4, PROBES_FROM_NEW) for state in applying(before, after)]
    assert got[0] == [REJECT] * len(PROBES_FROM_NEW)
    assert got[1] == got[2] == got[3] == [ALLOW] * len(PROBES_FROM_NEW)


KNOWN_PROBES = [(hook, Packet(s, d, proto, port)) for hook, s, d in [
    ("FORWARD", "10.1.0.10", "10.1.0.11"), ("FORWARD", "10.1.0.11", "10.1.0.10"),
    ("FORWARD", "10.1.0.12", "10.1.0.10"), ("FORWARD", "10.1.0.10", "10.1.0.12"),
    ("FORWARD", "10.2.0.10", "10.1.0.12"), ("FORWARD", "10.1.0.12", "10.2.0.12"),
    ("FORWARD", "192.0.2.10", "10.1.0.10"), ("INPUT", "10.1.0.12", "172.18.0.1"),
    ("INPUT", "10.1.0.10", "172.18.0.1")] for port, proto in ((80, "tcp"), (81, "udp"))]


@pytest.mark.parametrize("change", ["y/a becomes isolated", "x/a stops being isolated", "x/a and y/a swap",
                                    "the option is turned on", "the option is turned off"])
def test_known_pods_never_flip_while_a_change_is_applied(change):
    isolate_y = policy("y/a-in", sel({"app": "a"}), ingress=[rule([pods_peer()])])
    open_x_a = policy("x/a-open", sel({"app": "a"}), ingress=[rule()], egress=[rule()])
    plan = {
        "y/a becomes isolated": ([deny_all("x")], [deny_all("x"), isolate_y], OPTIONS, OPTIONS),
        "x/a stops being isolated": ([policy("x/c", sel({"app": "c"}), types=[INGRESS])],
                                     [], OPTIONS, OPTIONS),
        "x/a and y/a swap": ([open_x_a, policy("x/d", sel({"app": "a"}))], [isolate_y], OPTIONS, OPTIONS),
        "the option is turned on": ([open_x_a], [open_x_a], None, OPTIONS),
        "the option is turned off": ([open_x_a], [open_x_a], OPTIONS, None),
    }
    old_pols, new_pols, old_opts, new_opts = plan[change]

    def state(pols, opts):
        c = cluster(NAMESPACES, PODS, pols)
        return compile_node(c, "n1") if opts is None else compile_node(c, "n1", options=opts["n1"])

    before, after = state(old_pols, old_opts), state(new_pols, new_opts)
    first, last = verdicts(before, 4, KNOWN_PROBES), verdicts(after, 4, KNOWN_PROBES)
    stable = [i for i, (a, b) in enumerate(zip(first, last)) if a == b]
    assert stable
    for step, mid in enumerate(applying(before, after)):
        got = verdicts(mid, 4, KNOWN_PROBES)
        flipped = [KNOWN_PROBES[i] for i in stable if got[i] != first[i]]
        assert not flipped, f"step {step}: {flipped}"


# --------------------------------------------------------------------------
# the node's pod ranges from its Node object


def node_obj(**spec) -> dict:
    return {"metadata": {"name": "node-1"}, "spec": spec}


@pytest.mark.parametrize("obj, cidrs, problems", [
    (node_obj(podCIDR="10.244.1.0/24", podCIDRs=["10.244.1.0/24", "fd00:10:244:1::/64"]),
     ("10.244.1.0/24", "fd00:10:244:1::/64"), []),
    (node_obj(podCIDR="10.244.1.0/24"), ("10.244.1.0/24",), []),
    (node_obj(podCIDRs=["fd00:10:244:1::5/64"]), ("fd00:10:244:1::/64",), []),
    (node_obj(podCIDRs=["10.244.1.0/24", "nonsense", 7]), ("10.244.1.0/24",),
     ['Node node-1: spec.podCIDRs[1]: invalid CIDR "nonsense"',
      "Node node-1: spec.podCIDRs[2]: must be a string, got 7"]),
    (node_obj(), (), ["Node node-1: spec.podCIDRs: required (the node has no pod range yet)"]),
    (node_obj(podCIDRs="10.244.1.0/24"), (),
     ['Node node-1: spec.podCIDRs: must be a list, got "10.244.1.0/24"']),
    ({"metadata": {"name": "node-1"}}, (), ["Node node-1: spec: required"]),
    ({"spec": {}}, (), ["Node <unknown>: metadata: required"]),
])
def test_node_pod_cidrs(obj, cidrs, problems):
    got, found = parse_node_pod_cidrs(obj)
    assert got == cidrs
    assert [str(p) for p in found] == problems


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, st.builds(lambda spec: {"metadata": {"name": "n"}, "spec": spec},
                                 st.dictionaries(st.sampled_from(["podCIDR", "podCIDRs"]), JSON))))
def test_any_node_json_gives_valid_ranges_or_problems(obj):
    cidrs, problems = parse_node_pod_cidrs(obj)
    assert cidrs or problems
    assert all(str(ipaddress.ip_network(c)) == c for c in cidrs)
