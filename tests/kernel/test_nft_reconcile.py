"""reconcile.py --dataplane nftables end to end: the real command in a
network namespace, against a real API server, writing the real nft table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace

import pytest

from lib import nft_parse
from lib.nft_state import ABSENT, Table
from tests.kernel.node import Node, json_lines, pod, policy, small_cluster, wait_for

WEB_ONLY_FROM_CLIENTS = policy("x", "web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}},
                           "podSelector": {"matchLabels": {"role": "client"}}}],
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


# --- helpers ----------------------------------------------------------------------

CLIENT_2 = pod("y", "client-2", "10.244.2.20", node="node-2", labels={"role": "client"})
WEB_2 = pod("x", "web-2", "10.244.1.12", labels={"app": "web"})
T = ("inet", "kube-policy-manager")


def ours(node: Node) -> Table:
    """Our table as nft lists it, parsed (ABSENT when there is none)."""
    try:
        text = node.run("nft", "-j", "list", "table", *T)
    except subprocess.CalledProcessError as err:
        assert nft_parse.table_absent(err.stderr), err.stderr
        return ABSENT
    return nft_parse.parse(text)


def web_chain(table: Table) -> str:
    return table.map_map()["kpm-ingress4"].elements["10.244.1.10"].split()[1]


def peer_set(table: Table, address: str) -> str:
    (name,) = [s.name for s in table.sets if address in s.elements]
    return name


def kpm_iptables(node: Node) -> list[str]:
    """Every line of ours in both families' filter tables and in ipset."""
    saved = node.iptables_save(4) + node.iptables_save(6)
    return ([line for line in saved.splitlines() if "KPM" in line]
            + [line for line in node.ipset_save().splitlines() if "KPM" in line])


def ok(result) -> dict:
    assert result.code == 0, result.stderr
    return cycle_line(result.stderr)


# --- drift -------------------------------------------------------------------------

TAMPER = {
    # name: (the nft command, given our table; drift flagged)
    "pod-chain-flushed": (lambda t: ["flush", "chain", *T, web_chain(t)], True),
    # elements come and go with pods: one missing is repaired, not flagged
    "set-element-deleted": (lambda t: ["delete", "element", *T, peer_set(t, "10.244.2.10"),
                                       "{ 10.244.2.10 }"], False),
    "map-element-deleted": (lambda t: ["delete", "element", *T, "kpm-ingress4",
                                       "{ 10.244.1.10 }"], False),
    # a --once run has not seen the table before: it cannot tell drift from a first start
    "table-deleted": (lambda t: ["delete", "table", *T], False),
}


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_drift_is_repaired_in_one_cycle_and_the_next_writes_nothing(node, tamper):
    command, flagged = TAMPER[tamper]
    ok(node.reconcile("--once", *NFT))
    before = ours(node)
    node.run("nft", *command(before))
    assert ours(node) != before
    line = ok(node.reconcile("--once", *NFT))
    assert line["applied"] is True and line["changes"] >= 1
    assert (line["drift"] >= 1) == flagged, line
    assert ours(node) == before
    again = ok(node.reconcile("--once", *NFT))
    assert again["changes"] == 0 and again["applied"] is False


def test_a_loop_flags_its_deleted_table_as_drift_and_rebuilds_it(node):
    daemon = node.start_daemon("--interval", "1", *NFT)
    wait_for(lambda: daemon.status("/readyz") == 200, 20, "the first cycle")
    before = ours(node)
    node.run("nft", "delete", "table", *T)
    line = wait_for(lambda: next((l for l in daemon.log() if l.get("event") == "cycle"
                                  and l.get("drift")), None), 10, "a cycle flagging drift")
    assert line["applied"] is True
    wait_for(lambda: ours(node) == before, 5, "the table rebuilt")


@pytest.mark.parametrize("mode", [("--interval", "1"), ("--watch", "--interval", "60")],
                         ids=["poll", "watch"])
def test_a_loop_applies_a_pod_change(node, mode):
    daemon = node.start_daemon(*mode, *NFT)
    wait_for(lambda: daemon.status("/readyz") == 200, 20, "the first cycle")
    assert "10.244.1.12" not in ours(node).map_map()["kpm-ingress4"].elements
    small_cluster(node, (WEB_ONLY_FROM_CLIENTS,), (WEB_2,))
    wait_for(lambda: "10.244.1.12" in ours(node).map_map()["kpm-ingress4"].elements, 10,
             "the new pod's map element")
    table = ours(node)
    ingress = table.map_map()["kpm-ingress4"].elements
    assert ingress["10.244.1.12"] == ingress["10.244.1.10"]         # one shared chain


# --- a failing transaction ---------------------------------------------------------

RACING_NFT = """#!/bin/sh
# nft, with someone else's change made just before each transaction
if [ "$1" = "-f" ] && [ -f "$(dirname "$0")/race.nft" ]; then
    {real} -f "$(dirname "$0")/race.nft"
fi
exec {real} "$@"
"""


