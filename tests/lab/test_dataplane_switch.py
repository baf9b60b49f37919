"""A node switched from the iptables dataplane to nftables and back, with
real packets: while every node switches, allowed connections keep getting
through and refused ones keep being refused (the new dataplane is in force
before the old one's rules are removed), and once it has switched nothing of
the other dataplane is left in the node's namespace: no KPM- chain, jump or
ipset after the switch to nftables, no `inet kube-policy-manager` table
after the switch back.

By `reconcile.py --once --dataplane ...` in each node's namespace, as an
operator changing the DaemonSet's flag would, and by in-process cycles.
"""
from __future__ import annotations

import textwrap
import time

import pytest
import yaml

from lib.dataplane import IPTABLES, NFTABLES
from tests.lab.case import parse_case
from tests.lab.enforce import enforce
from tests.lab.lab import Lab, table_cells
from tests.lab.runner import _TransitionWatch

NODES = ("node-1", "node-2")
CASE = textwrap.dedent("""
    name: dataplane-switch
    cluster:
      nodes: [{name: node-1}, {name: node-2}]
      namespaces: [{name: x}]
      pods:
        - {namespace: x, name: a, labels: {pod: a}, node: node-1, ports: [{containerPort: 80}, {containerPort: 80, protocol: UDP}]}
        - {namespace: x, name: b, labels: {pod: b}, node: node-2, ports: [{containerPort: 80}, {containerPort: 80, protocol: UDP}]}
        - {namespace: x, name: c, labels: {pod: c}, node: node-1, ports: [{containerPort: 80}, {containerPort: 80, protocol: UDP}]}
    policies:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: b-from-a, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: b}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: c-to-a, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: c}}
          policyTypes: [Egress]
          egress: [{to: [{podSelector: {matchLabels: {pod: a}}}]}]
    expect:
      - port: 80
        table: &table |
          -    x/a  x/b  x/c
          x/a  .    .    .
          x/b  .    .    .
          x/c  .    X    .
      - {port: 80, family: IPv6, table: *table}
      - {port: 80, protocol: UDP, table: *table}
      - {port: 80, protocol: UDP, family: IPv6, table: *table}
""")


def leftovers(lab: Lab, node: str) -> dict[str, list[str]]:
    """What each dataplane holds in the node's namespace, as its own tools list it."""
    ipt = []
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save",
                 "ip6tables-legacy-save"):
        out = lab.node_exec(node, [tool, "-t", "filter"])
        assert out.returncode == 0, f"{tool} on {node}: {out.stderr.strip()}"
        ipt += [f"{tool}: {line}" for line in out.stdout.splitlines() if "KPM-" in line]
    sets = lab.node_exec(node, ["ipset", "list", "-n"])
    assert sets.returncode == 0, f"ipset list on {node}: {sets.stderr.strip()}"
    ipt += [f"ipset: {name}" for name in sets.stdout.split() if name.startswith("KPM-")]
    table = lab.node_exec(node, ["nft", "list", "table", "inet", "kube-policy-manager"])
    nft = ["table inet kube-policy-manager"] if table.returncode == 0 else []
    return {IPTABLES: ipt, NFTABLES: nft}


def switch(lab: Lab, how: str, to: str) -> None:
    if how == "reconcile.py":
        outcomes = lab.reconcilers.once(("--once",), dataplane=to)
        wrong = [o.describe(f"--once --dataplane {to}") for o in outcomes if o.returncode != 0]
        assert not wrong, "\n".join(wrong)
    else:
        for node in NODES:
            enforce(lab, node, dataplane_name=to)


def wait_for_a_round(watch: _TransitionWatch, timeout: float = 10.0) -> int:
    """The rounds done once the probes are going (so that they overlap the switch)."""
    deadline = time.monotonic() + timeout
    while watch.rounds == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return watch.rounds


def in_sync(lab: Lab, on: str) -> dict[str, int]:
    return {o.node: o.returncode
            for o in lab.reconcilers.once(("--once", "--dry-run"), dataplane=on)}


@pytest.mark.parametrize("how", ["reconcile.py", "in-process"])
def test_switching_dataplanes_keeps_every_verdict_and_leaves_nothing_behind(root, prefix, how):
    case = parse_case(yaml.safe_load(CASE), f"test_dataplane_switch.py[{how}]")
    (state,) = case.states
    with Lab(case, prefix, dataplane=IPTABLES) as lab:
        lab.set_state(state)
        assert lab.reconcile() == []
        results = lab.check(state.expect)
        assert [r.describe() for r in results if not r.passed] == []
        assert all(leftovers(lab, n)[IPTABLES] and not leftovers(lab, n)[NFTABLES] for n in NODES)

        cells = table_cells(state.expect)
        for old, new in ((IPTABLES, NFTABLES), (NFTABLES, IPTABLES)):
            watch = _TransitionWatch(lab, cells)
            try:
                started = wait_for_a_round(watch)
                switch(lab, how, new)
            finally:
                flips = watch.stop()
            assert watch.rounds > started, "no probe ran while the nodes switched"
            assert flips == [], f"{old} -> {new}:\n" + "\n".join(flips)
            results = lab.check(state.expect)
            assert [r.describe() for r in results if not r.passed] == [], f"after {old} -> {new}"
            for node in NODES:
                held = leftovers(lab, node)
                assert held[old] == [], f"{node} after {old} -> {new}: {held[old]}"
                assert held[new], f"{node} after {old} -> {new}: nothing of {new}"
            assert in_sync(lab, new) == {n: 0 for n in NODES}
