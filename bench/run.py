"""Running the benchmark: per size, a synthetic cluster served by a real API
server whose socket lives in a network namespace made for the run, and the
real pipeline run once per cycle in its own process inside that namespace;
then the --watch data source, in one more process, for what it costs the API
at start-up, in an idle cycle and for one change.

Nothing is written outside the namespace, which is deleted at the end of
each size whatever happens.
"""
from __future__ import annotations

import contextlib
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

from bench import netns, scenarios, synth, watch_process
from lib import objects
from lib.compile import compile_node
from lib.model import Cluster
from lib.ruleset import DesiredState
from tests.apiserver import ApiServer

REPO = Path(__file__).resolve().parents[1]
CYCLE_TIMEOUT = 600.0
GNU_TIME = "/usr/bin/time"
COMPILE_REPEATS = 9
NO_CHANGE_REPEATS = 3
WATCH_KINDS = 3                  # namespaces, pods, policies: one list and one watch each
WATCH_OPEN_TIMEOUT = 30.0
WATCH_EXIT_TIMEOUT = 30.0
WATCH_FAILED_EXIT = 2.0
WATCH_CHANGE = "remote-pod"      # the poll cycle whose change the watch process sees


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


@dataclass(frozen=True)
class ServerCount:
    """Requests as the API server logged them: list pages and watches."""
    lists: int
    watches: int


@dataclass(frozen=True)
class WatchRun:
    """bench.watch_process's reports, and the server's view of each step."""
    synced_seconds: float        # start to every kind listed
    startup: dict                # the first cycle, with the API cost until the watches opened
    idle: tuple                  # of dict: cycles with nothing changed
    change: dict                 # the cycle one changed object triggered
    change_step: scenarios.Step
    server: dict                 # "start-up", "idle", "change" -> ServerCount
    rss_kb: int


@dataclass
class SizeResult:
    spec: synth.Spec
    backend: str
    local_pods: int = 0
    cycles: list = field(default_factory=list)            # of Cycle
    reconcile_runs: list = field(default_factory=list)    # of ProcessRun
    generate_seconds: float = 0.0
    watch: Optional[WatchRun] = None


def model(state: scenarios.State) -> Cluster:
    return objects.parse_cluster(list(state.namespaces), list(state.pods), list(state.policies),
                                 admin_policies=list(state.admin_policies),
                                 baseline_policies=list(state.baseline_policies),
                                 nodes=list(state.nodes))


def compiled(cluster: synth.Synthetic) -> tuple[Cluster, DesiredState]:
    parsed = model(scenarios.initial(cluster))
    return parsed, compile_node(parsed, synth.NODE)


def rule_count(desired: DesiredState) -> int:
    return sum(len(c.rules) for f in (desired.v4, desired.v6) for c in f.chains)


def member_count(desired: DesiredState) -> int:
    return sum(len(s.members) for s in desired.sets)


