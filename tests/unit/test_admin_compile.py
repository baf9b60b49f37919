"""The admin tiers, judged by what the compiled rules do to packets.

Each case quotes the sentence of the policy.networking.k8s.io v1alpha1 API
reference it checks; the verdicts come from the packet tracer walking every
node's compiled state (tests/unit/tracer.py, tests/unit/nft_tracer.py), as in
test_compile.py, on both dataplanes.
"""
from __future__ import annotations

import pytest

from lib.compile import CompileOptions, compile_node, np_tier_chain_name, pod_chain_name
from lib.explain import explain, render
from lib.plan import KernelState, diff
from lib.plan_view import render_diff
from lib.model import ALLOW, DENY, EGRESS, INGRESS, PASS, TCP, UDP, PolicyPort
from tests.unit.builders import (NAME_LABEL, a_namespaces, a_networks, a_nodes, a_pods, anp, arule,
                                 banp, cluster, named, node, ns_peer, ns_subject, pods_peer,
                                 pods_subject, policy, pport, rule, sel, with_admin)
from tests.unit.test_compile import NAMESPACES, NODE_IPS, PODS, Expect, Net, mismatches
from tests.unit.dataplanes import IPTABLES, each_dataplane, node_state, tracer_for
from tests.unit.tracer import Packet

X = {NAME_LABEL: "x"}
NODES = [node("n1", NODE_IPS["n1"], role="worker"), node("n2", NODE_IPS["n2"], role="control")]


def net(policies=(), admin=(), baseline=None, dataplane=IPTABLES) -> Net:
    return Net(with_admin(cluster(NAMESPACES, PODS, list(policies)), admin, baseline, NODES),
               dataplane)


