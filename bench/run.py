"""Running the benchmark: per size, a synthetic cluster served by a real API
server whose socket lives in a network namespace made for the run, and the
real pipeline run once per cycle in its own process inside that namespace.

Nothing is written outside the namespace, which is deleted at the end of
each size whatever happens.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench import netns, scenarios, synth
from lib import objects
from lib.compile import compile_node
from lib.model import Cluster
from lib.ruleset import DesiredState
from tests.apiserver import ApiServer

REPO = Path(__file__).resolve().parents[1]
CYCLE_TIMEOUT = 600.0
GNU_TIME = "/usr/bin/time"
COMPILE_REPEATS = 5
NO_CHANGE_REPEATS = 3


class BenchError(RuntimeError):
    pass


def IDLE_STEP(state: scenarios.State) -> scenarios.Step:
    return scenarios.Step("idle", "idle loop", state,
                          "nothing changed: the daemon loop's next cycle, in the same process")


@dataclass(frozen=True)
class Cycle:
    step: scenarios.Step
    result: dict                 # what bench.cycle_process printed
    wall: float                  # seconds of the whole child process
    runs: tuple = ()             # every run's report when it ran more than once

    @property
    def repeats(self) -> int:
        return max(1, len(self.runs))


@dataclass(frozen=True)
class ProcessRun:
    """One run of reconcile.py as a process."""
    what: str
    code: int
    seconds: float
    peak_rss_kb: int             # the process and the binaries it ran


@dataclass
class SizeResult:
    spec: synth.Spec
    backend: str
    local_pods: int = 0
    cycles: list = field(default_factory=list)            # of Cycle
    reconcile_runs: list = field(default_factory=list)    # of ProcessRun
    generate_seconds: float = 0.0


def model(state: scenarios.State) -> Cluster:
    return objects.parse_cluster(list(state.namespaces), list(state.pods), list(state.policies))


def compiled(cluster: synth.Synthetic) -> tuple[Cluster, DesiredState]:
    parsed = model(scenarios.initial(cluster))
    return parsed, compile_node(parsed, synth.NODE)


def rule_count(desired: DesiredState) -> int:
    return sum(len(c.rules) for f in (desired.v4, desired.v6) for c in f.chains)


def member_count(desired: DesiredState) -> int:
    return sum(len(s.members) for s in desired.sets)


def compile_seconds(clusters: list[Cluster], repeats: int = COMPILE_REPEATS) -> list[float]:
    """Best of a few compilations of each cluster, taken in turns with all
    of them in memory, so that a busy machine weighs on each alike. The
    cyclic garbage collector is paused as in a reconcile cycle (lib.cycle):
    otherwise its passes, which walk every live object, would be timed too,
    and they grow with whatever else the benchmark holds."""
    best = [float("inf")] * len(clusters)
    was_enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            for i, cluster in enumerate(clusters):
                gc.collect()
                gc.disable()
                start = time.perf_counter()
                compile_node(cluster, synth.NODE)
                best[i] = min(best[i], time.perf_counter() - start)
                gc.enable()
    finally:
        if was_enabled:
            gc.enable()
        else:
            gc.disable()
    return best


# --- processes in the namespace ------------------------------------------------

def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_cycle_process(ns: str, url: str, backend: str, *, time_saves: bool = False,
                      profile: Optional[str] = None, cycles: int = 1) -> tuple[dict, float]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.cycle_process",
            "--api-server", url, "--node", synth.NODE, "--backend", backend, "--full-rewrite",
            "--cycles", str(cycles)]
    if time_saves:
        argv.append("--time-saves")
    if profile:
        argv += ["--profile", profile]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CYCLE_TIMEOUT, cwd=REPO)
    wall = time.perf_counter() - start
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"cycle process exited with code {done.returncode} and no report:\n"
                         f"{_tail(done.stderr)}") from None
    if not result.get("ok"):
        raise BenchError(f"cycle failed in {result.get('failed_stage')}: {result.get('error')}")
    # A process that ran more than one cycle has no start-to-exit figure of one.
    result["process"] = wall if not result["previous"] else None
    for earlier in result["previous"]:
        earlier["process"] = None
    return result, wall


def run_measured(argv: list, timeout: float = CYCLE_TIMEOUT) -> tuple[int, float, int, str]:
    """Run a process to its end under GNU time; (exit code, seconds, peak RSS
    in KiB, stderr). The peak is the largest of the process and the binaries
    it ran. getrusage() of our own children would not do: a child started
    by fork or vfork carries this (large) process's resident size into its
    ru_maxrss, while one started by the small `time` process does not."""
    if not os.path.exists(GNU_TIME):
        raise BenchError(f"{GNU_TIME} (GNU time) is needed to measure peak memory: "
                         "apt-get install time")
    with tempfile.NamedTemporaryFile(mode="r") as peak, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        done = subprocess.run([GNU_TIME, "-f", "%M", "-o", peak.name, *argv], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, timeout=timeout)
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
        figures = peak.read().split()
        if not figures or not figures[-1].isdigit():
            raise BenchError(f"{GNU_TIME} gave no peak memory figure:\n{_tail(stderr)}")
        return done.returncode, seconds, int(figures[-1]), stderr


def reconcile_argv(ns: str, url: str, backend: str, *flags: str) -> list:
    return ["ip", "netns", "exec", ns, sys.executable, str(REPO / "reconcile.py"),
            "--node-name", synth.NODE, "--api-server", url, "--iptables-backend", backend,
            "--log-level", "WARNING", *flags]


# --- one size -----------------------------------------------------------------

def _serve(server: ApiServer, state: scenarios.State) -> None:
    server.set_state(namespaces=state.namespaces, pods=state.pods, policies=state.policies)


def _total(result: dict) -> float:
    return sum(result["seconds"].values())


def run_size(spec: synth.Spec, backend: str, profile_dir: Optional[str] = None,
             progress: Callable[[str], None] = lambda _: None, quick: bool = False) -> SizeResult:
    """The cycles of one size, each in a new process, except the idle loop
    cycle: the second no-change cycle of one process, which reuses the
    first one's compile the way the daemon's loop does. The no-change
    process runs NO_CHANGE_REPEATS times and the quickest is kept: the idle
    cycle is judged on time, and the least disturbed run says most about
    the code. `quick` runs it once and measures reconcile.py in the
    no-change case only."""
    result = SizeResult(spec, backend)
    start = time.perf_counter()
    cluster = synth.generate(spec)
    result.generate_seconds = time.perf_counter() - start
    parsed, desired = compiled(cluster)
    result.local_pods = sum(1 for p in parsed.pods if p.node == synth.NODE and not p.host_network)

    first = scenarios.initial(cluster)
    steps = [scenarios.Step("first", "first apply", first, "empty kernel"),
             scenarios.Step("no-change", "no change", first, "same objects")]
    state = first
    for change in scenarios.CHANGES:
        step = change(state, parsed, desired, synth.NODE)
        steps.append(step)
        state = step.state
    del parsed, desired

    with netns.namespace() as ns:
        server = ApiServer(sock=netns.bound_socket(ns))
        server.start()
        try:
            served = None
            for step in steps:
                if step.state is not served:
                    _serve(server, step.state)
                    served = step.state
                no_change = step.key == "no-change"
                repeats = NO_CHANGE_REPEATS if no_change and not quick else 1
                runs = []
                for attempt in range(repeats):
                    progress(f"{spec.name}: {step.title}" + (f" ({attempt + 1}/{repeats})" if repeats > 1 else ""))
                    profile = (os.path.join(profile_dir, f"{spec.name}-{step.key}-{attempt}.prof")
                               if profile_dir else None)
                    runs.append(run_cycle_process(ns, server.url, backend, time_saves=no_change,
                                                  profile=profile, cycles=2 if no_change else 1))
                out, wall = min(runs, key=lambda r: _total(r[0]))
                every = tuple(r for r, _ in runs) if repeats > 1 else ()
                if no_change:
                    result.cycles.append(Cycle(step, out["previous"][0], wall,
                                               tuple(r["previous"][0] for r in every)))
                    step = IDLE_STEP(step.state)
                result.cycles.append(Cycle(step, out, wall, every))

            runs = [("no change", ("--once",))]
            if not quick:
                runs = [("cleanup", ("--cleanup",)), ("first apply", ("--once",))] + runs
            progress(f"{spec.name}: reconcile.py " + ", ".join(" ".join(f) for _, f in runs))
            for what, flags in runs:
                code, seconds, rss, stderr = run_measured(
                    reconcile_argv(ns, server.url, backend, *flags))
                if code != 0:
                    raise BenchError(f"reconcile.py {' '.join(flags)} exited with {code}:\n"
                                     f"{_tail(stderr)}")
                result.reconcile_runs.append(ProcessRun(what, code, seconds, rss))
        finally:
            server.stop()
    return result


# --- cluster-only figures for the checks -------------------------------------------

@dataclass(frozen=True)
class Scaling:
    base: synth.Spec
    base_compile: float
    doubled: synth.Spec
    doubled_compile: float
    peers: synth.Spec
    base_rules: int
    peers_rules: int
    base_members: int
    peers_members: int


def scaling(spec: synth.Spec, repeats: int = COMPILE_REPEATS) -> Scaling:
    """Compile time of the cluster and of the cluster doubled; rules of the
    cluster and of the same cluster with half as many pods again, all on
    other nodes."""
    base = model(scenarios.initial(synth.generate(spec)))
    twice = synth.doubled(spec)
    doubled_model = model(scenarios.initial(synth.generate(twice)))
    base_time, doubled_time = compile_seconds([base, doubled_model], repeats)
    del doubled_model
    base_desired = compile_node(base, synth.NODE)
    more = synth.with_remote_peers(spec, spec.pods // 2)
    peers_desired = compile_node(model(scenarios.initial(synth.generate(more))), synth.NODE)
    return Scaling(spec, base_time, twice, doubled_time, more,
                   rule_count(base_desired), rule_count(peers_desired),
                   member_count(base_desired), member_count(peers_desired))
