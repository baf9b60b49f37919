"""Label selectors and the cluster index, against Kubernetes semantics."""

import pytest

from lib.model import NOTHING, Peer
from lib.selectors import ClusterIndex, matches
from tests.unit.builders import (both_peer, block, cluster, namespace, ns_peer, pod, pods_peer,
                                 policy, req, sel)

LABELS = {"app": "web", "tier": "front"}


@pytest.mark.parametrize("selector, expected", [
    (sel(), True),
    (sel({"app": "web"}), True),
    (sel({"app": "web", "tier": "front"}), True),
    (sel({"app": "web", "tier": "back"}), False),
    (sel({"app": "db"}), False),
    (sel({"missing": ""}), False),
    (sel(None, req("app", "In", "db", "web")), True),
    (sel(None, req("app", "In", "db")), False),
    (sel(None, req("missing", "In", "x")), False),
    (sel(None, req("app", "NotIn", "db")), True),
    (sel(None, req("app", "NotIn", "web")), False),
    (sel(None, req("missing", "NotIn", "x")), True),     # absent key: NotIn matches
    (sel(None, req("tier", "Exists")), True),
    (sel(None, req("missing", "Exists")), False),
    (sel(None, req("missing", "DoesNotExist")), True),
    (sel(None, req("tier", "DoesNotExist")), False),
    (sel({"app": "web"}, req("tier", "In", "front"), req("missing", "DoesNotExist")), True),
    (sel({"app": "web"}, req("tier", "In", "back")), False),           # labels AND expressions
    (sel(None, req("tier", "Exists"), req("tier", "NotIn", "front")), False),
    (sel(None, req("app", "Gt", "1")), False),            # unknown operator: fail closed
    (NOTHING, False),
])
def test_matches(selector, expected):
    assert matches(selector, LABELS) is expected


def test_empty_selector_matches_unlabelled_and_match_nothing_matches_nothing():
    assert matches(sel(), {})
    assert not matches(NOTHING, {})
    assert not matches(sel(None, req("a", "In")), {"a": ""})   # In with no values


def keys(pods):
    return [p.key for p in pods]


@pytest.fixture
def index():
    return ClusterIndex(cluster(
        namespace("x", team="a"),
        namespace("y", team="b"),
        # namespace z has pods but no Namespace object
        pod("x/a", labels={"app": "a"}, ips="10.0.0.1"),
        pod("x/b", labels={"app": "b"}, ips="10.0.0.2", node="n2"),
        pod("x/h", labels={"app": "b"}, ips="172.18.0.1", host_network=True),
        pod("y/b", labels={"app": "b"}, ips="10.0.0.3"),
        pod("y/c", labels={"app": "c"}, ips="10.0.0.4"),
        pod("z/b", labels={"app": "b"}, ips="10.0.0.5"),
        policy("x/all", sel()),
        policy("x/only-a", sel({"app": "a"})),
        policy("y/b", sel({"app": "b"})),
    ))


def test_namespace_without_object_has_only_its_name_label(index):
    assert index.namespace_labels["z"] == {"kubernetes.io/metadata.name": "z"}
    assert index.namespaces_selected(sel({"kubernetes.io/metadata.name": "z"})) == ("z",)
    assert index.namespaces_selected(sel(None, req("team", "DoesNotExist"))) == ("z",)
    assert index.namespaces_selected(sel()) == ("x", "y", "z")


def test_policy_pods_same_namespace_only_and_never_host_network(index):
    pols = {p.key: p for p in index.cluster.policies}
    assert keys(index.policy_pods(pols["x/all"])) == ["x/a", "x/b"]
    assert keys(index.policy_pods(pols["x/only-a"])) == ["x/a"]
    assert keys(index.policy_pods(pols["y/b"])) == ["y/b"]


