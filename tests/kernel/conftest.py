"""Network namespaces for real-kernel tests.

Every iptables rule and ipset a test writes lives in a namespace these
fixtures make (tests.scratch_netns), which is deleted afterwards whatever
the test's outcome, so the host's own tables are never touched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Iterator

import pytest

from tests.scratch_netns import scratch_netns

NETNS_PREFIX = "kpm-t-"


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (they create network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("kernel tests need iproute2's ip")


@pytest.fixture
def netns() -> Iterator[str]:
    """Name of a fresh network namespace, deleted on teardown."""
    _require_root()
    with scratch_netns(NETNS_PREFIX) as name:
        yield name


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], str]]:
    """Makes as many fresh namespaces as a test needs; all deleted on teardown."""
    _require_root()
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(scratch_netns(NETNS_PREFIX))
