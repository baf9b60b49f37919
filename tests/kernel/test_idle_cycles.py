"""The loop's idle cycles: the real reconcile.py in a network namespace, against
a real API server. While the API serves the same objects, parse and compile
are skipped, yet drift is still repaired and any change is compiled; an
apply that only adds set members does not run the conntrack cleanup."""
from __future__ import annotations

import pytest

from tests.kernel.node import Node, namespace, pod, policy, wait_for

WEB_FROM_CLIENTS = policy("x", "web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"namespaceSelector": {},
                           "podSelector": {"matchLabels": {"role": "client"}}}],
                 "ports": [{"port": 80}]}],
})
WEB = pod("x", "web", "10.244.1.10", labels={"app": "web"})
CLIENT = pod("y", "client", "10.244.2.10", node="node-2", labels={"role": "client"})
CLIENT_2 = pod("y", "client-2", "10.244.2.11", node="node-2", labels={"role": "client"})


def serve(node: Node, pods=(WEB, CLIENT), policies=(WEB_FROM_CLIENTS,)) -> None:
    node.api.set_state(namespaces=[namespace("x"), namespace("y")], pods=list(pods),
                       policies=list(policies))


@pytest.fixture(params=("nft", "legacy"))
def node(request, netns):
    n = Node(netns, backend=request.param)
    yield n
    n.close()


def cycles(daemon) -> list[dict]:
    return [line for line in daemon.log() if line.get("event") == "cycle"]


def forward_rules(node: Node) -> list[str]:
    return [line for line in node.iptables_save(4).splitlines() if line.startswith("-A FORWARD")]


def test_idle_cycles_reuse_the_compiled_state_repair_drift_and_see_changes(node):
    serve(node)
    daemon = node.start_daemon("--interval", "1", "--metrics-port", "0")
    wait_for(lambda: len(cycles(daemon)) >= 3, 20, "three cycles")
    first, *idle = cycles(daemon)
    failed = [line for line in daemon.log()
              if line.get("event") in ("cycle-error", "startup-error")]
    assert not failed, daemon.log()
    assert first["reused"] is False and first["applied"] is True, daemon.log()
    assert all(c["reused"] is True and c["changes"] == 0 for c in idle)
    assert "-j KPM-FORWARD" in forward_rules(node)[0]

    # Drift while the API is idle: the kernel is still read and repaired.
    node.run(f"iptables-{node.backend}", "-D", "FORWARD", "1")
    assert not any("KPM-FORWARD" in r for r in forward_rules(node))
    seen = len(cycles(daemon))
    wait_for(lambda: any(c["changes"] for c in cycles(daemon)[seen:]), 10, "the repair")
    repair = next(c for c in cycles(daemon)[seen:] if c["changes"])
    assert repair["reused"] is True and repair["applied"] is True
    assert "-j KPM-FORWARD" in forward_rules(node)[0]

    # A change in the API is compiled and applied: a new client joins the set.
    seen = len(cycles(daemon))
    serve(node, pods=(WEB, CLIENT, CLIENT_2))
    # The cycle's log line comes after its apply: wait for the line, not the set.
    changed = wait_for(lambda: next((c for c in cycles(daemon)[seen:] if c["changes"]), None),
                       10, "a cycle that applies the new client")
    assert changed["reused"] is False
    assert "10.244.2.11" in node.ipset_save()
    wait_for(lambda: len(cycles(daemon)) >= seen + 3, 10, "more idle cycles")
    assert cycles(daemon)[-1]["reused"] is True and cycles(daemon)[-1]["changes"] == 0


def test_conntrack_cleanup_runs_after_narrowing_applies_only(node):
    def cleanup_logged(result) -> bool:
        return any(line.get("event") == "conntrack-cleanup" for line in result.log)

    serve(node)
    first = node.reconcile("--once")
    assert first.code == 0, first.stderr
    assert cleanup_logged(first)                   # chains and hooks written: may narrow

    serve(node, pods=(WEB, CLIENT, CLIENT_2))      # a peer joins: one member added
    joined = node.reconcile("--once")
    assert joined.code == 0, joined.stderr
    assert [c["changes"] for c in joined.log if c.get("event") == "cycle"] == [1]
    assert "10.244.2.11" in node.ipset_save()
    assert not cleanup_logged(joined)

    serve(node, pods=(WEB, CLIENT))                # it leaves: a member deleted
    left = node.reconcile("--once")
    assert left.code == 0, left.stderr
    assert "10.244.2.11" not in node.ipset_save()
    assert cleanup_logged(left)
