"""The compiled rules, judged by what they do to packets.

Verdicts come from tests/unit/tracer.py (iptables) and tests/unit/nft_tracer.py
(nftables) walking the compiled state the way the kernel would, over the path a packet really takes between nodes: the
source node's FORWARD (or INPUT when it is for the node itself), then the
destination node's FORWARD (or INPUT), with traffic from a node to its own
pods unfiltered (OUTPUT is not hooked).
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.compile import compile_node, named_port_problems
from lib.model import EGRESS, INGRESS, SCTP, TCP, UDP, Cluster, Peer, Pod
from lib.ruleset import MAX_CHAIN_NAME, MAX_SET_NAME, DesiredState
from lib.selectors import ClusterIndex
from tests.unit.builders import (NAME_LABEL, block, both_peer, cluster, cport, namespace, ns_peer,
                                 pod, pods_peer, policy, pport, req, rule, sel)
from tests.unit.dataplanes import IPTABLES, each_dataplane, node_state, tracer_for
from tests.unit.tracer import ALLOW, Packet, TraceError, trace

# --------------------------------------------------------------------------
# the test cluster: two nodes, namespaces x and y (z has pods but no object)

NODE_IPS = {"n1": ("172.18.0.1", "fd00:172:18::1"), "n2": ("172.18.0.2", "fd00:172:18::2")}
EXTERNAL = ("192.0.2.10", "2001:db8::10")

NAMESPACES = [namespace("x", team="a", env="prod"), namespace("y", team="b", env="dev")]
PODS = [
    pod("x/a", "n1", ("10.1.0.10", "fd00:1::10"), {"app": "a", "tier": "web"},
        [cport(80, "http"), cport(53, "dns", UDP), cport(9, "assoc", SCTP)]),
    pod("x/b", "n2", ("10.2.0.10", "fd00:2::10"), {"app": "b", "tier": "db"},
        [cport(8080, "http"), cport(5353, "dns", UDP)]),
    pod("x/c", "n1", ("10.1.0.11", "fd00:1::11"), {"app": "c"}),
    pod("x/d", "n2", ("10.2.0.14", "fd00:2::14"), {"app": "d", "tier": "cache"},
        [cport(80, "http", UDP)]),
    pod("y/a", "n1", ("10.1.0.12", "fd00:1::12"), {"app": "a"}),
    pod("y/b", "n2", ("10.2.0.12", "fd00:2::12"), {"app": "b", "tier": "web"}),
    pod("z/a", "n2", ("10.2.0.13",), {"app": "a"}),                      # IPv4 only
    pod("x/h", "n1", NODE_IPS["n1"], {"app": "b"}, host_network=True),
    pod("x/h2", "n2", NODE_IPS["n2"], {"app": "b"}, host_network=True),
]


@dataclass(frozen=True)
class End:
    """One end of a connection: a pod, a node's own address, or an outside host."""
    name: str
    ips: tuple[str, ...]
    node: Optional[str]       # None: outside the cluster
    host: bool                # the node's own network stack

    def ip(self, family: int) -> Optional[str]:
        return next((a for a in self.ips if ipaddress.ip_address(a).version == family), None)


class Net:
    """The compiled state of every node of a cluster, and connections through it."""

    def __init__(self, c: Cluster, dataplane: str = IPTABLES):
        self.cluster = c
        self.dataplane = dataplane
        self.index = ClusterIndex(c)
        self.ends = {p.key: End(p.key, p.ips, p.node, p.host_network) for p in c.pods}
        self.ends.update({f"node:{n}": End(f"node:{n}", ips, n, True) for n, ips in NODE_IPS.items()})
        self.ends["ext"] = End("ext", EXTERNAL, None, False)
        self._states: dict = {}
        self._tracers: dict = {}

    def state(self, node: str):
        """The node's DesiredState (iptables) or Table (nftables)."""
        if node not in self._states:
            self._states[node] = node_state(self.dataplane, self.cluster, node, self.index)
        return self._states[node]

    def tracer(self, node: str, family: int):
        if (node, family) not in self._tracers:
            self._tracers[(node, family)] = tracer_for(self.state(node), family)
        return self._tracers[(node, family)]

    def hops(self, src: End, dst: End) -> list[tuple[str, str]]:
        """(node, built-in chain) pairs the first packet crosses."""
        hops = []
        if src.node and not src.host:
            same = dst.node == src.node
            hops.append((src.node, "INPUT" if same and dst.host else "FORWARD"))
        if dst.node and dst.node != src.node:
            hops.append((dst.node, "INPUT" if dst.host else "FORWARD"))
        return hops

    def connect(self, src: str, dst: str, port: int = 80, proto: str = "tcp", family: int = 4,
                state: str = "NEW") -> bool:
        s, d = self.ends[src], self.ends[dst]
        if s.ip(family) is None or d.ip(family) is None:
            raise ValueError(f"{src} -> {dst}: no IPv{family} address")
        packet = Packet(s.ip(family), d.ip(family), proto, port, state)
        return all(self.tracer(node, family).verdict(hook, packet) == ALLOW
                   for node, hook in self.hops(s, d))


@dataclass(frozen=True)
class Expect:
    """A truth table as in the lab cases: rows are sources, `.` allowed, `X` refused."""
    table: str
    port: int = 80
    proto: str = "tcp"
    family: int = 4


def mismatches(net: Net, expect: Expect) -> list[str]:
    lines = [ln.split() for ln in expect.table.strip().splitlines()]
    columns = lines[0][1:]
    out = []
    for row in lines[1:]:
        src, marks = row[0], row[1:]
        assert len(marks) == len(columns), row
        for dst, mark in zip(columns, marks):
            if src == dst:
                continue
            got = net.connect(src, dst, expect.port, expect.proto, expect.family)
            if got != (mark == "."):
                out.append(f"{src} -> {dst} {expect.port}/{expect.proto} IPv{expect.family}: "
                           f"expected {mark}, got {'.' if got else 'X'}")
    return out


def all_marks(mark: str, rows: list[str], cols: list[str]) -> str:
    return "\n".join(["- " + " ".join(cols)] + [f"{r} " + " ".join([mark] * len(cols)) for r in rows])


EVERY = ["x/a", "x/b", "x/c", "x/d", "y/a", "y/b", "z/a", "x/h", "node:n1", "node:n2", "ext"]
PODS_ONLY = ["x/a", "x/b", "x/c", "x/d", "y/a", "y/b", "z/a"]

# --------------------------------------------------------------------------
# semantic cases: (policies, truth tables)

