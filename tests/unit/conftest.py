"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from tests.apiserver import ApiServer


@pytest.fixture
def serve():
    """Start ApiServers (on loopback) that are stopped when the test ends,
    whatever happens."""
    started = []

    def start(**kwargs):
        server = ApiServer(**kwargs)
        started.append(server)
        return server.start()
    yield start
    for server in started:
        server.stop()
