"""What an operator reads on the nftables dataplane, end to end in a
network namespace: `reconcile.py status`, the dry-run outputs and
`--cleanup`, against the real nft table and a real API server; and
/metrics of the loop."""
from __future__ import annotations

import json

import pytest

from tests.kernel.node import Node, wait_for
from tests.kernel.test_dry_run_and_status import three_pods
from tests.kernel.test_reconcile import add_foreign_rules

NFT = ("--dataplane", "nftables")
T = ("inet", "kube-policy-manager")
FOREIGN_TABLE = """table inet other {
    chain forward {
        type filter hook forward priority 0; policy accept;
        tcp dport 25 drop comment "no mail"
    }
}
"""

@pytest.fixture
def node(netns):
    n = Node(netns, backend="nft")
    three_pods(n)
    yield n
    n.close()


def listing(node: Node) -> str:
    """Our table as nft lists it; "" when there is none."""
    try:
        return node.run("nft", "list", "table", *T)
    except Exception:  # noqa: BLE001 - nft exits 1 when the table is not there
        return ""


def chains_of(node: Node, pod_key: str) -> list[dict]:
    doc = json.loads(node.reconcile("status", *NFT, "--output", "json").stdout)
    return next(p for p in doc["pods"] if p["pod"] == pod_key)["chains"]


def rows(result) -> list[list[str]]:
    return [line.split() for line in result.stdout.splitlines()]


def test_status_before_and_after_applying_and_after_drift(node):
    before = node.reconcile("status", *NFT)
    assert before.code == 2, before.stderr
    table = rows(before)
    assert table[0] == ["POD", "INGRESS", "EGRESS", "POLICIES", "RULES", "SETS", "KERNEL"]
    assert table[1] == ["x/db", "-", "isolated", "1", "2", "0", "missing"]
    assert table[2] == ["x/free", "-", "-", "0", "0", "0", "in", "sync"]
    assert table[3][:2] == ["x/web", "isolated"] and table[3][-1] == "missing"
    assert listing(node) == ""                                # status writes nothing

    assert node.reconcile("--once", *NFT).code == 0
    written = listing(node)
    done = node.reconcile("status", *NFT)
    assert done.code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [r[-2:] for r in rows(done)[1:4]] == [["in", "sync"]] * 3
    assert lines[5].startswith("node node-1: 2 policies, 3 local pods, ")
    assert lines[5].endswith("; kernel in sync; dataplane nftables, IPv4+IPv6")

    [db_out] = [c["name"] for c in chains_of(node, "x/db")]
    node.run("nft", "flush", "chain", *T, db_out)
    node.run("nft", "delete", "element", *T, "kpm-ingress4", "{ 10.244.1.10 }")
    tampered = listing(node)
    drifted = node.reconcile("status", *NFT)
    assert drifted.code == 2
    assert rows(drifted)[1][-1] == "differs" and rows(drifted)[3][-1] == "missing"
    lines = drifted.stdout.splitlines()
    assert f"  x/db: {db_out} (IPv4 egress): differs, rules differ" in lines
    assert any(line.startswith("  x/web: kpm-i4-") and
               line.endswith("(IPv4 ingress): missing, 10.244.1.10 missing from kpm-ingress4")
               for line in lines)
    assert "kernel out of sync (2 changes pending, 1 drift)" in lines[5]
    assert listing(node) == tampered != written


def test_status_json_and_the_daemons_options(node):
    flags = ("--log-drops", "--isolate-new-pods", "--pod-cidr", "10.244.1.0/24",
             "--pod-cidr", "fd00:10:244:1::/64")
    assert node.reconcile("--once", *NFT, *flags).code == 0
    done = node.reconcile("status", *NFT, *flags, "--output", "json")
    assert done.code == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["dataplane"], doc["backend"], doc["in_sync"]) == ("nftables", None, True)
    assert [(p["pod"], p["state"], p["known"]) for p in doc["pods"]] == [
        ("x/db", "in sync", True), ("x/free", "in sync", True), ("x/web", "in sync", True)]
    web = doc["pods"][2]
    assert [(c["family"], c["direction"]) for c in web["chains"]] == [(4, "ingress"), (6, "ingress")]
    plain = node.reconcile("status", *NFT)                 # without the options: differs
    assert plain.code == 2
    assert any(line.startswith("  node: chain-delete kpm-localsrc4 (IPv4)")
               for line in plain.stdout.splitlines())


