"""A connection a new policy refuses is cut, not left to live on through conntrack.

Our chains let every packet of a known connection through, so without the
reconciler's conntrack cleanup a connection opened while the policy allowed
it would keep working after a change that refuses it. In a lab cluster, long
lived TCP connections are opened between pods under an allow-all state; then
a policy refuses one of them, every node reconciles once, and:

- the refused connection breaks at its next exchange (reset or end of file,
  within a second);
- the connections that stay allowed, from the same pod on another port and
  on the same port between other pods, still echo;
- new connections follow the policy.

Both families at once, with the refusal coming from the destination's
ingress (enforced by its node) or from the source's egress (its own node).
"""
from __future__ import annotations

import errno
import socket
import textwrap
import threading
import time
from dataclasses import dataclass

import pytest
import yaml

from tests.lab.case import IPV4, IPV6, Case, parse_case
from tests.lab.lab import Lab, table_cells
from tests.lab.traffic import open_socket

CUT_WITHIN = 1.0            # seconds: the refused connection must fail this fast
ECHO_TIMEOUT = 2.0          # seconds for an allowed exchange (a busy machine may be slow)
CONNECT_TIMEOUT = 2.0
PORTS = (8080, 8081)

# x/a and x/c on node-1, x/b on node-2. Step 1 allows everything; step 2
# refuses x/a -> x/b on 8080 only, through the policy of the parameter.
CASE = """
cluster:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces: [{name: x}]
  pods:
    - {namespace: x, name: a, labels: {pod: a}, node: node-1}
    - {namespace: x, name: b, labels: {pod: b}, node: node-2}
    - {namespace: x, name: c, labels: {pod: c}, node: node-1}
steps:
  - expect:
      - {port: 8080, all: allow}
      - {port: 8081, all: allow}
      - {port: 8080, family: IPv6, all: allow}
      - {port: 8081, family: IPv6, all: allow}
  - policies: []            # the policy of the parameter
    expect:
      - port: 8080
        table: &refused |
          -    x/a  x/b  x/c
          x/a  .    X    .
          x/b  .    .    .
          x/c  .    .    .
      - {port: 8081, all: allow}
      - {port: 8080, family: IPv6, table: *refused}
      - {port: 8081, family: IPv6, all: allow}
"""

POLICIES = {
    # x/b admits 8080 from x/c only, and 8081 from anyone
    "ingress": """
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: b-in, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: b}}
        policyTypes: [Ingress]
        ingress:
          - from: [{podSelector: {matchLabels: {pod: c}}}]
            ports: [{port: 8080}]
          - ports: [{port: 8081}]
    """,
    # x/a sends 8080 to x/c only, and 8081 anywhere
    "egress": """
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: a-out, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
          - to: [{podSelector: {matchLabels: {pod: c}}}]
            ports: [{port: 8080}]
          - ports: [{port: 8081}]
    """,
}

# The long-lived connections of each direction: (source, destination, port).
CUT = [("x/a", "x/b", 8080)]
KEPT = {
    "ingress": [("x/a", "x/b", 8081), ("x/c", "x/b", 8080)],
    "egress": [("x/a", "x/b", 8081), ("x/a", "x/c", 8080)],
}
ENFORCED_ON = {"ingress": "node-2", "egress": "node-1"}


def conntrack_case(direction: str) -> Case:
    data = yaml.safe_load(CASE)
    data["name"] = f"conntrack-cut-{direction}"
    data["steps"][1]["policies"] = [yaml.safe_load(textwrap.dedent(POLICIES[direction]))]
    return parse_case(data, f"test_conntrack_cut.py[{direction}]")


# ---------------------------------------------------------------- echo servers