CASES = {
    # "All AdminNetworkPolicy rules have higher precedence than NetworkPolicy
    # or BaselineAdminNetworkPolicy rules."
    "ANP Deny over a NetworkPolicy that allows": dict(
        policies=[policy("x/all", sel(), ingress=[rule()])],
        admin=[anp("deny-team-b", 10, ns_subject(X),
                   ingress=[arule(DENY, [a_namespaces({"team": "b"})])])],
        expect=[Expect("""
            -    x/a x/b x/c y/a
            x/b  .   .   .   .
            y/a  X   X   X   .
            y/b  X   X   X   .
            z/a  .   .   .   .
            ext  .   .   .   .
        """), Expect("""
            -    x/a x/b
            y/a  X   X
            x/c  .   .
        """, 80, "tcp", 6)]),

    "ANP Allow over a NetworkPolicy that denies everything": dict(
        policies=[policy("x/deny", sel(), types=[INGRESS])],
        admin=[anp("monitoring", 10, ns_subject(X),
                   ingress=[arule(ALLOW, [a_pods({"team": "b"}, {"app": "b"})])])],
        expect=[Expect("""
            -    x/a x/b x/c y/a
            y/b  .   .   .   .
            y/a  X   X   X   .
            x/b  X   .   X   .
            ext  X   X   X   .
        """)]),

    # "Pass: indicates that all further rules in AdminNetworkPolicy are
    # skipped and the traffic is evaluated by NetworkPolicy"
    "Pass skips lower ANPs and hands the decision to NetworkPolicy": dict(
        policies=[policy("x/from-y-a", sel({"app": "a"}),
                         ingress=[rule([ns_peer({"team": "b"})], [pport(80)]),
                                  rule([pods_peer({"app": "c"})])])],
        admin=[anp("pass-team-b", 5, ns_subject(X), ingress=[arule(PASS, [a_namespaces({"team": "b"})])]),
               anp("deny-all", 10, ns_subject(X), ingress=[arule(DENY, [a_namespaces()])])],
        expect=[Expect("""
            -    x/a x/b
            y/a  .   .
            y/b  .   .
            x/c  X   X
            z/a  X   X
        """), Expect("""
            -    x/a x/b
            y/a  X   .
        """, 81)]),

    # "...then BaselineAdminNetworkPolicy" when no NetworkPolicy selects the pod
    "Pass, no NetworkPolicy, then the BANP's Deny": dict(
        admin=[anp("pass-team-b", 5, ns_subject(X), ingress=[arule(PASS, [a_namespaces({"team": "b"})])])],
        baseline=banp(ns_subject(X), ingress=[arule(DENY, [a_namespaces()])]),
        expect=[Expect("""
            -        x/a x/b y/a
            y/a      X   X   .
            x/b      X   .   .
            ext      .   .   .
            node:n2  .   .   .
        """)]),

    # "Policies with lower priority values have higher precedence"
    "the lower priority wins between two ANPs that disagree": dict(
        admin=[anp("deny-b", 20, ns_subject(X), ingress=[arule(DENY, [a_pods({"team": "b"}, {"app": "b"})])]),
               anp("allow-b", 10, ns_subject(X), ingress=[arule(ALLOW, [a_pods({"team": "b"}, {"app": "b"})])]),
               anp("deny-a", 1, ns_subject(X), ingress=[arule(DENY, [a_pods({"team": "b"}, {"app": "a"})])]),
               anp("allow-a", 2, ns_subject(X), ingress=[arule(ALLOW, [a_pods({"team": "b"}, {"app": "a"})])])],
        expect=[Expect("""
            -    x/a x/c
            y/b  .   .
            y/a  X   X
        """)]),

    # "The relative precedence of ingress rules within a single ANP object
    # ... is determined by the order in which the rule is written."
    "within one ANP the first rule that matches decides": dict(
        admin=[anp("ordered", 10, pods_subject(X, {"app": "a"}),
                   ingress=[arule(ALLOW, [a_pods(X, {"app": "b"})]), arule(DENY, [a_namespaces()])])],
        expect=[Expect("""
            -    x/a x/c
            x/b  .   .
            x/c  X   .
            y/a  X   .
        """)]),

    # "An ANP with no ingress rules does not affect ingress traffic."
    "an ANP with egress rules only leaves ingress alone": dict(
        admin=[anp("egress-only", 10, ns_subject(X), egress=[arule(DENY, [a_namespaces({"team": "b"})])])],
        expect=[Expect("""
            -    x/a x/b y/a y/b
            y/a  .   .   .   .
            x/a  .   .   X   X
        """)]),

    # egress peers: "nodes" and "networks"
    "egress to nodes by label and to networks": dict(
        admin=[anp("no-control-plane", 10, pods_subject(X, {"app": "a"}),
                   egress=[arule(DENY, [a_nodes({"role": "control"}), a_networks("192.0.2.0/24")])])],
        expect=[Expect("""
            -    node:n1 node:n2 x/h2 ext x/b
            x/a  .       X       X    X   .
            x/c  .       .       .    .   .
        """), Expect("""
            -    node:n1 node:n2 ext
            x/a  .       X       .
        """, 80, "tcp", 6)]),

    "a networks peer holds pods too": dict(
        admin=[anp("no-10-2", 10, pods_subject(X, {"app": "a"}),
                   egress=[arule(DENY, [a_networks("10.2.0.0/16")])])],
        expect=[Expect("""
            -    x/b y/b z/a x/c y/a
            x/a  X   X   X   .   .
        """)]),

    # ports: portNumber, namedPort (the container port's own protocol), portRange
    "ports by number, by name and by range": dict(
        admin=[anp("ports", 10, ns_subject(X),
                   ingress=[arule(DENY, [a_namespaces({"team": "b"})],
                                  [named("dns"), PolicyPort(TCP, 8000, 8100), PolicyPort(TCP, 80)])],
                   egress=[arule(DENY, [a_pods(X, {"tier": "db"})], [named("dns")])])],
        expect=[Expect("""
            -    x/a x/b x/c
            y/a  X   X   X
            x/c  .   .   .
        """), Expect("""
            -    x/a x/b
            y/a  X   .
        """, 53, "udp"), Expect("""
            -    x/b
            y/a  X
        """, 5353, "udp"), Expect("""
            -    x/b x/d
            y/a  X   X
        """, 8080), Expect("""
            -    x/b
            x/c  X
            x/a  X
        """, 5353, "udp"), Expect("""
            -    x/b
            x/c  .
        """, 8080)]),

    # "BaselineAdminNetworkPolicy rules have lower precedence than NetworkPolicy"
    "the BANP decides only where no NetworkPolicy selects the pod": dict(
        policies=[policy("x/a-from-b", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})])])],
        baseline=banp(ns_subject(), ingress=[arule(ALLOW, [a_pods(X, {"app": "c"})]),
                                             arule(DENY, [a_namespaces()])]),
        expect=[Expect("""
            -    x/a x/c y/a x/b
            x/b  .   X   X   .
            x/c  X   .   .   .
            y/b  X   X   X   X
            ext  X   .   .   .
        """)]),

    # "Note that host-networked pods are not included in subject selection."
    "host-network pods are never subjects": dict(
        admin=[anp("deny-in-x", 10, ns_subject(X), ingress=[arule(DENY, [a_namespaces()])])],
        expect=[Expect("""
            -    x/h x/a
            y/a  .   X
        """)]),

    # fail closed: a rule that could not be understood is a Deny of everything
    "a Deny-all rule (the form of a rule that could not be read) refuses everything": dict(
        policies=[policy("x/all", sel(), ingress=[rule()])],
        admin=[anp("broken", None, pods_subject(X, {"app": "a"}), ingress=[arule(DENY)], egress=[arule(DENY)]),
               anp("allow", 1, ns_subject(X), ingress=[arule(ALLOW, [a_namespaces()])])],
        expect=[Expect("""
            -        x/a x/b
            x/b      X   .
            y/a      X   .
            ext      X   .
            node:n2  X   .
        """), Expect("""
            -    x/b node:n1 ext
            x/a  X   X       X
        """)]),
}


