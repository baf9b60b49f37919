"""The lab cluster's network: one namespace per node, pod and external host.

Pods are routed, not bridged: a veth per pod whose node side holds
169.254.1.1 and fe80::1, a host route per pod on its node. Traffic between two
pods of one node therefore crosses that node's FORWARD chain, exactly where
the reconciler hooks. Nodes meet on an underlay bridge that lives in a
namespace of its own (no bridge netfilter involved), and route to each other's
pod ranges through the owning node's address. External hosts hang off node-1.
Nothing is created in the machine's own namespace except the namespace names.
"""
from __future__ import annotations

import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional

from . import netns
from .case import External, Node, Pod

LAB_PREFIX = "kpm-lab-"
GATEWAY4, GATEWAY6 = "169.254.1.1", "fe80::1"
API_ADDRESS = "169.254.250.1"       # the API server's address on the underlay bridge
OWNER_DIR = "/run/kpm-lab"          # one file per live run: token -> pid

_NO_ICMP_LIMITS = {             # refused probes must be answered at once, however many run
    "net.ipv4.icmp_ratelimit": "0",
    "net.ipv6.icmp.ratelimit": "0",
    "net.ipv4.icmp_msgs_per_sec": "100000",
    "net.ipv4.icmp_msgs_burst": "100000",
}
_ROUTER_SYSCTLS = {
    **_NO_ICMP_LIMITS,
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
_HOST_SYSCTLS = {
    **_NO_ICMP_LIMITS,
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}


@dataclass(frozen=True)
class Endpoint:
    """Where probes start from or go to."""
    name: str                 # "x/a", "node:node-1", "ext:internet"
    netns: str
    ipv4: str
    ipv6: Optional[str]

    def address(self, family: str) -> Optional[str]:
        return self.ipv4 if family == "IPv4" else self.ipv6


def new_run_token() -> str:
    """A short random token for this run, recorded with our pid so that a
    concurrent run never takes our namespaces for leftovers."""
    token = secrets.token_hex(3)
    os.makedirs(OWNER_DIR, exist_ok=True)
    with open(os.path.join(OWNER_DIR, token), "w") as f:
        f.write(str(os.getpid()))
    return token


def release_run_token(token: str) -> None:
    try:
        os.unlink(os.path.join(OWNER_DIR, token))
    except FileNotFoundError:
        pass


def _alive_owner(token: str) -> bool:
    try:
        with open(os.path.join(OWNER_DIR, token)) as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete lab namespaces whose run is gone (killed, or run with --keep);
    return their names."""
    stale = []
    for name in netns.listed():
        if not name.startswith(LAB_PREFIX):
            continue
        token = name[len(LAB_PREFIX):].split("-", 1)[0]
        if not _alive_owner(token):
            stale.append(name)
    if stale:
        netns.delete(stale)
    try:
        tokens = os.listdir(OWNER_DIR)
    except FileNotFoundError:
        tokens = []
    for token in tokens:
        if not _alive_owner(token):
            release_run_token(token)
    return stale


def remove_run(token: str) -> list[str]:
    """Delete every namespace of run `token` (the last resort after an interruption)."""
    mine = [n for n in netns.listed() if n.startswith(f"{LAB_PREFIX}{token}-")]
    errors = netns.delete(mine)
    release_run_token(token)
    return errors


def _parallel(fn, items: Iterable) -> list:
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        return list(pool.map(fn, items))


class Network:
    """The namespaces, links and routes of one case's cluster."""

    def __init__(self, prefix: str, nodes: tuple[Node, ...], externals: tuple[External, ...]):
        if not prefix.startswith(LAB_PREFIX):
            raise ValueError(f"lab namespace prefix must start with {LAB_PREFIX}")
        self.prefix = prefix
        self.nodes = {n.name: n for n in nodes}
        self.first_node = nodes[0]
        self.externals = {e.name: e for e in externals}
        self.underlay = f"{prefix}ul"
        self.pods: dict[str, Pod] = {}            # key -> pod as built
        self._veth_of: dict[str, str] = {}        # pod key -> node-side veth
        self._counter = 0
        self._lock = threading.Lock()
        self._created: list[str] = []

    # -- names ---------------------------------------------------------------

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}n-{node}"

    def pod_ns(self, pod: Pod) -> str:
        if pod.host_network:
            return self.node_ns(pod.node)
        return f"{self.prefix}p-{pod.namespace}.{pod.name}"[:200]

    def ext_ns(self, name: str) -> str:
        return f"{self.prefix}e-{name}"[:200]

    def namespaces(self) -> list[str]:
        """Every namespace this cluster created and still has."""
        present = set(netns.listed())
        return [n for n in self._created if n in present]

    def _veth(self, letter: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{letter}{self._counter}"      # lives only inside our namespaces: short is enough

    # -- endpoints -------------------------------------------------------------

    def endpoint(self, name: str) -> Endpoint:
        if name.startswith("node:"):
            node = self.nodes[name[5:]]
            return Endpoint(name, self.node_ns(node.name), node.ip, node.ipv6)
        if name.startswith("ext:"):
            ext = self.externals[name[4:]]
            return Endpoint(name, self.ext_ns(ext.name), ext.ip, ext.ipv6)
        pod = self.pods[name]
        return Endpoint(name, self.pod_ns(pod), pod.ip, pod.ipv6)

    # -- building ------------------------------------------------------------------

    def _create(self, names: list[str], sysctls: dict[str, str]) -> None:
        netns.create(names)
        self._created.extend(names)
        _parallel(lambda n: netns.write_sysctls(n, sysctls), names)

    def build(self) -> None:
        nodes = list(self.nodes.values())
        node_names = [self.node_ns(n.name) for n in nodes]
        ext_names = [self.ext_ns(e) for e in self.externals]
        self._create([self.underlay], _HOST_SYSCTLS)
        self._create(node_names, _ROUTER_SYSCTLS)
        self._create(ext_names, _HOST_SYSCTLS)

        ul = [("link", "set", "lo", "up"),
              ("link", "add", "br0", "type", "bridge", "stp_state", "0", "mcast_snooping", "0"),
              ("link", "set", "br0", "up"),
              ("addr", "add", f"{API_ADDRESS}/32", "dev", "br0")]
        for n in nodes:
            port = f"u{n.index}"
            ul += [("link", "add", port, "type", "veth", "peer", "name", "ul0", "netns", self.node_ns(n.name)),
                   ("link", "set", port, "master", "br0"),
                   ("link", "set", port, "up"),
                   ("route", "add", f"{n.ip}/32", "dev", "br0", "src", API_ADDRESS)]
        netns.batch(ul, self.underlay)

        ext_veths = {e: self._veth("e") for e in self.externals}
        _parallel(lambda n: netns.batch(self._node_commands(n, ext_veths), self.node_ns(n.name)), nodes)
        _parallel(lambda e: netns.batch(_host_side(e.ip, e.ipv6), self.ext_ns(e.name)),
                  self.externals.values())
        first = self.first_node
        routes = []
        for name, ext in self.externals.items():
            routes += _routes_to(ext.ip, ext.ipv6, ext_veths[name], first)
        netns.batch(routes, self.node_ns(first.name))

    def _node_commands(self, node: Node, ext_veths: dict[str, str]) -> list[tuple[str, ...]]:
        cmds = [("link", "set", "lo", "up"),
                ("link", "set", "ul0", "up"),
                ("addr", "add", f"{node.ip}/32", "dev", "ul0"),
                ("addr", "add", f"{node.ipv6}/128", "dev", "ul0", "nodad"),
                ("route", "add", f"{API_ADDRESS}/32", "dev", "ul0", "src", node.ip)]
        first = self.first_node
        for other in self.nodes.values():
            if other.name == node.name:
                continue
            cmds += [("route", "add", f"{other.ip}/32", "dev", "ul0", "src", node.ip),
                     ("route", "add", f"{other.ipv6}/128", "dev", "ul0", "src", node.ipv6),
                     ("route", "add", other.pod_cidr, "via", other.ip, "dev", "ul0", "onlink"),
                     ("route", "add", other.pod_cidr6, "via", other.ipv6, "dev", "ul0", "onlink")]
        for name, ext in self.externals.items():
            if node.name == first.name:
                veth = ext_veths[name]
                cmds += [("link", "add", veth, "type", "veth", "peer", "name", "eth0",
                          "netns", self.ext_ns(name))] + _gateway_side(veth)
            else:
                cmds.append(("route", "add", f"{ext.ip}/32", "via", first.ip, "dev", "ul0", "onlink"))
                if ext.ipv6:
                    cmds.append(("route", "add", f"{ext.ipv6}/128", "via", first.ipv6, "dev", "ul0", "onlink"))
        return cmds

    def add_pods(self, pods: Iterable[Pod]) -> None:
        """Give each new (not host-network) pod its namespace, veth and routes."""
        pods = [p for p in pods if p.key not in self.pods]
        routed = [p for p in pods if not p.host_network]
        if routed:
            self._create([self.pod_ns(p) for p in routed], _HOST_SYSCTLS)
            for p in routed:
                self._veth_of[p.key] = self._veth("p")
            by_node: dict[str, list[Pod]] = {}
            for p in routed:
                by_node.setdefault(p.node, []).append(p)

            def links(node: str) -> None:
                cmds = []
                for p in by_node[node]:
                    veth = self._veth_of[p.key]
                    cmds.append(("link", "add", veth, "type", "veth", "peer", "name", "eth0",
                                 "netns", self.pod_ns(p)))
                    cmds += _gateway_side(veth)
                    cmds += _routes_to(p.ip, p.ipv6, veth, self.nodes[node])
                netns.batch(cmds, self.node_ns(node))

            _parallel(links, by_node)
            _parallel(lambda p: netns.batch(_host_side(p.ip, p.ipv6), self.pod_ns(p)), routed)
        for p in pods:
            self.pods[p.key] = p

    def remove_pods(self, keys: Iterable[str]) -> None:
        """Remove pods; deleting a pod's namespace also removes its veth and routes."""
        gone = []
        for key in keys:
            pod = self.pods.pop(key, None)
            self._veth_of.pop(key, None)
            if pod is not None and not pod.host_network:
                gone.append(self.pod_ns(pod))
        errors = netns.delete(gone)
        self._created = [n for n in self._created if n not in gone]
        if errors:
            raise netns.NetnsError("; ".join(errors))

    def update_pods(self, pods: Iterable[Pod]) -> None:
        """Bring the pod set to `pods`: re-created pods (new node or address) are
        removed and added again; label changes need no network change."""
        wanted = {p.key: p for p in pods}
        stale = [k for k, p in self.pods.items()
                 if k not in wanted or wanted[k].generation != p.generation]
        self.remove_pods(stale)
        self.add_pods(wanted.values())
        for key, pod in wanted.items():
            self.pods[key] = pod

    def destroy(self) -> list[str]:
        """Delete every namespace of this cluster; return the errors."""
        names = list(self._created)
        self._created.clear()
        self.pods.clear()
        return netns.delete(names)


def _gateway_side(veth: str) -> list[tuple[str, ...]]:
    return [("addr", "add", f"{GATEWAY4}/32", "dev", veth),
            ("addr", "add", f"{GATEWAY6}/64", "dev", veth, "nodad"),
            ("link", "set", veth, "up")]


def _routes_to(ip: str, ipv6: Optional[str], veth: str, node: Node) -> list[tuple[str, ...]]:
    cmds = [("route", "add", f"{ip}/32", "dev", veth, "src", node.ip)]
    if ipv6:
        cmds.append(("route", "add", f"{ipv6}/128", "dev", veth, "src", node.ipv6))
    return cmds


def _host_side(ip: str, ipv6: Optional[str]) -> list[tuple[str, ...]]:
    cmds = [("link", "set", "lo", "up"),
            ("link", "set", "eth0", "up"),
            ("addr", "add", f"{ip}/32", "dev", "eth0")]
    if ipv6:
        cmds.append(("addr", "add", f"{ipv6}/128", "dev", "eth0", "nodad"))
    cmds += [("route", "add", f"{GATEWAY4}/32", "dev", "eth0", "scope", "link"),
             ("route", "add", "default", "via", GATEWAY4, "dev", "eth0", "onlink"),
             ("route", "add", "::/0", "via", GATEWAY6, "dev", "eth0")]
    return cmds
