"""reconcile.py --dataplane nftables end to end: the real command in a
network namespace, against a real API server, writing the real nft table."""
from __future__ import annotations

import json

import pytest

from tests.kernel.node import Node, small_cluster, policy

WEB_ONLY_FROM_CLIENTS = policy("x", "web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                 "ports": [{"port": 80}]}],
})
NFT = ("--dataplane", "nftables")


@pytest.fixture
def node(netns):
    n = Node(netns, backend="nft")
    small_cluster(n, (WEB_ONLY_FROM_CLIENTS,), ())
    yield n
    n.close()


def table(node: Node) -> str:
    return node.run("nft", "list", "table", "inet", "kube-policy-manager")


def cycle_line(stderr: str) -> dict:
    return [json.loads(l) for l in stderr.splitlines() if '"cycle"' in l][-1]


def test_first_run_writes_our_table_and_the_second_writes_nothing(node):
    first = node.reconcile("--once", *NFT)
    assert first.code == 0, first.stderr
    listing = table(node)
    assert "hook forward priority filter - 10; policy accept;" in listing
    assert "ip daddr vmap @kpm-ingress4" in listing
    assert "KPM" not in node.iptables_save(4)              # nothing in the shared tables
    second = node.reconcile("--once", *NFT)
    assert second.code == 0, second.stderr
    assert table(node) == listing
    line = cycle_line(second.stderr)
    assert line["changes"] == 0 and line["applied"] is False
    dry = node.reconcile("--once", "--dry-run", *NFT)
    assert dry.code == 0, dry.stderr
