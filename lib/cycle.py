"""One reconcile cycle: fetch, parse, compile, read, diff, apply, on either
dataplane (lib.dataplane).

Each stage is timed; a failing stage ends the cycle before anything is
written (or, in apply, before the next step), so the rules in force stay.

A process that runs many cycles passes a LastCompiled: while the API
returns the same objects (same identities and resourceVersions), parse and
compile are skipped and the previous Cluster and desired state reused, so an
idle cycle costs the fetch, the kernel read and the diff. After a change,
only the changed objects are parsed again; compile runs on the whole
cluster. The kernel is read and diffed every cycle all the same: drift is
found whatever the API says.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from lib import compile as compiler
from lib import conntrack, dataplane, logs, objects
from lib.intent import FamilyIntent, NodeIntent
from lib.model import ADMIN, BASELINE, Cluster, Problem
from lib.selectors import ClusterIndex

STAGES = ("fetch", "parse", "compile", "read", "diff", "apply")


@dataclass(frozen=True)
class Counts:
    policies: int = 0
    admin_policies: int = 0          # AdminNetworkPolicies and the baseline policy
    local_pods: int = 0
    rules: int = 0
    sets: int = 0
    set_members: int = 0


@dataclass(frozen=True)
class CycleReport:
    ok: bool
    seconds: dict = field(default_factory=dict)      # stage -> seconds
    counts: Counts = Counts()
    plan: object = None                              # the dataplane's plan
    failed_stage: Optional[str] = None
    error: Optional[str] = None
    applied: bool = False
    apply_stats: object = None
    api_requests: int = 0
    api_bytes: int = 0
    cluster: Optional[Cluster] = None
    desired: object = None                           # the dataplane's desired state
    kernel: object = None                            # its state as read before the diff
    reused: bool = False                             # parse and compile skipped: same objects

    @property
    def changes(self) -> int:
        return len(self.plan.changes) if self.plan else 0


class StageError(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause


def count(cluster: Cluster, desired, node: str, plane=None) -> Counts:
    """`plane` (lib.dataplane) counts `desired`; None: the iptables one."""
    rules, sets, members = (plane or dataplane.IptablesDataplane).counts(desired)
    return Counts(
        policies=len(cluster.policies),
        admin_policies=len(cluster.admin_policies) + (cluster.baseline is not None),
        local_pods=sum(1 for p in cluster.pods if p.node == node and not p.host_network),
        rules=rules,
        sets=sets,
        set_members=members,
    )


def intent_families(intent: NodeIntent, families) -> NodeIntent:
    """Drop what a node without IPv6 (or IPv4) cannot hold, so its plans can be empty."""
    return NodeIntent(
        v4=intent.v4 if 4 in families else FamilyIntent(4),
        v6=intent.v6 if 6 in families else FamilyIntent(6),
        sets=tuple(s for s in intent.sets if s.family in families))


# kind, and the ClusterObjects list of that kind
_LISTS = (("Namespace", "namespaces"), ("Pod", "pods"), ("NetworkPolicy", "policies"),
          (ADMIN, "admin_policies"), (BASELINE, "baseline_policies"), ("Node", "nodes"))


def fingerprint(fetched) -> Optional[tuple]:
    """The identity and version of every fetched object (the keys of
    objects.ParseMemo), in the order served: equal fingerprints mean the API
    served the same objects, as the API server gives an object a new
    resourceVersion on every change. None when an object has no such key
    (no resourceVersion, say): nothing then shows it unchanged."""
    items = []
    for kind, attr in _LISTS:
        for obj in getattr(fetched, attr):
            key = objects.ParseMemo.key(kind, obj)
            if key is None:
                return None
            items.append(key)
    return tuple(items)


def parse_fetched(fetched, memo: Optional[objects.ParseMemo] = None) -> Cluster:
    """The model of one read of the API (lib.kubeapi.ClusterObjects), every kind included."""
    return objects.parse_cluster(
        fetched.namespaces, fetched.pods, fetched.policies, memo=memo,
        admin_policies=fetched.admin_policies, baseline_policies=fetched.baseline_policies,
        nodes=fetched.nodes)


@dataclass(frozen=True)
class Compiled:
    """What parse and compile made of one read of the API, and everything
    they depended on (`key`: the objects' fingerprint, the node, the
    families the kernel holds)."""
    key: tuple
    cluster: Cluster
    desired: object                   # the dataplane's desired state
    problems: tuple[Problem, ...]     # of the objects, and named ports nothing declares


class LastCompiled:
    """The previous cycle's Compiled, kept by a process for its next cycle.
    It is dropped before a recompilation, so that two clusters are never
    held at once; `memo` keeps what each object parsed to, so that a
    recompilation parses only the objects that changed."""

    def __init__(self) -> None:
        self.compiled: Optional[Compiled] = None
        self.memo = objects.ParseMemo()


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
              conntrack_cleanup: bool = True,
              last: Optional[LastCompiled] = None,
              options: "compiler.CompileOptions" = compiler.DEFAULT_OPTIONS) -> CycleReport:
    """Run the pipeline once. `fetch()` returns lib.kubeapi.ClusterObjects.
    With `last`, parse and compile are skipped when the objects are those
    of the previous cycle, and `last` is updated for the next one.

    The cyclic garbage collector is paused meanwhile. A cycle allocates
    about a million containers (the decoded API lists, the parsed kernel
    state) that reference counting frees, and each automatic full
    collection they trigger walks every live object, a kept cluster
    included: at 10,000 pods that was half of an idle cycle. The few
    reference cycles a cycle leaves are collected once it is over."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _run_cycle(fetch, dataplane.of(kernel), node, dry_run, problem_log,
                          conntrack_cleanup, last, options)
    finally:
        if was_enabled:
            gc.enable()


