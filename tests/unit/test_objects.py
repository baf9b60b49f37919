"""lib.objects: API JSON -> model, validation, fail-closed handling."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib import objects
from lib.model import (
    EGRESS, EVERYTHING, INGRESS, SCTP, TCP, UDP, ContainerPort, IPBlock, LabelSelector,
    Namespace, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule, Problem, Requirement,
)
from lib.objects import parse_cluster, parse_namespace, parse_pod, parse_policy

FIXTURES = Path(__file__).parent / "fixtures" / "objects"
BOTH = frozenset((INGRESS, EGRESS))
ING = frozenset((INGRESS,))
EGR = frozenset((EGRESS,))


def items(name: str) -> list:
    return json.loads((FIXTURES / f"{name}.json").read_text())["items"]


def fixture_item(name: str, index: int) -> dict:
    return copy.deepcopy(items(name)[index])


def netpol(spec, name="web", namespace="x", with_spec=True) -> dict:
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "creationTimestamp": "2026-11-20T09:25:00Z",
            "generation": 1,
            "name": name,
            "namespace": namespace,
            "resourceVersion": "6500",
            "uid": "8c7b6a59-4837-4261-9504-f3e2d1c0b9a8",
        },
    }
    if with_spec:
        obj["spec"] = spec
    return obj


def parsed(spec, **kw):
    """Parse a policy that must come out (possibly with problems)."""
    pol, problems = parse_policy(netpol(spec, **kw))
    assert pol is not None, problems
    return pol, [str(p) for p in problems]


def ingress_rule(rule) -> tuple[tuple[PolicyRule, ...], list[str]]:
    """The parsed ingress of a policy holding `rule` as its single ingress rule."""
    pol, problems = parsed({"podSelector": {}, "ingress": [rule]})
    return pol.ingress, problems


def sel(**labels) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def running_pod(name="a", namespace="x", ips=("10.244.1.10",), phase="Running", **spec) -> dict:
    """A minimal pod as the API prints it, with status.podIP and podIPs."""
    status = {"phase": phase, "hostIP": "172.18.0.1"}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"pod": name},
                     "uid": "2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901"},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}],
                 "nodeName": "node-1", **spec},
        "status": status,
    }


# --- the fixtures, end to end ---------------------------------------------------

def test_fixture_cluster_parses_completely():
    cluster = parse_cluster(items("namespaces"), items("pods"), items("policies"))
    assert cluster.problems == ()
    assert cluster.namespaces == (
        Namespace("kube-system", (("kubernetes.io/metadata.name", "kube-system"),)),
        Namespace("x", (("kubernetes.io/metadata.name", "x"), ("team", "a"))),
        Namespace("y", (("kubernetes.io/metadata.name", "y"), ("team", "b"))),
    )
    # migrate-5hv2p (Succeeded) and db-0 (Pending, no IP yet) never reach the model.
    assert cluster.pods == (
        Pod("kube-system", "kube-proxy-8kz4w", "node-1", ("172.18.0.1",),
            (("controller-revision-hash", "5d7b8c9f6"), ("k8s-app", "kube-proxy"),
             ("pod-template-generation", "1")),
            host_network=True),
        Pod("x", "web-7c9f8d6b5d-q2x8z", "node-1", ("10.244.1.10", "fd00:10:244:1::10"),
            (("app", "web"), ("pod-template-hash", "7c9f8d6b5d")),
            ports=(ContainerPort(8080, TCP, "http"), ContainerPort(8443, TCP, "https"),
                   ContainerPort(53, UDP, "dns"), ContainerPort(9153, TCP, None))),
        Pod("y", "client", "node-2", ("10.244.2.11",), (("app", "client"),)),
    )
    assert cluster.policies == (
        NetworkPolicy(
            "x", "web", sel(app="web"), BOTH,
            ingress=(
                PolicyRule(
                    peers=(Peer(pod_selector=sel(app="client")),
                           Peer(namespace_selector=LabelSelector(
                               match_expressions=(Requirement("team", "In", ("a", "b")),)))),
                    ports=(PolicyPort(TCP, "http"), PolicyPort(TCP, 8443)),
                    index=0),
                PolicyRule(peers=(Peer(ip_block=IPBlock("fd00:10:244:2::/64")),), index=1),
            ),
            egress=(
                PolicyRule(
                    peers=(Peer(pod_selector=sel(**{"k8s-app": "kube-dns"}),
                                namespace_selector=sel(**{"kubernetes.io/metadata.name":
                                                          "kube-system"})),),
                    ports=(PolicyPort(UDP, 53), PolicyPort(TCP, 53)),
                    index=0),
                PolicyRule(
                    peers=(Peer(ip_block=IPBlock("10.0.0.0/8",
                                                 ("10.96.0.0/12", "10.244.0.0/16"))),),
                    ports=(PolicyPort(TCP, 32000, 32768),),
                    index=1),
            ),
        ),
        NetworkPolicy("y", "default-deny", EVERYTHING, ING),
    )


def test_cluster_output_is_sorted_whatever_the_input_order():
    ns, pods, pols = items("namespaces"), items("pods"), items("policies")
    forward = parse_cluster(ns, pods, pols)
    backward = parse_cluster(ns[::-1], pods[::-1], pols[::-1])
    assert forward == backward
    assert [p.key for p in forward.pods] == sorted(p.key for p in forward.pods)
    assert [p.key for p in forward.policies] == ["x/web", "y/default-deny"]


# --- namespaces ---------------------------------------------------------------

@pytest.mark.parametrize("labels, expected, problems", [
    ({"team": "a"}, {"team": "a", "kubernetes.io/metadata.name": "x"}, []),
    (None, {"kubernetes.io/metadata.name": "x"}, []),
    # the API server always sets it to the name
    ({"kubernetes.io/metadata.name": "other"}, {"kubernetes.io/metadata.name": "x"}, []),
    ({"a b": "c'd", "e": "$(reboot);\n"},
     {"a b": "c'd", "e": "$(reboot);\n", "kubernetes.io/metadata.name": "x"}, []),
    ({"team": "a", "n": 5, "": "v"}, {"team": "a", "kubernetes.io/metadata.name": "x"},
     ['Namespace x: metadata.labels.n: label value must be a string, got 5',
      'Namespace x: metadata.labels[""]: label key must be a non-empty string']),
    ({5: "v", "ok": "1"}, {"ok": "1", "kubernetes.io/metadata.name": "x"},
     ["Namespace x: metadata.labels[5]: label key must be a non-empty string"]),
    (["team=a"], {"kubernetes.io/metadata.name": "x"},
     ["Namespace x: metadata.labels: must be a map of strings to strings, got a list"]),
])
def test_namespace_labels(labels, expected, problems):
    obj = fixture_item("namespaces", 0)
    obj["metadata"]["labels"] = labels
    ns, got = parse_namespace(obj)
    assert ns == Namespace("x", tuple(sorted(expected.items())))
    assert ns.label_map == expected
    assert [str(p) for p in got] == problems


@pytest.mark.parametrize("obj, message", [
    ("x", 'Namespace <unknown>: <root>: must be an object, got "x"'),
    (None, "Namespace <unknown>: <root>: must be an object, got null"),
    ({"kind": "Namespace"}, "Namespace <unknown>: metadata: required"),
    ({"metadata": []}, "Namespace <unknown>: metadata: must be an object, got a list"),
    ({"metadata": {"labels": {}}}, "Namespace <unknown>: metadata.name: required"),
    ({"metadata": {"name": 7}}, "Namespace <unknown>: metadata.name: must be a string, got 7"),
])
def test_namespace_without_identity_is_a_problem(obj, message):
    ns, problems = parse_namespace(obj)
    assert ns is None
    assert [str(p) for p in problems] == [message]


# --- pods ---------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_never_contribute_an_address(phase):
    obj = running_pod(phase=phase)
    assert parse_pod(obj) == (None, [])
    obj["status"]["podIPs"] = [{"ip": "not an ip"}]      # not even a problem
    assert parse_pod(obj) == (None, [])


@pytest.mark.parametrize("status", [
    None,
    {"phase": "Pending"},
    {"phase": "Pending", "podIPs": []},
    {"phase": "Pending", "podIP": ""},
    {"phase": "Running", "podIPs": None, "podIP": None},
])
def test_pods_without_address_are_skipped_silently(status):
    obj = running_pod()
    if status is None:
        del obj["status"]
    else:
        obj["status"] = status
    assert parse_pod(obj) == (None, [])


@pytest.mark.parametrize("phase", ["Running", "Pending", "Unknown"])
def test_pods_holding_an_address_are_kept(phase):
    pod, problems = parse_pod(running_pod(phase=phase))
    assert problems == []
    assert pod == Pod("x", "a", "node-1", ("10.244.1.10",), (("pod", "a"),))


@pytest.mark.parametrize("status, ips, problems", [
    ({"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00:10:244:1::10"}]},
     ("10.244.1.10", "fd00:10:244:1::10"), []),
    ({"podIP": "fd00::a", "podIPs": [{"ip": "fd00::a"}, {"ip": "10.0.0.1"}]},
     ("fd00::a", "10.0.0.1"), []),
    # podIP only: older API servers, or a client that strips podIPs
    ({"podIP": "10.244.1.10"}, ("10.244.1.10",), []),
    ({"podIP": "10.244.1.10", "podIPs": []}, ("10.244.1.10",), []),
    # canonical text, so downstream compares with what the kernel prints
    ({"podIPs": [{"ip": "FD00:10:244:1:0:0:0:10"}]}, ("fd00:10:244:1::10",), []),
    ({"podIPs": [{"ip": "10.244.1.10"}, {"ip": "10.244.1.10"}]}, ("10.244.1.10",), []),
    ({"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00::1::2"}]},
     ("10.244.1.10",), ['Pod x/a: status.podIPs[1].ip: invalid IP address "fd00::1::2"']),
    # podIPs gives nothing usable: the primary address is still the pod's
    ({"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.300"}]},
     ("10.244.1.10",), ['Pod x/a: status.podIPs[0].ip: invalid IP address "10.244.1.300"']),
    ({"podIPs": [{"ip": "10.244.1.10"}, {"ip": 5}, "fd00::1", {}]}, ("10.244.1.10",),
     ["Pod x/a: status.podIPs[1].ip: must be a string, got 5",
      'Pod x/a: status.podIPs[2]: must be an object, got "fd00::1"',
      "Pod x/a: status.podIPs[3].ip: required"]),
    ({"podIPs": [{"ip": "fe80::1%eth0"}, {"ip": " 10.0.0.1"}, {"ip": "10.0.0.1/32"}]}, None,
     ['Pod x/a: status.podIPs[0].ip: invalid IP address "fe80::1%eth0"',
      'Pod x/a: status.podIPs[1].ip: invalid IP address " 10.0.0.1"',
      'Pod x/a: status.podIPs[2].ip: invalid IP address "10.0.0.1/32"']),
    ({"podIP": "bogus", "podIPs": [{"ip": "bogus"}]}, None,
     ['Pod x/a: status.podIPs[0].ip: invalid IP address "bogus"']),
    ({"podIP": "10.0.0.1", "podIPs": {"ip": "10.0.0.1"}}, ("10.0.0.1",),
     ["Pod x/a: status.podIPs: must be a list, got an object"]),
])
def test_pod_ips(status, ips, problems):
    obj = running_pod()
    obj["status"] = {"phase": "Running", **status}
    pod, got = parse_pod(obj)
    assert [str(p) for p in got] == problems
    if ips is None:
        assert pod is None
    else:
        assert pod.ips == ips


@pytest.mark.parametrize("ports, expected, problems", [
    ([{"containerPort": 80}], [ContainerPort(80, TCP)], []),
    ([{"containerPort": 53, "protocol": "UDP", "name": "dns"},
      {"containerPort": 3868, "protocol": "SCTP", "name": "diameter", "hostPort": 3868}],
     [ContainerPort(53, UDP, "dns"), ContainerPort(3868, SCTP, "diameter")], []),
    ([{"containerPort": 0}, {"containerPort": 81}], [ContainerPort(81)],
     ["Pod x/a: spec.containers[0].ports[0].containerPort: "
      "must be an integer between 1 and 65535, got 0"]),
    ([{"containerPort": 65536}], [],
     ["Pod x/a: spec.containers[0].ports[0].containerPort: "
      "must be an integer between 1 and 65535, got 65536"]),
    ([{"containerPort": "80"}], [],
     ['Pod x/a: spec.containers[0].ports[0].containerPort: '
      'must be an integer between 1 and 65535, got "80"']),
    ([{"name": "http"}], [],
     ["Pod x/a: spec.containers[0].ports[0].containerPort: "
      "must be an integer between 1 and 65535, got null"]),
    ([{"containerPort": True}], [],
     ["Pod x/a: spec.containers[0].ports[0].containerPort: "
      "must be an integer between 1 and 65535, got true"]),
    ([{"containerPort": 80, "protocol": "tcp"}], [],
     ['Pod x/a: spec.containers[0].ports[0].protocol: '
      'unsupported value "tcp": supported values: "TCP", "UDP", "SCTP"']),
    ([{"containerPort": 80, "name": "Http"}], [],
     ['Pod x/a: spec.containers[0].ports[0].name: invalid port name "Http": '
      "must contain only lowercase letters (a-z), digits (0-9) and '-'"]),
    ("80", [], ['Pod x/a: spec.containers[0].ports: must be a list, got "80"']),
    (["http"], [], ['Pod x/a: spec.containers[0].ports[0]: must be an object, got "http"']),
])
def test_container_ports(ports, expected, problems):
    pod, got = parse_pod(running_pod(containers=[{"name": "main", "ports": ports}]))
    assert pod is not None
    assert list(pod.ports) == expected
    assert [str(p) for p in got] == problems


def test_container_ports_of_every_container_but_not_init_containers():
    pod, problems = parse_pod(running_pod(
        containers=[{"name": "a", "ports": [{"containerPort": 80, "name": "http"}]},
                    {"name": "b"},
                    {"name": "c", "ports": [{"containerPort": 53, "protocol": "UDP"}]}],
        initContainers=[{"name": "init", "ports": [{"containerPort": 9999, "name": "init"}]}]))
    assert problems == []
    assert pod.ports == (ContainerPort(80, TCP, "http"), ContainerPort(53, UDP))


@pytest.mark.parametrize("spec, expected, problems", [
    ({"hostNetwork": True}, ("node-1", True), []),
    ({"hostNetwork": False}, ("node-1", False), []),
    ({"nodeName": None}, ("", False), []),
    ({"nodeName": 3}, ("", False), ["Pod x/a: spec.nodeName: must be a string, got 3"]),
    # neither guess is safe: as a pod it would isolate its node's address
    ({"hostNetwork": "true"}, None, ['Pod x/a: spec.hostNetwork: must be a boolean, got "true"']),
])
def test_pod_node_and_host_network(spec, expected, problems):
    pod, got = parse_pod(running_pod(**spec))
    assert [str(p) for p in got] == problems
    assert (pod and (pod.node, pod.host_network)) == expected


@pytest.mark.parametrize("change, message", [
    (lambda o: o["metadata"].pop("namespace"), "Pod <unknown>: metadata.namespace: required"),
    (lambda o: o["metadata"].pop("name"), "Pod x/<unknown>: metadata.name: required"),
    (lambda o: o.pop("spec"), "Pod x/a: spec: required"),
    (lambda o: o.update(spec=[]), "Pod x/a: spec: must be an object, got a list"),
    (lambda o: o.update(status="Running"), 'Pod x/a: status: must be an object, got "Running"'),
])
def test_unusable_pods(change, message):
    obj = running_pod()
    change(obj)
    pod, problems = parse_pod(obj)
    assert pod is None
    assert [str(p) for p in problems] == [message]


def test_pod_labels_keep_strange_values_and_drop_bad_entries():
    obj = running_pod()
    obj["metadata"]["labels"] = {"quote": "it's \"x\"", "cmd": "$(rm -rf /); echo", "nl": "a\nb",
                                 "bad": ["x"]}
    pod, problems = parse_pod(obj)
    assert pod.label_map == {"quote": "it's \"x\"", "cmd": "$(rm -rf /); echo", "nl": "a\nb"}
    assert [str(p) for p in problems] == [
        "Pod x/a: metadata.labels.bad: label value must be a string, got a list"]


# --- policies: policyTypes ------------------------------------------------------

@pytest.mark.parametrize("spec, types", [
    ({"podSelector": {}}, ING),
    ({"podSelector": {}, "policyTypes": []}, ING),
    ({"podSelector": {}, "policyTypes": None}, ING),
    ({"podSelector": {}, "egress": []}, ING),
    ({"podSelector": {}, "egress": [{}]}, BOTH),
    # a rule that does not validate still makes the policy isolate egress
    ({"podSelector": {}, "egress": [{"ports": [{"port": 0}]}]}, BOTH),
    ({"podSelector": {}, "ingress": [{}]}, ING),
    ({"podSelector": {}, "policyTypes": ["Egress"]}, EGR),
    ({"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{}]}, ING),
    ({"podSelector": {}, "policyTypes": ["Egress", "Ingress"]}, BOTH),
    ({"podSelector": {}, "policyTypes": ["Egress", "Egress"]}, EGR),
])
def test_policy_types_default_like_the_api_server(spec, types):
    pol, problems = parsed(spec)
    assert problems == [] or spec.get("egress") == [{"ports": [{"port": 0}]}]
    assert pol.policy_types == types


@pytest.mark.parametrize("policy_types, problems", [
    (["ingress"], ['NetworkPolicy x/web: spec.policyTypes[0]: unsupported value "ingress": '
                   'supported values: "Ingress", "Egress" (policy isolates both directions)']),
    (["Egress", 1], ['NetworkPolicy x/web: spec.policyTypes[1]: unsupported value 1: '
                     'supported values: "Ingress", "Egress" (policy isolates both directions)']),
    ("Ingress", ['NetworkPolicy x/web: spec.policyTypes: must be a list, got "Ingress" '
                 '(policy isolates both directions)']),
    (["Ingress", "Egress", "Ingress"],
     ["NetworkPolicy x/web: spec.policyTypes: may not specify more than two policyTypes "
      "(policy isolates both directions)"]),
])
def test_invalid_policy_types_isolate_both_directions(policy_types, problems):
    pol, got = parsed({"podSelector": {}, "policyTypes": policy_types,
                       "ingress": [{"from": [{"podSelector": {}}]}]})
    assert got == problems
    assert pol.policy_types == BOTH
    assert pol.ingress == (PolicyRule(peers=(Peer(pod_selector=EVERYTHING),)),)


# --- policies: spec-level fail-closed ------------------------------------------

def test_missing_spec_denies_all_ingress_of_the_namespace():
    pol, problems = parse_policy(netpol(None, with_spec=False))
    assert pol == NetworkPolicy("x", "web", EVERYTHING, ING)
    assert [str(p) for p in problems] == [
        "NetworkPolicy x/web: spec: required "
        "(read as {}: every pod of the namespace, all ingress denied)"]


@pytest.mark.parametrize("spec", ["podSelector: {}", ["podSelector"], 0])
def test_unreadable_spec_isolates_everything(spec):
    pol, problems = parse_policy(netpol(spec))
    assert pol == NetworkPolicy("x", "web", EVERYTHING, BOTH)
    assert len(problems) == 1 and problems[0].field == "spec"


@pytest.mark.parametrize("spec, types", [
    ({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}], "egress": [{}],
      "policyTypes": ["Ingress"]}, ING),
    ({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}, BOTH),
    ({"podSelector": {"matchLabels": {"app": "web"}}, "egress": [{}]}, BOTH),
])
def test_unknown_spec_field_keeps_isolation_and_drops_every_rule(spec, types):
    spec["allowEverything"] = True
    pol, problems = parsed(spec)
    assert pol == NetworkPolicy("x", "web", sel(app="web"), types)
    assert problems == ["NetworkPolicy x/web: spec.allowEverything: unknown field "
                        "(every rule of the policy ignored)"]


@pytest.mark.parametrize("selector, problems", [
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "Is"}]},
     ['NetworkPolicy x/web: spec.podSelector.matchExpressions[0].operator: unsupported value "Is": '
      'supported values: "In", "NotIn", "Exists", "DoesNotExist" '
      "(policy applied to every pod of the namespace, both directions)"]),
    ({"matchLabels": {"app": 1}},
     ["NetworkPolicy x/web: spec.podSelector.matchLabels.app: label value must be a string, "
      "got 1 (policy applied to every pod of the namespace, both directions)"]),
    ({"matchLabel": {"app": "web"}},
     ["NetworkPolicy x/web: spec.podSelector.matchLabel: unknown field "
      "(policy applied to every pod of the namespace, both directions)"]),
    ("app=web",
     ['NetworkPolicy x/web: spec.podSelector: must be an object (a label selector), got "app=web" '
      "(policy applied to every pod of the namespace, both directions)"]),
])
def test_invalid_pod_selector_isolates_the_whole_namespace_and_keeps_rules(selector, problems):
    pol, got = parsed({"podSelector": selector, "policyTypes": ["Ingress"],
                       "ingress": [{"ports": [{"port": 80}]}, {"ports": [{"port": 0}]}]})
    assert got[:len(problems)] == problems
    assert pol.pod_selector == EVERYTHING
    assert pol.policy_types == BOTH
    assert pol.ingress == (PolicyRule(ports=(PolicyPort(TCP, 80),), index=0),)


@pytest.mark.parametrize("spec", [{}, {"podSelector": None}, {"podSelector": {}},
                                  {"podSelector": {"matchLabels": None, "matchExpressions": []}}])
def test_absent_or_empty_pod_selector_selects_every_pod(spec):
    pol, problems = parsed(spec)
    assert problems == []
    assert pol.pod_selector == EVERYTHING


@pytest.mark.parametrize("field, types", [("ingress", ING), ("egress", BOTH)])
def test_rules_that_are_not_a_list_still_isolate(field, types):
    pol, problems = parsed({"podSelector": {}, field: {"from": []}})
    assert pol == NetworkPolicy("x", "web", EVERYTHING, types)
    assert problems == [f"NetworkPolicy x/web: spec.{field}: must be a list, got an object "
                        "(no rule of this direction applies)"]


@pytest.mark.parametrize("meta, problems", [
    ({"name": "web"}, ["NetworkPolicy <unknown>: metadata.namespace: required"]),
    ({"namespace": "x"}, ["NetworkPolicy x/<unknown>: metadata.name: required"]),
    ({"name": "", "namespace": 3}, ["NetworkPolicy <unknown>: metadata.namespace: must be a string, got 3",
                                    "NetworkPolicy <unknown>: metadata.name: required"]),
])
def test_policy_without_namespace_or_name_is_skipped(meta, problems):
    obj = netpol({"podSelector": {}})
    obj["metadata"] = meta
    pol, got = parse_policy(obj)
    assert pol is None
    assert [str(p) for p in got] == problems


@pytest.mark.parametrize("parse, kind", [
    (parse_policy, "NetworkPolicy"), (parse_pod, "Pod"), (parse_namespace, "Namespace")])
@pytest.mark.parametrize("item", [None, 7, "web", ["metadata"], 1.5, True])
def test_non_object_items_are_problems(parse, kind, item):
    value, problems = parse(item)
    assert value is None
    assert len(problems) == 1
    assert problems[0].kind == kind and problems[0].field == "<root>"
    assert problems[0].message.startswith("must be an object, got ")


# --- policies: rules and peers ---------------------------------------------------

@pytest.mark.parametrize("rule, expected", [
    ({}, PolicyRule()),
    ({"from": [], "ports": []}, PolicyRule()),
    ({"from": None, "ports": None}, PolicyRule()),
    ({"from": [{"podSelector": {}}]}, PolicyRule(peers=(Peer(pod_selector=EVERYTHING),))),
    ({"from": [{"namespaceSelector": {}}]},
     PolicyRule(peers=(Peer(namespace_selector=EVERYTHING),))),
    # both selectors in one peer: pods matching podSelector in namespaces matching the other
    ({"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}},
                "podSelector": {"matchLabels": {"pod": "a"}}}]},
     PolicyRule(peers=(Peer(pod_selector=sel(pod="a"), namespace_selector=sel(team="b")),))),
    # two peers: either
    ({"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}},
               {"podSelector": {"matchLabels": {"pod": "a"}}}]},
     PolicyRule(peers=(Peer(namespace_selector=sel(team="b")), Peer(pod_selector=sel(pod="a"))))),
    ({"from": [{"podSelector": {}, "namespaceSelector": None, "ipBlock": None}]},
     PolicyRule(peers=(Peer(pod_selector=EVERYTHING),))),
    ({"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
     PolicyRule(peers=(Peer(ip_block=IPBlock("192.0.2.0/24")),))),
])
def test_valid_peers(rule, expected):
    rules, problems = ingress_rule(rule)
    assert problems == []
    assert rules == (expected,)


def test_egress_rules_use_to():
    pol, problems = parsed({"podSelector": {}, "policyTypes": ["Egress"],
                            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                                        "ports": [{"port": 443}]}]})
    assert problems == []
    assert pol.egress == (PolicyRule(peers=(Peer(ip_block=IPBlock("0.0.0.0/0")),),
                                     ports=(PolicyPort(TCP, 443),)),)


@pytest.mark.parametrize("rule, problems", [
    ({"from": [{}]},
     ["spec.ingress[0].from[0]: must specify a peer: podSelector, namespaceSelector or ipBlock"]),
    ({"from": [{"podSelector": None}]},
     ["spec.ingress[0].from[0]: must specify a peer: podSelector, namespaceSelector or ipBlock"]),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
     ["spec.ingress[0].from[0]: may not specify both ipBlock and another peer"]),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}]},
     ["spec.ingress[0].from[0]: may not specify both ipBlock and another peer"]),
    ({"from": [{"podSelector": {}}, "10.0.0.0/8"]},
     ['spec.ingress[0].from[1]: must be an object, got "10.0.0.0/8"']),
    ({"from": {"podSelector": {}}}, ["spec.ingress[0].from: must be a list, got an object"]),
    ({"to": [{"podSelector": {}}]}, ["spec.ingress[0].to: unknown field"]),
    ({"from": [{"podSelector": {}, "serviceAccount": "web"}]},
     ["spec.ingress[0].from[0].serviceAccount: unknown field"]),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "exept": ["10.1.0.0/16"]}}]},
     ["spec.ingress[0].from[0].ipBlock.exept: unknown field"]),
    ({"from": [{"podSelector": {"matchLabels": {"a": "b"}, "matchFields": {}}}]},
     ["spec.ingress[0].from[0].podSelector.matchFields: unknown field"]),
    ({"ports": [{"port": 80, "portRange": "80-90"}]},
     ["spec.ingress[0].ports[0].portRange: unknown field"]),
    ({"from": [{"podSelector": {}}], "action": "Deny"}, ["spec.ingress[0].action: unknown field"]),
    ({"from": [{"podSelector": {"matchExpressions": [
        {"key": "a", "operator": "Exists", "value": "x"}]}}]},
     ["spec.ingress[0].from[0].podSelector.matchExpressions[0].value: unknown field"]),
    ("allow-all", ['spec.ingress[0]: must be an object, got "allow-all"']),
])
def test_invalid_rule_is_dropped(rule, problems):
    rules, got = ingress_rule(rule)
    assert rules == ()
    assert got == [f"NetworkPolicy x/web: {p}" for p in problems]


def test_a_dropped_rule_leaves_the_others_with_their_index():
    pol, problems = parsed({
        "podSelector": {},
        "ingress": [
            {"ports": [{"port": 80}]},
            {"from": [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"a": 5}}}],
             "ports": [{"port": 81}, {"port": 82, "protocol": "ICMP"}]},
            {"ports": [{"port": 83}]},
        ]})
    assert pol.ingress == (PolicyRule(ports=(PolicyPort(TCP, 80),), index=0),
                           PolicyRule(ports=(PolicyPort(TCP, 83),), index=2))
    # one problem per invalid field, not one per rule
    assert problems == [
        "NetworkPolicy x/web: spec.ingress[1].from[1].namespaceSelector.matchLabels.a: "
        "label value must be a string, got 5",
        'NetworkPolicy x/web: spec.ingress[1].ports[1].protocol: unsupported value "ICMP": '
        'supported values: "TCP", "UDP", "SCTP"',
    ]


# --- policies: ports ---------------------------------------------------------------

@pytest.mark.parametrize("port, expected", [
    ({}, PolicyPort(TCP, None)),
    ({"protocol": "UDP"}, PolicyPort(UDP, None)),
    ({"port": 80}, PolicyPort(TCP, 80)),
    ({"port": 1, "protocol": "SCTP"}, PolicyPort(SCTP, 1)),
    ({"port": 65535, "protocol": None}, PolicyPort(TCP, 65535)),
    ({"port": "http"}, PolicyPort(TCP, "http")),
    ({"port": "dns-tcp", "protocol": "UDP"}, PolicyPort(UDP, "dns-tcp")),
    ({"port": "a23456789012345"}, PolicyPort(TCP, "a23456789012345")),
    ({"port": "8080a"}, PolicyPort(TCP, "8080a")),
    ({"port": 32000, "endPort": 32768}, PolicyPort(TCP, 32000, 32768)),
    ({"port": 80, "endPort": 80}, PolicyPort(TCP, 80, 80)),
    ({"port": 1, "endPort": 65535, "protocol": "UDP"}, PolicyPort(UDP, 1, 65535)),
    ({"port": 80, "endPort": None}, PolicyPort(TCP, 80)),
])
def test_valid_ports(port, expected):
    rules, problems = ingress_rule({"ports": [port]})
    assert problems == []
    assert rules == (PolicyRule(ports=(expected,)),)


@pytest.mark.parametrize("port, field, message", [
    ({"port": "80"}, "port",
     'invalid port name "80": must contain at least one letter (a-z); '
     "a port number must be a JSON number, not a string"),
    ({"port": "Http"}, "port", 'invalid port name "Http": '
     "must contain only lowercase letters (a-z), digits (0-9) and '-'"),
    ({"port": "a234567890123456"}, "port",
     'invalid port name "a234567890123456": must be no more than 15 characters'),
    ({"port": "-http"}, "port", "invalid port name \"-http\": must not begin or end with '-'"),
    ({"port": "http-"}, "port", "invalid port name \"http-\": must not begin or end with '-'"),
    ({"port": "my--http"}, "port", "invalid port name \"my--http\": must not contain consecutive '-'"),
    ({"port": "web_http"}, "port", 'invalid port name "web_http": '
     "must contain only lowercase letters (a-z), digits (0-9) and '-'"),
    ({"port": ""}, "port", 'invalid port name "": must not be empty'),
    ({"port": 0}, "port", "must be an integer between 1 and 65535, got 0"),
    ({"port": 65536}, "port", "must be an integer between 1 and 65535, got 65536"),
    ({"port": -1}, "port", "must be an integer between 1 and 65535, got -1"),
    ({"port": 80.0}, "port", "must be a port number or a port name, got 80.0"),
    ({"port": True}, "port", "must be a port number or a port name, got true"),
    ({"port": [80]}, "port", "must be a port number or a port name, got a list"),
    ({"port": 80, "protocol": "tcp"}, "protocol",
     'unsupported value "tcp": supported values: "TCP", "UDP", "SCTP"'),
    ({"port": 80, "protocol": "ICMP"}, "protocol",
     'unsupported value "ICMP": supported values: "TCP", "UDP", "SCTP"'),
    ({"port": 90, "endPort": 80}, "endPort", "must be >= port (90)"),
    ({"port": 80, "endPort": 65536}, "endPort",
     "must be an integer between 1 and 65535, got 65536"),
    ({"port": 80, "endPort": "90"}, "endPort",
     'must be an integer between 1 and 65535, got "90"'),
    ({"port": "http", "endPort": 90}, "endPort", "may not be specified when port is not a number"),
    ({"endPort": 90}, "endPort", "may not be specified when port is not specified"),
    ({"port": None, "endPort": 90}, "endPort", "may not be specified when port is not specified"),
])
def test_invalid_port_drops_the_rule(port, field, message):
    """Dropping only the port entry could leave an empty list, meaning every
    port: the whole rule goes."""
    rules, problems = ingress_rule({"from": [{"podSelector": {}}],
                                    "ports": [{"port": 443}, port]})
    assert rules == ()
    assert problems == [f"NetworkPolicy x/web: spec.ingress[0].ports[1].{field}: {message}"]


def test_ports_not_a_list_drops_the_rule():
    rules, problems = ingress_rule({"ports": 80})
    assert rules == ()
    assert problems == ["NetworkPolicy x/web: spec.ingress[0].ports: must be a list, got 80"]


def test_end_port_message_matches_the_documented_form():
    pol, problems = parse_policy(netpol({"podSelector": {}, "ingress": [
        {"ports": [{"port": 79}, {"port": 80, "endPort": 79}]}]}))
    assert pol.ingress == ()
    assert [str(p) for p in problems] == [
        "NetworkPolicy x/web: spec.ingress[0].ports[1].endPort: must be >= port (80)"]
    assert problems[0] == Problem("NetworkPolicy", "x/web", "spec.ingress[0].ports[1].endPort",
                                  "must be >= port (80)")


# --- policies: ipBlock ----------------------------------------------------------

@pytest.mark.parametrize("block, expected", [
    ({"cidr": "10.0.0.0/8"}, IPBlock("10.0.0.0/8")),
    ({"cidr": "10.1.2.3/8"}, IPBlock("10.0.0.0/8")),
    ({"cidr": "192.0.2.10/32"}, IPBlock("192.0.2.10/32")),
    ({"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]},
     IPBlock("0.0.0.0/0", ("10.0.0.0/8", "192.168.0.0/16"))),
    ({"cidr": "10.0.0.0/8", "except": ["10.244.1.7/16", "10.96.0.0/12", "10.244.0.0/16"]},
     IPBlock("10.0.0.0/8", ("10.96.0.0/12", "10.244.0.0/16"))),
    ({"cidr": "FD00:10:244:0:0:0:0:1/48", "except": ["fd00:10:244:2::/64"]},
     IPBlock("fd00:10:244::/48", ("fd00:10:244:2::/64",))),
    ({"cidr": "::/0"}, IPBlock("::/0")),
    ({"cidr": "10.0.0.0/8", "except": None}, IPBlock("10.0.0.0/8")),
    ({"cidr": "10.0.0.0/8", "except": []}, IPBlock("10.0.0.0/8")),
])
def test_ip_block_is_normalised(block, expected):
    rules, problems = ingress_rule({"from": [{"ipBlock": block}]})
    assert problems == []
    assert rules == (PolicyRule(peers=(Peer(ip_block=expected),)),)


@pytest.mark.parametrize("block, field, message", [
    ({"cidr": "10.0.0.0/33"}, "cidr", 'invalid CIDR "10.0.0.0/33"'),
    ({"cidr": "10.0.0.1"}, "cidr", 'invalid CIDR "10.0.0.1"'),
    ({"cidr": "10.0.0.0/255.0.0.0"}, "cidr", 'invalid CIDR "10.0.0.0/255.0.0.0"'),
    ({"cidr": "fe80::%eth0/64"}, "cidr", 'invalid CIDR "fe80::%eth0/64"'),
    ({"cidr": "10.0.0.0/8 "}, "cidr", 'invalid CIDR "10.0.0.0/8 "'),
    ({"cidr": ""}, "cidr", "required"),
    ({}, "cidr", "required"),
    ({"cidr": 167772160}, "cidr", "must be a string, got 167772160"),
    ({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}, "except[0]",
     'must be a strict subset of cidr 10.0.0.0/8, got "10.0.0.0/8"'),
    ({"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}, "except[0]",
     'must be a strict subset of cidr 10.0.0.0/16, got "10.0.0.0/8"'),
    ({"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}, "except[0]",
     'must be a strict subset of cidr 10.0.0.0/8, got "11.0.0.0/16"'),
    ({"cidr": "::/0", "except": ["10.0.0.0/8"]}, "except[0]",
     'must be a strict subset of cidr ::/0, got "10.0.0.0/8"'),
    ({"cidr": "10.0.0.0/8", "except": ["10.1.0.0"]}, "except[0]", 'invalid CIDR "10.1.0.0"'),
    ({"cidr": "10.0.0.0/8", "except": [None]}, "except[0]", "must be a string, got null"),
    ({"cidr": "10.0.0.0/8", "except": "10.1.0.0/16"}, "except",
     'must be a list, got "10.1.0.0/16"'),
])
def test_invalid_ip_block_drops_the_rule(block, field, message):
    rules, problems = ingress_rule({"from": [{"ipBlock": block}]})
    assert rules == ()
    assert problems == [f"NetworkPolicy x/web: spec.ingress[0].from[0].ipBlock.{field}: {message}"]


def test_bad_except_with_bad_cidr_reports_each_field():
    rules, problems = ingress_rule({"from": [{"ipBlock": {"cidr": "nope", "except": ["x"]}}]})
    assert rules == ()
    assert problems == [
        'NetworkPolicy x/web: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR "nope"',
        'NetworkPolicy x/web: spec.ingress[0].from[0].ipBlock.except[0]: invalid CIDR "x"']


# --- label selectors ---------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ({"key": "tier", "operator": "In", "values": ["web", "api"]},
     Requirement("tier", "In", ("api", "web"))),
    ({"key": "tier", "operator": "NotIn", "values": ["db"]}, Requirement("tier", "NotIn", ("db",))),
    ({"key": "tier", "operator": "Exists"}, Requirement("tier", "Exists")),
    ({"key": "tier", "operator": "Exists", "values": []}, Requirement("tier", "Exists")),
    ({"key": "tier", "operator": "DoesNotExist", "values": None},
     Requirement("tier", "DoesNotExist")),
    ({"key": "tier", "operator": "In", "values": ["b", "a", "b"]},
     Requirement("tier", "In", ("a", "b"))),
])
def test_match_expressions_operators(expression, expected):
    rules, problems = ingress_rule({"from": [{"podSelector": {"matchExpressions": [expression]}}]})
    assert problems == []
    assert rules[0].peers[0].pod_selector == LabelSelector(match_expressions=(expected,))


@pytest.mark.parametrize("expression, field, message", [
    ({"key": "tier", "operator": "In"}, "values", "must be non-empty when operator is In"),
    ({"key": "tier", "operator": "In", "values": []}, "values",
     "must be non-empty when operator is In"),
    ({"key": "tier", "operator": "NotIn", "values": None}, "values",
     "must be non-empty when operator is NotIn"),
    ({"key": "tier", "operator": "Exists", "values": ["web"]}, "values",
     "must be empty when operator is Exists"),
    ({"key": "tier", "operator": "DoesNotExist", "values": ["web"]}, "values",
     "must be empty when operator is DoesNotExist"),
    ({"key": "tier", "operator": "in", "values": ["web"]}, "operator",
     'unsupported value "in": supported values: "In", "NotIn", "Exists", "DoesNotExist"'),
    ({"key": "tier", "operator": "Gt", "values": ["1"]}, "operator",
     'unsupported value "Gt": supported values: "In", "NotIn", "Exists", "DoesNotExist"'),
    ({"key": "tier", "values": ["web"]}, "operator", "required"),
    ({"operator": "Exists"}, "key", "required"),
    ({"key": "", "operator": "Exists"}, "key", "required"),
    ({"key": ["tier"], "operator": "Exists"}, "key", "must be a string, got a list"),
    ({"key": "tier", "operator": "In", "values": "web"}, "values", 'must be a list, got "web"'),
    ({"key": "tier", "operator": "In", "values": ["web", 1]}, "values[1]",
     "must be a string, got 1"),
])
def test_invalid_match_expressions_drop_the_rule(expression, field, message):
    rules, problems = ingress_rule({
        "from": [{"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "Exists"}, expression]}}]})
    assert rules == ()
    assert problems == [
        "NetworkPolicy x/web: spec.ingress[0].from[0].namespaceSelector.matchExpressions[1]."
        f"{field}: {message}"]


@pytest.mark.parametrize("selector, field, message", [
    ({"matchLabels": ["app=web"]}, "matchLabels",
     "must be a map of strings to strings, got a list"),
    ({"matchLabels": {"app": None}}, "matchLabels.app", "label value must be a string, got null"),
    ({"matchLabels": {"": "web"}}, 'matchLabels[""]', "label key must be a non-empty string"),
    ({"matchExpressions": {"key": "a"}}, "matchExpressions", "must be a list, got an object"),
    ({"matchExpressions": ["a in (b)"]}, "matchExpressions[0]", 'must be an object, got "a in (b)"'),
    ([], "", "must be an object (a label selector), got a list"),
])
def test_invalid_selector_shapes_drop_the_rule(selector, field, message):
    rules, problems = ingress_rule({"from": [{"podSelector": selector}]})
    assert rules == ()
    path = "spec.ingress[0].from[0].podSelector" + ("." + field if field[:1].isalpha() else field)
    assert problems == [f"NetworkPolicy x/web: {path}: {message}"]


def test_equal_selectors_compare_equal():
    a, _ = parsed({"podSelector": {
        "matchLabels": {"b": "2", "a": "1"},
        "matchExpressions": [{"key": "t", "operator": "In", "values": ["y", "x"]},
                             {"key": "s", "operator": "Exists"}]}})
    b, _ = parsed({"podSelector": {
        "matchExpressions": [{"key": "s", "operator": "Exists", "values": []},
                             {"key": "t", "operator": "In", "values": ["x", "y", "x"]}],
        "matchLabels": {"a": "1", "b": "2"}}})
    assert a.pod_selector == b.pod_selector
    assert a.pod_selector == LabelSelector(
        match_labels=(("a", "1"), ("b", "2")),
        match_expressions=(Requirement("s", "Exists"), Requirement("t", "In", ("x", "y"))))
    assert hash(a) == hash(b)


def test_strange_label_text_in_selectors_is_kept_as_data():
    pol, problems = parsed({"podSelector": {"matchLabels": {"a b": "it's $(x); \"y\"\n"}}})
    assert problems == []
    assert pol.pod_selector == LabelSelector(match_labels=(("a b", "it's $(x); \"y\"\n"),))


# --- problem text ---------------------------------------------------------------

def test_problem_text_is_one_safe_line():
    name = "evil\n\x1b[31mred\x00\u2028" + "z" * 200
    pol, problems = parse_policy(netpol(
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "a\r\nb" * 40}}]}]},
        name=name, namespace='x"y'))
    assert pol.name == name                     # the data itself is untouched
    assert len(problems) == 1
    text = str(problems[0])
    assert text.isprintable()
    assert len(text) < 400
    assert text.startswith('NetworkPolicy "x\\"y"/"evil\\n\\x1b[31mred\\x00\\u2028zzz')
    assert '...(215 chars)' in text
    assert 'invalid CIDR "a\\r\\nba\\r\\nb' in text
    assert text.endswith('"...(160 chars)')


@pytest.mark.parametrize("value, shown", [
    ("abc", '"abc"'),
    ('a"b\\c', '"a\\"b\\\\c"'),
    ("tab\there", '"tab\\there"'),
    ("\x7f\x85", '"\\x7f\\x85"'),
    ("caf\u00e9", '"caf\u00e9"'),
    ("\ud800", '"\\ud800"'),
    (10 ** 40, "a very large integer"),
    ({"a": 1}, "an object"),
    (object(), 'a value of type "object"'),
])
def test_show(value, shown):
    assert objects.show(value) == shown


# --- the whole cluster -----------------------------------------------------------

def test_cluster_reports_bad_items_by_position_and_never_raises():
    cluster = parse_cluster(
        ["x", {"metadata": {"name": "x"}}],
        [None, running_pod("b"), running_pod("a", phase="Failed")],
        [5, netpol({"podSelector": {}}, name="p"), {"metadata": {"name": "q"}}])
    assert [n.name for n in cluster.namespaces] == ["x"]
    assert [p.key for p in cluster.pods] == ["x/b"]
    assert [p.key for p in cluster.policies] == ["x/p"]
    assert [str(p) for p in cluster.problems] == [
        'Namespace namespaces[0]: <root>: must be an object, got "x"',
        "Pod pods[0]: <root>: must be an object, got null",
        "NetworkPolicy policies[0]: <root>: must be an object, got 5",
        "NetworkPolicy policies[2]: metadata.namespace: required",
    ]


def test_cluster_ignores_a_duplicate_object():
    first, second = running_pod("a", ips=("10.0.0.1",)), running_pod("a", ips=("10.0.0.2",))
    cluster = parse_cluster([], [first, second], [])
    assert [p.ips for p in cluster.pods] == [("10.0.0.1",)]
    assert [str(p) for p in cluster.problems] == [
        "Pod x/a: metadata.name: duplicate object (pods[1]) ignored"]


@pytest.mark.parametrize("lists", [(None, None, None), ({}, "pods", 3)])
def test_cluster_lists_of_the_wrong_type(lists):
    cluster = parse_cluster(*lists)
    assert (cluster.namespaces, cluster.pods, cluster.policies) == ((), (), ())
    assert len(cluster.problems) == (0 if lists[0] is None else 3)


# --- robustness: any input, never an exception, never fail open ------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    value = copy.deepcopy(value)
    target = value
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return value


WEB_POLICY = items("policies")[0]
WEB_PARSED = parse_policy(WEB_POLICY)[0]
WEB_PATHS = [p for p in _paths(WEB_POLICY) if p[:1] == ("spec",) and len(p) > 1]


def _lines_are_safe(problems):
    return all(isinstance(p, Problem) and str(p).isprintable() for p in problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(WEB_PATHS), new=JSON)
def test_a_damaged_policy_never_allows_more(path, new):
    pol, problems = parse_policy(_replace(WEB_POLICY, path, new))
    assert _lines_are_safe(problems)
    assert pol is not None
    if path[1] != "policyTypes":
        assert pol.policy_types == BOTH
    if path[1] != "podSelector":
        assert pol.pod_selector == WEB_PARSED.pod_selector
    for direction in ("ingress", "egress"):
        for rule in getattr(pol, direction):
            damaged = path[1:] == (direction,) or path[1:3] == (direction, rule.index)
            if not damaged:
                assert rule == getattr(WEB_PARSED, direction)[rule.index]
        if path[1] != direction:
            assert len(getattr(pol, direction)) == len(getattr(WEB_PARSED, direction))


@settings(max_examples=200, deadline=None)
@given(item=JSON)
def test_any_json_item_never_raises(item):
    for parse in (parse_policy, parse_pod, parse_namespace):
        value, problems = parse(item)
        assert _lines_are_safe(problems)
    assert isinstance(parse_cluster([item], [item], [item]).problems, tuple)


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(list(_paths(items("pods")[0]))), new=JSON)
def test_a_damaged_pod_never_raises(path, new):
    pod, problems = parse_pod(_replace(items("pods")[0], path, new))
    assert _lines_are_safe(problems)
    if pod is not None:
        assert all(ip in ("10.244.1.10", "fd00:10:244:1::10") or ":" in ip or "." in ip
                   for ip in pod.ips)


# --- parsing again what changed only -------------------------------------------

def _bumped(obj: dict, version: str, **labels) -> dict:
    new = copy.deepcopy(obj)
    new["metadata"]["resourceVersion"] = version
    new["metadata"].setdefault("labels", {}).update(labels)
    return new


def test_a_memo_parses_only_changed_objects_and_gives_the_same_cluster():
    namespaces, pods, policies = items("namespaces"), items("pods"), items("policies")
    memo = objects.ParseMemo()
    assert parse_cluster(namespaces, pods, policies, memo) == parse_cluster(namespaces, pods, policies)
    assert memo.hits == 0

    assert parse_cluster(namespaces, pods, policies, memo) == parse_cluster(namespaces, pods, policies)
    keyed = sum(1 for kind, objs in (("Namespace", namespaces), ("Pod", pods),
                                     ("NetworkPolicy", policies))
                for o in objs if objects.ParseMemo.key(kind, o) is not None)
    assert keyed >= len(pods) and memo.hits == keyed

    # one pod relabelled (a new resourceVersion): parsed again, the rest reused
    changed = [_bumped(pods[0], "99999", tier="db")] + pods[1:]
    got = parse_cluster(namespaces, changed, policies, memo)
    assert got == parse_cluster(namespaces, changed, policies)
    assert memo.hits == keyed - 1
    assert dict(next(p for p in got.pods if p.name == pods[0]["metadata"]["name"]).labels)["tier"] == "db"


def test_a_memo_reports_the_problems_of_a_reused_object_every_time():
    bad = netpol({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})
    memo = objects.ParseMemo()
    first = parse_cluster([], [], [bad], memo).problems
    again = parse_cluster([], [], [bad], memo).problems
    assert first and again == first and memo.hits == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["a", "b", "c"]), st.booleans()),
                max_size=8))
def test_a_memo_follows_any_sequence_of_changes(steps):
    """Each step relabels (new version) or deletes one pod; parsing with the
    memo always equals parsing from scratch."""
    namespaces, pods, policies = items("namespaces"), items("pods"), items("policies")
    memo = objects.ParseMemo()
    for n, (index, value, delete) in enumerate(steps):
        if pods and delete:
            pods = pods[:index % len(pods)] + pods[index % len(pods) + 1:]
        elif pods:
            i = index % len(pods)
            pods = pods[:i] + [_bumped(pods[i], f"7{n}", step=value)] + pods[i + 1:]
        assert parse_cluster(namespaces, pods, policies, memo) == parse_cluster(namespaces, pods, policies)