def compile_seconds(clusters: list[Cluster], repeats: int = COMPILE_REPEATS) -> list[float]:
    """Best of a few compilations of each cluster, in CPU seconds of this
    process (what compiling costs, whatever else shares the machine), taken
    in turns with all of them in memory, so that a busy machine weighs on
    each alike. The
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
                start = time.process_time()
                compile_node(cluster, synth.NODE)
                best[i] = min(best[i], time.process_time() - start)
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
                      profile: Optional[str] = None, cycles: int = 1,
                      dataplane: str = "iptables", empty_first: bool = False) -> tuple[dict, float]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.cycle_process",
            "--api-server", url, "--node", synth.NODE, "--backend", backend, "--full-rewrite",
            "--cycles", str(cycles), "--dataplane", dataplane]
    if time_saves:
        argv.append("--time-saves")
    if empty_first:
        argv.append("--empty-first")
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


def _server_count(server: ApiServer, since: int) -> tuple[ServerCount, int]:
    """What the server logged from entry `since` on, and where its log ends."""
    log = server.requests
    watches = sum(1 for r in log[since:] if r.params.get("watch") in ("1", "true"))
    return ServerCount(len(log) - since - watches, watches), len(log)


def measure_watch(ns: str, server: ApiServer, backend: str, start: scenarios.State,
                  change: scenarios.Step, idle_cycles: int = watch_process.IDLE_CYCLES,
                  timeout: float = CYCLE_TIMEOUT) -> WatchRun:
    """Serve `start`, run bench.watch_process against it, and once its
    three watches are open and its idle cycles done, serve `change.state`.
    Every read of the child has a timeout; the child is killed if it
    outlives the measurement."""
    _serve(server, start)
    server.clear_requests()
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.watch_process",
            "--api-server", server.url, "--node", synth.NODE, "--backend", backend,
            "--idle-cycles", str(idle_cycles), "--timeout", str(timeout)]
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                 cwd=REPO)

        def failure(text: str) -> BenchError:
            try:
                child.wait(WATCH_FAILED_EXIT)         # a child that reported an error is ending
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            err.seek(0)
            return BenchError(f"watch process: {text} (exit code {child.returncode}):\n"
                              f"{_tail(err.read().decode('utf-8', 'replace'))}")

        out = watch_process.LineReader(child.stdout.fileno())

        def receive(step: str) -> dict:
            try:
                line = out.read(timeout)
            except EOFError:
                raise failure(f"ended before its {step} report") from None
            if line is None:
                raise failure(f"no {step} report within {timeout:g} s")
            try:
                message = json.loads(line)
            except ValueError:
                raise failure(f"not JSON: {line[:200]!r}") from None
            if not message.get("ok") or message.get("step") != step:
                raise failure(message.get("error") or f"expected {step}, got {line[:200]!r}")
            return message

        def send(line: str) -> None:
            try:
                child.stdin.write(line.encode() + b"\n")
                child.stdin.flush()
            except BrokenPipeError:
                raise failure(f"gone before {line.split()[0]!r}") from None

        try:
            synced = receive("synced")
            deadline = time.monotonic() + WATCH_OPEN_TIMEOUT
            while server.open_watches() < WATCH_KINDS:
                if child.poll() is not None:
                    raise failure(f"ended with {server.open_watches()} of {WATCH_KINDS} watches open")
                if time.monotonic() > deadline:
                    raise failure(f"{server.open_watches()} of {WATCH_KINDS} watches open after "
                                  f"{WATCH_OPEN_TIMEOUT:g} s")
                time.sleep(0.01)
            counts = {}
            counts["start-up"], seen = _server_count(server, 0)
            send("go")
            startup = receive("start-up")
            idle = receive("idle")
            counts["idle"], seen = _server_count(server, seen)
            _serve(server, change.state)
            send(f"changed {time.monotonic()!r}")
            changed = receive("change")
            counts["change"], _ = _server_count(server, seen)
            child.stdin.close()              # end of input: the child stops its watches and exits
            try:
                code = child.wait(WATCH_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise failure(f"still running {WATCH_EXIT_TIMEOUT:g} s after its input ended") from None
            if code != 0:
                raise failure("exited with an error after its reports")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            for pipe in (child.stdin, child.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
    return WatchRun(synced["seconds"], startup, tuple(idle["cycles"]), changed, change, counts,
                    changed["rss_kb"])


# --- one size -----------------------------------------------------------------

def _serve(server: ApiServer, state: scenarios.State) -> None:
    server.set_state(namespaces=state.namespaces, pods=state.pods, policies=state.policies,
                     admin_policies=state.admin_policies, baseline_policies=state.baseline_policies,
                     nodes=state.nodes)


def _total(result: dict) -> float:
    return sum(result["seconds"].values())


def quickest_stages(runs: list[dict]) -> dict:
    """Repeated runs of one cycle as one report: the quickest run's, with
    each stage's seconds the least that stage took in any run. A run's
    total carries every stage's jitter at once (fetch and parse, the same
    work on either side of a comparison, spread by a tenth of a second
    here), so two nearly equal cycles are told apart by their stages'
    floors, not by which run was luckiest."""
    best = min(runs, key=_total)
    seconds = {stage: min(r["seconds"][stage] for r in runs if stage in r["seconds"])
               for stage in best["seconds"]}
    return {**best, "seconds": seconds}


def run_size(spec: synth.Spec, backend: str, profile_dir: Optional[str] = None,
             progress: Callable[[str], None] = lambda _: None, quick: bool = False) -> SizeResult:
    """The cycles of one size, each in a new process, except the idle loop
    cycle: the second no-change cycle of one process, which reuses the
    first one's compile the way the daemon's loop does. The no-change
    process runs NO_CHANGE_REPEATS times and the quickest is kept: the idle
    cycle is judged on time, and the least disturbed run says most about
    the code. `quick` runs it once and measures reconcile.py in the
    no-change case only. Last, the watch data source in a process of its
    own: start-up on the first state and an empty kernel, idle cycles, and
    the remote pod joining."""
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

            change = next(s for s in steps if s.key == WATCH_CHANGE)
            progress(f"{spec.name}: watch mode: start-up, idle cycles, {change.title}")
            result.watch = measure_watch(ns, server, backend, first, change)
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
