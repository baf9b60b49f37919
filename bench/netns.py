"""The network namespaces the benchmark writes in, and sockets bound inside them.

Every chain and set the benchmark makes lives in a namespace made here and
deleted on the way out, whether the run ends normally, fails or is
interrupted. The namespaces are those of the kernel tests
(tests.scratch_netns), under a prefix of the benchmark's own.
"""
from __future__ import annotations

from typing import ContextManager

from tests.lab.netns import CLONE_NEWNET, NETNS_DIR, TIMEOUT
from tests.scratch_netns import NetnsError, bound_socket, delete, scratch_netns

__all__ = ["CLONE_NEWNET", "NETNS_DIR", "PREFIX", "TIMEOUT", "NetnsError", "bound_socket",
           "delete", "namespace"]

PREFIX = "kpm-bench-"


def namespace() -> ContextManager[str]:
    """A fresh namespace with loopback up, deleted when the block ends."""
    return scratch_netns(PREFIX)