class EchoServers:
    """TCP echo servers inside pod namespaces; each accepted connection is
    echoed until its peer closes or breaks it."""

    def __init__(self):
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def listen(self, netns: str, address: str, port: int) -> None:
        family = IPV6 if ":" in address else IPV4
        sock = open_socket(netns, family, "TCP")
        self._track(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == IPV6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(16)
        sock.settimeout(0.2)
        self._start(self._accept, sock)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _start(self, target, sock: socket.socket) -> None:
        thread = threading.Thread(target=target, args=(sock,), daemon=True, name="echo")
        thread.start()
        with self._lock:
            self._threads.append(thread)

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(0.2)
            self._track(conn)
            self._start(self._echo, conn)

    def _echo(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            threads, sockets = list(self._threads), list(self._sockets)
        for thread in threads:
            thread.join(2)
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------- clients

ECHO, RESET, EOF, TIMEOUT = "echo", "reset", "eof", "timeout"


def connect(netns: str, address: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    sock = open_socket(netns, IPV6 if ":" in address else IPV4, "TCP")
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, payload: bytes, timeout: float) -> str:
    """Send one message and read it back: ECHO, RESET, EOF or TIMEOUT."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                return EOF
            got += chunk
    except socket.timeout:
        return TIMEOUT
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return RESET
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNREFUSED):
            return RESET
        raise
    return ECHO if got == payload else f"garbled {got!r}"


def new_connection(netns: str, address: str, port: int) -> str:
    """A fresh connection and one exchange: ECHO when allowed."""
    try:
        sock = connect(netns, address, port)
    except socket.timeout:
        return TIMEOUT
    except OSError as exc:
        return f"refused ({exc.strerror})"
    try:
        return exchange(sock, b"new\n", ECHO_TIMEOUT)
    finally:
        sock.close()


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    port: int
    family: str

    def label(self) -> str:
        return f"{self.src} -> {self.dst} {self.port}/TCP {self.family}"


def _conntrack_entries(lab: Lab, node: str, flow: Flow, src_ip: str, dst_ip: str) -> list[str]:
    proc = lab.node_exec(node, ["conntrack", "-L", "-f", "ipv6" if flow.family == IPV6 else "ipv4",
                                "-p", "tcp", "--orig-src", src_ip, "--orig-dst", dst_ip,
                                "--dport", str(flow.port)])
    assert proc.returncode == 0, f"conntrack -L on {node}: {proc.stderr.strip()}"
    return [line for line in proc.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------- the test

@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_refused_connection_is_cut_and_allowed_ones_live_on(direction, dataplane, root, prefix):
    case = conntrack_case(direction)
    allow_all, restricted = case.states
    cut = [Flow(s, d, p, f) for s, d, p in CUT for f in (IPV4, IPV6)]
    kept = [Flow(s, d, p, f) for s, d, p in KEPT[direction] for f in (IPV4, IPV6)]
    with Lab(case, prefix, dataplane=dataplane) as lab:
        echo = EchoServers()
        sockets: dict[Flow, socket.socket] = {}
        try:
            wrong = _run(lab, direction, allow_all, restricted, cut, kept, echo, sockets)
        finally:
            for sock in sockets.values():
                sock.close()
            echo.close()
    assert not wrong, f"{direction} policy ({dataplane}):\n" + "\n".join(wrong)


def _run(lab: Lab, direction: str, allow_all, restricted, cut: list[Flow], kept: list[Flow],
         echo: EchoServers, sockets: dict) -> list[str]:
    def ns(name: str) -> str:
        return lab.endpoint(name).netns

    def addr(name: str, family: str) -> str:
        return lab.endpoint(name).address(family)

    # rules (and with them connection tracking) in place before any connection
    lab.set_state(allow_all)
    errors = lab.reconcile()
    assert not errors, "\n".join(errors)
    for pod in allow_all.pods:
        for family in (IPV4, IPV6):
            for port in PORTS:
                echo.listen(ns(pod.key), addr(pod.key, family), port)

    for flow in cut + kept:
        sockets[flow] = connect(ns(flow.src), addr(flow.dst, flow.family), flow.port)
        assert exchange(sockets[flow], b"before\n", ECHO_TIMEOUT) == ECHO, flow.label()
    node = ENFORCED_ON[direction]
    for flow in cut:
        entries = _conntrack_entries(lab, node, flow, addr(flow.src, flow.family),
                                     addr(flow.dst, flow.family))
        assert any("ESTABLISHED" in e for e in entries), (
            f"{flow.label()}: no established conntrack entry on {node} before the change, "
            f"so nothing would keep it alive: {entries}")

    lab.set_state(restricted)
    errors = lab.reconcile()
    assert not errors, "\n".join(errors)

    wrong = []
    for flow in cut:
        start = time.monotonic()
        got = exchange(sockets[flow], b"after\n", CUT_WITHIN)
        if got not in (RESET, EOF):
            wrong.append(f"{flow.label()}: must be cut, got {got} after "
                         f"{time.monotonic() - start:.2f} s")
    for flow in kept:
        got = exchange(sockets[flow], b"after\n", ECHO_TIMEOUT)
        if got != ECHO:
            wrong.append(f"{flow.label()}: must still echo, got {got}")
    for cell, allowed in sorted(table_cells(restricted.expect).items(), key=lambda kv: kv[0].label()):
        got = new_connection(ns(cell.src), addr(cell.dst, cell.family), cell.port)
        if (got == ECHO) != allowed:
            wrong.append(f"new {cell.label()}: expected {'.' if allowed else 'X'}, got {got}")
    return wrong
