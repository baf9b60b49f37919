"""Isolating new pods, with real packets in a two-node lab cluster.

A pod whose network exists but which the API does not list yet (the window
between a pod starting and the next cycle) is refused both ways, on its own
node and across nodes, while the node itself still reaches it (kubelet
probes) and every known pod keeps its connectivity. With the option off the
same pod is open, so the refusal is the option's doing. Once the API lists
the pod (no policy selects it), the next cycle opens it.

node-1 also holds 10.244.1.1 and fd00:10:244:1::1, inside its own pod
ranges, as a CNI bridge would: the node's own traffic from those addresses,
and known pods talking to them, must not be cut.

Pod ranges come from each Node object's spec.podCIDRs through the API.
"""
from __future__ import annotations

import subprocess
import textwrap
import threading

import yaml

from tests.lab.case import IPV4, IPV6, parse_case
from tests.lab.enforce import enforce, in_sync, options_for
from tests.lab.lab import Lab
from tests.lab.traffic import ALLOWED, REFUSED, TIMEOUT, Listener, probe

PORT = 8080
CASE = textwrap.dedent("""
    name: new-pods-before-rules
    cluster:
      nodes: [{name: node-1}, {name: node-2}]
      namespaces: [{name: x}]
      pods:
        - {namespace: x, name: a, node: node-1, ports: [{containerPort: 8080}]}
        - {namespace: x, name: b, node: node-2, ports: [{containerPort: 8080}]}
    steps:
      - expect:
          - {port: 8080, all: allow}
          - {port: 8080, family: IPv6, all: allow}
      - pods:
          - {namespace: x, name: new, node: node-1, ports: [{containerPort: 8080}]}
        expect:
          - {port: 8080, all: allow}
          - {port: 8080, family: IPv6, all: allow}
""")
GATEWAY = {IPV4: "10.244.1.1", IPV6: "fd00:10:244:1::1"}
NODES = ("node-1", "node-2")


class Watch:
    """Probes known allowed connections in a loop while cycles apply; any
    refusal is a cycle that was not hitless for a pod it already knew."""

    def __init__(self, lab: Lab, pairs):
        self.lab, self.pairs = lab, pairs
        self.bad: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while True:                              # at least one round, however quick the cycle
            for src, dst, family in self.pairs:
                got = connect(self.lab, src, dst, family)
                if got == REFUSED:
                    self.bad.append(f"{src} -> {dst} {family}: refused during a cycle")
            self.rounds += 1
            if self._stop.is_set():
                return


def connect(lab: Lab, src: str, dst: str, family: str) -> str:
    s, d = lab.endpoint(src), lab.endpoint(dst)
    return probe(s.netns, d.address(family), PORT, "TCP", family)


def check(lab: Lab, expected: dict) -> list[str]:
    """Each (src, dst, family) -> ALLOWED or REFUSED; a refusal must be an
    answer (reset), not silence. Returns the differences."""
    wrong = []
    for (src, dst, family), want in expected.items():
        got = connect(lab, src, dst, family)
        if got == TIMEOUT and want == ALLOWED:
            got = probe(lab.endpoint(src).netns, lab.endpoint(dst).address(family), PORT, "TCP",
                        family, timeout=3.0)
        if got != want:
            wrong.append(f"{src} -> {dst} {family}: expected {want}, got {got}")
    return wrong


def cycle(lab: Lab, options: dict) -> None:
    for node in NODES:
        enforce(lab, node, options[node])


def expectations(new: str) -> dict:
    """`new` refused or allowed in every direction; known pods always allowed."""
    cells = {}
    for family in (IPV4, IPV6):
        for other in ("x/a", "x/b"):
            cells[("x/new", other, family)] = new
            cells[(other, "x/new", family)] = new
        cells[("x/new", "node:node-1", family)] = new       # INPUT of its own node
        cells[("x/new", "node:node-2", family)] = new
        cells[("node:node-1", "x/new", family)] = ALLOWED    # OUTPUT: kubelet probes
        for src, dst in (("x/a", "x/b"), ("x/b", "x/a"), ("node:node-1", "x/a"),
                         ("x/a", "node:node-1"), ("node:node-2", "x/a")):
            cells[(src, dst, family)] = ALLOWED
    return cells


