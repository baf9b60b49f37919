"""Network namespaces for real-kernel tests.

Every iptables rule and ipset a test writes lives in a namespace made here,
which is deleted afterwards whatever the test's outcome, so the host's own
tables are never touched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from typing import Callable, Iterator

import pytest

NETNS_PREFIX = "kpm-t-"
_TIMEOUT = 20


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=_TIMEOUT, check=check)


def _namespace_pids(name: str) -> list[int]:
    done = _ip("netns", "pids", name, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _remove_namespace(name: str) -> None:
    """Kill what still runs inside (servers a test started there), then delete."""
    for pid in _namespace_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def new_netns() -> Iterator[str]:
    """A fresh, uniquely named network namespace, with loopback up."""
    name = NETNS_PREFIX + secrets.token_hex(4)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _remove_namespace(name)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (they create network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("kernel tests need iproute2's ip")


@pytest.fixture
def netns() -> Iterator[str]:
    """Name of a fresh network namespace, deleted on teardown."""
    _require_root()
    with new_netns() as name:
        yield name


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], str]]:
    """Makes as many fresh namespaces as a test needs; all deleted on teardown."""
    _require_root()
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(new_netns())