CASES = {
    "no policies: everything allowed": (
        [], [Expect(all_marks(".", EVERY, EVERY)), Expect(all_marks(".", EVERY, EVERY), 53, "udp")]),

    "default deny ingress in x; host-network pod x/h is never isolated": (
        [policy("x/deny", sel(), types=[INGRESS])],
        [Expect("""
            -        x/a x/b x/c x/d y/a z/a x/h
            x/a      .   X   X   X   .   .   .
            x/b      X   .   X   X   .   .   .
            y/a      X   X   X   X   .   .   .
            z/a      X   X   X   X   .   .   .
            x/h2     X   .   X   .   .   .   .
            node:n1  .   X   .   X   .   .   .
            node:n2  X   .   X   .   .   .   .
            ext      X   X   X   X   .   .   .
        """)]),

    "ingress: [] isolates exactly like no rules": (
        [policy("x/deny", sel({"app": "a"}), ingress=[], types=[INGRESS])],
        [Expect("""
            -    x/a x/b
            x/b  X   .
            x/c  X   .
            y/b  X   .
        """)]),

    "allow-all ingress: a rule with no peers and no ports": (
        [policy("x/deny", sel(), types=[INGRESS]), policy("x/all", sel(), ingress=[rule()])],
        [Expect(all_marks(".", EVERY, EVERY)), Expect(all_marks(".", EVERY, EVERY), 5353, "udp"),
         Expect(all_marks(".", PODS_ONLY[:-1], PODS_ONLY[:-1]), 80, "tcp", 6)]),     # z/a: no IPv6

    "default deny egress of x/a, including its own node and the outside": (
        [policy("x/deny-out", sel({"app": "a"}), types=[EGRESS])],
        [Expect("""
            -    x/b x/c y/a z/a x/h x/h2 node:n1 node:n2 ext
            x/a  X   X   X   X   X   X    X       X       X
            x/c  .   .   .   .   .   .    .       .       .
        """), Expect("""
            -        x/a
            x/b      .
            x/c      .
            node:n2  .
            ext      .
        """)]),

    "allow-all egress": (
        [policy("x/deny-out", sel({"app": "a"}), types=[EGRESS]),
         policy("x/all-out", sel({"app": "a"}), egress=[rule()], types=[EGRESS])],
        [Expect(all_marks(".", ["x/a"], EVERY[1:])),
         Expect(all_marks(".", ["x/a"], ["x/b", "x/c", "y/a", "y/b"]), 8080, "tcp", 6)]),

    "podSelector peer: same namespace only; host-network pods never match": (
        [policy("x/from-b", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})])])],
        [Expect("""
            -        x/a
            x/b      .
            y/b      X
            x/c      X
            x/h      .
            x/h2     X
            node:n2  X
        """)]),

    "namespaceSelector peer: every pod of the matching namespaces": (
        [policy("x/from-team-b", sel({"app": "a"}), ingress=[rule([ns_peer({"team": "b"})])])],
        [Expect("""
            -    x/a
            y/a  .
            y/b  .
            x/b  X
            x/c  X
            z/a  X
        """)]),

    "a namespace without object carries its name label": (
        [policy("x/from-z", sel({"app": "a"}), ingress=[rule([ns_peer({NAME_LABEL: "z"})])])],
        [Expect("""
            -    x/a
            z/a  .
            y/b  X
            x/b  X
        """)]),

    "both selectors in one peer: AND": (
        [policy("x/from-b-in-team-b", sel({"app": "a"}),
                ingress=[rule([both_peer({"team": "b"}, {"app": "b"})])])],
        [Expect("""
            -    x/a
            y/b  .
            y/a  X
            x/b  X
            z/a  X
        """)]),

    "the same selectors as two peers: OR": (
        [policy("x/from-team-b-or-b", sel({"app": "a"}),
                ingress=[rule([ns_peer({"team": "b"}), pods_peer({"app": "b"})])])],
        [Expect("""
            -    x/a
            y/b  .
            y/a  .
            x/b  .
            x/c  X
            z/a  X
        """)]),

    "empty namespaceSelector with a podSelector: that pod label in every namespace": (
        [policy("x/from-any-b", sel({"app": "a"}), ingress=[rule([both_peer({}, {"app": "b"})])])],
        [Expect("""
            -    x/a
            x/b  .
            y/b  .
            y/a  X
            x/c  X
        """)]),

    "matchExpressions In": (
        [policy("x/in", sel({"app": "a"}),
                ingress=[rule([pods_peer(None, req("tier", "In", "db", "cache"))])])],
        [Expect("-   x/a\n x/b .\n x/d .\n x/c X\n y/b X")]),

    "matchExpressions NotIn matches pods without the key": (
        [policy("x/notin", sel({"app": "a"}),
                ingress=[rule([pods_peer(None, req("tier", "NotIn", "db"))])])],
        [Expect("-   x/a\n x/b X\n x/c .\n x/d .\n y/a X")]),

    "matchExpressions Exists": (
        [policy("x/exists", sel({"app": "a"}),
                ingress=[rule([pods_peer(None, req("tier", "Exists"))])])],
        [Expect("-   x/a\n x/b .\n x/c X\n x/d .")]),

    "matchExpressions DoesNotExist": (
        [policy("x/dne", sel({"app": "a"}),
                ingress=[rule([pods_peer(None, req("tier", "DoesNotExist"))])])],
        [Expect("-   x/a\n x/b X\n x/c .\n x/d X")]),

    "matchExpressions on namespaces (NotIn: a namespace without the label matches)": (
        [policy("x/not-prod", sel({"app": "a"}),
                ingress=[rule([ns_peer(None, req("env", "NotIn", "prod"))])])],
        [Expect("-   x/a\n y/a .\n y/b .\n z/a .\n x/b X\n x/c X")]),

    "matchExpressions in the policy's podSelector": (
        [policy("x/deny-tiered", sel(None, req("tier", "Exists")), types=[INGRESS])],
        [Expect("-   x/a x/b x/c x/d\n y/a X X . X")]),

    "ipBlock with except, ingress": (
        [policy("x/from-blocks", sel({"app": "a"}), ingress=[rule([
            block("10.2.0.0/16", "10.2.0.12/32"), block("192.0.2.0/24")])])],
        [Expect("""
            -        x/a
            x/b      .
            z/a      .
            y/b      X
            y/a      X
            x/c      X
            node:n2  X
            x/h2     X
            ext      .
        """)]),

    "ipBlock is how host-network pods and nodes are reached": (
        [policy("x/from-nodes", sel({"app": "a"}), ingress=[rule([block("172.18.0.0/24")])])],
        [Expect("-   x/a\n node:n2 .\n x/h2 .\n x/b X")]),

    "ipBlock with except, egress": (
        [policy("x/to-blocks", sel({"app": "a"}), types=[EGRESS],
                egress=[rule([block("10.2.0.0/16", "10.2.0.12/32")])])],
        [Expect("""
            -    x/b z/a y/b y/a x/c node:n1 node:n2 ext
            x/a  .   .   X   X   X   X       X       X
        """)]),

    "egress to the own node goes through INPUT and needs an ipBlock": (
        [policy("x/to-pods", sel({"app": "a"}), types=[EGRESS], egress=[rule([ns_peer()])]),
         policy("x/to-n1", sel({"app": "c"}), types=[EGRESS], egress=[rule([block("172.18.0.1/32")])])],
        [Expect("""
            -    node:n1 x/h node:n2 x/b y/a ext
            x/a  X       X   X       .   .   X
            x/c  .       .   X       X   X   X
        """)]),

    "named port, ingress: resolved against each destination pod": (
        [policy("x/http", sel(), ingress=[rule(None, [pport("http")])])],
        [Expect("-   x/a x/b x/c x/d\n y/a . X X X\n y/b . X X X", 80),
         Expect("-   x/a x/b x/c x/d\n y/a X . X X\n y/b X . X X", 8080),
         Expect("-   x/a x/b x/c x/d\n y/a X X X X", 80, "udp"),       # x/d's http is UDP
         Expect("-   x/a x/b\n y/a . X\n y/b . X", 80, "tcp", 6)]),

    "named port, ingress, UDP: the protocol is part of the name": (
        [policy("x/http-udp", sel(), ingress=[rule(None, [pport("http", UDP)])])],
        [Expect("-   x/a x/b x/d\n y/a X X .", 80, "udp"),
         Expect("-   x/a x/b x/d\n y/a X X X", 80, "tcp")]),

    "named port, egress: resolved per destination pod": (
        [policy("y/http-out", sel({"app": "a"}), types=[EGRESS],
                egress=[rule([ns_peer()], [pport("http")])])],
        [Expect("-   x/a x/b x/c x/d y/b ext\n y/a . X X X X X", 80),
         Expect("-   x/a x/b x/c x/d y/b ext\n y/a X . X X X X", 8080),
         Expect("-   x/a x/b\n y/a . X", 80, "tcp", 6),
         Expect("-   x/a x/b\n y/a X .", 8080, "tcp", 6),
         Expect("-   x/d\n y/a X", 80, "udp")]),

    "named port, egress to any peer": (
        [policy("y/http-out", sel({"app": "a"}), types=[EGRESS], egress=[rule(None, [pport("http")])])],
        [Expect("-   x/a x/b x/c ext\n y/a . X X X", 80),
         Expect("-   x/a x/b x/c ext\n y/a X . X X", 8080)]),

    "named port, egress to an ipBlock: the pods inside it": (
        [policy("y/http-out", sel({"app": "a"}), types=[EGRESS],
                egress=[rule([block("10.2.0.0/16")], [pport("http")])])],
        [Expect("-   x/a x/b\n y/a X X", 80),
         Expect("-   x/a x/b\n y/a X .", 8080),
         Expect("-   x/a x/b\n y/a X X", 8080, "tcp", 6)]),    # the block is IPv4 only

    "endPort": (
        [policy("x/range", sel({"app": "a"}), ingress=[rule(None, [pport(8000, end_port=8080)])])],
        [Expect("-  x/a\n y/a X", 7999), Expect("-  x/a\n y/a .", 8000),
         Expect("-  x/a\n y/a .", 8040), Expect("-  x/a\n y/a .", 8080),
         Expect("-  x/a\n y/a X", 8081), Expect("-  x/a\n y/a X", 8040, "udp")]),

    "UDP and SCTP ports": (
        [policy("x/dns", sel({"app": "a"}), ingress=[rule(None, [pport(53, UDP), pport(9, SCTP)])])],
        [Expect("-  x/a\n y/a .", 53, "udp"), Expect("-  x/a\n y/a X", 53, "tcp"),
         Expect("-  x/a\n y/a .", 9, "sctp"), Expect("-  x/a\n y/a X", 9, "tcp"),
         Expect("-  x/a\n y/a X", 9, "udp"), Expect("-  x/a\n y/a X", 53, "sctp")]),

    "protocol defaults to TCP; a port entry without a number allows the whole protocol": (
        [policy("x/p80", sel({"app": "a"}), ingress=[rule(None, [pport(80)])]),
         policy("x/udp", sel({"app": "c"}), ingress=[rule(None, [pport(None, UDP)])])],
        [Expect("-  x/a x/c\n y/a . X", 80, "tcp"), Expect("-  x/a x/c\n y/a X .", 80, "udp"),
         Expect("-  x/a x/c\n y/a X .", 12345, "udp"), Expect("-  x/a x/c\n y/a X X", 81, "tcp")]),

    "peers and ports in one rule: both must match": (
        [policy("x/b-on-80", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})], [pport(80)])])],
        [Expect("-  x/a\n x/b .\n y/a X", 80), Expect("-  x/a\n x/b X\n y/a X", 81)]),

    "rules and policies add up": (
        [policy("x/one", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})], [pport(81)]),
                                                     rule([pods_peer({"app": "c"})])]),
         policy("x/two", sel(), ingress=[rule([ns_peer({"team": "b"})], [pport(80)])])],
        [Expect("-  x/a x/b x/c\n x/b X . X\n x/c . X .\n y/a . . .\n z/a X X X", 80),
         Expect("-  x/a x/b x/c\n x/b . . X\n x/c . X .\n y/a X X X", 81)]),

    "policyTypes Egress only: the ingress rules are ignored": (
        [policy("x/out", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "none"})])],
                egress=[rule()], types=[EGRESS])],
        [Expect(all_marks(".", ["x/b", "y/a", "node:n2", "ext"], ["x/a"])),
         Expect(all_marks(".", ["x/a"], ["x/b", "y/a", "node:n1", "ext"]))]),

    "a policy applies only in its own namespace": (
        [policy("y/deny", sel(), types=[INGRESS, EGRESS])],
        [Expect("-  x/a x/b y/a y/b\n x/c . . X X\n z/a . . X X\n y/a X X . X")]),

    "pods of the same name in two namespaces are told apart": (
        [policy("x/from-b", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})], [pport(80)])]),
         policy("y/from-b", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})], [pport(81)])])],
        [Expect("-  x/a y/a\n x/b . X\n y/b X X", 80), Expect("-  x/a y/a\n x/b X X\n y/b X .", 81)]),

    "both ends local: the source's egress and the destination's ingress must both allow": (
        [policy("x/c-out", sel({"app": "c"}), types=[EGRESS], egress=[rule([pods_peer({"app": "a"})])]),
         policy("x/a-in", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})])]),
         policy("y/a-out", sel({"app": "a"}), types=[EGRESS], egress=[rule([ns_peer({"team": "a"})])]),
         policy("x/c-in", sel({"app": "c"}), ingress=[rule([ns_peer({"team": "b"})])])],
        [Expect("""
            -    x/a x/c y/a x/b
            x/c  X   .   X   X
            x/b  .   X   .   .
            y/a  X   .   .   .
            x/a  .   X   .   .
        """)]),

    "dual-stack: IPv6 ipBlock admits IPv6 only": (
        [policy("x/v6", sel({"app": "a"}), ingress=[rule([block("fd00:2::/64")])])],
        [Expect("-  x/a\n x/b .\n y/b .\n y/a X\n node:n1 .\n node:n2 X", 80, "tcp", 6),
         Expect("-  x/a\n x/b X\n y/b X\n y/a X\n z/a X\n node:n1 .", 80, "tcp", 4)]),

    "dual-stack: selectors apply in both families": (
        [policy("x/from-b", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})])])],
        [Expect("-  x/a\n x/b .\n x/c X\n y/b X", 80, "tcp", 6),
         Expect("-  x/a\n x/b .\n x/c X\n y/b X", 80, "tcp", 4)]),

    "/0 ipBlock with except in both families": (
        [policy("x/world", sel({"app": "a"}), ingress=[rule([block("0.0.0.0/0", "10.2.0.0/16"),
                                                              block("::/0", "fd00:1::/64")])])],
        [Expect("-  x/a\n ext .\n y/a .\n x/b X\n node:n2 .", 80, "tcp", 4),
         Expect("-  x/a\n ext .\n y/a X\n x/b .\n node:n2 .", 80, "tcp", 6)]),
}


