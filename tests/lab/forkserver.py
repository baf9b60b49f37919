"""Starts `reconcile.py --once` runs by forking one process that has already
imported the program's modules.

A `--once` run spends most of its time importing lib/ (some 0.5 s of CPU),
and the lab starts one per node for every step, on both dataplanes. The
server imports once; each run is a fork of it that enters the node's
network namespace, takes the run's working directory, environment and
argument list, and executes reconcile.py as `__main__`, exactly as
`ip netns exec NODE python reconcile.py ARGS` would, with its output in
files and its exit status reported back.

The server is single-threaded (it forks), and speaks JSON lines on its
stdin and stdout: a request {"id", "netns", "script", "argv", "cwd", "env",
"stdout", "stderr"} is answered {"id", "pid"} once forked and {"id",
"exit"} once the run is over.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import selectors
import signal
import subprocess
import sys
import threading
import traceback
from typing import Optional

from . import netns

# What reconcile.py imports on the way (lazily, inside its functions).
PRELOAD = ("requests", "yaml", "sh", "lib.cycle", "lib.kubeapi", "lib.dataplane", "lib.kernel",
           "lib.nft_kernel", "lib.loop", "lib.watch", "lib.status", "lib.explain", "lib.metrics",
           "lib.terminal", "lib.conntrack", "lib.objects", "lib.compile", "lib.nft_status")


# ---------------------------------------------------------------- the server

def _child(request: dict) -> None:
    """In the forked process: become the run, never return."""
    code = 1
    try:
        fd = os.open(os.path.join(netns.NETNS_DIR, request["netns"]), os.O_RDONLY | os.O_CLOEXEC)
        netns._setns(fd)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for target, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_TRUNC)
            os.dup2(out, target)
            os.close(out)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = [request["script"], *request["argv"]]
        sys.path[0] = os.path.dirname(request["script"])
        try:
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as a failed run, as Python would
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> int:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    running: dict[int, object] = {}
    buffer = b""
    out = sys.stdout

    def say(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    def reap() -> None:
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            say({"id": running.pop(pid), "exit": os.waitstatus_to_exitcode(status)})

    open_input = True
    while open_input or running:
        for key, _ in sel.select(timeout=1.0):
            if key.fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                open_input = False
                sel.unregister(key.fd)
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                running[pid] = request["id"]
                say({"id": request["id"], "pid": pid})
        reap()
    return 0


# ---------------------------------------------------------------- the client

class ForkedRun:
    """One run through the server, with what Reconcilers needs of a Popen."""

    def __init__(self, server: "ForkServer", ident: int, stdout: str, stderr: str):
        self._server = server
        self.ident = ident
        self._paths = (stdout, stderr)
        self.pid: Optional[int] = None
        self.returncode: Optional[int] = None
        self._started = threading.Event()
        self._done = threading.Event()

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("reconcile.py (forked)", timeout)
        return self.returncode

    def kill(self) -> None:
        self._started.wait(5)
        if self.pid is not None and not self._done.is_set():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def communicate(self, timeout: Optional[float] = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for path in self._paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
            finally:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return texts[0], texts[1]


class ForkServer:
    """The server process and the thread that reads its answers."""

    def __init__(self, python: str = sys.executable):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._proc = subprocess.Popen([python, "-m", "tests.lab.forkserver"], cwd=repo,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        self._lock = threading.Lock()
        self._runs: dict[int, ForkedRun] = {}
        self._next = 0
        self._reader = threading.Thread(target=self._read, name="lab-forkserver", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def start(self, node_netns: str, script: str, argv: list[str], cwd: str,
              env: dict[str, str]) -> ForkedRun:
        import tempfile
        paths = []
        for what in ("out", "err"):
            fd, path = tempfile.mkstemp(prefix=f"kpm-lab-once-{what}-")
            os.close(fd)
            paths.append(path)
        with self._lock:
            self._next += 1
            run = ForkedRun(self, self._next, *paths)
            self._runs[run.ident] = run
            request = {"id": run.ident, "netns": node_netns, "script": script, "argv": argv,
                       "cwd": cwd, "env": env, "stdout": paths[0], "stderr": paths[1]}
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        return run

    def _read(self) -> None:
        for line in self._proc.stdout:
            message = json.loads(line)
            with self._lock:
                run = self._runs.get(message["id"])
            if run is None:
                continue
            if "pid" in message:
                run.pid = message["pid"]
                run._started.set()
            if "exit" in message:
                run.returncode = message["exit"]
                with self._lock:
                    self._runs.pop(run.ident, None)
                run._started.set()
                run._done.set()
        with self._lock:                 # the server is gone: nothing will finish
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run.returncode = -signal.SIGKILL
            run._started.set()
            run._done.set()

    def close(self) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


_server: Optional[ForkServer] = None
_server_lock = threading.Lock()


def shared(python: str = sys.executable) -> ForkServer:
    """This process's server, started on first use."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive():
            _server = ForkServer(python)
        return _server


if __name__ == "__main__":
    sys.exit(serve())
