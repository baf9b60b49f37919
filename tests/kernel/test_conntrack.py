"""lib.conntrack against the real kernel: a tiny routed cluster of three
namespaces (a client pod and a server pod behind a node that forwards between
them), the node's rules compiled and applied as a cycle does, and real TCP
connections that outlive a policy until cleanup cuts them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from lib import compile as compiler
from lib import conntrack, iptables_render
from lib import plan as planner
from lib.cycle import intent_families
from lib.kernel import Kernel
from lib.model import Cluster
from tests.lab.netns import forget, inside, write_sysctls
from tests.unit.builders import namespace, pod, pods_peer, policy, pport, rule, sel

NODE = "node-1"
GATEWAY = {4: "169.254.1.1", 6: "fe80::1"}
NODE_ADDRESS = {4: "172.18.0.1", 6: "fd00:ff::1"}
CLIENT = {4: "10.244.0.10", 6: "fd00::10"}
SERVER = {4: "10.244.0.20", 6: "fd00::20"}
FORBIDDEN, ALLOWED = 8080, 9090
CUT_WITHIN = 1.0           # seconds for a cut connection to notice


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


def wire_pod(node_ns: str, pod_ns: str, veth: str, pod_ip: dict[int, str]) -> None:
    """A routed pod: a veth whose node side holds the gateway addresses,
    a host route on the node, a default route in the pod."""
    ip("link", "add", veth, "netns", node_ns, "type", "veth", "peer", "name", "eth0",
       "netns", pod_ns)
    write_sysctls(pod_ns, {"net.ipv6.conf.all.accept_dad": "0",
                           "net.ipv6.conf.default.accept_dad": "0"})
    ip("-n", pod_ns, "addr", "add", f"{pod_ip[4]}/32", "dev", "eth0")
    ip("-n", pod_ns, "addr", "add", f"{pod_ip[6]}/128", "dev", "eth0", "nodad")
    ip("-n", pod_ns, "link", "set", "eth0", "up")
    ip("-n", pod_ns, "route", "add", GATEWAY[4], "dev", "eth0")
    ip("-n", pod_ns, "route", "add", "default", "via", GATEWAY[4], "dev", "eth0")
    ip("-n", pod_ns, "-6", "route", "add", "default", "via", GATEWAY[6], "dev", "eth0")
    ip("-n", node_ns, "addr", "add", f"{GATEWAY[4]}/32", "dev", veth)
    ip("-n", node_ns, "addr", "add", f"{GATEWAY[6]}/64", "dev", veth, "nodad")
    ip("-n", node_ns, "link", "set", veth, "up")
    ip("-n", node_ns, "route", "add", f"{pod_ip[4]}/32", "dev", veth)
    ip("-n", node_ns, "-6", "route", "add", f"{pod_ip[6]}/128", "dev", veth)


def wire_node(node: str, client: str, server: str) -> None:
    """The node forwards between the client and the server pod, and holds
    NODE_ADDRESS itself."""
    write_sysctls(node, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                         "net.ipv6.conf.all.accept_dad": "0",
                         "net.ipv6.conf.default.accept_dad": "0"})
    wire_pod(node, client, "vclient", CLIENT)
    wire_pod(node, server, "vserver", SERVER)
    ip("-n", node, "addr", "add", f"{NODE_ADDRESS[4]}/32", "dev", "lo")
    ip("-n", node, "addr", "add", f"{NODE_ADDRESS[6]}/128", "dev", "lo")


@dataclass
class EchoServer:
    """Echoes what each connection sends, on every port given, in `netns`."""
    netns: str
    family: int
    ports: tuple[int, ...]
    sockets: list = field(default_factory=list)

    def start(self) -> "EchoServer":
        for port in self.ports:
            with inside(self.netns):
                listener = socket.socket(_af(self.family), socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((SERVER[self.family], port))
            listener.listen()
            self.sockets.append(listener)
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self.sockets.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def stop(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


@dataclass
class Topology:
    node: str
    client: str
    server: str
    family: int
    kernel: Kernel
    opened: list = field(default_factory=list)

    def connect(self, netns: str, port: int, source: str | None = None) -> socket.socket:
        with inside(netns):
            sock = socket.socket(_af(self.family), socket.SOCK_STREAM)
        self.opened.append(sock)
        sock.settimeout(CUT_WITHIN)
        if source:
            sock.bind((source, 0))
        sock.connect((SERVER[self.family], port))
        return sock

    def close(self) -> None:
        for s in self.opened:
            s.close()
        for name in (self.node, self.client, self.server):
            forget(name)


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    sock.sendall(data)
    return sock.recv(len(data)) == data


def is_cut(sock: socket.socket) -> bool:
    """The connection fails (reset) within CUT_WITHIN: sending succeeds into the
    socket's buffer, the node refuses the packet with a TCP reset."""
    deadline = time.monotonic() + CUT_WITHIN
    try:
        while time.monotonic() < deadline:
            sock.sendall(b"ping")
            if sock.recv(4) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def conntrack_flows(netns: str, family: int) -> list[conntrack.Flow]:
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-f",
                          conntrack.FAMILY_OPTION[family], "-o", "extended"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return list(conntrack.parse_listing(out).flows)


def open_model() -> Cluster:
    """The pods, no policy: everything allowed."""
    return Cluster((namespace("a"),), model().pods, ())


