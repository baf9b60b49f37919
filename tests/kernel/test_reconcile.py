"""The command line end to end: the real reconcile.py in a network namespace,
against a real API server, writing the real kernel's tables."""
from __future__ import annotations

import json

import pytest

from tests.kernel.node import small_cluster, Node, namespace, pod, policy

BACKENDS = ("nft", "legacy")

WEB_ONLY_FROM_CLIENTS = policy("x", "web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                 "ports": [{"port": 80}]}],
})
DENY_EGRESS_DB = policy("x", "db-no-egress", {
    "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Egress"]})


def cluster(node: Node, policies=(WEB_ONLY_FROM_CLIENTS, DENY_EGRESS_DB), extra_pods=()):
    small_cluster(node, policies, extra_pods)


@pytest.fixture(params=BACKENDS)
def node(request, netns):
    n = Node(netns, backend=request.param)
    yield n
    n.close()


def add_foreign_rules(node: Node) -> None:
    """What kube-proxy, Docker and an admin leave in a node's tables."""
    node.run(f"iptables-{node.backend}-restore", "--noflush", stdin="\n".join([
        "*filter",
        ":KUBE-FORWARD - [0:0]",
        ":DOCKER-USER - [0:0]",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "-A FORWARD -j DOCKER-USER",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        "-A DOCKER-USER -j RETURN",
        "COMMIT", ""]))
    node.run(f"iptables-{node.backend}", "-P", "FORWARD", "DROP")
    node.run("ipset", "create", "admin-allow", "hash:ip")
    node.run("ipset", "add", "admin-allow", "192.0.2.1")


def test_first_apply_hooks_first_and_second_run_writes_nothing(node):
    add_foreign_rules(node)
    cluster(node)
    first = node.reconcile("--once")
    assert first.code == 0, first.stderr
    v4 = node.iptables_save(4)
    forward = [line for line in v4.splitlines() if line.startswith("-A FORWARD")]
    assert "-j KPM-FORWARD" in forward[0]                  # our hook is first
    assert any("KUBE-FORWARD" in line for line in forward[1:])  # theirs kept, in order
    assert "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in v4
    assert ":FORWARD DROP" in v4                            # the admin's policy untouched
    assert "-j KPM-INPUT" in [l for l in v4.splitlines() if l.startswith("-A INPUT")][0]
    assert "KPM-" in node.ipset_save() and "admin-allow" in node.ipset_save()

    before = node.snapshot()
    second = node.reconcile("--once")
    assert second.code == 0, second.stderr
    assert node.snapshot() == before
    cycle_line = [json.loads(l) for l in second.stderr.splitlines() if '"cycle"' in l][-1]
    assert cycle_line["changes"] == 0 and cycle_line["applied"] is False

    dry = node.reconcile("--once", "--dry-run")
    assert dry.code == 0, dry.stderr


def test_dry_run_reports_pending_changes_and_writes_nothing(node):
    cluster(node)
    before = node.snapshot()
    dry = node.reconcile("--once", "--dry-run")
    assert dry.code == 2, dry.stderr
    assert "+ chain KPM-FORWARD (IPv4)" in dry.stdout
    raw = node.reconcile("--once", "--dry-run", "--output", "raw")
    assert raw.code == 2, raw.stderr
    assert "*filter" in raw.stdout and "KPM-FORWARD" in raw.stdout
    assert node.snapshot() == before


def test_changed_policy_touches_only_its_own_pods_chain(node):
    cluster(node)
    assert node.reconcile("--once").code == 0
    chains_before = {c: node.owned_chain(c) for c in _owned_chains(node)}
    widened = policy("x", "web", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": 80}, {"port": 443}]}]})
    cluster(node, policies=(widened, DENY_EGRESS_DB))
    dry = node.reconcile("--once", "--dry-run")
    assert dry.code == 2
    assert node.reconcile("--once").code == 0
    chains_after = {c: node.owned_chain(c) for c in _owned_chains(node)}
    changed = {c for c in chains_after if chains_after[c] != chains_before.get(c)}
    assert len(changed) == 1 and next(iter(changed)).startswith("KPM-I-")
    assert node.reconcile("--once", "--dry-run").code == 0


def test_remote_pod_joining_a_selector_changes_only_set_members(node):
    cluster(node)
    assert node.reconcile("--once").code == 0
    v4, v6, sets = node.snapshot()
    cluster(node, extra_pods=[pod("x", "client2", "10.244.2.11", node="node-2",
                                  labels={"role": "client"})])
    assert node.reconcile("--once").code == 0
    assert node.iptables_save(4) == v4 and node.iptables_save(6) == v6
    assert "10.244.2.11" in node.ipset_save() and "10.244.2.11" not in sets


def test_cleanup_restores_the_tables_exactly(node):
    add_foreign_rules(node)
    pristine = node.snapshot()
    cluster(node)
    assert node.reconcile("--once").code == 0
    assert node.snapshot() != pristine
    dry = node.reconcile("--cleanup", "--dry-run")
    assert dry.code == 2 and "KPM-" in dry.stdout
    cleaned = node.reconcile("--cleanup")
    assert cleaned.code == 0, cleaned.stderr
    assert node.snapshot() == pristine
    assert node.reconcile("--cleanup", "--dry-run").code == 0


def test_api_unreachable_fails_the_cycle_and_keeps_rules(node):
    cluster(node)
    assert node.reconcile("--once").code == 0
    before = node.snapshot()
    node.api.fail_next(500, count=10)
    failed = node.reconcile("--once")
    assert failed.code == 1
    errors = [json.loads(l) for l in failed.stderr.splitlines() if '"cycle-error"' in l]
    assert errors and errors[0]["stage"] == "fetch"
    assert node.snapshot() == before


def _owned_chains(node: Node) -> list[str]:
    return [line[1:].split()[0] for line in node.iptables_save(4).splitlines()
            if line.startswith(":KPM-")]
