"""`python -m bench --quick` end to end: the small cluster through the real
pipeline in a network namespace, its tables (poll mode's cycles, the API
cost of poll against watch, the iptables and nftables dataplanes side by
side) and its check lines, and nothing left behind."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CYCLES = ("first apply", "no change", "idle loop", "remote pod", "local pod", "policy edit", "ns relabel")
ROWS = ("fetch (API, JSON decode)", "parse", "compile", "read kernel state", "diff", "apply",
        "cycle total", "iptables lines written", "ipset lines written",
        "set members added / removed", "iptables rules, IPv4 + IPv6", "ipsets / members",
        "requests", "bytes", "peak RSS of the cycle process", "apply: ours / full",
        "lines written: ours / full")
CHECKS = ("no change: zero kernel writes", "no change (idle loop cycle): cycle <=", "remote pod joins: zero iptables lines",
          "remote pod joins: apply <=", "iptables rule count does not grow with peer pods",
          "compile grows linearly", "peak memory <=",
          "50 admin policies and a baseline: idle loop cycle <=",
          "50 admin policies and a baseline: remote pod joins <=",
          "50 admin policies and a baseline: local pod added <=",
          "nftables idle loop cycle <= iptables", "nftables remote pod joins, loop <= iptables",
          "nftables local pod added, loop <= iptables", "nftables local pod removed, loop <= iptables",
          "nftables remote pod joins, new process <= iptables",
          "nftables local pod added, new process <= iptables",
          "nftables local pod removed, new process <= iptables",
          "nftables first apply faster than iptables",
          "nftables rule count does not grow with local pods")
DATAPLANE_CYCLES = ("first apply (empty kernel)", "idle loop cycle", "remote pod joins, loop",
                    "local pod added, loop", "local pod removed, loop", "remote pod joins, new process",
                    "local pod added, new process", "local pod removed, new process")
CHECK_LINE = re.compile(r"^(PASS|FAIL)  (.+?)  \|  (.+)$", re.MULTILINE)
WATCH_COLUMNS = ("start-up", "idle cycle", "remote pod")
WATCH_KINDS = 3                    # namespaces, pods, policies


def _bench_namespaces() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith("kpm-bench-")}
    except FileNotFoundError:
        return set()


def _row(out: str, label: str) -> list[str]:
    for line in out.splitlines():
        if line.startswith("  " + label + "  "):
            return line[len(label) + 2:].split()
    raise AssertionError(f"no table row {label!r} in:\n{out}")


def _rows(out: str, label: str) -> list[list[str]]:
    """Every row of that label, in order."""
    return [line[len(label) + 2:].split() for line in out.splitlines()
            if line.startswith("  " + label + "  ")]


def _section(out: str, heading: str) -> str:
    """From the line holding `heading` to the next blank line."""
    start = out.index(heading)
    end = out.find("\n\n", start)
    return out[start:] if end < 0 else out[start:end]


def _numbers(out: str, label: str) -> list[int]:
    return [int(cell.replace(",", "")) for cell in _row(out, label)]


def _pairs(out: str, label: str) -> list[tuple[int, int]]:
    """The cells of a row of "a / b" figures."""
    cells = re.findall(r"([\d,]+) / ([\d,]+)", " ".join(_row(out, label)))
    return [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in cells]


def test_quick_benchmark_prints_the_table_and_the_checks_and_cleans_up():
    if os.geteuid() != 0:
        pytest.fail("python -m bench --quick needs root: it creates network namespaces and "
                    "writes iptables rules and ipsets inside them")
    before = _bench_namespaces()
    done = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    # 0: every check passed; 1: a target was missed (the targets are set for
    # the medium size); 2 would mean the benchmark could not run at all.
    assert done.returncode in (0, 1), f"exit {done.returncode}\n{out}\n{done.stderr}"

    assert "== small: 1,000 pods on 20 nodes" in out and "100 policies" in out
    header = next(line for line in out.splitlines() if "first apply" in line)
    assert all(title in header for title in CYCLES)
    for label in ROWS:
        assert label in out, label
    first_lines, *_ = _row(out, "iptables lines written")
    assert int(first_lines.replace(",", "")) > 0          # the first apply wrote the rules
    assert "reconcile.py as a process: no change" in out and "peak" in out
    # only the idle loop cycle reuses its process's previous compile, and it writes nothing
    assert _row(out, "parse and compile reused") == ["no", "no", "yes", "no", "no", "no", "no"]
    assert _row(out, "iptables lines written")[2] == "0"

    # watch mode beside poll mode: start-up, an idle cycle, one change
    header = next(line for line in out.splitlines() if line.startswith("API per cycle: poll vs watch"))
    assert all(title in header for title in WATCH_COLUMNS)
    poll_requests, poll_bytes = _numbers(out, "poll: requests"), _numbers(out, "poll: bytes")
    watch_requests, watch_bytes = _numbers(out, "watch: requests"), _numbers(out, "watch: bytes")
    (lists, watches), idle, change = _pairs(out, "watch: lists / watches (server log)")
    # start-up: the lists poll mode makes every cycle, once, then one watch per kind
    assert watches == WATCH_KINDS and lists == poll_requests[0]
    assert watch_requests[0] == lists + watches
    assert abs(watch_bytes[0] - poll_bytes[0]) <= poll_bytes[0] // 100
    # an idle cycle asks nothing of the API server, as the client and the server both count
    assert watch_requests[1] == 0 and watch_bytes[1] == 0 and idle == (0, 0)
    assert poll_requests[1] > 0 and poll_bytes[1] > 1_000_000
    # one pod joining: no request, one event of a few KB against a poll cycle's full lists
    assert watch_requests[2] == 0 and change == (0, 0)
    assert 0 < watch_bytes[2] < poll_bytes[2] / 100
    # the cycle the event triggered did the kernel work poll mode did for the same change
    ipt, ips = _pairs(out, "iptables / ipset lines written")[2]
    assert ipt == 0 and ips == int(_row(out, "ipset lines written")[3].replace(",", "")) > 0
    enforce = _row(out, "time to enforce, from the API change")
    assert enforce[:2] == ["-", "-"] and 0 < float(enforce[2]) < 30
    assert 0 < float(_row(out, "time to enforce, from event arrival")[2]) < 30

    # the same cluster with admin policies: more rules, the same three cycles measured
    assert "without and with 50 AdminNetworkPolicies and a BaselineAdminNetworkPolicy" in out
    admin = _section(out, "without and with 50 AdminNetworkPolicies")
    plain_rules, admin_rules = _numbers(admin, "rules")
    assert admin_rules > plain_rules > 0
    for title in ("idle loop cycle", "remote pod joins", "local pod added"):
        assert all(float(cell) > 0 for cell in _row(admin, title))

    # both dataplanes through the same cycles: each writes its whole state first, nothing
    # when idle, a few lines for one pod; nft's rules fewer, its dispatch one element a pod
    assert "iptables and nftables dataplanes, 1,000 pods, 100 policies" in out
    planes = _section(out, "iptables and nftables dataplanes")
    lines = [[int(c.replace(",", "")) for c in cells] for cells in _rows(planes, "  lines written")]
    assert len(lines) == len(DATAPLANE_CYCLES)
    first, idle, *one_pod = lines
    assert min(first) > 100 and idle == [0, 0]
    # each one-pod change, in the loop and in a new process: a few nft lines
    assert all(0 < nft < 20 for _, nft in one_pod)
    for title in DATAPLANE_CYCLES:
        ipt, nft = _row(planes, title)[:2]
        assert float(ipt) > 0 and float(nft) > 0
    ipt_rules, nft_rules = (int(c.replace(",", "")) for c in _row(planes, "rules")[:2])
    assert 0 < nft_rules < ipt_rules
    assert int(_row(planes, "nft dispatch map elements")[1].replace(",", "")) > 0

    found = CHECK_LINE.findall(out)
    assert len(found) == len(CHECKS), out
    for (verdict, name, figure), expected in zip(found, CHECKS):
        assert name.startswith(expected) and figure.strip()
    exit_expected = 1 if any(v == "FAIL" for v, _, _ in found) else 0
    assert done.returncode == exit_expected

    assert _bench_namespaces() == before                  # its network namespace is gone
