"""Fixtures of the lab's tests: root is required (and its absence is a failure,
never a skip), one run token per session, a check that nothing is left, and
the dataplane a test runs on (each of them, for the tests that take it)."""
from __future__ import annotations

import itertools
import os

import pytest

from lib.dataplane import DATAPLANES
from tests.lab import netns
from tests.lab.cluster import LAB_PREFIX, new_run_token, remove_leftovers, remove_run


@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.fail("the lab needs root (network namespaces, iptables inside them); run the tests as root")


@pytest.fixture(scope="session")
def run_token():
    """A token for this test session; every namespace of it is removed at the end."""
    if os.geteuid() != 0:
        yield "nonroot"
        return
    remove_leftovers()
    token = new_run_token()
    yield token
    remove_run(token)


@pytest.fixture(params=DATAPLANES)
def dataplane(request):
    """What the lab's nodes enforce with: a test that takes it runs on each."""
    return request.param


_numbers = itertools.count(1)


@pytest.fixture
def prefix(run_token, request):
    """A namespace prefix unique to one test, checked to be gone after it."""
    p = f"{LAB_PREFIX}{run_token}-t{next(_numbers)}-"
    yield p
    left = [name for name in netns.listed() if name.startswith(p)]
    if left:
        netns.delete(left)
        pytest.fail(f"namespaces left behind by {request.node.name}: {', '.join(left)}")