def test_a_pod_unknown_to_the_api_is_refused_until_a_cycle_knows_it(root, prefix, dataplane):
    case = parse_case(yaml.safe_load(CASE), "test_new_pods.py")
    before, after = case.states
    newcomer = next(p for p in after.pods if p.key == "x/new")
    with Lab(case, prefix, dataplane=dataplane) as lab:
        lab.set_state(before)
        guarded = {n: options_for(lab, n, isolate_new_pods=True) for n in NODES}
        plain = {n: options_for(lab, n) for n in NODES}
        assert guarded["node-1"].pod_cidrs == ("10.244.1.0/24", "fd00:10:244:1::/64")
        node1 = lab.network.node_ns("node-1")
        for family in (IPV4, IPV6):
            plen = "32" if family == IPV4 else "128"
            subprocess.run(["ip", "-n", node1, "addr", "add", f"{GATEWAY[family]}/{plen}", "dev", "lo"],
                           check=True, capture_output=True, timeout=20)
        listeners = [Listener(lab.network.node_ns(n), address, PORT, "TCP") for n in NODES
                     for address in (lab.network.nodes[n].ip, lab.network.nodes[n].ipv6)]
        listeners += [Listener(node1, address, PORT, "TCP") for address in GATEWAY.values()]
        lab.servers.ensure(listeners)
        cycle(lab, guarded)
        known = [(s, d, f) for (s, d, f), want in expectations(REFUSED).items()
                 if want == ALLOWED and "x/new" not in (s, d)]
        assert not check(lab, {k: ALLOWED for k in known}), "known pods must be unaffected"

        # the pod's network exists, the API does not list it yet
        lab.network.add_pods([newcomer])
        lab.servers.ensure([Listener(lab.network.pod_ns(newcomer), a, PORT, "TCP")
                            for a in (newcomer.ip, newcomer.ipv6)])
        with Watch(lab, known) as watch:
            cycle(lab, guarded)                      # a cycle that does not know it either
        wrong = check(lab, expectations(REFUSED))
        assert not wrong, "an unknown pod must have no network:\n" + "\n".join(wrong)
        assert not watch.bad, watch.bad

        # the node's own addresses inside its pod ranges are not cut
        for family in (IPV4, IPV6):
            assert probe(lab.endpoint("x/a").netns, GATEWAY[family], PORT, "TCP", family) == ALLOWED
            assert probe(node1, GATEWAY[family], PORT, "TCP", family) == ALLOWED
            assert probe(lab.endpoint("x/new").netns, GATEWAY[family], PORT, "TCP", family) == REFUSED

        # control: without the option the same pod is open
        with Watch(lab, known) as watch:
            cycle(lab, plain)
        assert not check(lab, expectations(ALLOWED))
        for family in (IPV4, IPV6):
            assert probe(lab.endpoint("x/new").netns, GATEWAY[family], PORT, "TCP", family) == ALLOWED
        with Watch(lab, known) as watch2:
            cycle(lab, guarded)
        assert not check(lab, expectations(REFUSED))
        assert not watch.bad and not watch2.bad, watch.bad + watch2.bad

        # the API lists it now, without a policy: the next cycle opens it
        lab.set_state(after)
        with Watch(lab, known) as watch:
            cycle(lab, guarded)
        wrong = check(lab, expectations(ALLOWED))
        assert not wrong, "a known pod without policies must be open:\n" + "\n".join(wrong)
        assert not watch.bad, watch.bad
        assert all(in_sync(lab, n, guarded[n]) for n in NODES)


ISOLATED = textwrap.dedent("""
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-new, namespace: x}
    spec:
      podSelector: {matchLabels: {app: new}}
      policyTypes: [Ingress, Egress]
      ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
""")


def test_a_new_isolated_pod_gets_exactly_its_policy(root, prefix, dataplane):
    """Listed by the API with a policy: from unknown (all refused) straight
    to what its policy allows, never open in between."""
    data = yaml.safe_load(CASE)
    data["cluster"]["pods"][0]["labels"] = {"app": "a"}
    data["steps"][1]["pods"][0]["labels"] = {"app": "new"}
    data["steps"][1]["policies"] = [yaml.safe_load(ISOLATED)]
    case = parse_case(data, "test_new_pods.py[isolated]")
    before, after = case.states
    newcomer = next(p for p in after.pods if p.key == "x/new")
    with Lab(case, prefix, dataplane=dataplane) as lab:
        lab.set_state(before)
        guarded = {n: options_for(lab, n, isolate_new_pods=True) for n in NODES}
        cycle(lab, guarded)
        lab.network.add_pods([newcomer])
        lab.servers.ensure([Listener(lab.network.pod_ns(newcomer), a, PORT, "TCP")
                            for a in (newcomer.ip, newcomer.ipv6)])
        cycle(lab, guarded)
        assert not check(lab, {("x/a", "x/new", f): REFUSED for f in (IPV4, IPV6)})

        refused_during: list[str] = []
        rounds = []
        stop = threading.Event()

        def hammer():
            # x/b -> x/new must never get through, not even while the cycle applies
            while True:
                for family in (IPV4, IPV6):
                    if connect(lab, "x/b", "x/new", family) == ALLOWED:
                        refused_during.append(f"x/b -> x/new {family} got through")
                    if connect(lab, "x/new", "x/a", family) == ALLOWED:
                        refused_during.append(f"x/new -> x/a {family} got through")
                rounds.append(1)
                if stop.is_set():
                    return

        thread = threading.Thread(target=hammer, daemon=True)
        lab.set_state(after)
        thread.start()
        try:
            cycle(lab, guarded)
        finally:
            stop.set()
            thread.join()
        assert rounds and not refused_during, refused_during
        cells = {}
        for family in (IPV4, IPV6):
            cells[("x/a", "x/new", family)] = ALLOWED
            cells[("x/b", "x/new", family)] = REFUSED
            cells[("x/new", "x/a", family)] = REFUSED
            cells[("x/new", "x/b", family)] = REFUSED
        wrong = check(lab, cells)
        assert not wrong, "\n".join(wrong)
