"""One reconcile cycle: fetch, parse, compile, read, diff, apply.

Each stage is timed; a failing stage ends the cycle before anything is
written (or, in apply, before the next step), so the rules in force stay.

A process that runs many cycles passes a LastCompiled: while the API
returns the same objects (same identities and resourceVersions), parse and
compile are skipped and the previous Cluster and DesiredState reused, so an
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
from lib import conntrack, logs, objects, plan as planner
from lib.model import ADMIN, BASELINE, Cluster, Problem
from lib.plan import KernelState, Plan
from lib.ruleset import DesiredState, FamilyState
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
    reused: bool = False                             # parse and compile skipped: same objects

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
        admin_policies=len(cluster.admin_policies) + (cluster.baseline is not None),
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
    desired: DesiredState
    problems: tuple[Problem, ...]     # of the objects, and named ports nothing declares


class LastCompiled:
    """The previous cycle's Compiled, kept by a process for its next cycle.
    It is dropped before a recompilation, so that two clusters are never
    held at once; `memo` keeps what each object parsed to, so that a
    recompilation parses only the objects that changed."""

    def __init__(self) -> None:
        self.compiled: Optional[Compiled] = None
        self.memo = objects.ParseMemo()


def may_narrow(the_plan: Plan, desired: DesiredState) -> bool:
    """Whether applying the plan can make the node refuse a flow it allowed,
    which is when the conntrack entries of refused flows must be cut.

    A plan cannot narrow when all it does is create sets and add members to
    them, and every rule of ours that matches a set that gains members
    RETURNs (allows) on a match: a new member then only allows more, and a
    new set is referenced by no rule yet. Anything else may narrow: an
    iptables payload (a rewritten chain loses RETURN rules or gains a pod's
    isolation, a hook restored after someone removed it puts every pod under
    policy again, a deleted or added chain comes with such rewrites),
    members deleted, sets destroyed, a set recreated with another type (the
    `destroy` lines of the prepare payload), or a member added to a set that
    an admin Deny or Pass rule matches."""
    if any(the_plan.iptables.values()) or any(the_plan.iptables_cleanup.values()):
        return True
    if the_plan.ipset_cleanup:
        return True
    grown = set()
    for line in the_plan.ipset_prepare.splitlines():
        if not line.strip() or line.startswith("create "):
            continue
        if not line.startswith("add "):
            return True
        grown.add(line.split(" ", 2)[1])
    return not _sets_only_allow(desired, grown)


def _sets_only_allow(desired: DesiredState, names: set) -> bool:
    """Every rule matching one of the named sets jumps to RETURN: a member more allows more."""
    for family in (desired.v4, desired.v6):
        for chain in family.chains:
            for rule in chain.rules:
                if "--match-set" not in rule.args or _jump(rule.args) == "RETURN":
                    continue
                if any(rule.args[i + 1] in names for i, a in enumerate(rule.args[:-1])
                       if a == "--match-set"):
                    return False
    return True


def _jump(args: tuple) -> Optional[str]:
    for i, arg in enumerate(args[:-1]):
        if arg in ("-j", "--jump", "-g", "--goto"):
            return args[i + 1]
    return None


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
        return _run_cycle(fetch, kernel, node, dry_run, problem_log, conntrack_cleanup, last,
                          options)
    finally:
        if was_enabled:
            gc.enable()


def _run_cycle(fetch, kernel, node, dry_run, problem_log, conntrack_cleanup, last,
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

    try:
        fetched = stage("fetch", fetch)
        state["api_cost"] = (getattr(fetched, "requests", 0), getattr(fetched, "bytes", 0))
        families = tuple(getattr(kernel, "families", (4, 6)))

        def recognise_or_parse():
            prints = fingerprint(fetched) if last is not None else None
            key = (prints, node, families)
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
            compiled = stage("compile", lambda: _compile(key, parsed, node, options))
            if last is not None and key[0] is not None:
                last.compiled = compiled
        else:
            seconds["compile"] = 0.0
        cluster, desired = compiled.cluster, compiled.desired
        state["cluster"], state["desired"] = cluster, desired
        if problem_log is not None:
            problem_log.update(compiled.problems)
        current = stage("read", kernel.read)
        state["kernel"] = current
        the_plan = stage("diff", lambda: planner.diff(desired, current))
        state["plan"] = the_plan
        stats = None
        if not dry_run and not the_plan.empty:
            stats = stage("apply", lambda: kernel.apply(the_plan))
            if conntrack_cleanup and may_narrow(the_plan, desired):
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


def _compile(key: tuple, cluster: Cluster, node: str,
             options: "compiler.CompileOptions" = compiler.DEFAULT_OPTIONS) -> Compiled:
    """The node's desired state and the problems compiling finds, on one
    index of the cluster shared by both."""
    index = ClusterIndex(cluster)
    desired = only_families(compiler.compile_node(cluster, node, index, options), key[2])
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
        counts=count(cluster, desired, node) if cluster and desired else Counts(),
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
