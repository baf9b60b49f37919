"""What an operator reads, end to end in a network namespace: the dry-run
diff naming drift, its JSON form, and `reconcile.py status`, against the
real kernel's tables and a real API server."""
from __future__ import annotations

import json

import pytest

from lib.ruleset import short_hash
from tests.kernel.node import Node, namespace, pod, policy, wait_for

BACKENDS = ("nft", "legacy")

WEB = policy("x", "web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                 "ports": [{"port": 80}]}],
})
DB_NO_EGRESS = policy("x", "db-no-egress", {
    "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Egress"]})
WEB_IN = "KPM-I-" + short_hash("x/web")
DB_OUT = "KPM-E-" + short_hash("x/db")


def three_pods(n: Node) -> None:
    """x/web (dual-stack, ingress from clients on 80), x/db (no egress) and
    x/free on this node, x/client on node-2."""
    n.api.set_state(
        namespaces=[namespace("x")],
        pods=[pod("x", "web", "10.244.1.10", labels={"app": "web"}, ipv6="fd00:10:244:1::10"),
              pod("x", "db", "10.244.1.11", labels={"app": "db"}),
              pod("x", "free", "10.244.1.12"),
              pod("x", "client", "10.244.2.10", node="node-2", labels={"role": "client"})],
        policies=[WEB, DB_NO_EGRESS])


@pytest.fixture(params=BACKENDS)
def node(request, netns):
    n = Node(netns, backend=request.param)
    three_pods(n)
    yield n
    n.close()


def iptables(node: Node, *args: str) -> str:
    return node.run(f"iptables-{node.backend}", *args)


def test_a_rule_deleted_by_hand_is_drift_in_the_diff_and_the_json(node):
    assert node.reconcile("--once").code == 0
    assert len(node.owned_chain(WEB_IN)) == 3
    iptables(node, "-D", WEB_IN, "3")                  # the final REJECT goes
    tampered = node.snapshot()

    dry = node.reconcile("--once", "--dry-run")
    assert dry.code == 2, dry.stderr
    lines = dry.stdout.splitlines()
    assert f"~ chain {WEB_IN} (IPv4): rewrite 3 rules  DRIFT: lost its final rules" in lines
    assert "    + -j REJECT --reject-with icmp-port-unreachable   # x/web_reject" in lines
    assert lines[-1] == ("1 change pending: 1 chain rewritten; 1 of them drift (the kernel was "
                         "changed by something other than kube-policy-manager)")
    assert "\x1b" not in dry.stdout

    js = node.reconcile("--once", "--dry-run", "--output", "json")
    assert js.code == 2, js.stderr
    doc = json.loads(js.stdout)
    assert doc["in_sync"] is False and doc["drift"] == 1
    [chain] = doc["chains"]
    assert (chain["name"], chain["family"], chain["drift"], chain["drift_reason"]) == \
        (WEB_IN, 4, True, "lost its final rules")
    assert len(chain["before"]) == 2 and len(chain["after"]) == 3
    assert doc["payloads"]["iptables"]["4"].startswith(f"*filter\n:{WEB_IN} - [0:0]\n")

    raw = node.reconcile("--once", "--dry-run", "--output", "raw")
    assert raw.code == 2
    assert raw.stdout == "# iptables-restore --noflush: IPv4 chains and hooks\n" + \
        doc["payloads"]["iptables"]["4"]
    assert node.snapshot() == tampered                  # dry runs write nothing

    assert node.reconcile("--once").code == 0
    again = node.reconcile("--once", "--dry-run")
    assert again.code == 0 and again.stdout == "in sync: nothing to change\n"


def test_a_hook_pushed_down_is_drift(node):
    assert node.reconcile("--once").code == 0
    iptables(node, "-I", "FORWARD", "1", "-s", "192.0.2.0/24", "-j", "ACCEPT")
    dry = node.reconcile("--once", "--dry-run")
    assert dry.code == 2
    assert ("~ hook FORWARD (IPv4): remove 1, insert KPM-FORWARD at 1  DRIFT: moved to 2"
            in dry.stdout.splitlines())
    doc = json.loads(node.reconcile("--once", "--dry-run", "--output", "json").stdout)
    [hook] = doc["hooks"]
    assert hook["name"] == "FORWARD" and hook["drift"] is True
    assert [r["position"] for r in hook["before"]] == [2]


def test_status_table_before_and_after_applying(node):
    before = node.reconcile("status")
    assert before.code == 2, before.stderr
    rows = before.stdout.splitlines()
    assert rows[0].split() == ["POD", "INGRESS", "EGRESS", "POLICIES", "RULES", "SETS", "KERNEL"]
    assert rows[1].split() == ["x/db", "-", "isolated", "1", "2", "0", "missing"]
    assert rows[3].split() == ["x/web", "isolated", "-", "1", "6", "2", "missing"]
    snapshot = node.snapshot()

    assert node.reconcile("--once").code == 0
    done = node.reconcile("status")
    assert done.code == 0, done.stderr
    rows = done.stdout.splitlines()
    assert [r.split() for r in rows[1:4]] == [
        ["x/db", "-", "isolated", "1", "2", "0", "in", "sync"],
        ["x/free", "-", "-", "0", "0", "0", "in", "sync"],
        ["x/web", "isolated", "-", "1", "6", "2", "in", "sync"],
    ]
    assert rows[5].startswith("node node-1: 2 policies, 3 local pods, ")
    assert rows[5].endswith(f"; kernel in sync; dataplane iptables (backend {node.backend}), IPv4+IPv6")
    assert snapshot != node.snapshot()

    iptables(node, "-F", DB_OUT)
    after_tamper = node.snapshot()
    drifted = node.reconcile("status")
    assert drifted.code == 2
    rows = drifted.stdout.splitlines()
    assert rows[1].split()[-1] == "differs"
    assert f"  x/db: {DB_OUT} (IPv4 egress): differs, rules differ" in rows
    assert "kernel out of sync (1 change pending, 1 drift)" in rows[5]
    assert node.snapshot() == after_tamper               # status writes nothing


