"""`lib.explain` must say what the lab measures on the wire.

explain is the reference the reconciler's conntrack cleanup judges flows
with, and what an operator reads when a connection fails, so it must agree
with the enforced rules cell by cell. Two layers:

- pure: every expected cell of every step of every case, whose destination
  serves the probed port, is evaluated by explain on the API objects of that
  step and must give the case's verdict. A cell whose destination does not
  serve the port is refused by the destination's kernel whatever the policy
  says, so it tells nothing about explain; it is still checked to be an `X`,
  which is the only mark the wire can confirm.
- wire (root): a sample of cases is run in the lab, and every measured cell
  (the tables' cells, and every other pair among the endpoints a table names)
  is compared with explain, not with the case's expectation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
import yaml

from lib.explain import EndpointError, Explanation, explain, render
from lib.model import Cluster
from tests.lab.apiobjects import state_cluster
from tests.lab.case import IPV4, IPV6, SCTP, Case, State, load_case, parse_case
from tests.lab.lab import Cell, Lab
from tests.lab.suites import CASES, case_params
from tests.lab.traffic import ALLOWED, RETRY_TIMEOUT, SKIPPED, TIMEOUT


# Cases run on the wire, all of the project's own: node-local and own-node
# traffic, host networks, externals, named ports resolved per destination,
# dual stack, ipBlock excepts changing across steps, a policy widened and
# deleted while pods are added and relabelled, SCTP, admin policies (nodes
# and networks peers, named ports and ranges, priorities changed across steps).
WIRE_SAMPLE = (
    "cases/27-egress-to-external.yaml",
    "cases/28-ingress-from-external.yaml",
    "cases/31-named-port-egress.yaml",
    "cases/38-sctp-alongside-tcp.yaml",
    "cases/42-host-network-not-isolated.yaml",
    "cases/44-node-local-traffic.yaml",
    "cases/45-egress-to-own-node.yaml",
    "cases/47-dual-stack-egress-ipblocks.yaml",
    "cases/54-steps-ipblock-except-change.yaml",
    "cases/48-steps-policy-add-change-delete.yaml",
    "cases/49-steps-pod-add-relabel-delete.yaml",
    *(name for name in CASES if name.startswith("cases/") and "-anp-" in name),
)


# ---------------------------------------------------------------- helpers

def family_number(family: str) -> int:
    return 6 if family == IPV6 else 4


def node_addresses(case: Case) -> dict[str, tuple[str, ...]]:
    """What the reconciler of each node finds on its interfaces: its own addresses."""
    return {n.name: (n.ip, n.ipv6) for n in case.nodes}


def cluster_of(case: Case, state: State) -> Cluster:
    """The model the reconciler builds from what the lab's API serves in `state`."""
    return state_cluster(case, state)


def address_of(case: Case, state: State, name: str, family: str) -> Optional[str]:
    """The address a probe of `family` uses for endpoint `name`."""
    if name.startswith("node:"):
        node = next(n for n in case.nodes if n.name == name[5:])
        return node.ip if family == IPV4 else node.ipv6
    if name.startswith("ext:"):
        ext = next(e for e in case.externals if e.name == name[4:])
        return ext.ip if family == IPV4 else ext.ipv6
    pod = next(p for p in state.pods if p.key == name)
    return pod.ip if family == IPV4 else pod.ipv6


def served(case: Case, state: State) -> frozenset[tuple[str, int, str]]:
    """(address, port, protocol) the lab listens on in `state`: every port a
    pod declares (a host-network pod on its node's addresses), every port an
    external declares, and on a node's addresses each port a table probes it
    on. The wire layer checks this against the lab's real listeners."""
    out = set()
    for pod in state.pods:
        for port in pod.ports:
            out |= {(pod.ip, port.port, port.protocol), (pod.ipv6, port.port, port.protocol)}
    for ext in case.externals:
        for port in ext.ports:
            out.add((ext.ip, port.port, port.protocol))
            if ext.ipv6:
                out.add((ext.ipv6, port.port, port.protocol))
    for table in state.expect:
        for _, dst, _ in table.cells:
            if dst.startswith("node:"):
                node = next(n for n in case.nodes if n.name == dst[5:])
                out |= {(node.ip, table.port, table.protocol), (node.ipv6, table.port, table.protocol)}
    return frozenset(out)


