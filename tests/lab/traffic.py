"""Servers that answer on every declared port, and probes that are real connections.

All sockets live in this one process: each is created by a thread that has
entered the right namespace, and keeps that namespace afterwards. One selector
thread serves every listening socket; probes run in parallel on a thread pool.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from . import netns

ALLOWED, REFUSED, TIMEOUT, SKIPPED = "allowed", "refused", "timeout", "skipped"
PROBE_TIMEOUT = 1.0
RETRY_TIMEOUT = 3.0
REPLY = b"kpm-lab\n"
_UNSUPPORTED = (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT)


def _family(family: str) -> int:
    return socket.AF_INET6 if family == "IPv6" else socket.AF_INET


def _kind(protocol: str) -> tuple[int, int]:
    if protocol == "UDP":
        return socket.SOCK_DGRAM, socket.IPPROTO_UDP
    if protocol == "SCTP":
        return socket.SOCK_STREAM, getattr(socket, "IPPROTO_SCTP", 132)
    return socket.SOCK_STREAM, socket.IPPROTO_TCP


class ProtocolUnsupported(OSError):
    """The kernel cannot make this kind of socket (SCTP here)."""


def open_socket(ns: str, family: str, protocol: str) -> socket.socket:
    """A socket that belongs to namespace `ns`."""
    kind, proto = _kind(protocol)
    with netns.inside(ns):
        try:
            return socket.socket(_family(family), kind, proto)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise ProtocolUnsupported(exc.errno, f"{protocol} sockets: {exc.strerror}") from None
            raise


@dataclass(frozen=True)
class Listener:
    netns: str
    address: str
    port: int
    protocol: str               # TCP, UDP, SCTP

    @property
    def family(self) -> str:
        return "IPv6" if ":" in self.address else "IPv4"


class Servers:
    """Every listening socket of the lab, served by one thread."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._sockets: dict[Listener, socket.socket] = {}
        self.unsupported: set[Listener] = set()
        self.busy: set[Listener] = set()           # already served by someone else
        self._pending: list[tuple[str, socket.socket, Optional[Listener]]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="lab-servers", daemon=True)
        self._thread.start()

    def ensure(self, listeners: Iterable[Listener]) -> None:
        """Listen on each listener not listened on yet."""
        for item in listeners:
            with self._lock:
                if item in self._sockets or item in self.unsupported or item in self.busy:
                    continue
            sock = self._open(item)
            if sock is None:
                continue
            with self._lock:
                self._sockets[item] = sock
                self._pending.append(("add", sock, item))
            os.write(self._wake_w, b"x")

    def _open(self, item: Listener) -> Optional[socket.socket]:
        try:
            sock = open_socket(item.netns, item.family, item.protocol)
        except ProtocolUnsupported:
            with self._lock:
                self.unsupported.add(item)
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if item.family == "IPv6":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((item.address, item.port))
            if item.protocol != "UDP":
                sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                with self._lock:
                    self.busy.add(item)
                return None
            raise OSError(exc.errno, f"listening on {item}: {exc.strerror}") from None
        return sock

    def close_namespace(self, ns: str) -> None:
        """Stop every listener of a namespace (before the namespace goes)."""
        with self._lock:
            items = [item for item in self._sockets if item.netns == ns]
        self.close(items)
        with self._lock:
            self.unsupported = {i for i in self.unsupported if i.netns != ns}
            self.busy = {i for i in self.busy if i.netns != ns}

    def close(self, listeners: Iterable[Listener]) -> None:
        """Stop these listeners; the others keep answering all along."""
        with self._lock:
            gone = [item for item in listeners if item in self._sockets]
            for item in gone:
                self._pending.append(("remove", self._sockets.pop(item), None))
        if gone:
            os.write(self._wake_w, b"x")
            self._drain()

    def _drain(self) -> None:
        """Wait until the serving thread has handled every pending change."""
        done = threading.Event()
        with self._lock:
            self._pending.append(("mark", None, done))
        os.write(self._wake_w, b"x")
        done.wait(5)

    def listening(self) -> list[Listener]:
        with self._lock:
            return list(self._sockets)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        with self._lock:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    if self._apply_pending():
                        return
                    continue
                self._answer(key.fileobj, key.data)

    def _apply_pending(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, []
            stop = self._stop
        for action, sock, item in pending:
            if action == "add":
                self._selector.register(sock, selectors.EVENT_READ, item)
            elif action == "remove":
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()
            elif action == "mark":
                item.set()
        return stop

    @staticmethod
    def _answer(sock: socket.socket, item: Listener) -> None:
        try:
            if item.protocol == "UDP":
                data, peer = sock.recvfrom(2048)
                sock.sendto(data, peer)
                return
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        try:
            conn.setblocking(True)
            conn.settimeout(1)
            conn.sendall(REPLY)
        except OSError:
            pass
        finally:
            conn.close()


def probe(src_ns: str, address: str, port: int, protocol: str, family: str,
          timeout: float = PROBE_TIMEOUT) -> str:
    """One real connection attempt from namespace src_ns: ALLOWED when the
    server answered, REFUSED on reset or ICMP error, TIMEOUT when nothing came
    back (also a refusal, but one that load alone can cause), SKIPPED when the
    kernel cannot make such a socket."""
    try:
        sock = open_socket(src_ns, family, protocol)
    except ProtocolUnsupported:
        return SKIPPED
    try:
        sock.settimeout(timeout)
        if protocol == "UDP":
            sock.connect((address, port))
            payload = b"kpm-lab-probe"
            sock.send(payload)
            return ALLOWED if sock.recv(2048) == payload else REFUSED
        sock.connect((address, port))
        return ALLOWED if sock.recv(64) else REFUSED
    except socket.timeout:
        return TIMEOUT
    except OSError:
        return REFUSED
    finally:
        sock.close()


@dataclass(frozen=True)
class Probe:
    src_ns: str
    address: str
    port: int
    protocol: str
    family: str


class Prober:
    """Runs many probes at once."""

    def __init__(self, workers: int = 64, timeout: float = PROBE_TIMEOUT):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lab-probe")
        self.timeout = timeout

    def run(self, probes: Sequence[Probe], timeout: Optional[float] = None) -> list[str]:
        limit = timeout or self.timeout
        return list(self._pool.map(
            lambda p: probe(p.src_ns, p.address, p.port, p.protocol, p.family, limit), probes))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
