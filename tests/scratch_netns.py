"""Scratch network namespaces: one for the length of a with-block, and
sockets made inside one.

The kernel tests and the benchmark write iptables rules and ipsets only in
such a namespace, so the host's own tables are never touched; it is deleted
when the block ends, whether it ends normally, fails or is interrupted. No
pytest here: the benchmark uses it too.
"""
from __future__ import annotations

import contextlib
import secrets
import socket
from typing import Iterator

from tests.lab import netns
from tests.lab.netns import NetnsError

__all__ = ["NetnsError", "bound_socket", "delete", "scratch_netns"]


def delete(name: str) -> None:
    """Kill what still runs inside (servers started there), then delete; a
    namespace already gone is fine, one that stays is an error."""
    errors = netns.delete([name])
    if errors:
        raise NetnsError(f"network namespace {name}: could not be deleted: {'; '.join(errors)}")


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A fresh namespace named `prefix` plus a random suffix, with loopback
    up, deleted when the block ends."""
    name = prefix + secrets.token_hex(4)
    netns.create([name])
    try:
        netns.batch([("link", "set", "lo", "up")], netns=name)
        yield name
    finally:
        delete(name)


def bound_socket(name: str, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: a free port) inside namespace
    `name`: a socket stays in the namespace it was made in, wherever it is
    used from."""
    try:
        with netns.inside(name):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise NetnsError(f"socket in network namespace {name}: {exc}") from exc
    return sock