@each_dataplane
@pytest.mark.parametrize("name", list(CASES))
def test_semantics(name, dataplane):
    policies, expects = CASES[name]
    net = Net(cluster(NAMESPACES, PODS, policies), dataplane)
    problems = [m for e in expects for m in mismatches(net, e)]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# conntrack, neighbour discovery, which pods get chains


def deny_all(*keys):
    return [policy(f"{k.split('/')[0]}/deny-{k.split('/')[1]}", sel({"app": k.split("/")[1]}),
                   types=[INGRESS, EGRESS]) for k in keys]


@each_dataplane
def test_replies_and_related_always_pass(dataplane):
    net = Net(cluster(NAMESPACES, PODS, deny_all("x/a")), dataplane)
    for family in (4, 6):
        for state in ("ESTABLISHED", "RELATED"):
            assert net.connect("x/b", "x/a", 80, "tcp", family, state)
            assert net.connect("x/a", "node:n1", 80, "tcp", family, state)
            assert net.connect("x/a", "x/c", 53, "udp", family, state)
        assert not net.connect("x/b", "x/a", 80, "tcp", family, "NEW")
        assert not net.connect("x/a", "x/c", 80, "tcp", family, "NEW")


@pytest.mark.parametrize("hook, src, dst", [
    ("FORWARD", "fd00:1::11", "fd00:1::10"),      # to the isolated pod
    ("FORWARD", "fd00:1::10", "fd00:2::10"),      # from it
    ("INPUT", "fd00:1::10", "fd00:172:18::1"),    # from it to the node
    ("INPUT", "fd00:1::10", "ff02::1:ff00:1"),    # solicited-node multicast
])
@each_dataplane
def test_icmpv6_neighbour_discovery_always_passes(hook, src, dst, dataplane):
    tracer = tracer_for(node_state(dataplane, cluster(NAMESPACES, PODS, deny_all("x/a")), "n1"), 6)
    for nd_type in (133, 134, 135, 136, 137):
        assert tracer.verdict(hook, Packet(src, dst, "ipv6-icmp", icmpv6_type=nd_type)) == "allow"
    assert tracer.verdict(hook, Packet(src, dst, "ipv6-icmp", icmpv6_type=128)) == "reject"


