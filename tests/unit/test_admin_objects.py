"""lib.objects for the admin tiers: AdminNetworkPolicy, BaselineAdminNetworkPolicy
and Node objects -> model, validated as the policy.networking.k8s.io/v1alpha1
schema and its CEL rules would, and the fail-closed forms of what is not valid.

The tables follow the API reference rule by rule: for each, an object that
meets it (and what it means) and one that breaks it (the Problem, and the
Deny of all traffic that takes its place)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lib import objects
from lib.model import (
    ADMIN, ALLOW, BASELINE, DENY, EVERYTHING, PASS, SCTP, TCP, UDP, AdminPeer, AdminPolicy,
    AdminRule, AdminSubject, LabelSelector, Node, PolicyPort, Requirement,
)
from lib.objects import (ParseMemo, parse_admin_policy, parse_baseline_policy, parse_cluster,
                         parse_node)

FIXTURES = Path(__file__).parent / "fixtures" / "objects"
ALL_PODS = AdminSubject(EVERYTHING, EVERYTHING)
DENY_ALL = AdminRule(DENY)


def items(name: str) -> list:
    return json.loads((FIXTURES / f"{name}.json").read_text())["items"]


def sel(**labels) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def admin_object(spec, name="a", kind=ADMIN, with_spec=True, **meta) -> dict:
    obj = {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": kind,
           "metadata": {"name": name, "resourceVersion": "7", "uid": f"uid-{name}", **meta}}
    if with_spec:
        obj["spec"] = spec
    return obj


def parse(kind, spec, name=None, **kw) -> tuple[AdminPolicy, list[str]]:
    """A policy that must come out, and its problems as text."""
    name = name or ("a" if kind == ADMIN else "default")
    parser = parse_admin_policy if kind == ADMIN else parse_baseline_policy
    policy, problems = parser(admin_object(spec, name, kind, **kw))
    assert policy is not None, problems
    return policy, [str(p) for p in problems]


def spec_with(kind, direction, rules, **extra) -> dict:
    spec = {"subject": {"namespaces": {}}, direction: rules, **extra}
    if kind == ADMIN:
        spec.setdefault("priority", 10)
    return spec


def one_rule(kind, direction, rule) -> tuple[AdminRule, list[str]]:
    policy, problems = parse(kind, spec_with(kind, direction, [rule]))
    rules = policy.ingress if direction == "ingress" else policy.egress
    assert len(rules) == 1
    return rules[0], problems


def peer_of(selector_field: str, value) -> dict:
    return {selector_field: value}


ANY_NS = {"namespaces": {}}
ANY_NS_PEER = AdminPeer(namespace_selector=EVERYTHING, pod_selector=EVERYTHING)


def ingress(action="Allow", peers=(ANY_NS,), **fields) -> dict:
    return {"action": action, "from": list(peers), **fields}


def egress(action="Allow", peers=(ANY_NS,), **fields) -> dict:
    return {"action": action, "to": list(peers), **fields}


def allowed(peers=(ANY_NS_PEER,), ports=None, action=ALLOW, name="") -> AdminRule:
    return AdminRule(action, tuple(peers), ports, name, 0)


# --- the fixtures, end to end ------------------------------------------------------

def test_fixture_admin_policies_parse_completely():
    cluster = parse_cluster([], [], [], admin_policies=items("adminnetworkpolicies"),
                            baseline_policies=items("baselineadminnetworkpolicies"),
                            nodes=items("nodes"))
    assert cluster.problems == ()
    control, partner = cluster.admin_policies
    assert control == AdminPolicy(
        ADMIN, "cluster-control", AdminSubject(sel(**{"kubernetes.io/metadata.name": "x"})),
        priority=10, log_drops=True,
        ingress=(
            AdminRule(ALLOW, (AdminPeer(sel(**{"kubernetes.io/metadata.name": "monitoring"}),
                                        EVERYTHING),),
                      (PolicyPort(TCP, 9153),), "allow-monitoring", 0),
            AdminRule(PASS, (AdminPeer(LabelSelector(match_expressions=(
                Requirement("team", "In", ("a", "b")),)), sel(app="client")),),
                None, "pass-same-team", 1),
            AdminRule(DENY, (ANY_NS_PEER,), None, "deny-the-rest", 2)),
        egress=(
            AdminRule(ALLOW, (AdminPeer(sel(**{"kubernetes.io/metadata.name": "kube-system"}),
                                        sel(**{"k8s-app": "kube-dns"})),),
                      (PolicyPort(UDP, 53), PolicyPort(None, "dns-tcp")), "allow-dns", 0),
            AdminRule(ALLOW, (AdminPeer(node_selector=LabelSelector(match_expressions=(
                Requirement("node-role.kubernetes.io/control-plane", "Exists"),))),),
                (PolicyPort(TCP, 6443),), "allow-api-server", 1),
            AdminRule(DENY, (AdminPeer(networks=("0.0.0.0/0", "::/0")),),
                      (PolicyPort(TCP, 32000, 32768),), "deny-outside", 2)))
    assert partner == AdminPolicy(
        ADMIN, "web-partner", AdminSubject(EVERYTHING, sel(app="web")), priority=50,
        egress=(AdminRule(ALLOW, (AdminPeer(networks=("203.0.113.0/24", "2001:db8::/32")),),
                          None, "allow-partner", 0),))
    assert cluster.baseline.kind == BASELINE and cluster.baseline.priority is None
    assert cluster.baseline.subject == AdminSubject(LabelSelector(match_expressions=(
        Requirement("kubernetes.io/metadata.name", "NotIn", ("kube-system",)),)))
    assert [(r.action, r.name) for r in cluster.baseline.egress] == [
        (ALLOW, "allow-internal"), (DENY, "default-deny")]
    assert cluster.baseline.key == "BANP default" and control.key == "ANP cluster-control"
    assert [n.name for n in cluster.nodes] == ["node-1", "node-2"]
    assert cluster.nodes[0].ips == ("172.18.0.1", "fd00:172:18::1")
    assert ("node-role.kubernetes.io/control-plane", "") in cluster.nodes[0].labels


def test_without_admin_kinds_the_cluster_has_no_admin_tier():
    cluster = parse_cluster([], [], [])
    assert (cluster.admin_policies, cluster.baseline, cluster.nodes) == ((), None, ())


# --- rules: each rule of the reference, met and broken ---------------------------------

LONG_NAME = "r" * 100
PODS_PEER = {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                      "podSelector": {"matchLabels": {"app": "db"}}}}
CIDRS_25 = [f"10.0.{i}.0/24" for i in range(25)]

# (what the reference requires, kind, direction, a rule that meets it, what it
#  parses to, a rule that breaks it, the problem: field and message)
RULES = [
    ("action is one of Allow, Deny, Pass", ADMIN, "ingress",
     ingress("Pass"), allowed(action=PASS),
     ingress("Reject"),
     'spec.ingress[0].action: unsupported value "Reject": supported values: "Allow", "Deny", "Pass"'),
    ("action is required", ADMIN, "egress",
     egress("Deny"), allowed(action=DENY),
     {"to": [ANY_NS]}, "spec.egress[0].action: required"),
    ("a baseline rule's action is Allow or Deny", BASELINE, "ingress",
     ingress("Deny"), allowed(action=DENY),
     ingress("Pass"),
     'spec.ingress[0].action: unsupported value "Pass": supported values: "Allow", "Deny"'),
    ("a rule's name is at most 100 characters", ADMIN, "ingress",
     ingress(name=LONG_NAME), allowed(name=LONG_NAME),
     ingress(name=LONG_NAME + "x"),
     "spec.ingress[0].name: must be no more than 100 characters, got 101"),
    ("a rule's name is a string", ADMIN, "ingress",
     ingress(name="web"), allowed(name="web"),
     ingress(name=7), "spec.ingress[0].name: must be a string, got 7"),
    ("from is required", ADMIN, "ingress",
     ingress(), allowed(),
     {"action": "Allow"}, "spec.ingress[0].from: required"),
    ("from has at least one item", ADMIN, "ingress",
     ingress(peers=[ANY_NS]), allowed(),
     ingress(peers=[]), "spec.ingress[0].from: must have at least 1 item"),
    ("from has at most 100 items", ADMIN, "ingress",
     ingress(peers=[ANY_NS] * 100), allowed(peers=[ANY_NS_PEER] * 100),
     ingress(peers=[ANY_NS] * 101), "spec.ingress[0].from: must have at most 100 items, got 101"),
    ("to has at least one item", ADMIN, "egress",
     egress(), allowed(),
     egress(peers=[]), "spec.egress[0].to: must have at least 1 item"),
    ("a peer sets exactly one field (none set: an unknown option, fail closed)", ADMIN, "ingress",
     ingress(peers=[PODS_PEER]), allowed(peers=[AdminPeer(sel(team="a"), sel(app="db"))]),
     ingress(peers=[{}]), "spec.ingress[0].from[0]: must specify exactly one of namespaces, pods"),
    ("a peer sets exactly one field (not two)", ADMIN, "egress",
     egress(peers=[{"nodes": {}}]), allowed(peers=[AdminPeer(node_selector=EVERYTHING)]),
     egress(peers=[{"namespaces": {}, "nodes": {}}]),
     "spec.egress[0].to[0]: must specify exactly one of namespaces, pods, nodes, networks, "
     "got namespaces and nodes"),
    ("an ingress peer is namespaces or pods: nodes are for egress", ADMIN, "ingress",
     ingress(peers=[ANY_NS]), allowed(),
     ingress(peers=[{"nodes": {}}]),
     "spec.ingress[0].from[0].nodes: not allowed in ingress rules: nodes and networks peers are "
     "for egress only"),
    ("an ingress peer is namespaces or pods: networks are for egress", BASELINE, "ingress",
     ingress(action="Deny"), allowed(action=DENY),
     ingress(action="Deny", peers=[{"networks": ["10.0.0.0/8"]}]),
     "spec.ingress[0].from[0].networks: not allowed in ingress rules: nodes and networks peers "
     "are for egress only"),
    ("a peer kind this API version does not define is unknown", ADMIN, "egress",
     egress(peers=[{"networks": ["10.0.0.0/8"]}]), allowed(peers=[AdminPeer(networks=("10.0.0.0/8",))]),
     egress(peers=[{"domainNames": ["example.com"]}]), "spec.egress[0].to[0].domainNames: unknown field"),
    ("pods has a namespaceSelector and a podSelector", ADMIN, "egress",
     egress(peers=[PODS_PEER]), allowed(peers=[AdminPeer(sel(team="a"), sel(app="db"))]),
     egress(peers=[{"pods": {"namespaceSelector": {}}}]), "spec.egress[0].to[0].pods.podSelector: required"),
    ("a selector's operator is In, NotIn, Exists or DoesNotExist", ADMIN, "ingress",
     ingress(peers=[{"namespaces": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}]),
     allowed(peers=[AdminPeer(LabelSelector(match_expressions=(Requirement("team", "Exists"),)),
                              EVERYTHING)]),
     ingress(peers=[{"namespaces": {"matchExpressions": [{"key": "team", "operator": "Has"}]}}]),
     'spec.ingress[0].from[0].namespaces.matchExpressions[0].operator: unsupported value "Has": '
     'supported values: "In", "NotIn", "Exists", "DoesNotExist"'),
    ("a nodes peer is a label selector", ADMIN, "egress",
     egress(peers=[{"nodes": {"matchLabels": {"zone": "a"}}}]),
     allowed(peers=[AdminPeer(node_selector=sel(zone="a"))]),
     egress(peers=[{"nodes": {"matchLabels": {"zone": 1}}}]),
     "spec.egress[0].to[0].nodes.matchLabels.zone: label value must be a string, got 1"),
    ("networks has at least one CIDR", ADMIN, "egress",
     egress(peers=[{"networks": ["fd00::/8"]}]), allowed(peers=[AdminPeer(networks=("fd00::/8",))]),
     egress(peers=[{"networks": []}]), "spec.egress[0].to[0].networks: must have at least 1 item"),
    ("networks has at most 25 CIDRs", ADMIN, "egress",
     egress(peers=[{"networks": CIDRS_25}]), allowed(peers=[AdminPeer(networks=tuple(CIDRS_25))]),
     egress(peers=[{"networks": CIDRS_25 + ["10.1.0.0/16"]}]),
     "spec.egress[0].to[0].networks: must have at most 25 items, got 26"),
    ("networks is a set: no value twice", ADMIN, "egress",
     egress(peers=[{"networks": ["10.0.0.0/8", "10.0.0.1/8"]}]),
     allowed(peers=[AdminPeer(networks=("10.0.0.0/8",))]),
     egress(peers=[{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}]),
     'spec.egress[0].to[0].networks[1]: duplicate value "10.0.0.0/8"'),
    ("a network is a CIDR", ADMIN, "egress",
     egress(peers=[{"networks": ["192.0.2.7/32"]}]), allowed(peers=[AdminPeer(networks=("192.0.2.7/32",))]),
     egress(peers=[{"networks": ["192.0.2.7"]}]), 'spec.egress[0].to[0].networks[0]: invalid CIDR "192.0.2.7"'),
    ("a network is IPv4 or IPv6, not an IPv4-mapped IPv6 address", ADMIN, "egress",
     egress(peers=[{"networks": ["::/0"]}]), allowed(peers=[AdminPeer(networks=("::/0",))]),
     egress(peers=[{"networks": ["::ffff:10.0.0.0/104"]}]),
     'spec.egress[0].to[0].networks[0]: invalid CIDR "::ffff:10.0.0.0/104": IPv4-mapped IPv6 '
     "addresses are not allowed"),
    ("a network is at most 43 characters", ADMIN, "egress",
     egress(peers=[{"networks": ["2001:db8:0:0:0:0:0:0/32"]}]),
     allowed(peers=[AdminPeer(networks=("2001:db8::/32",))]),
     egress(peers=[{"networks": ["2001:0db8:0000:0000:0000:0000:0000:0000/0032"]}]),
     "spec.egress[0].to[0].networks[0]: must be no more than 43 characters, got 44"),
    ("networks and nodes peers cannot be set with a namedPort", ADMIN, "egress",
     egress(peers=[PODS_PEER], ports=[{"namedPort": "http"}]),
     allowed(peers=[AdminPeer(sel(team="a"), sel(app="db"))], ports=(PolicyPort(None, "http"),)),
     egress(peers=[PODS_PEER, {"nodes": {}}], ports=[{"namedPort": "http"}]),
     "spec.egress[0]: a namedPort may not be used with nodes or networks peers: nodes and "
     "networks have no named ports"),
    ("ports, when set, has at least one item", ADMIN, "ingress",
     ingress(ports=[{"portNumber": {"port": 80}}]), allowed(ports=(PolicyPort(TCP, 80),)),
     ingress(ports=[]), "spec.ingress[0].ports: must have at least 1 item"),
    ("ports has at most 100 items", ADMIN, "egress",
     egress(ports=[{"portNumber": {"port": 80}}] * 100), allowed(ports=(PolicyPort(TCP, 80),) * 100),
     egress(ports=[{"portNumber": {"port": 80}}] * 101),
     "spec.egress[0].ports: must have at most 100 items, got 101"),
    ("a port sets exactly one of portNumber, namedPort, portRange", ADMIN, "ingress",
     ingress(ports=[{"namedPort": "metrics"}]), allowed(ports=(PolicyPort(None, "metrics"),)),
     ingress(ports=[{"namedPort": "metrics", "portNumber": {"port": 80}}]),
     "spec.ingress[0].ports[0]: must specify exactly one of portNumber, namedPort, portRange, "
     "got portNumber and namedPort"),
    ("a port sets at least one field", ADMIN, "ingress",
     ingress(ports=[{"portRange": {"start": 80, "end": 81}}]), allowed(ports=(PolicyPort(TCP, 80, 81),)),
     ingress(ports=[{}]),
     "spec.ingress[0].ports[0]: must specify exactly one of portNumber, namedPort, portRange"),
    ("portNumber.port is 1-65535", ADMIN, "ingress",
     ingress(ports=[{"portNumber": {"port": 65535, "protocol": "UDP"}}]),
     allowed(ports=(PolicyPort(UDP, 65535),)),
     ingress(ports=[{"portNumber": {"port": 0}}]),
     "spec.ingress[0].ports[0].portNumber.port: must be an integer between 1 and 65535, got 0"),
    ("portNumber.port is required", ADMIN, "egress",
     egress(ports=[{"portNumber": {"port": 1}}]), allowed(ports=(PolicyPort(TCP, 1),)),
     egress(ports=[{"portNumber": {"protocol": "TCP"}}]),
     "spec.egress[0].ports[0].portNumber.port: required"),
    ("protocol is TCP, UDP or SCTP (TCP when not given)", ADMIN, "egress",
     egress(ports=[{"portNumber": {"port": 9, "protocol": "SCTP"}}]),
     allowed(ports=(PolicyPort(SCTP, 9),)),
     egress(ports=[{"portNumber": {"port": 9, "protocol": "ICMP"}}]),
     'spec.egress[0].ports[0].portNumber.protocol: unsupported value "ICMP": supported values: '
     '"TCP", "UDP", "SCTP"'),
    ("portRange has start and end, 1-65535", ADMIN, "ingress",
     ingress(ports=[{"portRange": {"protocol": "UDP", "start": 1, "end": 65535}}]),
     allowed(ports=(PolicyPort(UDP, 1, 65535),)),
     ingress(ports=[{"portRange": {"start": 1}}]), "spec.ingress[0].ports[0].portRange.end: required"),
    ("portRange end is not below start", BASELINE, "egress",
     egress(ports=[{"portRange": {"start": 8080, "end": 8080}}]),
     allowed(ports=(PolicyPort(TCP, 8080, 8080),)),
     egress(ports=[{"portRange": {"start": 8080, "end": 8000}}]),
     "spec.egress[0].ports[0].portRange.end: must be >= start (8080)"),
    ("namedPort names a container port (an IANA service name)", ADMIN, "ingress",
     ingress(ports=[{"namedPort": "http-alt"}]), allowed(ports=(PolicyPort(None, "http-alt"),)),
     ingress(ports=[{"namedPort": "HTTP"}]),
     'spec.ingress[0].ports[0].namedPort: invalid port name "HTTP": must contain only lowercase '
     "letters (a-z), digits (0-9) and '-'; must contain at least one letter (a-z) (no container "
     "port can have it)"),
    ("a rule has only name, action, from/to and ports", ADMIN, "egress",
     egress(name="x"), allowed(name="x"),
     egress(name="x", tos=[ANY_NS]), "spec.egress[0].tos: unknown field"),
    ("an ingress rule has from, not to", ADMIN, "ingress",
     ingress(), allowed(),
     {"action": "Allow", "from": [ANY_NS], "to": [ANY_NS]}, "spec.ingress[0].to: unknown field"),
]


@pytest.mark.parametrize("requirement, kind, direction, good, meaning, bad, problem", RULES,
                         ids=[case[0] for case in RULES])
def test_a_rule_that_meets_the_reference_parses_and_one_that_breaks_it_denies_all(
        requirement, kind, direction, good, meaning, bad, problem):
    rule, problems = one_rule(kind, direction, good)
    assert problems == []
    assert rule == meaning

    rule, problems = one_rule(kind, direction, bad)
    name = bad.get("name") if isinstance(bad.get("name"), str) else ""
    assert rule == AdminRule(DENY, name=name, index=0)
    label = "a" if kind == ADMIN else "default"
    assert problems == [f"{kind} {label}: {problem} (rule denies all traffic)"]


def test_a_broken_rule_denies_all_at_its_own_place_between_the_others():
    policy, problems = parse(ADMIN, spec_with(ADMIN, "egress", [
        egress("Allow", name="first"), egress("Allow", name="broken", peers=[{}]),
        egress("Pass", name="last")]))
    assert [(r.action, r.name, r.index, r.peers) for r in policy.egress] == [
        (ALLOW, "first", 0, (ANY_NS_PEER,)), (DENY, "broken", 1, None), (PASS, "last", 2, (ANY_NS_PEER,))]
    assert problems == ["AdminNetworkPolicy a: spec.egress[1].to[0]: must specify exactly one of "
                        "namespaces, pods, nodes, networks (rule denies all traffic)"]


def test_every_defect_of_a_rule_is_reported():
    rule, problems = one_rule(ADMIN, "ingress", {"action": "Drop", "from": [{"pods": {}}],
                                                 "ports": [{"portNumber": {"port": "80"}}]})
    assert rule == AdminRule(DENY)
    assert problems == [
        'AdminNetworkPolicy a: spec.ingress[0].action: unsupported value "Drop": supported values: '
        '"Allow", "Deny", "Pass" (rule denies all traffic)',
        "AdminNetworkPolicy a: spec.ingress[0].from[0].pods.namespaceSelector: required "
        "(rule denies all traffic)",
        "AdminNetworkPolicy a: spec.ingress[0].from[0].pods.podSelector: required "
        "(rule denies all traffic)",
        'AdminNetworkPolicy a: spec.ingress[0].ports[0].portNumber.port: must be an integer '
        'between 1 and 65535, got "80" (rule denies all traffic)',
    ]


@pytest.mark.parametrize("rule, problem", [
    ("allow everything", 'spec.egress[0]: must be an object, got "allow everything"'),
    (None, "spec.egress[0]: must be an object, got null"),
])
def test_a_rule_that_is_not_an_object_denies_all(rule, problem):
    got, problems = one_rule(ADMIN, "egress", rule)
    assert got == DENY_ALL
    assert problems == [f"AdminNetworkPolicy a: {problem} (rule denies all traffic)"]


def test_networks_are_normalised_sorted_and_deduplicated():
    rule, problems = one_rule(ADMIN, "egress", egress(peers=[{"networks": [
        "fd00::1/8", "10.1.2.3/16", "10.1.0.0/16", "0.0.0.0/0"]}]))
    assert problems == []
    assert rule.peers == (AdminPeer(networks=("0.0.0.0/0", "10.1.0.0/16", "fd00::/8")),)


# --- the policy: priority, subject, spec --------------------------------------------

def test_priority_is_0_to_1000():
    for priority in (0, 1000):
        policy, problems = parse(ADMIN, spec_with(ADMIN, "ingress", [ingress()], priority=priority))
        assert problems == [] and policy.priority == priority
        assert policy.ingress == (allowed(),)


@pytest.mark.parametrize("priority, problem", [
    (-1, "must be between 0 and 1000, got -1"),
    (1001, "must be between 0 and 1000, got 1001"),
    ("10", 'must be an integer, got "10"'),
    (10.5, "must be an integer, got 10.5"),
    (True, "must be an integer, got true"),
    (None, "required"),
])
def test_a_policy_without_a_valid_priority_goes_first_and_denies_all(priority, problem):
    spec = {"priority": priority, "subject": {"namespaces": {}},
            "ingress": [ingress(name="in")], "egress": [egress("Pass", name="out")]}
    policy, problems = parse(ADMIN, spec)
    assert policy.priority is None
    assert policy.ingress == (AdminRule(DENY, name="in"),)
    assert policy.egress == (AdminRule(DENY, name="out"),)
    assert problems == [f"AdminNetworkPolicy a: spec.priority: {problem} "
                        "(policy denies all traffic of its subject)"]


def test_subject_namespaces_and_pods():
    policy, problems = parse(ADMIN, spec_with(ADMIN, "ingress", [ingress()],
                                              subject={"namespaces": {"matchLabels": {"t": "a"}}}))
    assert problems == [] and policy.subject == AdminSubject(sel(t="a"), EVERYTHING)
    policy, problems = parse(ADMIN, spec_with(ADMIN, "ingress", [ingress()], subject={
        "pods": {"namespaceSelector": {"matchLabels": {"t": "a"}},
                 "podSelector": {"matchLabels": {"app": "web"}}}}))
    assert problems == [] and policy.subject == AdminSubject(sel(t="a"), sel(app="web"))
    assert policy.ingress == (allowed(),)


EVERY_POD = "(policy applied to every pod, every rule denies all traffic)"


@pytest.mark.parametrize("subject, problem", [
    (None, "spec.subject: required"),
    ({}, "spec.subject: must specify exactly one of namespaces, pods"),
    ({"namespaces": {}, "pods": {"namespaceSelector": {}, "podSelector": {}}},
     "spec.subject: must specify exactly one of namespaces, pods, got namespaces and pods"),
    ("everyone", 'spec.subject: must be an object, got "everyone"'),
    ({"namespaces": {"matchLabels": []}},
     "spec.subject.namespaces.matchLabels: must be a map of strings to strings, got a list"),
    ({"pods": {"podSelector": {}}}, "spec.subject.pods.namespaceSelector: required"),
    ({"pods": {"namespaceSelector": {}, "podSelector": {}, "nodeSelector": {}}},
     "spec.subject.pods.nodeSelector: unknown field"),
    ({"namespaces": {}, "nodes": {}}, "spec.subject.nodes: unknown field"),
])
def test_a_subject_not_understood_selects_every_pod_and_every_rule_denies_all(subject, problem):
    spec = {"priority": 5, "ingress": [ingress(name="in")], "egress": [egress(name="out")]}
    if subject is not None:
        spec["subject"] = subject
    policy, problems = parse(ADMIN, spec)
    assert policy.subject == ALL_PODS and policy.priority == 5
    assert policy.ingress == (AdminRule(DENY, name="in"),)
    assert policy.egress == (AdminRule(DENY, name="out"),)
    assert problems == [f"AdminNetworkPolicy a: {problem} {EVERY_POD}"]


@pytest.mark.parametrize("pods, problem", [
    ({}, "spec.subject.pods.podSelector: required"),
    ({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
     "spec.subject.pods.podSelector.matchExpressions[0].values: must be non-empty when operator is In"),
])
def test_a_subject_with_only_its_pod_selector_at_fault_keeps_its_namespaces(pods, problem):
    spec = {"priority": 5, "subject": {"pods": {"namespaceSelector": {"matchLabels": {"t": "a"}},
                                                **pods}},
            "ingress": [ingress(name="in")]}
    policy, problems = parse(ADMIN, spec)
    assert policy.subject == AdminSubject(sel(t="a"), EVERYTHING)
    assert policy.ingress == (AdminRule(DENY, name="in"),)
    assert problems == [f"AdminNetworkPolicy a: {problem} (policy applied to every pod of the "
                        "namespaces it selects, every rule denies all traffic)"]


def test_an_unknown_field_in_spec_makes_every_rule_deny_all():
    spec = spec_with(ADMIN, "ingress", [ingress(name="in")], egress=[egress("Pass", name="out")],
                     tier="Admin")
    policy, problems = parse(ADMIN, spec)
    assert policy.priority == 10 and policy.subject == AdminSubject(EVERYTHING)
    assert policy.ingress == (AdminRule(DENY, name="in"),)
    assert policy.egress == (AdminRule(DENY, name="out"),)
    assert problems == ["AdminNetworkPolicy a: spec.tier: unknown field (every rule of the "
                        "policy denies all traffic)"]


def test_a_baseline_policy_has_no_priority():
    policy, problems = parse(BASELINE, spec_with(BASELINE, "ingress", [ingress()]))
    assert problems == [] and policy.priority is None and policy.ingress == (allowed(),)
    policy, problems = parse(BASELINE, spec_with(BASELINE, "ingress", [ingress()], priority=3))
    assert policy.ingress == (DENY_ALL,)
    assert problems == ["BaselineAdminNetworkPolicy default: spec.priority: unknown field "
                        "(every rule of the policy denies all traffic)"]


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_a_direction_that_is_not_a_list_is_one_rule_that_denies_all(direction):
    other = "egress" if direction == "ingress" else "ingress"
    maker = egress if other == "egress" else ingress
    spec = {"priority": 1, "subject": {"namespaces": {}}, direction: {"action": "Allow"},
            other: [maker()]}
    policy, problems = parse(ADMIN, spec)
    assert getattr(policy, direction) == (DENY_ALL,)
    assert getattr(policy, other) == (allowed(),)
    assert problems == [f"AdminNetworkPolicy a: spec.{direction}: must be a list, got an object "
                        "(this direction denies all traffic)"]


def test_a_direction_has_at_most_100_rules():
    policy, problems = parse(ADMIN, spec_with(ADMIN, "ingress", [ingress()] * 100))
    assert problems == [] and len(policy.ingress) == 100
    assert [r.index for r in policy.ingress] == list(range(100))
    policy, problems = parse(ADMIN, spec_with(ADMIN, "ingress", [ingress()] * 101))
    assert policy.ingress == (DENY_ALL,)
    assert problems == ["AdminNetworkPolicy a: spec.ingress: must have at most 100 items, got 101 "
                        "(this direction denies all traffic)"]


def test_no_rules_of_a_direction_leave_it_alone():
    policy, problems = parse(ADMIN, {"priority": 1, "subject": {"namespaces": {}}, "ingress": []})
    assert problems == [] and policy.ingress == () and policy.egress == ()


def test_a_spec_that_is_not_an_object_denies_all_traffic_of_every_pod():
    policy, problems = parse(ADMIN, "deny")
    assert policy == AdminPolicy(ADMIN, "a", ALL_PODS, None, (DENY_ALL,), (DENY_ALL,))
    assert problems == ['AdminNetworkPolicy a: spec: must be an object, got "deny" (policy '
                        'applied to every pod, denies all traffic both ways)']


def test_a_missing_spec_has_no_rule():
    policy, problems = parse(ADMIN, None, with_spec=False)
    assert policy == AdminPolicy(ADMIN, "a", ALL_PODS)
    assert problems == ["AdminNetworkPolicy a: spec: required (the policy has no rule: it "
                        "changes no verdict)"]


def test_the_log_drops_annotation():
    policy, problems = parse(ADMIN, spec_with(ADMIN, "egress", [egress()]),
                             annotations={"kube-policy-manager/log-drops": "True"})
    assert policy.log_drops and problems == []
    policy, problems = parse(BASELINE, spec_with(BASELINE, "egress", [egress()]),
                             annotations={"kube-policy-manager/log-drops": "yes"})
    assert not policy.log_drops
    assert problems == ['BaselineAdminNetworkPolicy default: metadata.annotations'
                        '["kube-policy-manager/log-drops"]: must be "true" or "false", got "yes" '
                        "(read as false)"]


@pytest.mark.parametrize("obj, problem", [
    ({"metadata": {}, "spec": {}}, "AdminNetworkPolicy <unknown>: metadata.name: required"),
    ("policy", 'AdminNetworkPolicy <unknown>: <root>: must be an object, got "policy"'),
])
def test_an_object_without_a_name_is_left_out(obj, problem):
    policy, problems = parse_admin_policy(obj)
    assert policy is None and [str(p) for p in problems] == [problem]


# --- the baseline policy ----------------------------------------------------------------

def test_a_baseline_policy_not_named_default_is_ignored():
    policy, problems = parse_baseline_policy(admin_object({"subject": {"namespaces": {}}},
                                                          name="strict", kind=BASELINE))
    assert policy is None
    assert [str(p) for p in problems] == [
        'BaselineAdminNetworkPolicy strict: metadata.name: must be "default": the API server '
        "accepts no other name for a BaselineAdminNetworkPolicy (ignored)"]


def test_the_cluster_holds_the_baseline_policy_named_default():
    deny = {"subject": {"namespaces": {}}, "ingress": [ingress("Deny")]}
    cluster = parse_cluster([], [], [], baseline_policies=[
        admin_object(deny, name="other", kind=BASELINE), admin_object(deny, name="default",
                                                                      kind=BASELINE)])
    assert cluster.baseline == AdminPolicy(BASELINE, "default", AdminSubject(EVERYTHING),
                                           ingress=(allowed(action=DENY),))
    assert [p.object for p in cluster.problems] == ["other"]


# --- the cluster: evaluation order, shared priorities ---------------------------------

def anp(name, priority, **extra):
    spec = {"subject": {"namespaces": {}}, "ingress": [ingress(name=name)], **extra}
    if priority != "missing":
        spec["priority"] = priority
    return admin_object(spec, name)


def test_admin_policies_are_in_evaluation_order_an_invalid_priority_first():
    cluster = parse_cluster([], [], [], admin_policies=[
        anp("c", 20), anp("b", 5), anp("z", "missing"), anp("a", 1000), anp("y", -3)])
    assert [(p.name, p.priority) for p in cluster.admin_policies] == [
        ("y", None), ("z", None), ("b", 5), ("c", 20), ("a", 1000)]
    assert [p.ingress[0].action for p in cluster.admin_policies] == [DENY, DENY, ALLOW, ALLOW, ALLOW]
    assert all(p.field == "spec.priority" for p in cluster.problems)


def test_equal_priorities_are_kept_in_name_order_and_each_says_so():
    cluster = parse_cluster([], [], [], admin_policies=[anp("b", 10), anp("a", 10), anp("c", 11)])
    assert [p.name for p in cluster.admin_policies] == ["a", "b", "c"]
    assert [str(p) for p in cluster.problems] == [
        "AdminNetworkPolicy a: spec.priority: 10 is also the priority of b; a is evaluated first "
        "(by name)",
        "AdminNetworkPolicy b: spec.priority: 10 is also the priority of a; a is evaluated first "
        "(by name)",
    ]


def test_three_policies_of_one_priority_name_their_order():
    cluster = parse_cluster([], [], [], admin_policies=[anp(n, 7) for n in "cab"])
    assert [str(p) for p in cluster.problems][1] == (
        "AdminNetworkPolicy b: spec.priority: 7 is also the priority of a, c; they are evaluated "
        "in name order: a, b, c")
    assert len(cluster.problems) == 3


def test_a_second_policy_of_the_same_name_is_ignored():
    cluster = parse_cluster([], [], [], admin_policies=[anp("a", 1), anp("a", 2)])
    assert [p.priority for p in cluster.admin_policies] == [1]
    assert [str(p) for p in cluster.problems] == [
        "AdminNetworkPolicy a: metadata.name: duplicate object (adminnetworkpolicies[1]) ignored"]


# --- nodes --------------------------------------------------------------------------------

def node_object(addresses, labels=None, name="node-1", **status) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}, "resourceVersion": "9",
                         "uid": "uid-node"},
            "status": {"addresses": addresses, **status}}


def test_a_node_keeps_its_labels_and_internal_and_external_addresses():
    node, problems = parse_node(node_object([
        {"type": "InternalIP", "address": "172.18.0.1"},
        {"type": "InternalIP", "address": "fd00:172:18:0::1"},
        {"type": "Hostname", "address": "node-1"},
        {"type": "InternalDNS", "address": "node-1.cluster.local"},
        {"type": "ExternalIP", "address": "203.0.113.7"},
        {"type": "ExternalIP", "address": "172.18.0.1"},
    ], labels={"zone": "a"}))
    assert problems == []
    assert node == Node("node-1", (("zone", "a"),), ("172.18.0.1", "fd00:172:18::1", "203.0.113.7"))


@pytest.mark.parametrize("entry, problem", [
    ({"type": "InternalIP", "address": "172.18.0.300"},
     'status.addresses[1].address: invalid IP address "172.18.0.300"'),
    ({"type": "ExternalIP", "address": "fe80::1%eth0"},
     'status.addresses[1].address: invalid IP address "fe80::1%eth0"'),
    ({"type": "InternalIP"}, "status.addresses[1].address: required"),
    ({"address": "10.0.0.1"}, "status.addresses[1].type: required"),
    ("10.0.0.1", 'status.addresses[1]: must be an object, got "10.0.0.1"'),
])
def test_a_bad_node_address_is_dropped_on_its_own(entry, problem):
    node, problems = parse_node(node_object([{"type": "InternalIP", "address": "172.18.0.1"}, entry]))
    assert node.ips == ("172.18.0.1",)
    assert [str(p) for p in problems] == [f"Node node-1: {problem}"]


def test_a_node_without_addresses_or_with_bad_labels():
    node, problems = parse_node({"metadata": {"name": "n", "labels": {"a": 1, "b": "x"}}})
    assert node == Node("n", (("b", "x"),), ())
    assert [str(p) for p in problems] == ["Node n: metadata.labels.a: label value must be a "
                                          "string, got 1"]
    node, problems = parse_node({"metadata": {"name": "n"}, "status": {"addresses": "10.0.0.1"}})
    assert node == Node("n") and [p.field for p in problems] == ["status.addresses"]


def test_a_node_heartbeat_keeps_its_memo_key_and_a_label_change_does_not():
    node = node_object([{"type": "InternalIP", "address": "172.18.0.1"}], labels={"zone": "a"},
                       conditions=[{"type": "Ready", "lastHeartbeatTime": "2026-11-21T10:00:00Z"}])
    beat = copy.deepcopy(node)
    beat["metadata"]["resourceVersion"] = "10"
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-11-21T10:05:00Z"
    relabelled = copy.deepcopy(beat)
    relabelled["metadata"]["labels"]["zone"] = "b"
    readdressed = copy.deepcopy(beat)
    readdressed["status"]["addresses"][0]["address"] = "172.18.0.9"
    key = ParseMemo.key("Node", node)
    assert key is not None and ParseMemo.key("Node", beat) == key
    assert ParseMemo.key("Node", relabelled) != key and ParseMemo.key("Node", readdressed) != key


# --- parse reuse ------------------------------------------------------------------------------

def test_the_memo_reuses_admin_objects_and_nodes_at_the_same_version():
    admin, baseline = items("adminnetworkpolicies"), items("baselineadminnetworkpolicies")
    nodes = items("nodes")
    memo = ParseMemo()
    first = parse_cluster([], [], [], memo, admin_policies=admin, baseline_policies=baseline,
                          nodes=nodes)
    again = parse_cluster([], [], [], memo, admin_policies=admin, baseline_policies=baseline,
                          nodes=nodes)
    assert memo.hits == len(admin) + len(baseline) + len(nodes) == 5
    assert again == first and again.admin_policies == first.admin_policies
    changed = copy.deepcopy(admin)
    changed[1]["metadata"]["resourceVersion"] = "7200"
    changed[1]["spec"]["priority"] = 5
    third = parse_cluster([], [], [], memo, admin_policies=changed, baseline_policies=baseline,
                          nodes=nodes)
    assert memo.hits == 4
    assert [p.name for p in third.admin_policies] == ["web-partner", "cluster-control"]


def test_the_same_name_in_two_admin_kinds_is_two_objects():
    assert ParseMemo.key(ADMIN, anp("default", 1)) != ParseMemo.key(BASELINE, anp("default", 1))
    assert ParseMemo.key(ADMIN, anp("a", 1)) == (ADMIN, "", "a", "uid-a", "7")
