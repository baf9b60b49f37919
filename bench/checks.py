"""The pass/fail targets of the benchmark, each judged with the figure it rests on.

The targets are set for 10,000 pods and 1,000 policies on a 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.run import Scaling, SizeResult

MAX_NO_CHANGE_FACTOR = 2.0        # x (iptables-save + ipset save), plus the API fetch
MAX_REMOTE_APPLY_SHARE = 0.10     # of the full-rewrite apply
MAX_COMPILE_GROWTH = 2.2          # for twice the pods and policies
MAX_PEAK_MB = 250.0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    figure: str


def _mb(kb: int) -> float:
    return kb / 1024


def _cycle(result: SizeResult, key: str) -> dict:
    for c in result.cycles:
        if c.step.key == key:
            return c.result
    raise LookupError(f"cycle {key!r} was not run")


def _writes(r: dict) -> tuple[int, int, int]:
    a = r["apply"]
    return a["processes"], a["iptables_lines"], a["ipset_lines"]


def no_change_writes_nothing(result: SizeResult) -> Check:
    """Judged on every run of the no-change cycles (a new process's, and
    the loop's next), not only the quickest."""
    cycles = [c for c in result.cycles if c.step.key in ("no-change", "idle")]
    every = [r for c in cycles for r in (c.runs or (c.result,))]
    worst = max(every, key=lambda r: (sum(_writes(r)), sum(r["plan"]["changes"].values())))
    processes, ipt, ips = _writes(worst)
    changes = sum(worst["plan"]["changes"].values())
    runs = f" (the most of {len(every)} cycles)" if len(every) > 1 else ""
    return Check("no change: zero kernel writes", processes == ipt == ips == changes == 0,
                 f"{processes} processes, {ipt} iptables lines, {ips} ipset lines, "
                 f"{changes} plan changes{runs}")


def no_change_time(result: SizeResult) -> Check:
    """Judged on the loop's idle cycle: that is the cycle a running daemon
    repeats every interval. A new process's first cycle also parses and
    compiles, and its figure is in the table."""
    r = _cycle(result, "idle")
    total = sum(r["seconds"].values())
    saves = r["saves"]
    fetch = r["seconds"]["fetch"]
    limit = MAX_NO_CHANGE_FACTOR * (saves["iptables_save"] + saves["ipset_save"]) + fetch
    stages = ", ".join(f"{k} {v:.3f}" for k, v in r["seconds"].items())
    return Check(f"no change (idle loop cycle): cycle <= {MAX_NO_CHANGE_FACTOR:g} x "
                 "(iptables-save + ipset save) + API fetch",
                 total <= limit,
                 f"{total:.3f} s {'<=' if total <= limit else '>'} {MAX_NO_CHANGE_FACTOR:g} x "
                 f"({saves['iptables_save']:.3f} + {saves['ipset_save']:.3f}) + {fetch:.3f} = "
                 f"{limit:.3f} s  [{stages}]")


def remote_pod_only_members(result: SizeResult) -> Check:
    r = _cycle(result, "remote-pod")
    _, ipt, ips = _writes(r)
    kinds = r["plan"]["changes"]
    only_members = set(kinds) == {"set-members"}
    listed = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
    return Check("remote pod joins: zero iptables lines, only set members change",
                 ipt == 0 and only_members,
                 f"{ipt} iptables lines, {ips} ipset lines, changes: {listed}")


def remote_pod_apply(result: SizeResult) -> Check:
    r = _cycle(result, "remote-pod")
    ours = r["seconds"].get("apply", 0.0)
    full = r["full"]["apply"]
    share = ours / full if full else float("inf")
    return Check(f"remote pod joins: apply <= {MAX_REMOTE_APPLY_SHARE:g} x full-rewrite apply",
                 share <= MAX_REMOTE_APPLY_SHARE,
                 f"{ours:.4f} s against {full:.3f} s (x{share:.3f})")


def rules_independent_of_peers(s: Scaling) -> Check:
    extra = s.peers.extra_remote_pods
    return Check("iptables rule count does not grow with peer pods",
                 s.peers_rules == s.base_rules and s.peers_members > s.base_members,
                 f"{s.base_rules:,} rules with {s.base.pods:,} pods, {s.peers_rules:,} with "
                 f"{s.base.pods + extra:,} (+{extra:,} remote; set members "
                 f"{s.base_members:,} -> {s.peers_members:,})")


def compile_linear(s: Scaling) -> Check:
    growth = s.doubled_compile / s.base_compile if s.base_compile else float("inf")
    return Check(f"compile grows linearly: x{MAX_COMPILE_GROWTH:g} at most for twice the cluster",
                 growth <= MAX_COMPILE_GROWTH,
                 f"{s.base_compile:.3f} CPU s ({s.base.pods:,} pods, {s.base.policies:,} policies) -> "
                 f"{s.doubled_compile:.3f} CPU s ({s.doubled.pods:,}, {s.doubled.policies:,}): "
                 f"x{growth:.2f}")


def peak_memory(result: SizeResult) -> Check:
    figures = [(f"reconcile.py {run.what}", _mb(run.peak_rss_kb)) for run in result.reconcile_runs]
    figures += [(f"cycle process, {c.step.title}", _mb(c.result["rss_kb"])) for c in result.cycles]
    if result.watch is not None:
        figures.append(("watch-mode process", _mb(result.watch.rss_kb)))
    where, peak = max(figures, key=lambda f: f[1])
    return Check(f"peak memory <= {MAX_PEAK_MB:g} MB", peak <= MAX_PEAK_MB,
                 f"{peak:.0f} MB ({where})")


def evaluate(result: SizeResult, s: Scaling) -> list[Check]:
    return [no_change_writes_nothing(result), no_change_time(result),
            remote_pod_only_members(result), remote_pod_apply(result),
            rules_independent_of_peers(s), compile_linear(s), peak_memory(result)]