def test_policies_for(index):
    by_key = {p.key: p for p in index.cluster.pods}
    assert [p.key for p in index.policies_for(by_key["x/a"])] == ["x/all", "x/only-a"]
    assert [p.key for p in index.policies_for(by_key["x/b"])] == ["x/all"]
    assert index.policies_for(by_key["x/h"]) == ()
    assert index.policies_for(by_key["z/b"]) == ()


@pytest.mark.parametrize("peer, expected", [
    (pods_peer({"app": "b"}), ["x/b"]),                          # policy's namespace only
    (pods_peer(), ["x/a", "x/b"]),
    (ns_peer({"team": "b"}), ["y/b", "y/c"]),                    # every pod of y
    (ns_peer(), ["x/a", "x/b", "y/b", "y/c", "z/b"]),
    (both_peer({"team": "b"}, {"app": "b"}), ["y/b"]),           # AND
    (both_peer(None, {"app": "b"}), ["x/b", "y/b", "z/b"]),
    (ns_peer(None, req("team", "NotIn", "a")), ["y/b", "y/c", "z/b"]),
    (block("0.0.0.0/0"), []),                                    # addresses, not pods
    (Peer(pod_selector=NOTHING), []),
])
def test_peer_pods(index, peer, expected):
    assert keys(index.peer_pods("x", peer)) == expected


def test_peers_union_is_sorted_without_duplicates(index):
    peers = (both_peer(None, {"app": "b"}), pods_peer(), ns_peer({"team": "b"}))
    assert keys(index.peers_pods("x", peers)) == ["x/a", "x/b", "y/b", "y/c", "z/b"]


def test_peer_evaluation_is_memoized(index):
    peer = both_peer({"team": "b"}, {"app": "b"})
    first = index.peer_pods("x", peer)
    assert index.peer_pods("x", both_peer({"team": "b"}, {"app": "b"})) is first
    # the same peer in another namespace is another question when it has no namespaceSelector
    assert keys(index.peer_pods("y", pods_peer({"app": "b"}))) == ["y/b"]


def test_label_postings_agree_with_a_full_scan():
    """The candidate lists used for matchLabels must never lose a match."""
    pods = [pod(f"n{i % 3}/p{i}", labels={"a": str(i % 2), "b": str(i % 5)}) for i in range(60)]
    idx = ClusterIndex(cluster(pods))
    for selector in [sel({"a": "1"}), sel({"a": "0", "b": "3"}), sel({"b": "9"}),
                     sel({"a": "1"}, req("b", "NotIn", "1", "2")), sel(None, req("b", "In", "4"))]:
        for ns in ("n0", "n1", "n2"):
            want = [p.key for p in sorted(pods, key=lambda p: p.name)
                    if p.namespace == ns and matches(selector, p.label_map)]
            assert sorted(keys(idx.pods_selected(ns, selector))) == sorted(want)


def test_large_cluster_answers():
    """10,000 pods, 100 namespaces, 1,000 policies with two peers each (speed: `make bench`)."""
    namespaces = [namespace(f"ns{i}", team=f"t{i % 10}") for i in range(100)]
    pods = [pod(f"ns{i % 100}/p{i}", node=f"n{i % 30}", ips=f"10.{i // 250}.{i % 250}.1",
                labels={"app": f"app{i % 20}", "tier": f"tier{i % 3}"}) for i in range(10_000)]
    policies = [policy(f"ns{i % 100}/pol{i}", sel({"app": f"app{i % 20}"}),
                       ingress=[]) for i in range(1000)]
    peers = [(f"ns{i % 100}", (pods_peer({"app": f"app{(i + 1) % 20}"}),
                               both_peer({"team": f"t{i % 10}"}, None),
                               Peer(namespace_selector=sel(None, req("team", "In", f"t{i % 7}")),
                                    pod_selector=sel({"tier": f"tier{i % 3}"}))))
             for i in range(1000)]
    idx = ClusterIndex(cluster(namespaces, pods, policies))
    total = 0
    for p in policies:
        total += len(idx.policy_pods(p))
    for ns, ps in peers:
        total += len(idx.peers_pods(ns, ps))
    assert total > 10_000