@each_dataplane
def test_icmp_to_an_isolated_pod_is_refused(dataplane):
    state = node_state(dataplane, cluster(NAMESPACES, PODS, deny_all("x/a")), "n1")
    assert tracer_for(state, 4).verdict("FORWARD", Packet("10.1.0.11", "10.1.0.10", "icmp")) == "reject"


def chain_names(state: DesiredState, family: int) -> set[str]:
    return {c.name for c in state.family(family).chains}


def pod_chains(state: DesiredState, family: int) -> set[str]:
    return {n for n in chain_names(state, family) if n not in ("KPM-FORWARD", "KPM-INPUT")}


def test_only_isolated_local_pods_get_chains():
    c = cluster(NAMESPACES, PODS, policy("x/deny", sel(), types=[INGRESS]),
                policy("x/out", sel({"app": "c"}), types=[EGRESS]))
    n1, n2 = compile_node(c, "n1"), compile_node(c, "n2")
    from lib.compile import pod_chain_name
    by_key = {p.key: p for p in PODS}
    assert pod_chains(n1, 4) == {pod_chain_name(by_key["x/a"], INGRESS),
                                 pod_chain_name(by_key["x/c"], INGRESS),
                                 pod_chain_name(by_key["x/c"], EGRESS)}
    assert pod_chains(n2, 4) == {pod_chain_name(by_key["x/b"], INGRESS),
                                 pod_chain_name(by_key["x/d"], INGRESS)}
    assert pod_chains(n1, 6) == pod_chains(n1, 4)
    # host-network x/h (n1) and x/h2 (n2) match podSelector {} in x, yet get nothing
    names = {r.text for s in (n1, n2) for f in (4, 6) for ch in s.family(f).chains for r in ch.rules}
    assert not any(t.startswith(("x/h ", "x/h2 ")) for t in names)


def test_chain_names_hash_namespace_and_pod():
    from lib.compile import pod_chain_name
    from lib.ruleset import short_hash
    by_key = {p.key: p for p in PODS}
    assert pod_chain_name(by_key["x/a"], INGRESS) == "KPM-I-" + short_hash("x/a")
    assert pod_chain_name(by_key["x/a"], EGRESS) == "KPM-E-" + short_hash("x/a")
    state = compile_node(cluster(NAMESPACES, PODS, policy("x/deny", sel(), types=[INGRESS, EGRESS]),
                                 policy("y/deny", sel(), types=[INGRESS, EGRESS])), "n1")
    for family in (4, 6):
        names = [c.name for c in state.family(family).chains]
        assert len(names) == len(set(names)) == 2 + 2 * 3      # x/a, x/c, y/a