def explain_cell(case: Case, state: State, cluster: Cluster, cell: Cell) -> Explanation:
    """explain on the endpoints as a user names them: `ns/pod` for pods, the
    address of the probed family for nodes and externals."""
    def name(endpoint: str) -> str:
        if endpoint.startswith(("node:", "ext:")):
            return address_of(case, state, endpoint, cell.family)
        return endpoint
    return explain(cluster, name(cell.src), name(cell.dst), cell.port, cell.protocol,
                   family_number(cell.family), node_addresses(case))


def _reasons(e: Explanation) -> str:
    return "\n".join("      " + line for line in render(e).splitlines()[1:])


@dataclass
class PureResult:
    compared: int = 0
    not_served: int = 0
    sctp: int = 0
    problems: list[str] = field(default_factory=list)


def compare_with_expectations(case: Case) -> PureResult:
    """Every expected cell of every step against explain."""
    result = PureResult()
    for state in case.states:
        cluster = cluster_of(case, state)
        serving = served(case, state)
        step = f"step {state.index + 1}: " if case.multi_step else ""
        for table in state.expect:
            for src, dst, want in table.cells:
                cell = Cell(src, dst, table.port, table.protocol, table.family)
                where = f"{step}{table.where}: {cell.label()}"
                if (address_of(case, state, dst, table.family), table.port, table.protocol) not in serving:
                    result.not_served += 1
                    if want:
                        result.problems.append(
                            f"{where}: expected '.', but {dst} does not serve "
                            f"{table.port}/{table.protocol}: no policy can make it connect")
                    continue
                try:
                    got = explain_cell(case, state, cluster, cell)
                except EndpointError as exc:
                    result.problems.append(f"{where}: explain cannot resolve an endpoint: {exc}")
                    continue
                result.compared += 1
                result.sctp += table.protocol == SCTP
                if got.allowed != want:
                    result.problems.append(
                        f"{where}: case expects {'.' if want else 'X'}, explain says "
                        f"{'ALLOWED' if got.allowed else 'DENIED'}\n{_reasons(got)}")
    return result


# ---------------------------------------------------------------- pure layer

@pytest.mark.parametrize("path", case_params())
def test_explain_gives_the_expected_verdict(path, record_property):
    result = compare_with_expectations(load_case(path))
    record_property("compared", result.compared)
    record_property("not_served", result.not_served)
    record_property("sctp", result.sctp)
    if result.problems:
        pytest.fail(f"{path}: {len(result.problems)} of {result.compared + result.not_served} cells:\n"
                    + "\n".join(result.problems), pytrace=False)
    assert result.compared > 0, f"{path}: no cell was compared"


COMPARATOR_CHECK = """
name: comparator-check
cluster:
  nodes: [{name: node-1}, {name: node-2}]
  namespaces: [{name: x}]
  pods:
    - {namespace: x, name: a, labels: {pod: a}, node: node-1, ports: [{containerPort: 80}]}
    - {namespace: x, name: b, labels: {pod: b}, node: node-2, ports: [{containerPort: 80}]}
    - {namespace: x, name: c, labels: {pod: c}, node: node-2, ports: [{containerPort: 81}]}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-b, namespace: x}
    spec:
      podSelector: {matchLabels: {pod: b}}
      policyTypes: [Ingress]
expect:
  - port: 80
    table: |
      -            x/a  x/b  x/c
      x/a          .    .    .
      x/b          .    .    X
      node:node-2  .    .    X
"""


def test_comparison_reports_a_wrong_expectation_and_a_port_nobody_serves():
    """The comparison itself: x/a -> x/b is written '.' but x/b is isolated
    (and node-2 reaches it: its own node); x/a -> x/c is written '.' but x/c
    does not listen on 80; the other cells agree."""
    case = parse_case(yaml.safe_load(COMPARATOR_CHECK), "inline.yaml")
    result = compare_with_expectations(case)
    assert (result.compared, result.not_served) == (4, 3)
    assert len(result.problems) == 2
    assert "x/a -> x/b 80/TCP: case expects ., explain says DENIED" in result.problems[0]
    assert "x/a -> x/c 80/TCP: expected '.', but x/c does not serve 80/TCP" in result.problems[1]


