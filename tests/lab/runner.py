"""Running cases: state after state, reconcile, probe, compare, report.

Between two steps the lab keeps probing the cells that both steps agree on
while every node reconciles: a rule update that is not hitless shows up as a
cell that flipped for a moment, and is reported as a failure.
"""
from __future__ import annotations

import fnmatch
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from .case import Case, CaseError, State, case_files, load_case
from .cluster import LAB_PREFIX, new_run_token, remove_leftovers, remove_run
from .lab import Cell, CellResult, Lab, table_cells
from .reconcilers import SCRIPT
from lib.dataplane import DATAPLANES, IPTABLES
from .traffic import ALLOWED, TIMEOUT

Emit = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    keep: bool = False
    loop: bool = False
    transitions: bool = True
    script: Path = SCRIPT
    dataplane: str = IPTABLES       # what the reconcilers enforce with


@dataclass
class StepReport:
    index: int
    results: list[CellResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)      # reconciler failures
    flips: list[str] = field(default_factory=list)       # cells that flipped during the update
    transition_probes: int = 0                            # probes made during the update

    @property
    def failed_cells(self) -> list[CellResult]:
        return [r for r in self.results if not r.passed and not r.skipped]

    @property
    def failures(self) -> int:
        return len(self.failed_cells) + len(self.errors) + len(self.flips)


@dataclass
class CaseReport:
    name: str
    path: str
    multi_step: bool = False
    steps: list[StepReport] = field(default_factory=list)
    error: Optional[str] = None
    seconds: float = 0.0
    kept: list[str] = field(default_factory=list)
    dataplane: str = IPTABLES

    @property
    def transition_probes(self) -> int:
        return sum(s.transition_probes for s in self.steps)

    @property
    def leaks(self) -> int:
        return sum(len(s.flips) for s in self.steps)

    @property
    def passed(self) -> int:
        return sum(1 for s in self.steps for r in s.results if r.passed)

    @property
    def skipped(self) -> int:
        return sum(1 for s in self.steps for r in s.results if r.skipped)

    @property
    def failed(self) -> int:
        return sum(s.failures for s in self.steps) + (1 if self.error else 0)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def lines(self) -> list[str]:
        """What differs, per step: the message of a failed case."""
        out = []
        if self.error:
            out.append(self.error)
        for step in self.steps:
            items = ([r.describe() for r in step.failed_cells] + step.flips + step.errors)
            if not items:
                continue
            if self.multi_step:
                out.append(f"step {step.index + 1}:")
                out += [f"  {item}" for item in items]
            else:
                out += items
        return out


# ---------------------------------------------------------------- transitions

class _TransitionWatch:
    """Probes, in a loop, cells whose expectation does not change, until stopped."""

    def __init__(self, lab: Lab, cells: dict[Cell, bool]):
        self.lab = lab
        self.cells = list(cells)
        self.expected = cells
        self.flipped: dict[Cell, str] = {}
        self.rounds = 0
        self.probes = 0
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="lab-transitions", daemon=True)
        if self.cells:
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for cell, got in zip(self.cells, self.lab.probe(self.cells)):
                    if got == TIMEOUT and self.expected[cell]:
                        continue          # silence may be load; only an answer or a refusal counts
                    if (got == ALLOWED) != self.expected[cell]:
                        self.flipped.setdefault(cell, got)
                self.rounds += 1
                self.probes += len(self.cells)
        except BaseException as exc:   # reported by stop()
            self._error = exc

    def stop(self) -> list[str]:
        if not self.cells:
            return []
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        out = []
        for cell in self.cells:
            if cell in self.flipped:
                if self.expected[cell]:
                    out.append(f"{cell.label()}: allowed before and after, refused during the update")
                else:
                    out.append(f"{cell.label()}: refused before and after, got through during the update")
        return out


def stable_cells(prev: State, prev_results: Sequence[CellResult], nxt: State) -> dict[Cell, bool]:
    """Cells both states expect alike, that passed before, between endpoints
    that exist unchanged in both states."""
    before = {r.cell: r.expected for r in prev_results if r.passed}
    after = table_cells(nxt.expect)
    old_pods = {p.key: p.generation for p in prev.pods}
    new_pods = {p.key: p.generation for p in nxt.pods}

    def unchanged(name: str) -> bool:
        if name.startswith(("node:", "ext:")):
            return True
        return name in old_pods and old_pods[name] == new_pods.get(name)

    return {c: want for c, want in after.items()
            if before.get(c) is want and unchanged(c.src) and unchanged(c.dst)}


# ---------------------------------------------------------------- one case

def _same_cluster(a: State, b: State) -> bool:
    return (a.namespaces, a.pods, a.policies) == (b.namespaces, b.pods, b.policies)