@each_dataplane
@pytest.mark.parametrize("name", list(CASES))
def test_semantics(name, dataplane):
    case = CASES[name]
    n = net(case.get("policies", ()), case.get("admin", ()), case.get("baseline"), dataplane)
    problems = [m for e in case["expect"] for m in mismatches(n, e)]
    assert not problems, "\n".join(problems)


@each_dataplane
def test_replies_of_connections_pass_whatever_the_tiers_say(dataplane):
    n = net(admin=[anp("deny", 1, ns_subject(X), ingress=[arule(DENY, [a_namespaces()])])],
            dataplane=dataplane)
    assert not n.connect("y/a", "x/a")
    assert n.connect("y/a", "x/a", state="ESTABLISHED")


def test_a_pass_gets_a_tier_chain_only_when_the_tier_holds_something():
    with_np = net([policy("x/deny", sel({"app": "a"}), types=[INGRESS])],
                  [anp("pass", 1, ns_subject(X), ingress=[arule(PASS, [a_namespaces({"team": "b"})])])])
    chains = with_np.state("n1").v4.chain_map()
    x_a = next(p for p in PODS if p.key == "x/a")
    assert np_tier_chain_name(x_a, INGRESS) in chains
    assert chains[pod_chain_name(x_a, INGRESS)].rules[0].args[-2:] == ("-g", np_tier_chain_name(x_a, INGRESS))
    # nothing below the admin tier: a Pass allows, and a chain of returns is no chain at all
    alone = net(admin=[anp("pass", 1, ns_subject(X), ingress=[arule(PASS, [a_namespaces({"team": "b"})])])])
    assert not any(name.startswith(("KPM-I-", "KPM-IN-")) for name in alone.state("n1").v4.chain_map())


def test_pods_selected_by_the_same_admin_policies_share_its_peer_sets():
    c = with_admin(cluster(NAMESPACES, PODS), [anp("deny", 1, ns_subject(X),
                                                   ingress=[arule(DENY, [a_namespaces({"team": "b"})])])])
    state = compile_node(c, "n1")
    sets = {s.name: s for s in state.sets if s.family == 4}
    (peer_set,) = sets.values()
    assert peer_set.members == {"10.1.0.12", "10.2.0.12"}      # y/a, y/b
    ingress_chains = [ch for ch in state.v4.chains if ch.name.startswith("KPM-I-")]
    assert len(ingress_chains) == 2                           # x/a and x/c on n1; not x/h
    assert all(peer_set.name in ch.rules[0].args for ch in ingress_chains)


# --------------------------------------------------------------------------
# explain evaluates the tiers on its own and must say what the rules do

def _cells(expect: Expect):
    lines = [ln.split() for ln in expect.table.strip().splitlines()]
    for row in lines[1:]:
        for dst in lines[0][1:]:
            if row[0] != dst:
                yield row[0], dst


def _name(n: Net, end: str, family: int) -> str:
    return n.ends[end].ip(family) if end.startswith(("node:", "ext")) else end