def _run_cycle(fetch, plane, node, dry_run, problem_log, conntrack_cleanup, last,
               options) -> CycleReport:
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

    plane.prefetch()                      # the kernel lists while the API is read
    try:
        fetched = stage("fetch", fetch)
        state["api_cost"] = (getattr(fetched, "requests", 0), getattr(fetched, "bytes", 0))
        families = tuple(getattr(plane, "families", (4, 6)))

        def recognise_or_parse():
            prints = fingerprint(fetched) if last is not None else None
            key = (prints, node, families, plane.name)
            if prints is not None and last.compiled is not None and last.compiled.key == key:
                return key, last.compiled, None
            if last is not None:
                last.compiled = None          # freed before the next one is built
            return key, None, parse_fetched(fetched, last.memo if last is not None else None)

        key, compiled, parsed = stage("parse", recognise_or_parse)
        # Nothing past parse reads the API objects: freed before compile and
        # the kernel read, they do not add to the cycle's peak memory.
        fetched = None
        state["reused"] = compiled is not None
        if compiled is None:
            state["cluster"] = parsed
            compiled = stage("compile", lambda: _compile(key, parsed, node, plane, options))
            if last is not None and key[0] is not None:
                last.compiled = compiled
        else:
            seconds["compile"] = 0.0
        cluster, desired = compiled.cluster, compiled.desired
        state["cluster"], state["desired"] = cluster, desired
        if problem_log is not None:
            problem_log.update(compiled.problems)
        current = stage("read", plane.read)
        state["kernel"] = current
        the_plan = stage("diff", lambda: plane.diff(desired, current))
        state["plan"] = the_plan
        stats = None
        if not dry_run and not the_plan.empty:
            stats = stage("apply", lambda: plane.apply(the_plan))
            if conntrack_cleanup and plane.may_narrow(the_plan, desired):
                _cut_refused_connections(plane, cluster, node, seconds)
        if not dry_run:
            plane.settle()
    except StageError as err:
        plane.drop_prefetch()
        report = _report(False, seconds, state, node, failed_stage=err.stage, error=str(err.cause),
                         plane=plane)
        logs.get().error(f"cycle failed in {err.stage}: {err.cause}",
                         extra={"event": "cycle-error", "stage": err.stage,
                                "seconds": _rounded(seconds)})
        return report
    report = _report(True, seconds, state, node, applied=stats is not None, stats=stats,
                     plane=plane)
    _log_cycle(report, dry_run)
    return report


def _compile(key: tuple, cluster: Cluster, node: str, plane,
             options: "compiler.CompileOptions" = compiler.DEFAULT_OPTIONS) -> Compiled:
    """The node's desired state in the dataplane's terms and the problems
    compiling finds, on one index of the cluster shared by both."""
    index = ClusterIndex(cluster)
    intent = intent_families(compiler.intend_node(cluster, node, index, options), key[2])
    desired = plane.render(intent)
    problems = cluster.problems + compiler.named_port_problems(cluster, index)
    return Compiled(key, cluster, desired, problems)


def _cut_refused_connections(kernel, cluster, node, seconds) -> None:
    """After an apply that may narrow, connections the new rules refuse must
    not live on through conntrack. Never fails the cycle: the rules are
    already in force."""
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
    api_requests, api_bytes = state.get("api_cost", (0, 0))
    return CycleReport(
        ok=ok, seconds=dict(seconds),
        counts=count(cluster, desired, node, kw.get("plane")) if cluster and desired else Counts(),
        plan=state.get("plan"),
        failed_stage=kw.get("failed_stage"), error=kw.get("error"),
        applied=kw.get("applied", False), apply_stats=kw.get("stats"),
        api_requests=api_requests, api_bytes=api_bytes,
        cluster=cluster, desired=desired, kernel=state.get("kernel"),
        reused=bool(state.get("reused")),
    )


def _rounded(seconds: dict) -> dict:
    return {k: round(v, 4) for k, v in seconds.items()}


def _log_cycle(report: CycleReport, dry_run: bool) -> None:
    c = report.counts
    drift = sum(1 for ch in report.plan.changes if ch.drift) if report.plan else 0
    logs.get().info("cycle", extra={
        "event": "cycle", "dry_run": dry_run, "seconds": _rounded(report.seconds),
        "total_seconds": round(sum(report.seconds.values()), 4),
        "policies": c.policies, "admin_policies": c.admin_policies, "local_pods": c.local_pods,
        "rules": c.rules, "sets": c.sets, "set_members": c.set_members,
        "changes": report.changes, "drift": drift, "applied": report.applied,
        "reused": report.reused,
        "api_requests": report.api_requests, "api_bytes": report.api_bytes,
    })