# ---------------------------------------------------------------- wire layer

def wire_cells(case: Case, state: State) -> list[Cell]:
    """The tables' cells, then every other pair among the endpoints a table
    names (on its port, protocol and family) whose destination serves it and
    both ends have an address of that family."""
    serving = served(case, state)
    cells: dict[Cell, None] = {}
    for table in state.expect:
        for src, dst, _ in table.cells:
            cells[Cell(src, dst, table.port, table.protocol, table.family)] = None
    for table in state.expect:
        names = list(dict.fromkeys(table.rows + table.columns))
        for src in names:
            for dst in names:
                if src == dst:
                    continue
                a = address_of(case, state, src, table.family)
                b = address_of(case, state, dst, table.family)
                if a and b and (b, table.port, table.protocol) in serving:
                    cells.setdefault(Cell(src, dst, table.port, table.protocol, table.family))
    return [c for c in cells
            if (address_of(case, state, c.dst, c.family), c.port, c.protocol) in serving]


def _expectations(state: State) -> dict[Cell, bool]:
    return {Cell(s, d, t.port, t.protocol, t.family): want
            for t in state.expect for s, d, want in t.cells}


def _listening(lab: Lab) -> frozenset[tuple[str, int, str]]:
    s = lab.servers
    return frozenset((l.address, l.port, l.protocol)
                     for l in list(s.listening()) + list(s.unsupported) + list(s.busy))


def test_the_wire_sample_is_in_the_suite():
    """The sample names cases of the one collected set, never a path of its own."""
    assert [n for n in WIRE_SAMPLE if n not in CASES] == []


@pytest.mark.parametrize("name", [n for n in WIRE_SAMPLE if n in CASES])
def test_explain_agrees_with_the_wire(name, dataplane, root, prefix, record_property):
    case = load_case(CASES[name])
    problems: list[str] = []
    measured = skipped = 0
    with Lab(case, prefix, dataplane=dataplane) as lab:
        if case.initial is not None:
            lab.set_state(case.initial)
            errors = lab.reconcile()
            assert not errors, "\n".join(errors)
        for state in case.states:
            step = f"step {state.index + 1}: " if case.multi_step else ""
            lab.set_state(state)
            errors = lab.reconcile()
            assert not errors, step + "\n".join(errors)
            assert _listening(lab) == served(case, state), \
                f"{step}the lab listens elsewhere than test_explain_agrees.served() says"
            cluster = cluster_of(case, state)
            cells = wire_cells(case, state)
            verdicts = {c: explain_cell(case, state, cluster, c) for c in cells}
            got = dict(zip(cells, lab.probe(cells)))
            again = [c for c in cells if verdicts[c].allowed and got[c] == TIMEOUT]
            if again:
                got.update(zip(again, lab.probe(again, RETRY_TIMEOUT)))
            expected = _expectations(state)
            for cell in cells:
                if got[cell] == SKIPPED:
                    assert cell.protocol == SCTP, f"{step}{cell.label()}: probe skipped"
                    skipped += 1
                    continue
                measured += 1
                wire = got[cell] == ALLOWED
                if wire != verdicts[cell].allowed:
                    written = expected.get(cell)
                    case_says = ("not in the case's tables" if written is None
                                 else f"the case expects {'.' if written else 'X'}")
                    problems.append(
                        f"{step}{cell.label()}: wire {'.' if wire else 'X'} ({got[cell]}), explain "
                        f"{'ALLOWED' if verdicts[cell].allowed else 'DENIED'}, {case_says}\n"
                        f"{_reasons(verdicts[cell])}")
    record_property("measured", measured)
    record_property("skipped_sctp", skipped)
    if problems:
        pytest.fail(f"{name} ({dataplane}): {len(problems)} of {measured} measured cells differ "
                    "from explain:\n"
                    + "\n".join(problems), pytrace=False)
    assert measured > 0
