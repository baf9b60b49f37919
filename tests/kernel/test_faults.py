"""Faults an operator meets, end to end: the real reconcile.py in a network
namespace against a real API server, with the API failing, the kernel
refusing a step, the process killed, the rules tampered with, the xtables
lock held, a signal, and objects no API server should send.

What every test checks is what the operator relies on: nothing is written
when the input is incomplete, what is in force stays in force, a failure is
a JSON line naming where it happened, and the next cycle repairs.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

from lib.kubeapi import NAMESPACES, NETWORK_POLICIES, PODS
from lib.ruleset import short_hash
from tests.kernel.node import small_cluster, REPO, NODE, Node, Result, namespace, pod, policy, wait_for

WEB = policy("x", "web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"namespaceSelector": {},
                           "podSelector": {"matchLabels": {"role": "client"}}}],
                 "ports": [{"port": 80}]}],
})
DB_NO_EGRESS = policy("x", "db-no-egress", {
    "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Egress"]})
# Added while the fault is on: a cycle that went through would write its chain.
DB_FROM_WEB = policy("x", "db-from-web", {
    "podSelector": {"matchLabels": {"app": "db"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                 "ports": [{"port": 5432}]}],
})
PENDING_COMMENT = "x/db-from-web_ingress[0]"


def ingress_chain(key: str) -> str:
    return "KPM-I-" + short_hash(key)


def egress_chain(key: str) -> str:
    return "KPM-E-" + short_hash(key)


def cluster(node: Node, policies=(WEB, DB_NO_EGRESS), extra_pods=()):
    small_cluster(node, policies, extra_pods)


def remote_pods(count: int, ns: str = "bulk") -> list[dict]:
    """Pods on another node, in a namespace that sorts before "x": the first
    page of a paginated pod list holds only them."""
    return [pod(ns, f"p{i:04d}", f"10.250.{i // 250}.{i % 250 + 1}", node="node-2",
                labels={"app": "bulk"}) for i in range(count)]


@pytest.fixture
def node(netns):
    n = Node(netns, backend="nft")
    yield n
    n.close()


@pytest.fixture
def legacy_node(netns):
    n = Node(netns, backend="legacy")
    yield n
    n.close()


# --- reading what the kernel holds ----------------------------------------------

def events(result: Result, event: str) -> list[dict]:
    return [line for line in result.log if line.get("event") == event]


def cycle_line(result: Result) -> dict:
    lines = events(result, "cycle")
    assert len(lines) == 1, result.stderr
    return lines[0]


def failed_stage(result: Result) -> dict:
    """The one cycle-error line of a failed --once run."""
    assert result.code == 1, result.stderr
    errors = events(result, "cycle-error")
    assert len(errors) == 1, result.stderr
    assert errors[0]["level"] == "ERROR"
    assert not events(result, "cycle")
    return errors[0]


def has_rule(node: Node, fragment: str, family: int = 4) -> bool:
    return any(fragment in line for line in node.iptables_save(family).splitlines()
               if line.startswith("-A "))


def sets(node: Node) -> dict[str, str]:
    """ipset name -> its create line then its sorted add lines, as `ipset save` prints them."""
    return _sets_of(node.ipset_save())


def owned_set(node: Node, prefix: str) -> str:
    names = [n for n in sets(node) if n.startswith(prefix)]
    assert len(names) == 1, names
    return names[0]


def assert_consistent(node: Node) -> None:
    """Every set a rule matches on exists (the kernel itself guarantees that
    jump targets exist)."""
    have = set(sets(node))
    for family in (4, 6):
        used = re.findall(r"--match-set (\S+)", node.iptables_save(family))
        assert set(used) <= have, f"IPv{family} rules use missing sets {set(used) - have}"


def assert_superset(node: Node, before: tuple[str, str, str]) -> set[str]:
    """Tables as before; every set as before. Returns the names of new sets."""
    v4, v6, _ = node.snapshot()
    assert (v4, v6) == before[:2]
    now, then = sets(node), _sets_of(before[2])
    for name, content in then.items():
        assert now.get(name) == content, name
    assert_consistent(node)
    return set(now) - set(then)


def _sets_of(ipset_save: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for line in ipset_save.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("create", "add"):
            out.setdefault(words[1], []).append(line)
    return {name: "\n".join(sorted(lines, key=lambda ln: (not ln.startswith("create"), ln)))
            for name, lines in out.items()}


# --- the API fails: --once -----------------------------------------------------

def _down(node: Node) -> None:
    node.stop_api()


FETCH_FAULTS = {
    # fault, what the error line says
    "api-down": (_down, "connection failed"),
    "http-500": (lambda n: n.api.fail_next(500, count=50), "HTTP 500"),
    "malformed-json": (lambda n: n.api.malformed_next(path=PODS),
                       f"GET {PODS} page 1: response is not JSON"),
    "not-a-list": (lambda n: n.api.respond_next({"kind": "Status", "apiVersion": "v1"},
                                                path=NETWORK_POLICIES),
                   f"GET {NETWORK_POLICIES} page 1: not a List: items is missing"),
    "hang": (lambda n: n.api.hang_next(60, path=NAMESPACES),
             f"GET {NAMESPACES} page 1: no response within the read timeout"),
    "second-page-fails": (lambda n: n.api.fail_page(2, path=PODS), f"GET {PODS} page 2: HTTP 500"),
}


@pytest.mark.parametrize("fault", list(FETCH_FAULTS))
def test_api_fault_writes_nothing_and_fails_the_run(node, fault):
    inject, message = FETCH_FAULTS[fault]
    # 600 remote pods fill the first page of 500; the local pods are on the
    # second, so a half list would remove their chains.
    bulk = remote_pods(600) if fault == "second-page-fails" else []
    cluster(node, extra_pods=bulk)
    assert node.reconcile("--once").code == 0
    before = node.snapshot()
    cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB), extra_pods=bulk)

    inject(node)
    started = time.monotonic()
    failed = node.reconcile("--once", "--api-timeout", "2", timeout=40)
    elapsed = time.monotonic() - started

    error = failed_stage(failed)
    assert error["stage"] == "fetch"
    assert message in error["message"]
    assert node.snapshot() == before
    assert elapsed < 8           # a hung API costs one read timeout (2 s here), no more
    if fault == "second-page-fails":
        pages = [(r.page, r.status) for r in node.api.requests if r.path == PODS]
        assert pages[-2:] == [(1, 200), (2, 500)]

    # The API answers again: the pending change goes in.
    if fault == "api-down":
        node.restart_api()
        cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB), extra_pods=bulk)
    node.api.clear_faults()
    assert node.reconcile("--once").code == 0
    assert has_rule(node, PENDING_COMMENT)


# --- the API fails: the loop -----------------------------------------------------

class RequestClock:
    """When the API server's requests arrived (to 20 ms: when first seen),
    from now on."""

    def __init__(self, node: Node):
        self.node = node
        self.seen = len(node.api.requests)
        self.arrivals: list[tuple[float, object]] = []

    def _poll(self) -> None:
        requests = self.node.api.requests
        now = time.monotonic()
        self.arrivals += [(now, r) for r in requests[self.seen:]]
        self.seen = len(requests)

    def times(self, predicate) -> list[float]:
        self._poll()
        return [t for t, r in self.arrivals if predicate(r)]

    def wait(self, predicate, count: int, timeout: float, what: str) -> list[float]:
        wait_for(lambda: len(self.times(predicate)) >= count, timeout, what, step=0.02)
        return self.times(predicate)


def test_loop_counts_errors_backs_off_turns_unhealthy_and_recovers(node):
    cluster(node)
    daemon = node.start_daemon("--interval", "1")
    wait_for(lambda: daemon.status("/readyz") == 200, 15, "the first successful cycle")
    assert daemon.status("/healthz") == 200
    before = node.snapshot()
    ok_before = daemon.metric("kpm_cycles_total", result="ok")

    clock = RequestClock(node)
    node.api.fail_next(500, count=1000)
    cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB))

    # Three failed cycles: one request each (the first list that fails ends it).
    def failed(r):
        return r.status == 500

    def listed(r):
        return r.path == NAMESPACES and r.status == 200

    attempts = clock.wait(failed, 3, 10, "three failed cycles")
    wait_for(lambda: daemon.metric("kpm_errors_total", stage="fetch") == 3, 5,
             "three fetch errors counted")
    wait_for(lambda: daemon.status("/healthz") == 503, 3,
             "/healthz to fail after three intervals without success")
    assert daemon.status("/readyz") == 200       # it did succeed once: keep serving
    assert node.snapshot() == before

    node.api.clear_faults()                       # the API is back
    attempts += wait_for(lambda: [t for t in clock.times(listed) if t > attempts[-1]], 10,
                         "the next cycle", step=0.02)[:1]
    wait_for(lambda: has_rule(node, PENDING_COMMENT), 10, "the pending policy applied")
    wait_for(lambda: daemon.status("/healthz") == 200, 5, "/healthz to recover")

    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # the interval, then 2 and 4 intervals: without backoff there would have
    # been 7 requests in this time, not 3
    assert 0.8 < gaps[0] < 1.7, gaps
    assert 1.8 < gaps[1] < 3.0, gaps
    assert 3.8 < gaps[2] < 5.5, gaps
    assert len(clock.times(failed)) == 3
    assert daemon.metric("kpm_errors_total", stage="fetch") == 3
    assert daemon.metric("kpm_cycles_total", result="ok") > ok_before

    log = daemon.log()
    errors = [line for line in log if line.get("event") == "cycle-error"]
    assert len(errors) == 3 and all(e["stage"] == "fetch" and "HTTP 500" in e["message"]
                                    for e in errors)
    assert [line["failures"] for line in log if line.get("event") == "backoff"] == [2, 3]


def test_loop_survives_the_api_server_going_away(node):
    cluster(node)
    daemon = node.start_daemon("--interval", "1")
    wait_for(lambda: daemon.status("/readyz") == 200, 15, "the first successful cycle")
    before = node.snapshot()

    node.stop_api()
    wait_for(lambda: daemon.metric("kpm_errors_total", stage="fetch") == 2, 5,
             "two failed cycles")
    assert node.snapshot() == before

    node.restart_api()
    cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB))
    wait_for(lambda: has_rule(node, PENDING_COMMENT), 10, "the pending policy applied")
    wait_for(lambda: daemon.status("/healthz") == 200, 5, "/healthz to recover")
    errors = [line for line in daemon.log() if line.get("event") == "cycle-error"]
    assert errors and all("connection failed" in e["message"] for e in errors)


# --- SIGTERM -------------------------------------------------------------------------

def sigterm(daemon) -> tuple[int, float]:
    """SIGTERM the daemon; its exit code and the seconds it took to exit."""
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = daemon.wait(10)
    return code, time.monotonic() - started


def test_sigterm_stops_the_loop_promptly_and_leaves_the_rules(node):
    cluster(node)
    daemon = node.start_daemon("--interval", "1")
    wait_for(lambda: daemon.status("/readyz") == 200, 15, "the first successful cycle")
    before = node.snapshot()
    # Between two cycles, as a kubelet's SIGTERM usually finds it.
    done = len([line for line in daemon.log() if line.get("event") == "cycle"])
    wait_for(lambda: len([line for line in daemon.log() if line.get("event") == "cycle"]) > done,
             5, "the next cycle to end", step=0.01)

    code, elapsed = sigterm(daemon)

    assert code == 0
    assert elapsed < 1.0, f"exited {elapsed:.2f} s after SIGTERM"
    assert node.snapshot() == before
    assert [line["message"] for line in daemon.log() if line.get("event") == "stop"] == [
        "stopping; rules stay in force"]


def test_sigterm_while_the_api_hangs_stops_at_once_and_writes_nothing(node):
    cluster(node)
    # A read timeout far longer than the test: waiting for it would show.
    daemon = node.start_daemon("--interval", "1", "--api-timeout", "30")
    wait_for(lambda: daemon.status("/readyz") == 200, 15, "the first successful cycle")
    before = node.snapshot()
    cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB))   # a cycle that went on would write

    clock = RequestClock(node)
    node.api.hang_next(60, count=1000, path=PODS)
    # list_cluster asks for pods right after namespaces: a namespace list
    # answered now means the next request, the pod list, is hanging.
    clock.wait(lambda r: r.path == NAMESPACES, 1, 5, "a cycle to start its fetch")
    time.sleep(0.3)
    assert daemon.process.poll() is None
    assert clock.times(lambda r: r.path == PODS) == []      # not answered: still hanging

    code, elapsed = sigterm(daemon)

    assert code == 0
    assert elapsed < 1.5, f"exited {elapsed:.2f} s after SIGTERM"
    assert node.snapshot() == before
    assert not has_rule(node, PENDING_COMMENT)
    log = daemon.log()
    abandoned = [line for line in log if line.get("event") == "cycle-abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["reason"] == "SIGTERM"
    assert not [line for line in log if line.get("event") in ("cycle-error", "cycle-crash")]
    assert [line["message"] for line in log if line.get("event") == "stop"] == [
        "stopping; rules stay in force"]


def test_sigterm_while_a_once_run_waits_for_the_api_ends_it_with_code_1(node):
    cluster(node)
    assert node.reconcile("--once").code == 0
    before = node.snapshot()
    cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB))
    clock = RequestClock(node)
    node.api.hang_next(60, path=PODS)
    run = subprocess.Popen(node.reconcile_argv("--once", "--api-timeout", "30"), cwd=REPO,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        clock.wait(lambda r: r.path == NAMESPACES, 1, 10, "the run to start its fetch")
        time.sleep(0.3)
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
    assert run.returncode == 1, stderr             # the cycle it was asked for did not happen
    assert elapsed < 1.5, f"exited {elapsed:.2f} s after SIGTERM"
    result = Result(run.returncode, "", stderr)
    assert [line["message"] for line in events(result, "stop")] == [
        "stopped during the fetch; nothing was written"]
    assert not events(result, "cycle-error") and "Traceback" not in stderr
    assert node.snapshot() == before


def test_sigterm_during_an_apply_lets_it_finish(node):
    _many_pods_cluster(node, version=1)
    daemon = node.start_daemon("--interval", "1")
    wait_for(lambda: daemon.status("/readyz") == 200, 30, "the first successful cycle")
    _many_pods_cluster(node, version=2)          # every chain rewritten, every set replaced

    seen: list[list[str]] = []
    deadline = time.monotonic() + 30
    while not seen and daemon.process.poll() is None and time.monotonic() < deadline:
        seen = [a for _, a in _children(daemon.pid) if a and a[0].endswith("tables-nft-restore")]
        if not seen:
            time.sleep(0.002)
    assert seen, "no iptables-nft-restore of the daemon was seen"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0

    # the signal did not cut the apply short: the kernel holds version 2 in full
    log = daemon.log()
    last = [line for line in log if line.get("event") == "cycle"][-1]
    assert last["applied"] is True and last["changes"] > 0
    assert log[-1]["event"] == "stop"
    assert_consistent(node)
    check = node.reconcile("--once", "--dry-run")
    assert check.code == 0, check.stdout[-2000:]


# --- the kernel refuses a step -----------------------------------------------------------

def test_ipset_refusing_a_set_fails_the_run_before_any_rule(node):
    """Someone made a set under the name of one of ours, of another type, and
    uses it in a rule of their own: it can be neither replaced nor used."""
    cluster(node)
    dry = node.reconcile("--once", "--dry-run", "--output", "raw")
    assert dry.code == 2
    name = re.search(r"^create (KPM-N4-\S+) hash:net", dry.stdout, re.M).group(1)
    node.run("ipset", "create", name, "hash:ip")
    node.run("iptables-nft", "-N", "ADMIN")
    node.run("iptables-nft", "-A", "ADMIN", "-m", "set", "--match-set", name, "src",
             "-j", "ACCEPT")
    before = node.snapshot()

    failed = node.reconcile("--once")
    error = failed_stage(failed)
    assert error["stage"] == "apply"
    assert "ipset restore (prepare)" in error["message"] and name in error["message"]
    assert_superset(node, before)            # at most new sets, no rule at all

    node.run("iptables-nft", "-F", "ADMIN")  # the obstacle goes; the foreign set stays
    node.run("iptables-nft", "-X", "ADMIN")
    assert node.reconcile("--once").code == 0
    assert sets(node)[name].startswith(f"create {name} hash:net")
    assert has_rule(node, f"--match-set {name} src")
    assert node.reconcile("--once", "--dry-run").code == 0


def test_iptables_restore_failing_leaves_the_tables_as_they_were(node):
    """An nft base chain under the name of one of ours: iptables-nft-save
    cannot show it, so the plan declares the chain and the kernel refuses."""
    cluster(node)
    node.run("nft", "add", "table", "ip", "filter")
    node.run("nft", "add", "chain", "ip", "filter", "KPM-FORWARD",
             "{ type filter hook forward priority 5 ; }")
    before = node.snapshot()

    failed = node.reconcile("--once")
    error = failed_stage(failed)
    assert error["stage"] == "apply"
    assert "iptables-restore (IPv4, main transaction)" in error["message"]
    assert "KPM-FORWARD" in error["message"]
    new_sets = assert_superset(node, before)  # IPv4 and IPv6 untouched, sets only added
    assert new_sets and all(name.startswith("KPM-") for name in new_sets)

    node.run("nft", "delete", "chain", "ip", "filter", "KPM-FORWARD")
    assert node.reconcile("--once").code == 0
    assert has_rule(node, "-A FORWARD -m comment") and has_rule(node, "-j KPM-FORWARD", 6)
    assert node.reconcile("--once", "--dry-run").code == 0


def test_stale_set_in_use_elsewhere_is_kept_with_a_warning_and_removed_later(node):
    """An admin's rule borrows one of our sets; the policy then changes, and
    the set can no longer be destroyed. The policy is fully in force, so the
    cycle succeeds (a failing cycle would fail the liveness probe forever):
    the refused line is logged, the rest of the cleanup is applied."""
    cluster(node)
    assert node.reconcile("--once").code == 0
    old = owned_set(node, "KPM-N4-")
    node.run("iptables-nft", "-N", "ADMIN")
    node.run("iptables-nft", "-A", "ADMIN", "-m", "set", "--match-set", old, "src", "-j", "LOG")
    widened = policy("x", "web", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"namespaceSelector": {},
                               "podSelector": {"matchLabels": {"role": "client"}}},
                              {"ipBlock": {"cidr": "192.0.2.0/24"}}],
                     "ports": [{"port": 80}]}]})
    cluster(node, policies=(widened, DB_NO_EGRESS))

    done = node.reconcile("--once")
    assert done.code == 0, done.stderr
    kept = [line for line in done.log if line.get("event") == "stale-set-kept"]
    assert len(kept) == 1 and kept[0]["line"] == f"destroy {old}"
    assert "ipset restore (cleanup)" in kept[0]["message"]
    assert_consistent(node)
    new = [n for n in sets(node) if n.startswith("KPM-N4-") and n != old]
    assert len(new) == 1 and has_rule(node, f"--match-set {new[0]} src")
    assert not has_rule(node, f"--match-set {old} src -m tcp")   # our chains moved on
    pending = node.reconcile("--once", "--dry-run", "--output", "json")
    assert pending.code == 2
    payloads = json.loads(pending.stdout)["payloads"]
    assert not any(payloads["iptables"].values()) and not any(payloads["iptables_cleanup"].values())
    assert payloads["ipset_cleanup"].splitlines() == [f"destroy {old}"]   # only the kept one

    node.run("iptables-nft", "-F", "ADMIN")
    assert node.reconcile("--once").code == 0
    assert old not in sets(node)
    assert node.reconcile("--once", "--dry-run").code == 0


# --- kill -9 in the middle of an apply ----------------------------------------------------

def _many_pods_cluster(node: Node, version: int, count: int = 250) -> None:
    """`count` local pods under three policies whose peers change with
    `version`: a new version rewrites every pod chain and replaces every set."""
    local = [pod("x", f"p{i:04d}", f"10.244.{i // 250}.{i % 250 + 1}",
                 labels={"app": "web"}) for i in range(count)]
    clients = [pod("y", f"c{i:04d}", f"10.245.{i // 250}.{i % 250 + 1}", node="node-2",
                   labels={"role": "client"}) for i in range(count)]
    policies = [policy("x", f"p{j}", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"namespaceSelector": {},
                               "podSelector": {"matchLabels": {"role": "client"}}},
                              {"ipBlock": {"cidr": f"192.{j}.{version}.0/24"}}],
                     "ports": [{"port": 80 + k} for k in range(3)]}],
        "egress": [{"to": [{"ipBlock": {"cidr": f"10.{j}.{version}.0/24"}}],
                    "ports": [{"port": 53, "protocol": "UDP"}]}]}) for j in range(3)]
    node.api.set_state(namespaces=[namespace("x"), namespace("y")], pods=local + clients,
                       policies=policies)


def _children(pid: int) -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry), argv))
    return found


def test_kill_9_during_apply_then_a_fresh_start_converges_without_leftovers(node):
    node.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    node.run("ipset", "create", "admin-allow", "hash:ip")
    pristine = node.snapshot()
    _many_pods_cluster(node, version=1)
    assert node.reconcile("--once").code == 0
    _many_pods_cluster(node, version=2)

    argv = node.reconcile_argv("--once")
    victim = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed: list[list[str]] = []
    try:
        deadline = time.monotonic() + 30
        while victim.poll() is None and time.monotonic() < deadline:
            restores = [(pid, a) for pid, a in _children(victim.pid)
                        if a and a[0].endswith("tables-nft-restore")]
            if restores:
                # as a container runtime kills: the process and its children
                os.kill(victim.pid, signal.SIGKILL)
                for pid, a in restores:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed.append(a)
                break
            time.sleep(0.002)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)
    assert killed, "the run ended before its iptables-restore could be killed"
    assert victim.returncode == -signal.SIGKILL

    fresh = node.reconcile("--once")
    assert fresh.code == 0, fresh.stderr
    assert cycle_line(fresh)["changes"] > 0              # the kill did leave work undone
    assert node.reconcile("--once", "--dry-run").code == 0
    assert len([n for n in sets(node) if n.startswith("KPM-")]) == cycle_line(fresh)["sets"]

    cleaned = node.reconcile("--cleanup")
    assert cleaned.code == 0, cleaned.stderr
    assert node.snapshot() == pristine


# --- someone changes our rules ----------------------------------------------------------

WEB_CHAIN = ingress_chain("x/web")

TAMPER = {
    # name: (commands, the change the dry run lists (group, name), drift reason or None)
    "chain-flushed": ([["iptables-nft", "-F", WEB_CHAIN]], ("chains", WEB_CHAIN), "emptied"),
    "rule-added-to-our-chain": ([["iptables-nft", "-I", WEB_CHAIN, "1", "-j", "RETURN"]],
                                ("chains", WEB_CHAIN), "1 untagged rule"),
    "hook-deleted": ([["iptables-nft", "-D", "FORWARD", "1"]], ("hooks", "FORWARD"), "missing"),
    "rule-above-hook": ([["iptables-nft", "-I", "FORWARD", "1", "-s", "192.0.2.0/24",
                          "-j", "ACCEPT"]], ("hooks", "FORWARD"), "moved to 2"),
    # a set in use cannot be destroyed; emptying it is what can happen, and
    # it is not drift (members come and go with pods)
    "set-flushed": (None, ("sets", "KPM-N4-"), None),
}


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_tampering_is_reported_by_dry_run_and_repaired(node, tamper):
    commands, (group, name), reason = TAMPER[tamper]
    cluster(node)
    assert node.reconcile("--once").code == 0
    before = node.snapshot()
    if commands is None:
        name = owned_set(node, name)
        assert "10.244.2.10" in sets(node)[name]
        with pytest.raises(subprocess.CalledProcessError) as refused:
            node.run("ipset", "destroy", name)
        assert "in use" in refused.value.stderr
        commands = [["ipset", "flush", name]]
    for command in commands:
        node.run(*command)
    tampered = node.snapshot()
    assert tampered != before

    dry = node.reconcile("--once", "--dry-run", "--output", "json")
    assert dry.code == 2, dry.stderr
    plan = json.loads(dry.stdout)
    changes = plan[group]
    assert [(c["name"], c["family"]) for c in changes] == [(name, 4)]
    assert plan["changes"] == 1
    assert changes[0]["drift"] == (reason is not None)
    assert changes[0]["drift_reason"] == reason
    assert plan["drift"] == cycle_line(dry)["drift"] == (1 if reason else 0)
    if tamper == "set-flushed":
        assert changes[0]["members_added"] == ["10.244.2.10"]
    assert node.snapshot() == tampered

    assert node.reconcile("--once").code == 0
    if tamper == "rule-above-hook":
        forward = [line for line in node.iptables_save(4).splitlines()
                   if line.startswith("-A FORWARD ")]
        assert len(forward) == 2
        assert "-j KPM-FORWARD" in forward[0] and "192.0.2.0/24" in forward[1]
        assert node.snapshot()[1:] == before[1:]
    else:
        assert node.snapshot() == before


# --- the xtables lock (legacy) -------------------------------------------------------------

XTABLES_LOCK = "/run/xtables.lock"


def test_waits_for_the_xtables_lock_then_applies(legacy_node):
    node = legacy_node
    cluster(node)
    # Held at most 5 s whatever happens; released as soon as the cycle is seen waiting.
    holder = subprocess.Popen(["flock", XTABLES_LOCK, "sleep", "5"])
    run = None
    try:
        # flock starts sleep only once it holds the lock
        sleeper = wait_for(lambda: _children(holder.pid), 4, "flock to take the lock",
                           step=0.01)[0][0]
        run = subprocess.Popen(node.reconcile_argv("--once"), cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: [a for _, a in _children(run.pid)
                          if a and a[0].endswith("tables-legacy-restore")],
                 4, "the cycle to start iptables-legacy-restore", step=0.01)
        time.sleep(0.3)
        assert run.poll() is None, "the cycle did not wait for the lock"
        assert not has_rule(node, "-j KPM-FORWARD")
        os.kill(sleeper, signal.SIGTERM)       # the other program is done
        holder.wait(5)
        stdout, stderr = run.communicate(timeout=30)
    finally:
        for process in (run, holder):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
    assert run.returncode == 0, stderr
    assert has_rule(node, "-j KPM-FORWARD") and has_rule(node, f"-j {WEB_CHAIN}"), (
        stderr + node.iptables_save(4))
    assert node.reconcile("--once", "--dry-run").code == 0


def test_legacy_smoke_api_failure_then_drift_repair(legacy_node):
    node = legacy_node
    cluster(node)
    assert node.reconcile("--once").code == 0
    before = node.snapshot()
    node.api.fail_next(500, count=10)
    cluster(node, policies=(WEB, DB_NO_EGRESS, DB_FROM_WEB))
    assert failed_stage(node.reconcile("--once"))["stage"] == "fetch"
    assert node.snapshot() == before

    node.api.clear_faults()
    node.run("iptables-legacy", "-D", "FORWARD", "1")
    node.run("iptables-legacy", "-F", WEB_CHAIN)
    assert node.reconcile("--once").code == 0
    assert has_rule(node, PENDING_COMMENT)
    forward = [line for line in node.iptables_save(4).splitlines() if line.startswith("-A FORWARD")]
    assert len(forward) == 1 and "-j KPM-FORWARD" in forward[0]
    assert node.owned_chain(WEB_CHAIN)[0].endswith("--dport 80 -j RETURN")


# --- objects the API should never send ------------------------------------------------------

MARKER = f"/tmp/kpm-injected-{uuid.uuid4().hex}"
EVIL = f'evil" \'$(touch {MARKER})\'\n-A FORWARD -j ACCEPT ' + "z" * 300
ODD_LABEL = 'a"b $(touch ' + MARKER + ')\n\'c\''
DB = {"matchLabels": {"app": "db"}}

BAD_POLICIES = [
    policy("x", "bad-cidr", {"podSelector": DB, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]},
        {"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": 5432}]}]}),
    policy("x", "bad-protocol", {"podSelector": DB, "ingress": [
        {"ports": [{"protocol": "ICMP", "port": 7}]}]}),
    policy("x", "unknown-field", {"podSelector": DB, "ingress": [
        {"form": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}),
    policy("x", "missing-cidr", {"podSelector": DB, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"except": ["10.0.0.0/8"]}}]}]}),
    policy("x", "undeclared-port", {"podSelector": DB, "ingress": [{"ports": [{"port": "metrics"}]}]}),
    policy("x", EVIL, {"podSelector": DB, "ingress": [
        {"from": [{"ipBlock": {"cidr": EVIL}}]},
        {"ports": [{"port": 6379}]}]}),
    policy("x", "odd-selector", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"note": ODD_LABEL}}}],
         "ports": [{"port": 8080}]}]}),
]

EXPECTED_PROBLEMS = {
    ("x/bad-cidr", "spec.ingress[0].from[0].ipBlock.cidr"),
    ("x/bad-protocol", "spec.ingress[0].ports[0].protocol"),
    ("x/unknown-field", "spec.ingress[0].form"),
    ("x/missing-cidr", "spec.egress[0].to[0].ipBlock.cidr"),
    ("x/undeclared-port", "spec.ingress[0].ports[0].port"),
    ("x/pods[3]", "metadata.name"),
}


def _pod_list(items: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"},
            "items": items}


def test_bad_objects_allow_nothing_and_break_nothing_else(node):
    odd_client = pod("y", "odd", "10.244.2.20", node="node-2", labels={"note": ODD_LABEL})
    cluster(node, policies=(WEB, DB_NO_EGRESS, *BAD_POLICIES), extra_pods=[odd_client])
    items = [pod("x", "db", "10.244.1.11", labels={"app": "db"}),
             pod("x", "web", "10.244.1.10", labels={"app": "web"}, ports=[("http", 80, "TCP")]),
             pod("y", "client", "10.244.2.10", node="node-2", labels={"role": "client"}),
             {"metadata": {"namespace": "x", "labels": {"app": "web"}},       # no name
              "spec": {"nodeName": NODE}, "status": {"podIP": "10.244.1.99"}},
             odd_client]
    node.api.respond_next(_pod_list(items), path=PODS)

    result = node.reconcile("--once")
    assert result.code == 0, result.stderr
    assert not os.path.exists(MARKER)
    problems = events(result, "invalid-object")
    assert all(p["level"] == "ERROR" for p in problems)
    found = {(p["object"], p["field"]) for p in problems}
    assert EXPECTED_PROBLEMS <= found, found
    evil = [p for p in problems if p["object"].startswith('x/"evil')]
    assert len(evil) == 1 and evil[0]["field"] == "spec.ingress[0].from[0].ipBlock.cidr"
    assert "\n" not in evil[0]["message"] and len(evil[0]["message"]) < 400

    # db: still isolated both ways; only the rules that parsed allow anything
    db_in = node.owned_chain(ingress_chain("x/db"))
    allowed = [line for line in db_in if line.endswith("-j RETURN")]
    assert len(allowed) == 2, db_in
    assert "x/bad-cidr_ingress[1]_ports[0]" in allowed[0] and "--dport 5432" in allowed[0]
    assert f"--match-set {owned_set_with(node, '192.0.2.0/24')} src" in allowed[0]
    assert "--dport 6379" in allowed[1]
    assert db_in[-2:] and all("-j REJECT" in line for line in db_in[-2:])
    db_out = node.owned_chain(egress_chain("x/db"))
    assert [line for line in db_out if "-j RETURN" in line] == []
    assert len(db_out) == 2
    assert any(line.startswith("-A KPM-FORWARD -d 10.244.1.11/32 ")
               and line.endswith(f"-j {ingress_chain('x/db')}")
               for line in node.iptables_save(4).splitlines())

    # what is valid stays enforced
    web = node.owned_chain(WEB_CHAIN)
    assert any("x/web_ingress[0]_ports[0]" in line and "--dport 80 -j RETURN" in line
               for line in web)
    odd = owned_set_with(node, "10.244.2.20")
    assert any(f"--match-set {odd} src" in line and "--dport 8080" in line for line in web)

    # nothing from the odd texts reached a command line unescaped
    save = node.iptables_save(4)
    comments = re.findall(r'--comment (?:"([^"]*)"|(\S+))', save)
    texts = [a or b for a, b in comments]
    assert texts and all(re.fullmatch(r"kpm:[0-9a-f]{12} [A-Za-z0-9._/:\[\]=,+-]*", t)
                         and len(t) <= 255 for t in texts), texts
    forward = [line for line in save.splitlines() if line.startswith("-A FORWARD")]
    assert len(forward) == 1 and "-j KPM-FORWARD" in forward[0]

    # a second run reads the same objects and has nothing to do
    node.api.respond_next(_pod_list(items), path=PODS)
    again = node.reconcile("--once")
    assert again.code == 0 and cycle_line(again)["changes"] == 0


def owned_set_with(node: Node, member: str) -> str:
    names = [name for name, content in sets(node).items()
             if name.startswith("KPM-") and re.search(rf"^add {name} {re.escape(member)}$",
                                                      content, re.M)]
    assert len(names) == 1, names
    return names[0]