@each_dataplane
@pytest.mark.parametrize("name", list(CASES))
def test_explain_agrees_with_the_compiled_rules(name, dataplane):
    case = CASES[name]
    n = net(case.get("policies", ()), case.get("admin", ()), case.get("baseline"), dataplane)
    differ = []
    for e in case["expect"]:
        for src, dst in _cells(e):
            said = explain(n.cluster, _name(n, src, e.family), _name(n, dst, e.family), e.port,
                           e.proto.upper(), e.family, NODE_IPS).allowed
            if said != n.connect(src, dst, e.port, e.proto, e.family):
                differ.append(f"{src} -> {dst} {e.port}/{e.proto}: explain says {said}")
    assert not differ, "\n".join(differ)


def test_explain_names_the_deciding_tier_and_rule():
    case = CASES["Pass skips lower ANPs and hands the decision to NetworkPolicy"]
    c = net(case["policies"], case["admin"]).cluster
    denied = explain(c, "x/c", "x/a", 80)
    assert (denied.ingress.tier, denied.ingress.decided_by) == (
        "AdminNetworkPolicy", "ANP deny-all ingress rule 0: Deny")
    assert denied.ingress.admin_policies == ("ANP pass-team-b", "ANP deny-all")
    passed = explain(c, "y/a", "x/a", 80)
    assert passed.allowed and passed.ingress.tier == "NetworkPolicy"
    assert passed.ingress.passed_by == "ANP pass-team-b ingress rule 0: Pass"
    text = render(denied)
    assert "  ingress of x/a: refuses: ANP deny-all ingress rule 0: Deny\n" in text
    assert "    admin policies: ANP pass-team-b, ANP deny-all\n" in text
    baseline = CASES["the BANP decides only where no NetworkPolicy selects the pod"]
    b = net(baseline["policies"], baseline=baseline["baseline"]).cluster
    assert explain(b, "x/b", "x/c", 80).ingress.decided_by == "BANP default ingress rule 1: Deny"


# --------------------------------------------------------------------------
# drop logging names the admin policy that refused

@each_dataplane
def test_admin_refusals_are_logged_under_the_policy_that_refused(dataplane):
    """With the policy's annotation, or --log-drops, each Deny rule logs just
    before it refuses, with a prefix naming the pod and the admin policy;
    allowed packets and refusals of other tiers are logged as before."""
    deny = anp("deny-team-b", 10, ns_subject(X), ingress=[arule(DENY, [a_namespaces({"team": "b"})])],
               log_drops=True)
    base = banp(ns_subject(X), ingress=[arule(DENY, [a_pods(X, {"app": "c"})])])
    c = with_admin(cluster(NAMESPACES, PODS, [policy("x/deny-b", sel({"app": "b"}), types=[INGRESS])]),
                   [deny], base, NODES)
    for options, banp_logged in ((CompileOptions(), False), (CompileOptions(log_drops=True), True)):
        t1 = tracer_for(node_state(dataplane, c, "n1", options=options), 4)
        assert t1.verdict("FORWARD", Packet("10.1.0.12", "10.1.0.10", "tcp", 80)) == "reject"
        assert t1.logged == [("NFLOG", "KPM DROP in x/a anp/deny-team-b ")]
        assert t1.verdict("FORWARD", Packet("10.1.0.11", "10.1.0.10", "tcp", 80)) == "reject"
        assert t1.logged == ([("NFLOG", "KPM DROP in x/a banp/default ")] if banp_logged else [])
        assert t1.verdict("FORWARD", Packet("10.2.0.10", "10.1.0.10", "tcp", 80)) == "allow"
        assert t1.logged == []
        t2 = tracer_for(node_state(dataplane, c, "n2", options=options), 4)
        assert t2.verdict("FORWARD", Packet("10.2.0.12", "10.2.0.10", "tcp", 80)) == "reject"
        assert t2.logged == [("NFLOG", "KPM DROP in x/b anp/deny-team-b ")]
        assert t2.verdict("FORWARD", Packet("10.1.0.10", "10.2.0.10", "tcp", 80)) == "reject"
        assert t2.logged == ([("NFLOG", "KPM DROP in x/b ")] if banp_logged else [])


def test_dry_run_shows_the_admin_rules_in_the_pods_chains():
    case = CASES["Pass skips lower ANPs and hands the decision to NetworkPolicy"]
    desired = net(case["policies"], case["admin"]).state("n1")
    text = render_diff(diff(desired, KernelState()), desired, KernelState())
    assert "ANP_pass-team-b_ingress[0]" in text and "ANP_deny-all_ingress[0]" in text
    x_a = next(p for p in PODS if p.key == "x/a")
    assert np_tier_chain_name(x_a, INGRESS) in text