def test_pod_without_ipv6_gets_no_ipv6_chain():
    c = cluster(NAMESPACES, PODS, policy("z/deny", sel(), types=[INGRESS, EGRESS]))
    n2 = compile_node(c, "n2")
    assert len(pod_chains(n2, 4)) == 2
    assert pod_chains(n2, 6) == set()
    assert [r.args for r in n2.v6.chain_map()["KPM-FORWARD"].rules if "-j" in r.args
            and r.args[-1].startswith("KPM-")] == []


def test_layout_without_policies():
    state = compile_node(cluster(NAMESPACES, PODS), "n1")
    for family in (4, 6):
        fam = state.family(family)
        assert chain_names(state, family) == {"KPM-FORWARD", "KPM-INPUT"}
        assert [(h.builtin, h.rule.args) for h in fam.hooks] == [
            ("FORWARD", ("-j", "KPM-FORWARD")), ("INPUT", ("-j", "KPM-INPUT"))]
        top = fam.chain_map()["KPM-FORWARD"].rules
        assert top[0].args == ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN")
        assert len(top) == (1 if family == 4 else 6)
    assert state.sets == ()


def test_dispatch_addresses_are_written_with_prefix_length():
    state = compile_node(cluster(NAMESPACES, PODS, deny_all("x/a")), "n1")
    v4 = [r.args for r in state.v4.chain_map()["KPM-FORWARD"].rules]
    v6 = [r.args for r in state.v6.chain_map()["KPM-INPUT"].rules]
    assert ("-s", "10.1.0.10/32") == v4[1][:2] and ("-d", "10.1.0.10/32") == v4[2][:2]
    assert ("-s", "fd00:1::10/128") == v6[-1][:2]
    assert [r.args for r in state.v4.chain_map()["KPM-INPUT"].rules][1][:2] == ("-s", "10.1.0.10/32")


def test_tracer_refuses_what_it_does_not_understand():
    from lib.ruleset import Chain, FamilyState, Hook, Rule
    for args in [("-m", "limit", "--limit", "1/s", "-j", "RETURN"), ("!", "-s", "10.0.0.1/32", "-j", "RETURN"),
                 ("-s", "fd00::1/128", "-j", "RETURN"), ("--dport", "80", "-j", "RETURN"),
                 ("-m", "set", "--match-set", "KPM-N4-missing", "src", "-j", "RETURN"),
                 ("-j", "ACCEPT"), ("-p", "udp", "-j", "REJECT", "--reject-with", "tcp-reset")]:
        state = DesiredState(v4=FamilyState(4, (Chain("KPM-FORWARD", (Rule(args),)),),
                                            (Hook("FORWARD", Rule(("-j", "KPM-FORWARD"))),)))
        with pytest.raises(TraceError):
            trace(state, 4, "FORWARD", Packet("10.0.0.1", "10.0.0.2", "tcp", 80))


# --------------------------------------------------------------------------
# sets: members, names, sharing


def sets_of(state: DesiredState) -> dict:
    return {s.name: s for s in state.sets}


def test_set_members_are_canonical():
    c = cluster(NAMESPACES, PODS, policy("x/world", sel({"app": "a"}), ingress=[rule([
        block("0.0.0.0/0", "10.0.0.0/8", "192.168.0.0/16"), block("::/0"), block("10.2.0.10/32"),
        pods_peer({"app": "c"}), block("10.9.0.0/24", "10.9.0.0/25")])]))
    state = compile_node(c, "n1")
    (v4,) = [s for s in state.sets if s.family == 4]
    (v6,) = [s for s in state.sets if s.family == 6]
    assert v4.kind == v6.kind == "hash:net"
    # exact union: 0/0 minus 10/8 and 192.168/16, the host 10.2.0.10, the pod x/c, 10.9.0.128/25
    assert "0.0.0.0/5" in v4.members and "128.0.0.0/2" in v4.members
    assert "10.2.0.10" in v4.members and "10.1.0.11" in v4.members and "10.9.0.128/25" in v4.members
    assert not any(m.endswith(("/0", "/32")) for m in v4.members)
    covered = [ipaddress.ip_network(m) for m in v4.members]
    for probe, inside in [("10.1.0.11", True), ("10.1.0.10", False), ("10.9.0.5", False),
                          ("10.9.0.200", True), ("192.168.1.1", False), ("8.8.8.8", True),
                          ("200.0.0.1", True), ("10.2.0.10", True), ("10.2.0.11", False)]:
        assert any(ipaddress.ip_address(probe) in n for n in covered) is inside, probe
    assert v6.members == {"::/1", "8000::/1"}          # the pod x/c's address is inside


def test_peers_matching_nothing_in_a_family_still_get_a_rule_and_an_empty_set():
    c = cluster(NAMESPACES, PODS, policy("x/only-v6-block", sel({"app": "a"}),
                                         ingress=[rule([block("fd00:9::/64")])]),
                policy("x/nobody", sel({"app": "c"}), ingress=[rule([pods_peer({"app": "none"})])]))
    state = compile_node(c, "n1")
    by_family = {f: [s for s in state.sets if s.family == f] for f in (4, 6)}
    assert len(by_family[4]) == 2 and all(not s.members for s in by_family[4])
    assert sorted(len(s.members) for s in by_family[6]) == [0, 1]
    for family in (4, 6):
        chains = [ch for ch in state.family(family).chains if ch.name.startswith("KPM-I-")]
        assert len(chains) == 2 and all(len(ch.rules) == 3 for ch in chains)


def test_sets_are_exactly_those_referenced():
    c = cluster(NAMESPACES, PODS,
                policy("x/a", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})])]),
                policy("x/c", sel({"app": "c"}), ingress=[rule([pods_peer({"app": "d"})], [pport("nope")])]),
                policy("x/b", sel({"app": "b"}), ingress=[rule([pods_peer({"app": "zzz"})])]))
    state = compile_node(c, "n1")        # x/b is on n2: its set is not needed here
    referenced = {a for f in (4, 6) for ch in state.family(f).chains for r in ch.rules
                  for a in r.args if a.startswith("KPM-N") or a.startswith("KPM-P")}
    assert referenced == set(sets_of(state))
    assert [s.name for s in state.sets] == sorted(referenced)
    assert len(state.sets) == 2          # x/a's rule, one per family; x/c's rule resolves to nothing


