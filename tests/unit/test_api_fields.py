"""lib.api_fields: trimming an object as it arrives changes nothing that
parsing, fingerprinting or node addresses make of it, malformed or not."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import synth
from lib import api_fields, cycle, node_addresses, objects
from lib.kubeapi import ClusterObjects
from lib.model import ADMIN, BASELINE

FIXTURES = Path(__file__).parent / "fixtures" / "objects"


def _items(name: str) -> list:
    return json.loads((FIXTURES / f"{name}.json").read_text())["items"]


PODS = _items("pods") + [synth.pod_object("app-0001", "svc-1-0000", 3, ("10.3.0.7", "fd00::3:7"),
                                          {"app": "svc-1"}, [("http", 8080, "TCP")])]
NAMESPACES = _items("namespaces")
POLICIES = _items("policies")
ADMIN_POLICIES = _items("adminnetworkpolicies")
BASELINE_POLICIES = _items("baselineadminnetworkpolicies")
NODES = _items("nodes")

# Places where a malformed value changes what parsing makes of an object.
POD_PATHS = [
    (), ("metadata",), ("metadata", "name"), ("metadata", "namespace"), ("metadata", "uid"),
    ("metadata", "resourceVersion"), ("metadata", "labels"), ("metadata", "labels", "app"),
    ("spec",), ("spec", "nodeName"), ("spec", "hostNetwork"), ("spec", "containers"),
    ("spec", "containers", 0), ("spec", "containers", 0, "ports"),
    ("spec", "containers", 0, "ports", 0), ("spec", "containers", 0, "ports", 0, "containerPort"),
    ("spec", "containers", 0, "ports", 0, "name"), ("spec", "containers", 0, "ports", 0, "protocol"),
    ("spec", "initContainers"), ("status",), ("status", "phase"), ("status", "podIP"),
    ("status", "podIPs"), ("status", "podIPs", 0), ("status", "podIPs", 0, "ip"),
    ("status", "hostIP"), ("status", "hostIPs"), ("status", "hostIPs", 0, "ip"),
]
META_PATHS = [
    (), ("metadata",), ("metadata", "name"), ("metadata", "namespace"), ("metadata", "labels"),
    ("metadata", "labels", "team"), ("metadata", "annotations"),
    ("metadata", "annotations", objects.LOG_DROPS_ANNOTATION),
    ("metadata", "annotations", "kubectl.kubernetes.io/last-applied-configuration"),
]
POLICY_PATHS = META_PATHS + [
    ("spec",), ("spec", "podSelector"), ("spec", "ingress"), ("spec", "ingress", 0),
    ("spec", "ingress", 0, "from"), ("spec", "policyTypes"), ("spec", "egress"), ("spec", "future"),
]
ADMIN_PATHS = META_PATHS + [
    ("metadata", "uid"), ("metadata", "resourceVersion"), ("spec",), ("spec", "priority"),
    ("spec", "subject"), ("spec", "subject", "namespaces"), ("spec", "ingress"),
    ("spec", "ingress", 0), ("spec", "ingress", 0, "action"), ("spec", "ingress", 0, "from", 0),
    ("spec", "egress", 0, "to", 0), ("spec", "egress", 0, "ports", 0),
    ("spec", "egress", 1, "to", 0, "nodes"), ("spec", "future"), ("status",),
]
NODE_PATHS = META_PATHS + [
    ("metadata", "uid"), ("metadata", "resourceVersion"), ("spec",), ("spec", "podCIDRs"),
    ("status",), ("status", "addresses"), ("status", "addresses", 0),
    ("status", "addresses", 0, "address"), ("status", "addresses", 0, "type"),
    ("status", "addresses", 2, "type"), ("status", "conditions"), ("status", "nodeInfo"),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-70000, 70000) | st.text(max_size=12)
    | st.sampled_from(["", "10.0.0.9", "fd00::9", "Running", "Succeeded", "TCP", "true", "x",
                       "InternalIP", "Deny", "10.0.0.0/8"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["ip", "name", "ports", "containerPort", "protocol", "app", "x",
                         "type", "address", "namespaces", "action"]),
        inner, max_size=3),
    max_leaves=8)


def _set(obj, path: tuple, value):
    """A copy of `obj` with `value` at `path`, where the path's parents exist."""
    if not path:
        return value
    obj = copy.deepcopy(obj)
    parent = obj
    for step in path[:-1]:
        if isinstance(parent, dict) and step in parent:
            parent = parent[step]
        elif isinstance(parent, list) and isinstance(step, int) and step < len(parent):
            parent = parent[step]
        else:
            return obj
    last = path[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        parent[last] = value
    return obj


ADMIN_PARSERS = {ADMIN: objects.parse_admin_policy, BASELINE: objects.parse_baseline_policy,
                 "Node": objects.parse_node}


def _meaning(kind: str, obj) -> tuple:
    if kind in ADMIN_PARSERS:      # parsed, and the object's part of a cycle's fingerprint
        return ADMIN_PARSERS[kind](obj), objects.ParseMemo.key(kind, obj)
    if kind == "Pod":
        return (objects.parse_pod(obj), node_addresses.from_pods([obj]),
                cycle.fingerprint(ClusterObjects([], [obj], [], 0, 0)))
    if kind == "Namespace":
        return (objects.parse_namespace(obj), cycle.fingerprint(ClusterObjects([obj], [], [], 0, 0)))
    return (objects.parse_policy(obj), cycle.fingerprint(ClusterObjects([], [], [obj], 0, 0)))


def _assert_same(kind: str, obj) -> None:
    trimmed = api_fields.trimmed(kind, copy.deepcopy(obj))
    assert _meaning(kind, trimmed) == _meaning(kind, obj)


def test_every_fixture_means_the_same_trimmed():
    for kind, items in (("Pod", PODS), ("Namespace", NAMESPACES), ("NetworkPolicy", POLICIES),
                        (ADMIN, ADMIN_POLICIES), (BASELINE, BASELINE_POLICIES), ("Node", NODES)):
        for obj in items:
            _assert_same(kind, obj)


@pytest.mark.parametrize("kind, samples, paths", [
    ("Pod", PODS, POD_PATHS), ("Namespace", NAMESPACES, META_PATHS),
    ("NetworkPolicy", POLICIES, POLICY_PATHS), (ADMIN, ADMIN_POLICIES, ADMIN_PATHS),
    (BASELINE, BASELINE_POLICIES, ADMIN_PATHS), ("Node", NODES, NODE_PATHS)])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_malformed_object_means_the_same_trimmed(kind, samples, paths, data):
    obj = data.draw(st.sampled_from(samples))
    for path, value in data.draw(st.lists(st.tuples(st.sampled_from(paths), json_values),
                                          min_size=1, max_size=3)):
        obj = _set(obj, path, value)
    _assert_same(kind, obj)


def test_a_running_pod_shrinks_to_a_fraction_of_its_json():
    pod = PODS[-1]
    before = len(json.dumps(pod))
    after = len(json.dumps(api_fields.trimmed("Pod", pod)))
    assert after < before / 3, (before, after)


def test_the_last_applied_annotation_is_dropped_and_ours_kept():
    policy = copy.deepcopy(POLICIES[0])
    policy["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(policy),
        objects.LOG_DROPS_ANNOTATION: "true"}
    trimmed = api_fields.trimmed("NetworkPolicy", policy)
    assert trimmed["metadata"]["annotations"] == {objects.LOG_DROPS_ANNOTATION: "true"}
    assert objects.parse_policy(trimmed)[0].log_drops


def test_a_node_keeps_its_labels_and_addresses_only():
    node = NODES[0]
    trimmed = api_fields.trimmed("Node", node)
    assert trimmed == {"metadata": {k: node["metadata"][k]
                                    for k in ("name", "uid", "resourceVersion", "labels")},
                       "status": {"addresses": node["status"]["addresses"]}}
    assert len(json.dumps(trimmed)) < len(json.dumps(node)) / 3


def test_an_admin_policy_keeps_its_spec_and_our_annotation_only():
    policy = ADMIN_POLICIES[0]
    trimmed = api_fields.trimmed(ADMIN, policy)
    assert trimmed["spec"] == policy["spec"] and "status" not in trimmed
    assert trimmed["metadata"]["annotations"] == {objects.LOG_DROPS_ANNOTATION: "true"}
    assert objects.parse_admin_policy(trimmed)[0].log_drops


@pytest.mark.parametrize("spec, expected", [
    ({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}, {"nodes": {}}]}]}, True),
    ({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}]}]}, False),
    ({"ingress": [{"action": "Deny", "from": [{"nodes": {}}]}]}, False),      # not an ingress peer
    ({"egress": [{"to": [{"nodes": None}]}]}, False),
    ({"egress": "not a list"}, False),
    ({"egress": [{"to": "not a list"}, "not a rule"]}, False),
])
def test_names_nodes_tells_when_the_nodes_are_needed(spec, expected):
    assert api_fields.names_nodes({"metadata": {"name": "a"}, "spec": spec}) is expected
    assert api_fields.names_nodes("not an object") is False
