"""The synthetic clusters: deterministic, of the size asked, valid for the API,
and using every part of the NetworkPolicy API the benchmark claims to cover."""
from __future__ import annotations

import json
from collections import defaultdict

from bench import synth
from lib import objects
from lib.compile import compile_node

SMALL = synth.SIZES["small"]


def _parsed(cluster: synth.Synthetic):
    return objects.parse_cluster(list(cluster.namespaces), list(cluster.pods), list(cluster.policies))


def _walk(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def test_same_spec_same_objects_and_another_seed_other_objects():
    first = json.dumps(synth.generate(SMALL).pods, sort_keys=True)
    assert json.dumps(synth.generate(SMALL).pods, sort_keys=True) == first
    other = synth.Spec("small", SMALL.pods, SMALL.policies, SMALL.nodes, seed=SMALL.seed + 1)
    assert json.dumps(synth.generate(other).pods, sort_keys=True) != first


def test_sizes_as_promised_and_the_node_holds_its_share():
    assert [(s.pods, s.policies) for s in synth.SIZES.values()] == [
        (1_000, 100), (10_000, 1_000), (50_000, 5_000)]
    assert all(20 <= s.nodes <= 50 for s in synth.SIZES.values())
    cluster = synth.generate(SMALL)
    assert len(cluster.pods) == SMALL.pods and len(cluster.policies) == SMALL.policies
    per_node = defaultdict(int)
    for pod in cluster.pods:
        per_node[pod["spec"]["nodeName"]] += 1
    share = SMALL.pods / SMALL.nodes
    assert 0.5 * share <= per_node[synth.NODE] <= 1.5 * share
    assert len(per_node) == SMALL.nodes


def test_every_object_is_valid_and_addresses_are_unique():
    cluster = synth.generate(SMALL)
    parsed = _parsed(cluster)
    assert parsed.problems == ()
    addresses = [ip for p in parsed.pods if not p.host_network for ip in p.ips]
    assert len(addresses) == len(set(addresses))
    assert any(len(p.ips) == 2 for p in parsed.pods)                 # dual-stack pods
    assert any(p.host_network for p in parsed.pods)
    apps = [ns for ns in parsed.namespaces if ns.name.startswith("app-")]
    assert apps and all({"team", "env", "stack"} <= dict(ns.labels).keys() for ns in apps)


def test_policies_use_the_whole_api():
    cluster = synth.generate(SMALL)
    nodes = list(_walk([p["spec"] for p in cluster.policies]))
    operators = {e["operator"] for n in nodes for e in n.get("matchExpressions", [])}
    assert operators == {"In", "NotIn", "Exists", "DoesNotExist"}
    assert any("namespaceSelector" in n for n in nodes)
    assert any(n.get("namespaceSelector") == {} for n in nodes)
    assert any("endPort" in n for n in nodes)
    assert any(isinstance(n.get("port"), str) for n in nodes)
    assert {n.get("protocol") for n in nodes if "port" in n} >= {"TCP", "UDP", "SCTP"}
    blocks = [n["ipBlock"] for n in nodes if "ipBlock" in n]
    assert any(b.get("except") and ":" in b["cidr"] for b in blocks)
    assert any(b.get("except") and "." in b["cidr"] for b in blocks)
    assert any(p["spec"].get("egress") for p in cluster.policies)
    assert any(rule.get("ports") and "from" not in rule
               for p in cluster.policies for rule in p["spec"].get("ingress", []))


def test_a_port_name_stands_for_different_numbers_on_different_pods():
    numbers = defaultdict(set)
    for pod in synth.generate(SMALL).pods:
        for c in pod["spec"]["containers"]:
            for port in c.get("ports", []):
                numbers[port["name"]].add(port["containerPort"])
    assert len(numbers["http"]) > 1 and len(numbers["db"]) > 1


def test_remote_peers_change_nothing_else_and_stay_off_the_node():
    base = synth.generate(SMALL)
    more = synth.generate(synth.with_remote_peers(SMALL, 300))
    assert more.pods[:len(base.pods)] == base.pods
    assert more.policies == base.policies and more.namespaces == base.namespaces
    extra = more.pods[len(base.pods):]
    assert len(extra) == 300 and all(p["spec"]["nodeName"] != synth.NODE for p in extra)


def test_the_node_gets_chains_sets_and_named_port_sets():
    desired = compile_node(_parsed(synth.generate(SMALL)), synth.NODE)
    assert len(desired.v4.chains) > 2 and len(desired.v6.chains) > 2
    kinds = {s.kind for s in desired.sets}
    assert kinds == {"hash:net", "hash:ip,port"}