def test_identical_peers_share_a_set_and_egress_named_ports_use_ip_port_sets():
    peers = [both_peer({"team": "a"}, {"app": "b"})]
    c = cluster(NAMESPACES, PODS,
                policy("x/one", sel({"app": "a"}), ingress=[rule(peers)]),
                policy("x/two", sel({"app": "c"}), ingress=[rule(peers, [pport(80)])]),
                policy("x/three", sel({"app": "c"}), types=[EGRESS], egress=[rule(peers, [pport("http")])]))
    state = compile_node(c, "n1")
    kinds = sorted((s.name[:7], s.kind) for s in state.sets)
    assert kinds == [("KPM-N4-", "hash:net"), ("KPM-N6-", "hash:net"),
                     ("KPM-P4-", "hash:ip,port"), ("KPM-P6-", "hash:ip,port")]
    ports = {s.family: s.members for s in state.sets if s.kind == "hash:ip,port"}
    assert ports == {4: {"10.2.0.10,tcp:8080"}, 6: {"fd00:2::10,tcp:8080"}}


def test_peers_that_do_not_depend_on_the_policy_namespace_share_a_set_across_namespaces():
    """Policies in x and y: a namespaceSelector or ipBlock peer (and an
    egress named port towards any peer) selects the same pods from either
    namespace, so one set serves both; a bare podSelector selects in the
    policy's own namespace, so each namespace has its own set."""
    c = cluster(namespace("x"), namespace("y"),
                pod("x/a", "n1", ("10.0.1.1",), {"app": "a"}),
                pod("y/a", "n1", ("10.0.2.1",), {"app": "a"}),
                pod("x/b", "n2", ("10.0.1.2",), {"app": "b"}, ports=(cport(8080, "http"),)),
                pod("y/b", "n2", ("10.0.2.2",), {"app": "b"}, ports=(cport(8080, "http"),)),
                [policy(f"{ns}/p", sel({"app": "a"}), types=[INGRESS, EGRESS],
                        ingress=[rule([ns_peer()]), rule([block("192.0.2.0/24")]),
                                 rule([pods_peer({"app": "b"})])],
                        egress=[rule(None, [pport("http")])])
                 for ns in ("x", "y")])
    state = compile_node(c, "n1")
    v4 = {s.name: s.members for s in state.sets if s.family == 4}
    by_members = {frozenset(m): n for n, m in v4.items()}
    # shared: every pod, the ipBlock, the named port; per namespace: app=b of x, of y
    assert len(v4) == 5
    assert by_members[frozenset({"10.0.1.2"})] != by_members[frozenset({"10.0.2.2"})]
    assert frozenset({"10.0.1.2,tcp:8080", "10.0.2.2,tcp:8080"}) in by_members
    assert frozenset({"192.0.2.0/24"}) in by_members
    assert frozenset({"10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.2"}) in by_members
    # the shared named-port set allows what each policy says, from either namespace
    for src in ("10.0.1.1", "10.0.2.1"):
        assert trace(state, 4, "FORWARD", Packet(src, "10.0.2.2", dport=8080)) == ALLOW
        assert trace(state, 4, "FORWARD", Packet(src, "10.0.1.2", dport=9090)) != ALLOW


def test_names_are_within_the_kernel_limits():
    long_ns = "n" * 63
    c = cluster(pod(f"{long_ns}/{'p' * 253}", "n1", ("10.0.0.1", "fd00::1")),
                policy(f"{long_ns}/{'q' * 253}", sel(), ingress=[rule([pods_peer()], [pport("x" * 15)])],
                       egress=[rule([pods_peer()], [pport("y" * 15)])]))
    state = compile_node(c, "n1")
    names = chain_names(state, 4) | chain_names(state, 6)
    assert len(names) == 4 and all(len(n) <= MAX_CHAIN_NAME for n in names)
    assert len(state.sets) == 2 and all(len(s.name) <= MAX_SET_NAME for s in state.sets)


# --------------------------------------------------------------------------
# properties a user relies on


def remote_pods(n: int, labels: dict) -> list[Pod]:
    return [pod(f"y/r{i}", "n2", (f"10.3.{i // 200}.{i % 200 + 1}", f"fd00:3::{i + 1:x}"), labels)
            for i in range(n)]


def test_rule_count_does_not_grow_with_peer_pods():
    pols = [policy("x/from-b", sel({"app": "a"}), ingress=[rule([both_peer({}, {"app": "b"})], [pport(80)])]),
            policy("x/to-b", sel({"app": "c"}), types=[EGRESS], egress=[rule([ns_peer({"team": "b"})])])]
    before = compile_node(cluster(NAMESPACES, PODS, pols), "n1")
    after = compile_node(cluster(NAMESPACES, PODS, pols, remote_pods(500, {"app": "b"})), "n1")
    assert after.v4 == before.v4 and after.v6 == before.v6       # not one iptables line changes
    assert [s.name for s in after.sets] == [s.name for s in before.sets]
    grown = [len(a.members) - len(b.members) for a, b in zip(after.sets, before.sets)]
    assert sorted(grown) == [500, 500, 500, 500]
    net = Net(cluster(NAMESPACES, PODS, pols, remote_pods(500, {"app": "b"})))
    assert net.connect("y/r499", "x/a") and net.connect("x/c", "y/r7", 443)


