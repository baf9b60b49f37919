"""The real reconciler, run unmodified inside each node's namespace.

Exactly as a DaemonSet pod with host networking: one process per node, in the
node's network namespace, talking to the API server over the node's network.
Every run is given `--dataplane`: the lab's, or the one a call asks for (a
node switched from one dataplane to the other). A `--once` run of the
project's reconcile.py is forked from a process that has imported the
program already (tests/lab/forkserver.py): the same script, argument list,
environment and namespace, without half a second of imports per node and
step.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lib.dataplane import DATAPLANES, IPTABLES

from . import forkserver, netns

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "reconcile.py"
FORK_SWITCH = "KPM_LAB_FORK"  # 0: every --once run is a process of its own
ONCE_TIMEOUT = 60          # seconds for one --once run
CONVERGE_TIMEOUT = 30      # seconds for every loop to reach the API state
STOP_GRACE = 5             # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class Outcome:
    node: str
    returncode: int
    stdout: str
    stderr: str

    def describe(self, what: str) -> str:
        tail = _tail(self.stderr, 20)
        return f"reconciler {what} on {self.node} exited {self.returncode}" + (f":\n{tail}" if tail else "")


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Pending:
    """`--once` runs started on several nodes, finished by wait()."""

    def __init__(self, procs: dict[str, subprocess.Popen], timeout: float):
        self._procs = procs
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(procs)))
        self._futures = {node: self._pool.submit(self._collect, node, proc, timeout)
                         for node, proc in procs.items()}

    @staticmethod
    def _collect(node: str, proc: subprocess.Popen, timeout: float) -> Outcome:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n(killed after {timeout} s)"
        return Outcome(node, proc.returncode, out, err)

    def done(self) -> bool:
        return all(f.done() for f in self._futures.values())

    def wait(self) -> list[Outcome]:
        results = [f.result() for f in self._futures.values()]
        self._pool.shutdown()
        return results

    def kill(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()


class Reconcilers:
    """Starts and stops reconcile.py on the nodes of one lab cluster."""

    def __init__(self, node_namespaces: dict[str, str], api_url: str,
                 script: Path = SCRIPT, python: str = sys.executable,
                 dataplane: str = IPTABLES):
        if dataplane not in DATAPLANES:
            raise ValueError(f"dataplane {dataplane!r}: must be one of {', '.join(DATAPLANES)}")
        self.node_namespaces = node_namespaces        # node name -> namespace
        self.dataplane = dataplane
        self.api_url = api_url
        self.script = Path(script)
        self.python = python
        self._loops: dict[str, tuple[subprocess.Popen, object]] = {}
        self._pending: list[Pending] = []

    def _args(self, node: str, flags: Sequence[str], dataplane: Optional[str] = None) -> list[str]:
        """reconcile.py's arguments (after the script's name)."""
        return ["--dataplane", dataplane or self.dataplane, *flags,
                "--node-name", node, "--api-server", self.api_url]

    def _argv(self, node: str, flags: Sequence[str], dataplane: Optional[str] = None) -> list[str]:
        return netns.exec_argv(self.node_namespaces[node], [
            self.python, str(self.script), *self._args(node, flags, dataplane)])

    def _forked(self) -> bool:
        """Whether --once runs are forks of the preloaded server: for the
        project's own reconcile.py (another script, a test's stand-in, runs
        as its own process), unless KPM_LAB_FORK=0."""
        return (self.script.resolve() == SCRIPT and os.environ.get(FORK_SWITCH, "1") != "0")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def start_once(self, flags: Sequence[str] = ("--once",), timeout: float = ONCE_TIMEOUT,
                   dataplane: Optional[str] = None) -> Pending:
        """Start one run on every node at once (on `dataplane`, default the lab's)."""
        if not self.script.exists():
            raise FileNotFoundError(f"reconciler not found: {self.script}")
        if self._forked():
            server = forkserver.shared(self.python)
            procs = {node: server.start(ns, str(self.script),
                                        self._args(node, flags, dataplane),
                                        str(self.script.parent), self._env())
                     for node, ns in self.node_namespaces.items()}
        else:
            procs = {node: subprocess.Popen(self._argv(node, flags, dataplane), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                            text=True, cwd=str(self.script.parent), env=self._env())
                     for node in self.node_namespaces}
        pending = Pending(procs, timeout)
        self._pending.append(pending)
        return pending

    def once(self, flags: Sequence[str] = ("--once",), dataplane: Optional[str] = None) -> list[Outcome]:
        pending = self.start_once(flags, dataplane=dataplane)
        try:
            return pending.wait()
        finally:
            self._pending.remove(pending)

    # -- the loop mode ----------------------------------------------------

    def start_loops(self, interval: int = 1) -> None:
        if not self.script.exists():
            raise FileNotFoundError(f"reconciler not found: {self.script}")
        for node in self.node_namespaces:
            log = tempfile.TemporaryFile(mode="w+", prefix="kpm-lab-loop-")
            proc = subprocess.Popen(self._argv(node, ("--interval", str(interval))),
                                    stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    text=True, cwd=str(self.script.parent), env=self._env())
            self._loops[node] = (proc, log)

    def loop_log(self, node: str) -> str:
        """Read by position: the file's offset is shared with the process
        writing it, and a seek to the start would make its next line
        overwrite the first ones."""
        _, log = self._loops[node]
        fd = log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def dead_loops(self) -> list[Outcome]:
        return [Outcome(node, proc.returncode, "", self.loop_log(node))
                for node, (proc, _) in self._loops.items() if proc.poll() is not None]

    def converge(self, timeout: float = CONVERGE_TIMEOUT, poll: float = 0.3) -> list[str]:
        """Wait until every node's `--once --dry-run` finds the kernel in sync;
        return the errors (empty when converged)."""
        deadline = time.monotonic() + timeout
        while True:
            dead = self.dead_loops()
            if dead:
                return [o.describe("loop") for o in dead]
            outcomes = self.once(("--once", "--dry-run"))
            errors = [o.describe("--once --dry-run") for o in outcomes if o.returncode not in (0, 2)]
            if errors:
                return errors
            if all(o.returncode == 0 for o in outcomes):
                return []
            if time.monotonic() > deadline:
                return [f"reconciler loop on {o.node} did not converge within {timeout:.0f} s; "
                        f"still pending:\n{_tail(o.stdout, 30)}\nloop log:\n{_tail(self.loop_log(o.node), 10)}"
                        for o in outcomes if o.returncode == 2]
            time.sleep(poll)

    def stop(self) -> list[str]:
        """Stop every process we started (SIGTERM, then SIGKILL); return loop errors."""
        for pending in self._pending:
            pending.kill()
        self._pending.clear()
        errors = []
        for proc, _ in self._loops.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for node, (proc, log) in self._loops.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                errors.append(f"reconciler loop on {node} ignored SIGTERM for {STOP_GRACE} s")
            log.close()
        self._loops.clear()
        return errors
