"""One reconcile cycle: fetch, parse, compile, read, diff, apply.

Each stage is timed; a failing stage ends the cycle before anything is
written (or, in apply, before the next step), so the rules in force stay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from lib import compile as compiler
from lib import conntrack, logs, objects, plan as planner
from lib.model import Cluster, Problem
from lib.plan import KernelState, Plan
from lib.ruleset import DesiredState, FamilyState

STAGES = ("fetch", "parse", "compile", "read", "diff", "apply")


@dataclass(frozen=True)
class Counts:
    policies: int = 0
    local_pods: int = 0
    rules: int = 0
    sets: int = 0
    set_members: int = 0


@dataclass(frozen=True)
class CycleReport:
    ok: bool
    seconds: dict = field(default_factory=dict)      # stage -> seconds
    counts: Counts = Counts()
    plan: Optional[Plan] = None
    failed_stage: Optional[str] = None
    error: Optional[str] = None
    applied: bool = False
    apply_stats: object = None
    api_requests: int = 0
    api_bytes: int = 0
    cluster: Optional[Cluster] = None
    desired: Optional[DesiredState] = None
    kernel: Optional[KernelState] = None             # as read before the diff

    @property
    def changes(self) -> int:
        return len(self.plan.changes) if self.plan else 0


class StageError(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause


def count(cluster: Cluster, desired: DesiredState, node: str) -> Counts:
    rules = sum(len(c.rules) for f in (desired.v4, desired.v6) for c in f.chains)
    return Counts(
        policies=len(cluster.policies),
        local_pods=sum(1 for p in cluster.pods if p.node == node and not p.host_network),
        rules=rules,
        sets=len(desired.sets),
        set_members=sum(len(s.members) for s in desired.sets),
    )


def only_families(desired: DesiredState, families) -> DesiredState:
    """Drop what a node without IPv6 (or IPv4) cannot hold, so its plans can be empty."""
    return DesiredState(
        v4=desired.v4 if 4 in families else FamilyState(4),
        v6=desired.v6 if 6 in families else FamilyState(6),
        sets=tuple(s for s in desired.sets if s.family in families))


class ProblemLog:
    """Logs each problem once while it persists, so a bad object does not
    flood the log every interval, and says when it is gone."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def update(self, problems: tuple[Problem, ...]) -> None:
        log = logs.get()
        current = {str(p): p for p in problems}
        for text in sorted(current.keys() - self._seen):
            p = current[text]
            log.error(text, extra={"event": "invalid-object", "kind": p.kind,
                                   "object": p.object, "field": p.field})
        for text in sorted(self._seen - current.keys()):
            log.info("resolved: " + text, extra={"event": "invalid-object-resolved"})
        self._seen = set(current)


def run_cycle(fetch: Callable, kernel, node: str, dry_run: bool = False,
              problem_log: Optional[ProblemLog] = None,
              conntrack_cleanup: bool = True) -> CycleReport:
    """Run the pipeline once. `fetch()` returns lib.kubeapi.ClusterObjects."""
    seconds: dict[str, float] = {}
    state: dict[str, object] = {}

    def stage(name: str, fn: Callable):
        start = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure ends the cycle the same way
            raise StageError(name, exc) from exc
        finally:
            seconds[name] = time.perf_counter() - start

    try:
        fetched = stage("fetch", fetch)
        state["api"] = fetched
        cluster = stage("parse", lambda: objects.parse_cluster(
            fetched.namespaces, fetched.pods, fetched.policies))
        state["cluster"] = cluster
        desired = stage("compile", lambda: only_families(
            compiler.compile_node(cluster, node), getattr(kernel, "families", (4, 6))))
        state["desired"] = desired
        problems = cluster.problems + compiler.named_port_problems(cluster)
        if problem_log is not None:
            problem_log.update(problems)
        current = stage("read", kernel.read)
        state["kernel"] = current
        the_plan = stage("diff", lambda: planner.diff(desired, current))
        state["plan"] = the_plan
        stats = None
        if not dry_run and not the_plan.empty:
            stats = stage("apply", lambda: kernel.apply(the_plan))
            if conntrack_cleanup:
                _cut_refused_connections(kernel, cluster, node, seconds)
    except StageError as err:
        report = _report(False, seconds, state, node, failed_stage=err.stage, error=str(err.cause))
        logs.get().error(f"cycle failed in {err.stage}: {err.cause}",
                         extra={"event": "cycle-error", "stage": err.stage,
                                "seconds": _rounded(seconds)})
        return report
    report = _report(True, seconds, state, node, applied=stats is not None, stats=stats)
    _log_cycle(report, dry_run)
    return report


def _cut_refused_connections(kernel, cluster, node, seconds) -> None:
    """After an apply, connections the new rules refuse must not live on through
    conntrack. Never fails the cycle: the rules are already in force."""
    ct = conntrack.cleanup(kernel, cluster, node)
    seconds["conntrack"] = ct.seconds
    fields = {"event": "conntrack-cleanup", **ct.log_fields()}
    if ct.ok:
        logs.get().info("conntrack cleanup", extra=fields)
    else:
        logs.get().warning("conntrack cleanup incomplete",
                           extra={**fields, "errors": list(ct.errors)})


def _report(ok, seconds, state, node, **kw) -> CycleReport:
    cluster, desired = state.get("cluster"), state.get("desired")
    api = state.get("api")
    return CycleReport(
        ok=ok, seconds=dict(seconds),
        counts=count(cluster, desired, node) if cluster and desired else Counts(),
        plan=state.get("plan"),
        failed_stage=kw.get("failed_stage"), error=kw.get("error"),
        applied=kw.get("applied", False), apply_stats=kw.get("stats"),
        api_requests=getattr(api, "requests", 0), api_bytes=getattr(api, "bytes", 0),
        cluster=cluster, desired=desired, kernel=state.get("kernel"),
    )


def _rounded(seconds: dict) -> dict:
    return {k: round(v, 4) for k, v in seconds.items()}


def _log_cycle(report: CycleReport, dry_run: bool) -> None:
    c = report.counts
    drift = sum(1 for ch in report.plan.changes if ch.drift) if report.plan else 0
    logs.get().info("cycle", extra={
        "event": "cycle", "dry_run": dry_run, "seconds": _rounded(report.seconds),
        "total_seconds": round(sum(report.seconds.values()), 4),
        "policies": c.policies, "local_pods": c.local_pods, "rules": c.rules,
        "sets": c.sets, "set_members": c.set_members,
        "changes": report.changes, "drift": drift, "applied": report.applied,
        "api_requests": report.api_requests, "api_bytes": report.api_bytes,
    })