def test_editing_a_policy_rewrites_only_the_chains_of_the_pods_it_selects():
    other = policy("x/c-in", sel({"app": "c"}), ingress=[rule([pods_peer({"app": "b"})])])
    old = policy("x/a-in", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"})])])
    new = policy("x/a-in", sel({"app": "a"}), ingress=[rule([pods_peer({"app": "b"}), pods_peer({"app": "d"})])])
    before = compile_node(cluster(NAMESPACES, PODS, old, other), "n1")
    after = compile_node(cluster(NAMESPACES, PODS, new, other), "n1")
    by_key = {p.key: p for p in PODS}
    from lib.compile import pod_chain_name
    a_chain, c_chain = pod_chain_name(by_key["x/a"], INGRESS), pod_chain_name(by_key["x/c"], INGRESS)
    for family in (4, 6):
        b, a = before.family(family).chain_map(), after.family(family).chain_map()
        assert set(b) == set(a)
        changed = {name for name in a if a[name] != b[name]}
        assert changed == {a_chain}
        assert a[c_chain] == b[c_chain]
    # a set that survives the edit keeps its members: only new sets carry new content
    b_sets, a_sets = sets_of(before), sets_of(after)
    assert all(a_sets[n] == b_sets[n] for n in set(a_sets) & set(b_sets))
    assert set(a_sets) - set(b_sets)


def test_same_input_same_output_whatever_the_order():
    pols = [p for e in CASES.values() for p in e[0]]
    pols = list({p.key: p for p in pols}.values())
    base = compile_node(cluster(NAMESPACES, PODS, pols), "n1")
    rng = random.Random(7)
    for _ in range(3):
        shuffled = [list(NAMESPACES), list(PODS), list(pols)]
        for part in shuffled:
            rng.shuffle(part)
        again = compile_node(cluster(*shuffled), "n1")
        assert again == base
        assert [[r.args for r in c.rules] for c in again.v4.chains] == \
               [[r.args for r in c.rules] for c in base.v4.chains]
        assert [sorted(s.members) for s in again.sets] == [sorted(s.members) for s in base.sets]
    assert [c.name for c in base.v4.chains] == sorted(c.name for c in base.v4.chains)
    assert [s.name for s in base.sets] == sorted(s.name for s in base.sets)


def test_rule_order_follows_policy_name_then_rule_then_port():
    pols = [policy("x/b-pol", sel({"app": "a"}), ingress=[rule(None, [pport(1), pport(2)]), rule(None, [pport(3)])]),
            policy("x/a-pol", sel({"app": "a"}), ingress=[rule(None, [pport(4)])])]
    state = compile_node(cluster(NAMESPACES, PODS, pols), "n1")
    (chain,) = [c for c in state.v4.chains if c.name.startswith("KPM-I-")]
    assert [r.args[r.args.index("--dport") + 1] for r in chain.rules[:-2]] == ["4", "1", "2", "3"]
    assert [r.text for r in chain.rules] == ["x/a-pol ingress[0] ports[0]", "x/b-pol ingress[0] ports[0]",
                                             "x/b-pol ingress[0] ports[1]", "x/b-pol ingress[1] ports[0]",
                                             "x/a reject", "x/a reject"]


# --------------------------------------------------------------------------
# named_port_problems


def problem_fields(*pols):
    return [(p.object, p.field) for p in named_port_problems(cluster(NAMESPACES, PODS, pols))]


def test_named_port_problems():
    assert problem_fields(policy("x/ok", sel(), ingress=[rule(None, [pport("http")])])) == []
    assert problem_fields(policy("x/typo", sel(), ingress=[rule(None, [pport(80), pport("htpp")])])) == [
        ("x/typo", "spec.ingress[0].ports[1].port")]
    # declared, but not with that protocol, or not by a pod the policy selects
    assert problem_fields(policy("x/proto", sel({"app": "a"}), ingress=[rule(None, [pport("http", UDP)])])) == [
        ("x/proto", "spec.ingress[0].ports[0].port")]
    assert problem_fields(policy("x/other", sel({"app": "c"}), ingress=[rule(None, [pport("http")])])) == [
        ("x/other", "spec.ingress[0].ports[0].port")]
    # egress: the destination pods must declare it
    assert problem_fields(policy("y/out", sel(), types=[EGRESS],
                                 egress=[rule([ns_peer({"team": "a"})], [pport("http")])])) == []
    assert problem_fields(policy("y/out", sel(), types=[EGRESS],
                                 egress=[rule([ns_peer({"team": "b"})], [pport("http")]),
                                         rule([block("10.1.0.0/16")], [pport("dns", UDP)]),
                                         rule([block("10.1.0.0/16")], [pport("dns", TCP)]),
                                         rule(None, [pport("assoc", SCTP)])])) == [
        ("y/out", "spec.egress[0].ports[0].port"), ("y/out", "spec.egress[2].ports[0].port")]
    # rules of a type the policy does not have are never enforced, so never reported
    assert problem_fields(policy("x/egress-only", sel(), ingress=[rule(None, [pport("nope")])],
                                 egress=[rule()], types=[EGRESS])) == []


def test_named_port_problem_message_names_port_and_protocol():
    (problem,) = named_port_problems(cluster(NAMESPACES, PODS, policy(
        "x/typo", sel(), ingress=[rule(None, [pport("htpp")])])))
    assert str(problem).startswith("NetworkPolicy x/typo: spec.ingress[0].ports[0].port: ")
    assert "'htpp'" in str(problem) and "TCP" in str(problem)


# --------------------------------------------------------------------------
# differential test: compiled rules vs. the API's semantics, evaluated naively


def ref_matches(selector, labels: dict) -> bool:
    """Written apart from lib.selectors, so the two can disagree."""
    if selector.match_nothing:
        return False
    ok = all(labels.get(k) == v for k, v in selector.match_labels)
    for r in selector.match_expressions:
        present = r.key in labels
        ok = ok and {"In": present and labels.get(r.key) in r.values,
                     "NotIn": not (present and labels.get(r.key) in r.values),
                     "Exists": present, "DoesNotExist": not present}[r.operator]
    return ok


def ref_peer(namespaces: dict, policy_ns: str, peer: Peer, end: End, family: int) -> bool:
    if peer.ip_block is not None:
        ip = ipaddress.ip_address(end.ip(family))
        cidr = ipaddress.ip_network(peer.ip_block.cidr)
        return ip in cidr and not any(ip in ipaddress.ip_network(e) for e in peer.ip_block.excepts)
    if end.host or end.node is None:
        return False
    pod_obj = end.pod
    if peer.namespace_selector is None:
        ns_ok = pod_obj.namespace == policy_ns
    else:
        ns_ok = ref_matches(peer.namespace_selector,
                        namespaces.get(pod_obj.namespace, {NAME_LABEL: pod_obj.namespace}))
    return ns_ok and (peer.pod_selector is None or ref_matches(peer.pod_selector, pod_obj.label_map))


def ref_port(pp, dst: End, port: int, proto: str) -> bool:
    if pp.protocol.lower() != proto:
        return False
    if pp.port is None:
        return True
    if isinstance(pp.port, int):
        return pp.port <= port <= (pp.end_port or pp.port)
    if dst.node is None or dst.host:
        return False
    return any(cp.name == pp.port and cp.protocol == pp.protocol and cp.port == port
               for cp in dst.pod.ports)


def ref_allowed(c: Cluster, src: End, dst: End, port: int, proto: str, family: int) -> bool:
    namespaces = {n.name: n.label_map for n in c.namespaces}

    def side(subject: End, other: End, direction: str) -> bool:
        if subject.node is None or subject.host:
            return True
        p = subject.pod
        pols = [pol for pol in c.policies if pol.namespace == p.namespace
                and direction in pol.policy_types and ref_matches(pol.pod_selector, p.label_map)]
        if not pols:
            return True
        for pol in pols:
            for r in (pol.ingress if direction == INGRESS else pol.egress):
                if (r.peers is None or any(ref_peer(namespaces, pol.namespace, pr, other, family)
                                           for pr in r.peers)) \
                        and (r.ports is None or any(ref_port(pp, dst, port, proto) for pp in r.ports)):
                    return True
        return False

    if src.host and src.node == dst.node:
        return True                      # the node to its own pods: kubelet probes
    if dst.host and src.node == dst.node and not src.host:
        return side(src, dst, EGRESS)
    return side(src, dst, EGRESS) and side(dst, src, INGRESS)


@dataclass(frozen=True)
class PodEnd(End):
    pod: Optional[Pod] = None


LABEL_VALUES = st.sampled_from(["1", "2"])
LABELS = st.dictionaries(st.sampled_from(["a", "b"]), LABEL_VALUES, max_size=2)
REQUIREMENTS = st.builds(lambda k, op, vals: req(k, op, *(vals if op in ("In", "NotIn") else ())),
                         st.sampled_from(["a", "b"]),
                         st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
                         st.lists(LABEL_VALUES, min_size=1, max_size=2, unique=True))
SELECTORS = st.builds(lambda labels, exprs: sel(labels, *exprs), LABELS,
                      st.lists(REQUIREMENTS, max_size=2))
BLOCKS = st.sampled_from([
    block("10.0.0.0/8", "10.2.0.0/16"), block("10.1.0.8/29"), block("0.0.0.0/0", "10.1.0.0/16"),
    block("0.0.0.0/0"), block("10.0.0.0/8", "10.1.0.0/24", "10.1.0.12/30"),
    block("172.18.0.0/24"), block("fd00::/16", "fd00:2::/64"), block("::/0"), block("fd00:1::a/128"),
])
PEERS = st.one_of(
    BLOCKS,
    st.builds(lambda s: Peer(pod_selector=s), SELECTORS),
    st.builds(lambda s: Peer(namespace_selector=s), SELECTORS),
    st.builds(lambda a, b: Peer(pod_selector=a, namespace_selector=b), SELECTORS, SELECTORS),
)
PORTS = st.sampled_from([pport(80), pport(81, UDP), pport("http"), pport("http", UDP),
                         pport(79, end_port=80), pport(81, end_port=90), pport(None, UDP), pport("web")])
RULES = st.builds(rule, st.one_of(st.none(), st.lists(PEERS, min_size=1, max_size=2)),
                  st.one_of(st.none(), st.lists(PORTS, min_size=1, max_size=2)))
POLICIES = st.builds(
    lambda ns, name, s, ing, eg, types: policy(f"{ns}/{name}", s, ing, eg, types),
    st.sampled_from(["x", "y", "z"]), st.sampled_from(["p", "q", "r"]),
    st.one_of(st.just(sel()), SELECTORS),
    st.lists(RULES, max_size=3), st.lists(RULES, max_size=3),
    st.sampled_from([[INGRESS], [EGRESS], [INGRESS, EGRESS]]))
CONTAINER_PORTS = st.lists(st.sampled_from([cport(80, "http"), cport(81, "http"), cport(81, "http", UDP),
                                            cport(80, "web"), cport(81, "web", UDP)]), max_size=2,
                           unique_by=lambda p: (p.name, p.protocol))
NS_LABELS = st.tuples(LABELS, LABELS)
POD_SPECS = st.lists(st.tuples(st.sampled_from(["x", "y", "z"]), st.sampled_from(["n1", "n2"]),
                               LABELS, CONTAINER_PORTS), min_size=3, max_size=7)


@each_dataplane
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NS_LABELS, POD_SPECS, st.lists(POLICIES, min_size=1, max_size=5, unique_by=lambda p: p.key))
def test_compiled_rules_agree_with_the_api_semantics(dataplane, ns_labels, pod_specs, pols):
    namespaces = [namespace("x", **ns_labels[0]), namespace("y", **ns_labels[1])]   # z: no object
    pods = [pod(f"{ns}/p{i}", node, (f"10.{node[1]}.0.{10 + i}", f"fd00:{node[1]}::{10 + i:x}"),
                labels, ports) for i, (ns, node, labels, ports) in enumerate(pod_specs)]
    hosts = [pod("x/host2", "n2", NODE_IPS["n2"], {}, host_network=True)]
    c = cluster(namespaces, pods, hosts, pols)
    net = Net(c, dataplane)
    ends = {p.key: PodEnd(p.key, p.ips, p.node, p.host_network, p) for p in pods + hosts}
    ends.update({"node:n1": PodEnd("node:n1", NODE_IPS["n1"], "n1", True),
                 "ext": PodEnd("ext", EXTERNAL, None, False)})
    for src in ends.values():
        for dst in ends.values():
            if src is dst or (src.node is None and dst.node is None) or \
                    (src.host and dst.host):
                continue
            for family in (4, 6):
                for port, proto in ((80, "tcp"), (81, "tcp"), (81, "udp")):
                    want = ref_allowed(c, src, dst, port, proto, family)
                    got = net.connect(src.name, dst.name, port, proto, family)
                    assert got == want, (src.name, dst.name, port, proto, family)


