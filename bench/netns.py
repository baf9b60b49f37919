"""The network namespaces the benchmark writes in, and sockets bound inside them.

Every chain and set the benchmark makes lives in a namespace made here and
deleted on the way out, whether the run ends normally, fails or is
interrupted.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import threading
from typing import Iterator

PREFIX = "kpm-bench-"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
TIMEOUT = 30.0


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def delete(name: str) -> None:
    """Kill what still runs inside, then delete; a missing namespace is fine."""
    done = _ip("netns", "pids", name, check=False)
    for pid in (int(p) for p in done.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", name, check=False)
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        raise NetnsError(f"network namespace {name}: could not be deleted")


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A fresh namespace with loopback up, deleted when the block ends."""
    name = PREFIX + secrets.token_hex(4)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        delete(name)


def bound_socket(netns: str, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a free port of `host` inside `netns`.

    setns(2) moves only the calling thread, so a throwaway thread enters
    the namespace and makes the socket, which stays in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict = {}

    def make() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            result["sock"] = sock
        except Exception as exc:  # noqa: BLE001 - handed to the calling thread
            result["error"] = exc

    thread = threading.Thread(target=make, name=f"socket in {netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise NetnsError(f"socket in network namespace {netns}: {result['error']}")
    return result["sock"]
