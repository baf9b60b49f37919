"""Network namespaces: create, enter from a thread, configure, delete.

Entering a namespace with setns(2) only moves the calling thread, and a socket
stays in the namespace it was created in. So one process can serve and probe
every namespace of the lab without a fork per connection.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
IP = "ip"
TIMEOUT = 30          # seconds for any one `ip` invocation

_libc = ctypes.CDLL(None, use_errno=True)
_fds: dict[str, int] = {}
_fds_lock = threading.Lock()


class NetnsError(RuntimeError):
    pass


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _fd(name: str) -> int:
    with _fds_lock:
        fd = _fds.get(name)
        if fd is None:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            _fds[name] = fd
        return fd


def forget(name: str) -> None:
    """Drop the cached handle, so a deleted namespace can really go away."""
    with _fds_lock:
        fd = _fds.pop(name, None)
    if fd is not None:
        os.close(fd)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with the calling thread in namespace `name`, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(_fd(name))
        try:
            yield
        finally:
            try:
                _setns(home)
            except OSError as exc:
                raise NetnsError(f"cannot return from namespace {name}: {exc}") from exc
    finally:
        os.close(home)


def write_sysctls(name: str, values: dict[str, str]) -> None:
    """Write /proc/sys/net entries as seen from inside namespace `name`."""
    with inside(name):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)


def read_sysctl(name: str, key: str) -> str:
    with inside(name):
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
                         + (f"\ninput:\n{stdin}" if stdin else ""))


def batch(commands: Iterable[Sequence[str]], netns: str | None = None) -> None:
    """Run `ip` commands (argument lists, no `ip` itself) in one process, optionally
    inside `netns`. Arguments are our own names and addresses; each is checked to
    hold no whitespace or quote, which would split a batch line."""
    lines = []
    for cmd in commands:
        for arg in cmd:
            if not arg or any(ch.isspace() or ch in "\"'\\#" for ch in arg):
                raise NetnsError(f"unsafe ip argument {arg!r}")
        lines.append(" ".join(cmd))
    if not lines:
        return
    argv = [IP] + (["-n", netns] if netns else []) + ["-batch", "-"]
    _run(argv, "\n".join(lines) + "\n")


def create(names: Iterable[str]) -> None:
    batch((("netns", "add", n) for n in names))


def listed() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def pids(name: str) -> list[int]:
    proc = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True, timeout=TIMEOUT)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete(names: Iterable[str]) -> list[str]:
    """Delete namespaces (killing what still runs inside); return the errors."""
    errors = []
    names = [n for n in names if n]
    for n in names:
        forget(n)
        for pid in pids(n):
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for n in names:
        proc = subprocess.run([IP, "netns", "del", n], capture_output=True, text=True, timeout=TIMEOUT)
        if proc.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, n)):
            errors.append(f"{n}: {proc.stderr.strip()}")
    return errors


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs argv inside namespace `name`."""
    return [IP, "netns", "exec", name, *argv]