# --------------------------------------------------------------------------
# scale


def big_cluster(pods_n=10_000, policies_n=1_000, namespaces_n=100, nodes_n=30) -> Cluster:
    namespaces = [namespace(f"ns{i}", team=f"t{i % 10}") for i in range(namespaces_n)]
    pods = [pod(f"ns{i % namespaces_n}/p{i}", f"node{i % nodes_n}",
                (f"10.{i // 250}.{i % 250}.1", f"fd00::{i + 1:x}"),
                {"app": f"app{i % 20}", "tier": f"tier{i % 3}"},
                [cport(8080, "http")]) for i in range(pods_n)]
    pols = []
    for i in range(policies_n):
        ns = f"ns{i % namespaces_n}"
        pols.append(policy(f"{ns}/pol{i}", sel({"app": f"app{i % 20}"}), ingress=[
            rule([pods_peer({"app": f"app{(i + 1) % 20}"}), both_peer({"team": f"t{i % 10}"}, {"tier": "tier1"})],
                 [pport(80), pport("http")]),
            rule([ns_peer(None, req("team", "In", f"t{i % 7}", f"t{i % 5}"))]),
            rule([block("10.0.0.0/8", f"10.{i % 40}.0.0/16")], [pport(443)]),
        ], egress=[rule([ns_peer({"team": f"t{i % 10}"})], [pport("http")]), rule([block("0.0.0.0/0")])]))
    return cluster(namespaces, pods, pols)


def test_compiles_a_large_cluster():
    # Speed is measured by `make bench`; here only what the large cluster yields.
    c = big_cluster()
    state = compile_node(c, "node0")
    local = sum(1 for p in c.pods if p.node == "node0")
    assert len(pod_chains(state, 4)) == 2 * local
    assert sum(len(s.members) for s in state.sets) > 10_000