def model() -> Cluster:
    """The server admits the client on ALLOWED only."""
    return Cluster(
        (namespace("a"),),
        (pod("a/client", NODE, (CLIENT[4], CLIENT[6]), {"app": "client"}),
         pod("a/server", NODE, (SERVER[4], SERVER[6]), {"app": "server"})),
        (policy("a/server-in", sel({"app": "server"}),
                ingress=[rule([pods_peer({"app": "client"})], [pport(ALLOWED)])]),))


def enforce(kernel: Kernel, cluster: Cluster) -> None:
    desired = iptables_render.render(intent_families(compiler.intend_node(cluster, NODE),
                                                       kernel.families))
    kernel.apply(planner.diff(desired, kernel.read()))


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def topology(request, netns_factory):
    if shutil.which("conntrack") is None:
        pytest.skip("needs conntrack (conntrack-tools)")
    family = request.param
    node, client, server = netns_factory(), netns_factory(), netns_factory()
    wire_node(node, client, server)
    # The node enforces the open policy first: its ctstate rule is what turns
    # conntrack on in the namespace, as kube-proxy's rules do on a real node.
    kernel = Kernel("nft", netns=node, families=(family,))
    enforce(kernel, open_model())
    topo = Topology(node, client, server, family, kernel)
    echo = EchoServer(server, family, (FORBIDDEN, ALLOWED)).start()
    try:
        yield topo
    finally:
        echo.stop()
        topo.close()


def test_cleanup_cuts_the_connection_the_policy_forbids_and_keeps_the_others(topology):
    fam = topology.family
    forbidden = topology.connect(topology.client, FORBIDDEN)
    allowed = topology.connect(topology.client, ALLOWED)
    probe = topology.connect(topology.node, FORBIDDEN, source=NODE_ADDRESS[fam])
    assert echoes(forbidden) and echoes(allowed) and echoes(probe)

    cluster = model()
    kernel = topology.kernel
    enforce(kernel, cluster)

    # The rules refuse a new connection, but the established one lives on.
    with pytest.raises(ConnectionRefusedError):
        topology.connect(topology.client, FORBIDDEN)
    assert echoes(forbidden)

    stats = conntrack.cleanup(kernel, cluster, NODE)

    assert stats.ok, stats.errors
    assert (stats.stale, stats.commands, stats.deleted, stats.failed) == (1, 1, 1, 0)
    assert stats.listed >= 3
    assert is_cut(forbidden)
    assert echoes(allowed)
    assert echoes(probe)                       # node to its own pod: never cut
    assert echoes(topology.connect(topology.client, ALLOWED))
    left = {(f.src, f.dport) for f in conntrack_flows(topology.node, fam)}
    assert (CLIENT[fam], ALLOWED) in left
    assert (NODE_ADDRESS[fam], FORBIDDEN) in left


def test_connection_an_isolating_policy_still_admits_is_kept(topology):
    conn = topology.connect(topology.client, FORBIDDEN)
    assert echoes(conn)
    both_ports = Cluster(model().namespaces, model().pods, (
        policy("a/server-in", sel({"app": "server"}),
               ingress=[rule([pods_peer({"app": "client"})],
                             [pport(FORBIDDEN), pport(ALLOWED)])]),))
    enforce(topology.kernel, both_ports)
    stats = conntrack.cleanup(topology.kernel, both_ports, NODE)
    assert stats.ok, stats.errors
    assert (stats.stale, stats.commands, stats.deleted) == (0, 0, 0)
    assert stats.listed >= 1
    assert echoes(conn)


def test_cleanup_by_namespace_name_lists_both_families_and_skips_what_it_cannot_judge(netns):
    if shutil.which("conntrack") is None:
        pytest.skip("needs conntrack (conntrack-tools)")
    subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-I", "-p", "tcp",
                    "-s", CLIENT[6], "-d", SERVER[6], "--sport", "40000", "--dport",
                    str(FORBIDDEN), "--state", "ESTABLISHED", "-t", "120"],
                   check=True, capture_output=True, timeout=20)
    subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-I", "-p", "gre",
                    "-s", CLIENT[4], "-d", SERVER[4], "--srckey", "1", "--dstkey", "2",
                    "-t", "120"], check=True, capture_output=True, timeout=20)
    stats = conntrack.cleanup(netns, model(), NODE)
    assert stats.ok, stats.errors
    assert (stats.listed, stats.stale, stats.deleted) == (1, 1, 1)
    assert stats.skipped == 1 and " gre " in stats.first_skipped
    assert conntrack_flows(netns, 6) == []


def test_missing_conntrack_is_reported_not_raised(netns, tmp_path, monkeypatch):
    for tool in ("ip", "test"):
        os.symlink(shutil.which(tool), tmp_path / tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    stats = conntrack.cleanup(netns, model(), NODE)
    assert not stats.ok
    assert len(stats.errors) == 2               # one per family
    assert all("conntrack -L" in e for e in stats.errors)
    assert (stats.listed, stats.deleted) == (0, 0)


def test_unreadable_addresses_delete_nothing():
    stats = conntrack.cleanup("kpm-t-does-not-exist", model(), NODE)
    assert not stats.ok
    assert "ip addr" in stats.errors[0]
    assert (stats.listed, stats.commands, stats.deleted) == (0, 0, 0)