def test_status_json(node):
    assert node.reconcile("--once").code == 0
    done = node.reconcile("status", "--output", "json")
    assert done.code == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["node"], doc["backend"], doc["in_sync"]) == ("node-1", node.backend, True)
    assert doc["families"] == [4, 6]
    web = next(p for p in doc["pods"] if p["pod"] == "x/web")
    assert web["ingress_isolated"] is True and web["egress_isolated"] is False
    assert web["policies"] == ["x/web"] and web["state"] == "in sync"
    assert [(c["family"], c["direction"], c["state"]) for c in web["chains"]] == [
        (4, "ingress", "in sync"), (6, "ingress", "in sync")]


def test_status_with_the_api_down_is_an_error(node):
    node.api.fail_next(500, count=20)
    failed = node.reconcile("status")
    assert failed.code == 1 and failed.stdout == ""
    assert '"stage": "fetch"' in failed.stderr


# --- the daemon's compile options -------------------------------------------------------

POD_CIDRS = ("10.244.1.0/24", "fd00:10:244:1::/64")
DAEMON_FLAGS = ("--log-drops", "--isolate-new-pods",
                "--pod-cidr", POD_CIDRS[0], "--pod-cidr", POD_CIDRS[1])
DB_IN_LOCAL_SRC = "-A KPM-LOCAL-SRC -s 10.244.1.11/32"


def pod_rows(result) -> dict[str, str]:
    """POD -> KERNEL column of a status table."""
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        if not line:
            break
        words = line.split()
        rows[words[0]] = " ".join(words[6:])
    return rows


def test_status_takes_the_daemons_options_and_finds_its_rules_in_sync(node):
    node.api.set_state(nodes=[{"metadata": {"name": "node-1"},
                               "spec": {"podCIDRs": list(POD_CIDRS)}}])
    daemon = node.start_daemon("--interval", "1", *DAEMON_FLAGS)
    wait_for(lambda: daemon.status("/readyz") == 200, 15, "the daemon's first cycle")
    save = node.iptables_save(4)
    assert "-j NFLOG" in save and DB_IN_LOCAL_SRC in save     # what the options add
    written = node.snapshot()

    same = node.reconcile("status", *DAEMON_FLAGS)
    assert same.code == 0, same.stdout + same.stderr
    assert pod_rows(same) == {"x/db": "in sync", "x/free": "in sync", "x/web": "in sync"}
    assert "; kernel in sync; " in same.stdout and "  node: " not in same.stdout
    # flags before or after the command's name, the pod ranges from the Node object
    for argv in (("--log-drops", "--pod-cidr", POD_CIDRS[0], "status", "--isolate-new-pods",
                  "--pod-cidr", POD_CIDRS[1]),
                 ("status", "--log-drops", "--isolate-new-pods", "--output", "json")):
        again = node.reconcile(*argv)
        assert again.code == 0, (argv, again.stdout, again.stderr)
    doc = json.loads(again.stdout)
    assert [(p["pod"], p["state"], p["known"]) for p in doc["pods"]] == [
        ("x/db", "in sync", True), ("x/free", "in sync", True), ("x/web", "in sync", True)]
    assert node.reconcile("--once", "--dry-run", *DAEMON_FLAGS).code == 0

    # without the options: the log rules and the new-pod chains are differences
    plain = node.reconcile("status")
    assert plain.code == 2, plain.stderr
    assert pod_rows(plain) == {"x/db": "differs", "x/free": "in sync", "x/web": "differs"}
    lines = plain.stdout.splitlines()
    assert f"  x/db: {DB_OUT} (IPv4 egress): differs, rules differ" in lines
    assert f"  x/web: {WEB_IN} (IPv6 ingress): differs, rules differ" in lines
    assert "  node: chain-delete KPM-LOCAL-SRC (IPv4): 4 rules" in lines
    assert any(line.startswith("  node: set-destroy KPM-L4-") for line in lines)
    log_only = node.reconcile("status", "--log-drops")      # half of them: still differs
    assert log_only.code == 2 and set(pod_rows(log_only).values()) == {"in sync"}
    assert "  node: chain-delete KPM-UNKNOWN (IPv6): 3 rules" in log_only.stdout.splitlines()
    assert node.reconcile("--once", "--dry-run").code == 2

    # a pod the kernel no longer recognises would have no network: status names it
    daemon.signal()
    assert daemon.wait(10) == 0                                # or it would repair this
    number = next(i for i, line in enumerate(node.owned_chain("KPM-LOCAL-SRC"), 1)
                  if line.startswith(DB_IN_LOCAL_SRC))
    iptables(node, "-D", "KPM-LOCAL-SRC", str(number))
    tampered = node.snapshot()
    cut = node.reconcile("status", *DAEMON_FLAGS)
    assert cut.code == 2
    assert pod_rows(cut) == {"x/db": "differs", "x/free": "in sync", "x/web": "in sync"}
    assert ("  x/db: not known to KPM-LOCAL-SRC (IPv4): its traffic is refused"
            in cut.stdout.splitlines())
    assert node.snapshot() == tampered != written             # status wrote nothing