def test_a_refused_transaction_leaves_the_previous_rules_and_names_the_line(node, tmp_path):
    """Between our read and our write, an operator deletes an element the
    plan deletes too: the kernel refuses the whole transaction, nothing of
    it is applied (the new pod's element neither), the error quotes the
    refused line, and the next cycle converges."""
    small_cluster(node, (WEB_ONLY_FROM_CLIENTS,), (CLIENT_2,))
    ok(node.reconcile("--once", *NFT))
    shim = tmp_path / "nft"
    shim.write_text(RACING_NFT.format(real=shutil.which("nft")))
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    before = ours(node)
    name = peer_set(before, "10.244.2.20")
    (tmp_path / "race.nft").write_text(f"delete element {' '.join(T)} {name} {{ 10.244.2.20 }}\n")
    # client-2 leaves, web-2 arrives
    small_cluster(node, (WEB_ONLY_FROM_CLIENTS,), (WEB_2,))
    done = subprocess.run(node.reconcile_argv("--once", *NFT), capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 1, done.stderr
    (error,) = [l for l in json_lines(done.stderr) if l.get("event") == "cycle-error"]
    assert error["stage"] == "apply"
    assert "nft -f (transaction)" in error["message"]
    assert f"delete element inet kube-policy-manager {name} {{ 10.244.2.20 }}" in error["message"]
    after = ours(node)
    raced = replace(before, sets=tuple(replace(s, elements=s.elements - {"10.244.2.20"})
                                       for s in before.sets))
    assert after == raced                                # only the operator's change
    assert "10.244.1.12" not in after.map_map()["kpm-ingress4"].elements
    (tmp_path / "race.nft").unlink()
    ok(node.reconcile("--once", *NFT))
    assert "10.244.1.12" in ours(node).map_map()["kpm-ingress4"].elements
    assert ok(node.reconcile("--once", *NFT))["changes"] == 0


# --- what is not ours --------------------------------------------------------------

FOREIGN = """table inet foreign {
	chain screen {
		type filter hook forward priority 0; policy accept;
		ip saddr 192.0.2.1 drop
	}
}
table ip kpm-lookalike {
	set kpm-n4-aaaa {
		type ipv4_addr
		elements = { 192.0.2.7 }
	}
}
"""


def foreign_state(node: Node) -> tuple[str, str, str, str]:
    return (node.run("nft", "list", "table", "inet", "foreign"),
            node.run("nft", "list", "table", "ip", "kpm-lookalike"),
            node.iptables_save(4), node.iptables_save(6))


def test_foreign_tables_and_iptables_rules_are_never_touched(node):
    node.run("nft", "-f", "-", stdin=FOREIGN)
    node.run("iptables-nft", "-A", "FORWARD", "-s", "192.0.2.2", "-j", "DROP")
    node.run("ip6tables-nft", "-A", "INPUT", "-s", "2001:db8::2", "-j", "DROP")
    node.run("ipset", "create", "ADMIN-SET", "hash:ip")
    before = foreign_state(node), node.ipset_save()
    ok(node.reconcile("--once", *NFT))
    assert (foreign_state(node), node.ipset_save()) == before
    small_cluster(node, (WEB_ONLY_FROM_CLIENTS,), (WEB_2, CLIENT_2))
    assert ok(node.reconcile("--once", *NFT))["applied"] is True
    assert (foreign_state(node), node.ipset_save()) == before
    assert node.reconcile("--cleanup", *NFT).code == 0
    assert ours(node) is ABSENT
    assert (foreign_state(node), node.ipset_save()) == before


# --- switching dataplanes ------------------------------------------------------------

def test_switching_dataplanes_leaves_only_the_new_ones_rules(node):
    ok(node.reconcile("--once", "--dataplane", "iptables"))
    assert kpm_iptables(node) and ours(node) is ABSENT
    ok(node.reconcile("--once", *NFT))
    assert kpm_iptables(node) == []
    table = ours(node)
    assert "10.244.1.10" in table.map_map()["kpm-ingress4"].elements
    assert ok(node.reconcile("--once", *NFT))["changes"] == 0
    # and back
    ok(node.reconcile("--once", "--dataplane", "iptables"))
    assert ours(node) is ABSENT
    assert any("-d 10.244.1.10/32" in l for l in node.owned_chain("KPM-FORWARD"))
    assert ok(node.reconcile("--once", "--dataplane", "iptables"))["changes"] == 0


# --- conntrack cleanup -------------------------------------------------------------

def test_conntrack_cleanup_runs_after_narrowing_applies_only(node):
    """A peer joins (10.244.2.11 beside .10): its element added to the plain
    peer set only allows more, so no cut; it leaves again: cut."""
    def cleanup_logged(result) -> bool:
        return any(line.get("event") == "conntrack-cleanup" for line in result.log)

    first = node.reconcile("--once", *NFT)
    assert ok(first)["applied"] and cleanup_logged(first)      # the table built: may narrow
    neighbour = pod("y", "client-2", "10.244.2.11", node="node-2", labels={"role": "client"})
    small_cluster(node, (WEB_ONLY_FROM_CLIENTS,), (neighbour,))
    joined = node.reconcile("--once", *NFT)
    assert ok(joined)["changes"] == 1
    peers = ours(node).set_map()[peer_set(ours(node), "10.244.2.10")]
    assert {"10.244.2.10", "10.244.2.11"} <= peers.elements and not peers.interval
    assert not cleanup_logged(joined)
    small_cluster(node, (WEB_ONLY_FROM_CLIENTS,), ())
    left = node.reconcile("--once", *NFT)
    assert ok(left)["changes"] == 1 and cleanup_logged(left)