def test_dry_run_outputs_and_exit_codes(node):
    assert node.reconcile("--once", *NFT).code == 0
    same = node.reconcile("--once", "--dry-run", *NFT)
    assert (same.code, same.stdout) == (0, "in sync: nothing to change\n")
    for output in ("json", "raw"):
        assert node.reconcile("--once", "--dry-run", *NFT, "--output", output).code == 0

    [db_out] = [c["name"] for c in chains_of(node, "x/db")]
    node.run("nft", "flush", "chain", *T, db_out)
    tampered = listing(node)

    dry = node.reconcile("--once", "--dry-run", *NFT)
    assert dry.code == 2, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"chain-rewrite {db_out}: rewrite 2 rules; ")
    assert lines[0].endswith("[drift]")
    assert "+ reject with icmpx port-unreachable  # reject" in lines
    assert lines[-1] == ("1 change pending: 1 chain rewritten; 1 of them drift (the kernel was "
                         "changed by something other than kube-policy-manager)")

    js = node.reconcile("--once", "--dry-run", *NFT, "--output", "json")
    assert js.code == 2, js.stderr
    doc = json.loads(js.stdout)
    assert (doc["dataplane"], doc["in_sync"], doc["drift"]) == ("nftables", False, 1)
    [chain] = doc["chains"]
    assert (chain["name"], chain["drift"], len(chain["before"]), len(chain["after"])) == \
        (db_out, True, 0, 2)
    assert doc["payloads"]["nft"].startswith(f"flush chain inet kube-policy-manager {db_out}\n")

    raw = node.reconcile("--once", "--dry-run", *NFT, "--output", "raw")
    assert raw.code == 2
    assert raw.stdout == "# nft -f - : one transaction, 3 lines\n" + doc["payloads"]["nft"]
    assert listing(node) == tampered                       # dry runs write nothing

    assert node.reconcile("--once", *NFT).code == 0
    assert node.reconcile("--once", "--dry-run", *NFT).code == 0


def test_cleanup_removes_both_dataplanes_objects_and_nothing_else(node):
    add_foreign_rules(node)
    node.run("nft", "-f", "-", stdin=FOREIGN_TABLE)
    pristine = node.snapshot()
    foreign_table = node.run("nft", "list", "table", "inet", "other")
    # the iptables dataplane's chains and sets, then our table beside them
    assert node.reconcile("--once").code == 0
    assert "KPM-" in node.iptables_save(4) and "KPM-" in node.ipset_save()
    payload = node.reconcile("--once", "--dry-run", *NFT, "--output", "raw")
    assert payload.code == 2 and payload.stdout.startswith("# nft -f - ")
    node.run("nft", "-f", "-", stdin=payload.stdout)
    assert "kpm-ingress4" in listing(node)
    both = (node.snapshot(), listing(node))

    dry = node.reconcile("--cleanup", "--dry-run", *NFT)
    assert dry.code == 2, dry.stderr
    assert dry.stdout.startswith("table-delete kube-policy-manager: ")
    assert "KPM-FORWARD" in dry.stdout
    assert (node.snapshot(), listing(node)) == both          # a dry run writes nothing

    cleaned = node.reconcile("--cleanup", *NFT)
    assert cleaned.code == 0, cleaned.stderr
    assert listing(node) == ""
    assert node.snapshot() == pristine                       # foreign rules and ipset kept
    assert node.run("nft", "list", "table", "inet", "other") == foreign_table
    again = node.reconcile("--cleanup", "--dry-run", *NFT)
    assert again.code == 0, again.stdout + again.stderr


def test_metrics_in_the_loop_count_nft_writes(node):
    daemon = node.start_daemon("--interval", "1", *NFT)
    wait_for(lambda: daemon.status("/readyz") == 200, 15, "the daemon's first cycle")
    written = daemon.metric("kpm_kernel_writes_total", tool="nft")
    assert written is not None and written > 0
    assert daemon.metric("kpm_kernel_writes_total", tool="iptables") == 0
    assert daemon.metric("kpm_local_pods") == 3
    status = json.loads(node.reconcile("status", *NFT, "--output", "json").stdout)
    assert daemon.metric("kpm_rules") == status["rules"] > 0
    assert daemon.metric("kpm_ipsets") == status["sets"]
    # an idle cycle writes nothing more
    cycles = daemon.metric("kpm_cycles_total", result="ok")
    wait_for(lambda: daemon.metric("kpm_cycles_total", result="ok") > cycles, 10, "another cycle")
    assert daemon.metric("kpm_kernel_writes_total", tool="nft") == written
    assert daemon.status("/healthz") == 200