def run_case(case: Case, prefix: str, options: Options = Options(), emit: Emit = print,
             lab_hook: Optional[Callable[[Lab, int, StepReport], None]] = None) -> CaseReport:
    """Build the case's cluster, go through its states, and report every cell.

    `lab_hook(lab, step_index, report)` runs after each step is probed (the
    tests use it to break things on purpose)."""
    report = CaseReport(case.name, case.path, case.multi_step, dataplane=options.dataplane)
    started = time.monotonic()
    lab = Lab(case, prefix, script=options.script, loop=options.loop, dataplane=options.dataplane)
    try:
        lab.build()
        if case.initial is not None and not _same_cluster(case.initial, case.states[0]):
            lab.set_state(case.initial)
            errors = lab.reconcile()
            if errors:
                report.steps.append(StepReport(-1, errors=[f"before step 1: {e}" for e in errors]))
        prev: Optional[State] = None
        prev_results: list[CellResult] = []
        for state in case.states:
            step = StepReport(state.index)
            watch = None
            if options.transitions and prev is not None:
                watch = _TransitionWatch(lab, stable_cells(prev, prev_results, state))
            try:
                lab.set_state(state)
                step.errors = lab.reconcile()
            finally:
                if watch is not None:
                    step.flips = watch.stop()
                    step.transition_probes = watch.probes
            step.results = lab.check(state.expect)
            report.steps.append(step)
            if lab_hook is not None:
                lab_hook(lab, state.index, step)
            prev, prev_results = state, step.results
    except Exception as exc:  # noqa: BLE001 - a broken case must not stop the other cases
        report.error = f"error: {type(exc).__name__}: {exc}"
        report.error += "\n" + "".join(traceback.format_exc(limit=-3))
    finally:
        errors = lab.close(keep=options.keep)
        if options.keep:
            report.kept = lab.namespaces()
        if errors:
            msg = "cleanup: " + "; ".join(errors)
            report.error = f"{report.error}\n{msg}" if report.error else msg
        report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------- many cases

def matches(pattern: Optional[str], *names: str) -> bool:
    """-k: a glob when it has wildcards, else a substring, of the case name or file."""
    if not pattern:
        return True
    if any(ch in pattern for ch in "*?["):
        return any(fnmatch.fnmatch(n, pattern) for n in names)
    return any(pattern in n for n in names)


def print_report(report: CaseReport, emit: Emit) -> None:
    cells = report.passed + sum(len(s.failed_cells) for s in report.steps)
    skipped = f", {report.skipped} skipped" if report.skipped else ""
    moved = (f", {report.leaks} leaks in {report.transition_probes} transition probes"
             if report.transition_probes else "")
    name = f"{report.name} [{report.dataplane}]"
    if report.ok:
        emit(f"PASS {name}: {cells} cells{skipped}{moved}, {report.seconds:.1f} s")
    else:
        emit(f"FAIL {name} ({report.path}): {report.failed} failed of {cells} cells"
             f"{skipped}{moved}, {report.seconds:.1f} s")
        for line in report.lines():
            for part in line.splitlines():
                emit(f"  {part}")


def print_keep_hint(report: CaseReport, prefix: str, emit: Emit) -> None:
    if not report.kept:
        return
    emit(f"  kept {len(report.kept)} namespaces of {report.name}; enter one with:")
    for name in report.kept:
        if name.startswith(prefix + "n-"):
            emit(f"    ip netns exec {name} bash")
    emit(f"    (pods: ip netns exec {prefix}p-NAMESPACE.POD bash; all: ip netns list | grep ^{prefix})")
    emit(f"  remove them with:  for ns in $(ip netns list | awk '/^{prefix}/{{print $1}}'); "
         f"do ip netns del \"$ns\"; done")
    emit("  (the next lab run also removes them)")


@dataclass
class Tally:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    transition_probes: int = 0
    leaks: int = 0

    def add(self, report: CaseReport) -> None:
        self.passed += report.passed
        self.failed += report.failed
        self.skipped += report.skipped
        self.transition_probes += report.transition_probes
        self.leaks += report.leaks

    def line(self) -> str:
        out = f"{self.passed} passed, {self.failed} failed"
        if self.skipped:
            out += f", {self.skipped} skipped"
        return out


def run(paths: Sequence[str], options: Options = Options(), pattern: Optional[str] = None,
        emit: Emit = print, dataplanes: Optional[Sequence[str]] = None) -> int:
    """Run every case given, on each of `dataplanes` (default: the options'
    one); print differences and one summary line (after one per dataplane
    when there are several); return the exit status (0 only when nothing
    failed)."""
    dataplanes = tuple(dataplanes or (options.dataplane,))
    unknown = [d for d in dataplanes if d not in DATAPLANES]
    if unknown:
        raise ValueError(f"dataplane {unknown[0]!r}: must be one of {', '.join(DATAPLANES)}")
    files = case_files(list(paths))
    cases: list[Case] = []
    failed = 0
    per_plane: dict[str, Tally] = {}
    names: dict[str, str] = {}
    for f in files:
        try:
            case = load_case(f)
        except CaseError as exc:
            if matches(pattern, f.name, str(f)):
                emit(f"FAIL {exc}")
                failed += 1
            continue
        if not matches(pattern, case.name, f.name, str(f)):
            continue
        if case.name in names:     # still run: the file is fine, the pair is ambiguous in reports
            emit(f"note: {f}: name: {case.name!r} is also the name of {names[case.name]}")
        names.setdefault(case.name, str(f))
        cases.append(case)
    if not cases and not failed:
        emit("no case files found" + (f" matching {pattern!r}" if pattern else ""))
        failed += 1
    if cases:
        remove_leftovers()
        token = new_run_token()
        try:
            index = 0
            for plane in dataplanes:
                for case in cases:
                    index += 1
                    prefix = f"{LAB_PREFIX}{token}-{index}-"
                    report = run_case(case, prefix, replace(options, dataplane=plane), emit)
                    print_report(report, emit)
                    if options.keep:
                        print_keep_hint(report, prefix, emit)
                    per_plane.setdefault(plane, Tally()).add(report)
        finally:
            if not options.keep:
                remove_run(token)       # normally nothing is left; after Ctrl-C there may be
    total = Tally(failed=failed)
    for plane, tally in per_plane.items():
        for name in ("passed", "failed", "skipped", "transition_probes", "leaks"):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
        if len(dataplanes) > 1:
            emit(f"{plane}: {tally.line()}; {tally.leaks} leaks in {tally.transition_probes} "
                 f"transition probes")
    emit(total.line())
    return 1 if total.failed else 0
