"""The lab checks itself: it must see a broken enforcement, refuse unknown
fields, follow the documented defaults, clean up whatever happens, and never
count what it could not send as passed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.lab import netns
from tests.lab.apiobjects import state_cluster, state_objects
from tests.lab.case import CaseError, endpoint_kind, load_case, parse_case, policy_label
from tests.lab.cluster import LAB_PREFIX, OWNER_DIR, remove_leftovers
from tests.lab.lab import Cell, Lab, table_cells
from tests.lab.runner import CaseReport, Options, StepReport, run, run_case
from tests.lab.suites import CASES
from tests.lab.traffic import ALLOWED, REFUSED

REPO = Path(__file__).resolve().parents[2]

PORTS = "[{containerPort: 80}, {containerPort: 80, protocol: UDP}]"

# Ingress isolation only: the single place a refusal can come from is the
# destination node's FORWARD chain (or INPUT, never probed here).
BREAKABLE = f"""
name: breakable
cluster:
  nodes: [{{name: node-1}}, {{name: node-2}}]
  namespaces: [{{name: x}}, {{name: y}}]
  pods:
    - {{namespace: x, name: a, labels: {{pod: a}}, node: node-1, ports: {PORTS}}}
    - {{namespace: x, name: b, labels: {{pod: b}}, node: node-2, ports: {PORTS}}}
    - {{namespace: y, name: a, labels: {{pod: a}}, node: node-1, ports: {PORTS}}}
    - {{namespace: y, name: b, labels: {{pod: b}}, node: node-2, ports: {PORTS}}}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {{name: only-y-a, namespace: x}}
    spec:
      podSelector: {{}}
      policyTypes: [Ingress]
      ingress:
        - from:
            - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}
              podSelector: {{matchLabels: {{pod: a}}}}
expect:
  - port: 80
    protocol: TCP
    table: &table |
      -            x/a  x/b  y/a  y/b
      x/a          .    X    .    .
      x/b          X    .    .    .
      y/a          .    .    .    .
      y/b          X    X    .    .
      node:node-1  .    X    .    .
      node:node-2  X    .    .    .
  - port: 80
    protocol: UDP
    family: IPv6
    table: *table
"""


def write(tmp_path: Path, text: str, name: str = "case.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def admin_manifest(kind="AdminNetworkPolicy", name="a", priority=1, **spec) -> dict:
    """An admin policy manifest as a case holds it."""
    body = {"subject": {"namespaces": {}}, **spec}
    if priority is not None:
        body["priority"] = priority
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": kind,
            "metadata": {"name": name}, "spec": body}


def case_of(text: str, path: str = "inline.yaml"):
    return parse_case(yaml.safe_load(textwrap.dedent(text)), path)


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in netns.listed() if n.startswith(prefix)]


# ---------------------------------------------------------------- the case format (no root needed)

SMALL = """
name: small
cluster:
  namespaces: [{name: x}]
  pods:
    - {namespace: x, name: a, ports: [{containerPort: 80}]}
    - {namespace: x, name: b, ports: [{containerPort: 80}]}
expect:
  - port: 80
    all: allow
"""


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["cluster"].update(node=[]), "cluster.node"),
    (lambda d: d["cluster"]["pods"][0].update(lables={"a": "b"}), "cluster.pods[0].lables"),
    (lambda d: d["cluster"]["pods"][0]["ports"][0].update(hostPort=8080), "cluster.pods[0].ports[0].hostPort"),
    (lambda d: d["expect"][0].update(famliy="IPv6"), "expect[0].famliy"),
    (lambda d: d.update(policies=[{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                   "metadata": {"name": "p", "namespace": "x"},
                                   "spec": {"podSelector": {}, "ingress": [{"form": []}]}}]),
     "policies[0].spec.ingress[0].form"),
    (lambda d: d.update(policies=[{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                   "metadata": {"name": "p", "namespace": "x"},
                                   "spec": {"podSelector": {"matchLabel": {"a": "b"}}}}]),
     "policies[0].spec.podSelector.matchLabel"),
    (lambda d: d.update(policies=[admin_manifest(egress=[
        {"action": "Allow", "to": [{"domainNames": ["example.com"]}]}])]),
     "policies[0].spec.egress[0].to[0].domainNames"),
    (lambda d: d.update(policies=[admin_manifest(ingress=[
        {"action": "Deny", "from": [{"nodes": {}}]}])]),
     "policies[0].spec.ingress[0].from[0].nodes"),
    (lambda d: d.update(policies=[admin_manifest(egress=[
        {"action": "Deny", "to": [{"pods": {"namespaceSelector": {}, "podSelectors": {}}}]}])]),
     "policies[0].spec.egress[0].to[0].pods.podSelectors"),
    (lambda d: d.update(policies=[admin_manifest(ingress=[
        {"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"portRange": {"begin": 1}}]}])]),
     "policies[0].spec.ingress[0].ports[0].portRange.begin"),
    (lambda d: d.update(policies=[admin_manifest(tier="Admin")]), "policies[0].spec.tier"),
    (lambda d: d.update(policies=[admin_manifest(kind="BaselineAdminNetworkPolicy", name="default")]),
     "policies[0].spec.priority"),
    (lambda d: d["cluster"].update(nodes=[{"name": "node-1", "label": {"zone": "a"}}]),
     "cluster.nodes[0].label"),
])
def test_an_unknown_field_is_an_error_naming_it_and_the_file(tmp_path, edit, field):
    data = yaml.safe_load(SMALL)
    edit(data)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CaseError) as err:
        load_case(path)
    message = str(err.value)
    assert str(path) in message
    assert f"{field}: unknown field" in message


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(kind="ClusterNetworkPolicy"),
     "policies[0].kind: the lab does not serve 'ClusterNetworkPolicy'; it serves NetworkPolicy "
     "(networking.k8s.io/v1), AdminNetworkPolicy (policy.networking.k8s.io/v1alpha1), "
     "BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)"),
    (lambda p: p.update(apiVersion="policy.networking.k8s.io/v1alpha2"),
     "policies[0].apiVersion: AdminNetworkPolicy must be policy.networking.k8s.io/v1alpha1 (the "
     "version the lab serves), got 'policy.networking.k8s.io/v1alpha2'"),
    (lambda p: p["metadata"].update(namespace="x"),
     "policies[0].metadata.namespace: a AdminNetworkPolicy is cluster-scoped: it has no namespace"),
])
def test_a_policy_kind_or_version_the_lab_does_not_serve_is_an_error_naming_it(edit, message):
    data = yaml.safe_load(SMALL)
    policy = admin_manifest()
    edit(policy)
    data["policies"] = [policy]
    with pytest.raises(CaseError) as err:
        parse_case(data, "t.yaml")
    assert str(err.value) == f"t.yaml: {message}"


ADMIN_CASE = """
name: admin
cluster:
  nodes:
    - {name: node-1, labels: {zone: a}}
    - {name: node-2, labels: {kubernetes.io/hostname: other, tier: edge}}
  namespaces: [{name: x}, {name: y}]
  pods:
    - {namespace: x, name: a, ports: [{containerPort: 80}]}
    - {namespace: y, name: b, ports: [{containerPort: 80}]}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: y}
    spec: {podSelector: {}}
  - apiVersion: policy.networking.k8s.io/v1alpha1
    kind: AdminNetworkPolicy
    metadata: {name: deny}
    spec:
      priority: 1
      subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}
      egress:
        - name: zone-a
          action: Deny
          to: [{nodes: {matchLabels: {zone: a}}}, {networks: [192.0.2.0/24]}]
          ports: [{portNumber: {port: 80}}, {portRange: {start: 1, end: 9}}]
        - action: Allow
          to: [{namespaces: {}}]
          ports: [{namedPort: http}]
steps:
  - expect: [{port: 80, all: deny}]
  - deleteNamespaces: [y]
    expect: [{port: 80, all: deny}]
  - policies:
      - apiVersion: policy.networking.k8s.io/v1alpha1
        kind: BaselineAdminNetworkPolicy
        metadata: {name: default}
        spec:
          subject: {namespaces: {}}
          ingress: [{action: Deny, from: [{namespaces: {}}]}]
    expect: [{port: 80, all: deny}]
"""


def test_admin_policies_and_node_labels_in_the_case_format_and_what_the_api_serves():
    case = case_of(ADMIN_CASE)
    first, deleted, replaced = case.states
    assert [(p["kind"], p["metadata"]["name"]) for p in first.policies] == [
        ("NetworkPolicy", "deny"), ("AdminNetworkPolicy", "deny")]
    # deleting a namespace removes its NetworkPolicies, never a cluster-scoped policy
    assert [policy_label(p) for p in deleted.policies] == ["ANP deny"]
    # a step's policies replace the whole set, every kind
    assert [policy_label(p) for p in replaced.policies] == ["BANP default"]

    served = state_objects(case, first)
    assert [p["metadata"]["name"] for p in served["policies"]] == ["deny"]
    assert served["admin_policies"] == [first.policies[1]]
    assert served["baseline_policies"] == []
    assert [p["metadata"]["name"] for p in state_objects(case, replaced)["baseline_policies"]] == [
        "default"]
    node_1, node_2 = served["nodes"]
    assert node_1["metadata"]["labels"] == {"kubernetes.io/hostname": "node-1", "zone": "a"}
    assert node_2["metadata"]["labels"] == {"kubernetes.io/hostname": "other", "tier": "edge"}
    assert [(a["type"], a["address"]) for a in node_1["status"]["addresses"]
            if a["type"] == "InternalIP"] == [("InternalIP", "172.18.0.1"), ("InternalIP", "fd00:172:18::1")]

    cluster = state_cluster(case, first)
    assert cluster.problems == ()
    assert [p.key for p in cluster.admin_policies] == ["ANP deny"]
    assert [(n.name, n.ips) for n in cluster.nodes] == [
        ("node-1", ("172.18.0.1", "fd00:172:18::1")), ("node-2", ("172.18.0.2", "fd00:172:18::2"))]


def test_two_policies_of_one_kind_and_name_are_an_error_and_of_two_kinds_are_not():
    data = yaml.safe_load(SMALL)
    data["policies"] = [admin_manifest(), admin_manifest(kind="BaselineAdminNetworkPolicy",
                                                          name="a", priority=None)]
    assert len(parse_case(data, "t.yaml").states[0].policies) == 2
    data["policies"] = [admin_manifest(), admin_manifest()]
    with pytest.raises(CaseError, match="two policies share a kind, namespace and name"):
        parse_case(data, "t.yaml")


def test_the_admin_cases_load_and_parse_without_a_problem():
    """Every case with admin policies serves objects the program reads whole."""
    admin = 0
    for f in CASES.values():
        case = load_case(f)
        kinds = {p["kind"] for state in case.states for p in state.policies}
        if not kinds & {"AdminNetworkPolicy", "BaselineAdminNetworkPolicy"}:
            continue
        admin += 1
        for state in case.states:
            cluster = state_cluster(case, state)
            assert cluster.problems == (), (f, [str(p) for p in cluster.problems])
    assert admin >= 10


def test_a_step_field_the_lab_does_not_know_is_an_error(tmp_path):
    path = write(tmp_path, """
        name: steps
        cluster:
          namespaces: [{name: x}]
          pods: [{namespace: x, name: a}, {namespace: x, name: b}]
        steps:
          - expect: [{port: 80, all: deny}]
          - relabelPods: [x/a]
            expect: [{port: 80, all: deny}]
    """)
    with pytest.raises(CaseError, match=r"case.yaml: steps\[1\].relabelPods: unknown field"):
        load_case(path)


@pytest.mark.parametrize("table, message", [
    ("-  x/a x/b\nx/a .  .\nx/c .  X\n", "unknown endpoint 'x/c'"),
    ("-  x/a x/b\nx/a .  .  .\n", "3 marks for 2 columns"),
    ("-  x/a x/b\nx/b o  .\n", "mark 'o' for x/b -> x/a"),
    ("-  x/a x/a\nx/b .  .\n", "listed twice"),
    ("-  x/a node:node-9\nx/b .  .\n", "unknown endpoint 'node:node-9'"),
    ("-  x/a\n", "header line and at least one row"),
])
def test_malformed_tables_and_unknown_endpoints_are_errors(table, message):
    data = yaml.safe_load(SMALL)
    data["expect"] = [{"port": 80, "table": table}]
    with pytest.raises(CaseError, match=message):
        parse_case(data, "t.yaml")


def test_the_diagonal_is_never_checked_and_may_hold_any_mark():
    data = yaml.safe_load(SMALL)
    data["expect"] = [{"port": 80, "table": "-  x/a x/b\nx/a ?  X\nx/b .  -\n"}]
    case = parse_case(data, "t.yaml")
    assert case.states[0].expect[0].cells == (("x/a", "x/b", False), ("x/b", "x/a", True))


def test_ipv6_probes_to_an_external_without_ipv6_are_an_error():
    data = yaml.safe_load(SMALL)
    data["cluster"]["externals"] = [{"name": "net", "ip": "192.0.2.1", "ports": [{"containerPort": 80}]}]
    data["expect"] = [{"port": 80, "family": "IPv6", "table": "- ext:net\nx/a X\n"}]
    with pytest.raises(CaseError, match="ext:net has no IPv6 address"):
        parse_case(data, "t.yaml")


def test_default_addresses_follow_the_documented_rules():
    case = case_of("""
        name: defaults
        cluster:
          nodes: [{name: n1}, {name: n2, podCIDR: 10.9.0.0/24, podCIDRv6: fd00:9::/64}, {name: n3}]
          namespaces: [{name: x, labels: {team: a}}]
          externals: [{name: net, ip: 192.0.2.1}]
          pods:
            - {namespace: x, name: p1}
            - {namespace: x, name: p2}
            - {namespace: x, name: p3, ip: 10.244.3.10}
            - {namespace: x, name: p4}
            - {namespace: x, name: p5, node: n1, hostNetwork: true}
            - {namespace: x, name: p6}
            - {namespace: x, name: p7, node: n1, ip: 10.244.1.11}
        expect: [{port: 80, all: allow}]
    """)
    nodes = {n.name: n for n in case.nodes}
    assert (nodes["n1"].pod_cidr, nodes["n1"].pod_cidr6, nodes["n1"].ip, nodes["n1"].ipv6) == \
        ("10.244.1.0/24", "fd00:10:244:1::/64", "172.18.0.1", "fd00:172:18::1")
    assert (nodes["n3"].pod_cidr, nodes["n3"].pod_cidr6, nodes["n3"].ip, nodes["n3"].ipv6) == \
        ("10.244.3.0/24", "fd00:10:244:3::/64", "172.18.0.3", "fd00:172:18::3")
    pods = {p.name: p for p in case.states[0].pods}
    # pods without a node: round-robin over the nodes, by position in the file
    assert [pods[n].node for n in ("p1", "p2", "p3", "p4", "p6")] == ["n1", "n2", "n3", "n1", "n3"]
    assert (pods["p1"].ip, pods["p1"].ipv6) == ("10.244.1.10", "fd00:10:244:1::10")
    assert (pods["p2"].ip, pods["p2"].ipv6) == ("10.9.0.10", "fd00:9::10")
    assert (pods["p3"].ip, pods["p3"].ipv6) == ("10.244.3.10", "fd00:10:244:3::10")
    # p7 claims .11 explicitly, so p4 (first default after p1 on n1) skips it
    assert (pods["p4"].ip, pods["p4"].ipv6) == ("10.244.1.12", "fd00:10:244:1::12")
    assert (pods["p6"].ip, pods["p6"].ipv6) == ("10.244.3.11", "fd00:10:244:3::11")
    assert (pods["p5"].ip, pods["p5"].ipv6, pods["p5"].host_network) == ("172.18.0.1", "fd00:172:18::1", True)
    ns = case.states[0].namespaces[0]
    assert dict(ns.labels) == {"team": "a", "kubernetes.io/metadata.name": "x"}
    assert case.externals[0].ipv6 is None and case.externals[0].ports == ()


def test_steps_add_update_and_delete_with_the_documented_semantics():
    case = case_of("""
        name: steps
        cluster:
          nodes: [{name: n1}]
          namespaces: [{name: x}, {name: z}]
          pods:
            - {namespace: x, name: a, labels: {pod: a, tier: web}}
            - {namespace: x, name: b, labels: {pod: b}}
            - {namespace: z, name: c}
        steps:
          - expect: [{port: 80, all: allow}]
          - namespaces: [{name: x, labels: {team: blue}}, {name: w}]
            pods:
              - {namespace: x, name: a, labels: {pod: c}}
              - {namespace: w, name: d}
            deletePods: [x/b]
            deleteNamespaces: [z]
            expect: [{port: 80, all: deny}]
    """)
    first, second = case.states
    assert [p.key for p in first.pods] == ["x/a", "x/b", "z/c"]
    pods = {p.key: p for p in second.pods}
    assert sorted(pods) == ["w/d", "x/a"]
    assert dict(pods["x/a"].labels) == {"pod": "c"}                 # labels replaced whole
    assert pods["x/a"].ip == "10.244.1.10"                          # other keys kept
    assert pods["w/d"].ip == "10.244.1.11"                          # next free address
    namespaces = {n.name: dict(n.labels) for n in second.namespaces}
    assert namespaces == {"x": {"team": "blue", "kubernetes.io/metadata.name": "x"},
                          "w": {"kubernetes.io/metadata.name": "w"}}
    assert table_cells(second.expect)[Cell("x/a", "w/d", 80, "TCP", "IPv4")] is False


def test_both_expect_and_steps_or_neither_are_errors():
    data = yaml.safe_load(SMALL)
    data["steps"] = [{"expect": data["expect"]}]
    with pytest.raises(CaseError, match="either `expect` or `steps`"):
        parse_case(data, "t.yaml")
    del data["steps"], data["expect"]
    with pytest.raises(CaseError, match="expect: required"):
        parse_case(data, "t.yaml")


def test_the_sample_cases_load():
    files = list(CASES.values()) + sorted((REPO / "tests" / "lab").glob("*.yaml"))
    assert files
    for f in files:
        assert load_case(f).states


# ---------------------------------------------------------------- on the wire (root)

def broken_by(case, node: str) -> set[str]:
    """Cells that an ingress-only case must see change when `node` stops
    filtering forwarded traffic: refused cells towards a routed pod of that node
    whose source is not that node's own network."""
    pods = {p.key: p for p in case.states[0].pods}
    changed = set()
    for table in case.states[0].expect:
        for src, dst, allowed in table.cells:
            if allowed or endpoint_kind(dst) != "pod":
                continue
            target = pods[dst]
            if target.node != node or target.host_network:
                continue
            if src == f"node:{node}" or (src in pods and pods[src].host_network and pods[src].node == node):
                continue
            cell = Cell(src, dst, table.port, table.protocol, table.family)
            changed.add(f"{cell.label()}: expected X, got .")
    return changed


def remove_forward_jump(lab: Lab, node: str) -> None:
    """Delete the reconciler's `-j KPM-FORWARD` from FORWARD, both families."""
    for tool in ("iptables", "ip6tables"):
        rules = lab.node_exec(node, [tool, "-w", "-S", "FORWARD"]).stdout.splitlines()
        numbers = [i for i, line in enumerate(rules) if line.endswith("-j KPM-FORWARD")]
        assert numbers, f"{tool}: no jump to KPM-FORWARD on {node}: {rules}"
        for number in reversed(numbers):          # line 0 is the policy, so i is the rule number
            done = lab.node_exec(node, [tool, "-w", "-D", "FORWARD", str(number)])
            assert done.returncode == 0, done.stderr


def test_breaking_enforcement_on_one_node_is_reported_exactly(root, prefix):
    case = case_of(BREAKABLE)
    expected = broken_by(case, "node-2")
    assert len(expected) == 6      # 3 cells in each of the two tables
    seen = {}

    def break_node_2(lab, index, step):
        seen["before"] = CaseReport(case.name, case.path, steps=[step]).lines()
        remove_forward_jump(lab, "node-2")
        after = StepReport(index, results=lab.check(case.states[0].expect))
        seen["after"] = CaseReport(case.name, case.path, steps=[after]).lines()

    report = run_case(case, prefix, Options(), lab_hook=break_node_2)
    assert report.ok, report.lines()
    assert seen["before"] == []
    assert set(seen["after"]) == expected
    assert len(seen["after"]) == len(expected)


def test_a_probe_to_a_port_nobody_listens_on_is_refused(root, prefix):
    case = case_of(SMALL)
    with Lab(case, prefix) as lab:
        lab.set_state(case.states[0])
        a, b = lab.endpoint("x/a"), lab.endpoint("x/b")
        from tests.lab.traffic import RETRY_TIMEOUT, probe
        for family in ("IPv4", "IPv6"):
            # an answer may be slow on a loaded machine; a refusal must come at once
            assert probe(a.netns, b.address(family), 80, "TCP", family, RETRY_TIMEOUT) == ALLOWED
            for protocol in ("TCP", "UDP"):
                started = time.monotonic()
                assert probe(a.netns, b.address(family), 81, protocol, family) == REFUSED
                assert time.monotonic() - started < 0.5       # refused at once, not timed out
        assert probe(a.netns, b.address("IPv4"), 80, "UDP", "IPv4") == REFUSED  # TCP only declared
    assert lab_namespaces(prefix) == []


def test_sctp_probes_are_skipped_never_passed(root, tmp_path, capsys):
    path = write(tmp_path, """
        name: sctp
        cluster:
          namespaces: [{name: x}]
          pods:
            - {namespace: x, name: a, ports: [{containerPort: 80}, {containerPort: 132, protocol: SCTP}]}
            - {namespace: x, name: b, ports: [{containerPort: 80}, {containerPort: 132, protocol: SCTP}]}
        expect:
          - {port: 132, protocol: SCTP, all: allow}
          - {port: 80, all: allow}
    """)
    status = run([str(path)], Options())
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "2 passed, 0 failed, 2 skipped"
    assert status == 0


def test_a_failing_case_is_reported_and_leaves_no_namespace(root, tmp_path, capsys, prefix):
    path = write(tmp_path, SMALL.replace("all: allow", "all: deny"))
    case = load_case(path)
    report = run_case(case, prefix, Options())
    assert not report.ok
    assert sorted(report.lines()) == ["x/a -> x/b 80/TCP: expected X, got .",
                                      "x/b -> x/a 80/TCP: expected X, got ."]
    assert lab_namespaces(prefix) == []

    def explode(lab, index, step):
        raise RuntimeError("boom")

    report = run_case(case, prefix, Options(), lab_hook=explode)
    assert report.error and "boom" in report.error and report.failed >= 1
    assert lab_namespaces(prefix) == []

    status = run([str(path)], Options())
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 1
    assert "  x/a -> x/b 80/TCP: expected X, got ." in out
    assert out[-1] == "0 passed, 2 failed"


FAKE_RECONCILER = """
import os, subprocess, sys, time
# Refuses to touch any namespace but a lab node's (only those have the underlay link ul0).
if not os.path.exists("/sys/class/net/ul0"):
    sys.exit("not inside a lab node namespace")
if "--dry-run" in sys.argv:
    sys.exit(0)
if os.environ.get("FAKE_FAIL"):
    sys.exit("fake reconciler failed on purpose")
# not hitless on purpose: everything is open for a moment
subprocess.run(["iptables", "-w", "-F", "FORWARD"], check=True)
time.sleep(1.0)
subprocess.run(["iptables", "-w", "-A", "FORWARD", "-p", "tcp", "--dport", "80",
                "-j", "REJECT", "--reject-with", "tcp-reset"], check=True)
"""

TWO_STEPS = """
name: two-steps
cluster:
  namespaces: [{name: x}]
  pods:
    - {namespace: x, name: a, ports: [{containerPort: 80}]}
    - {namespace: x, name: b, ports: [{containerPort: 80}]}
steps:
  - expect: [{port: 80, all: deny}]
  - namespaces: [{name: x, labels: {changed: "yes"}}]
    expect: [{port: 80, all: deny}]
"""


def test_a_rule_update_that_is_not_hitless_is_reported(root, tmp_path, prefix):
    script = write(tmp_path, FAKE_RECONCILER, "fake_reconcile.py")
    case = case_of(TWO_STEPS)
    report = run_case(case, prefix, Options(script=script))
    assert sorted(report.steps[1].flips) == [
        "x/a -> x/b 80/TCP: refused before and after, got through during the update",
        "x/b -> x/a 80/TCP: refused before and after, got through during the update"]
    assert report.steps[0].flips == [] and report.failed == 2
    quiet = run_case(case, prefix, Options(script=script, transitions=False))
    assert quiet.ok, quiet.lines()


def test_a_failing_reconciler_fails_the_step_with_its_stderr(root, tmp_path, prefix, monkeypatch):
    script = write(tmp_path, FAKE_RECONCILER, "fake_reconcile.py")
    monkeypatch.setenv("FAKE_FAIL", "1")
    report = run_case(case_of(TWO_STEPS), prefix, Options(script=script))
    assert not report.ok
    errors = report.steps[0].errors
    assert len(errors) == 1 and "exited 1" in errors[0] and "fake reconciler failed on purpose" in errors[0]


LOOP = """
name: loop
cluster:
  namespaces: [{name: x}]
  pods:
    - {namespace: x, name: a, ports: [{containerPort: 80}]}
    - {namespace: x, name: b, ports: [{containerPort: 80}]}
policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: x}
    spec: {podSelector: {}}
steps:
  - expect: [{port: 80, all: deny}]
  - policies: []
    expect: [{port: 80, all: allow}]
"""


def test_loop_mode_converges_at_each_step(root, prefix):
    report = run_case(case_of(LOOP), prefix, Options(loop=True))
    assert report.ok, report.lines()
    assert [len(s.results) for s in report.steps] == [2, 2]


# ---------------------------------------------------------------- the command line (root)

def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.lab", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_namespaces(proc: subprocess.Popen, timeout: float = 30) -> str:
    """The namespace prefix of a running CLI, once its cluster exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for token in os.listdir(OWNER_DIR) if os.path.isdir(OWNER_DIR) else []:
            try:
                pid = int(Path(OWNER_DIR, token).read_text())
            except (ValueError, FileNotFoundError):
                continue
            if pid == proc.pid:
                p = f"{LAB_PREFIX}{token}-"
                if any(n.endswith("-ul") for n in lab_namespaces(p)):
                    return p
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the lab never built its cluster: {proc.communicate()[0]}")


SLOW = SMALL.replace("name: small", "name: slow").replace(
    "expect:\n  - port: 80\n    all: allow",
    "steps:\n" + "".join("  - expect: [{port: 80, all: allow}]\n" for _ in range(40)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_removes_everything(root, tmp_path, sig):
    path = write(tmp_path, SLOW)
    proc = start_cli("run", str(path))
    p = wait_for_namespaces(proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert lab_namespaces(p) == [], out


def test_a_killed_run_is_cleaned_up_by_the_next(root, tmp_path, capsys):
    path = write(tmp_path, SLOW)
    proc = start_cli("run", str(path))
    p = wait_for_namespaces(proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert lab_namespaces(p)                      # left behind by the killed run
    removed = remove_leftovers()
    assert set(lab_namespaces(p)) == set() and any(n.startswith(p) for n in removed)


def test_keep_leaves_the_namespaces_and_says_how_to_enter_and_remove_them(root, tmp_path):
    path = write(tmp_path, SMALL)
    proc = start_cli("run", "--keep", str(path))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    enter = [ln.split()[3] for ln in out.splitlines() if ln.strip().startswith("ip netns exec ")]
    assert enter and all(n.startswith(LAB_PREFIX) for n in enter)
    p = enter[0].split("n-node-1")[0]
    try:
        assert f"{p}n-node-1" in netns.listed()
        assert "ip netns del" in out
    finally:
        remove_leftovers()
    assert lab_namespaces(p) == []


def test_a_forked_run_is_the_script_run_in_the_node(root, prefix, monkeypatch):
    """reconcile.py forked from the preloaded server answers as its own process
    does: the same exit status and output, in the node's namespace, on both
    dataplanes, and a usage error is a usage error."""
    case = case_of(SMALL)
    with Lab(case, prefix) as lab:
        lab.set_state(case.states[0])
        runs = {}
        for fork in ("1", "0"):
            monkeypatch.setenv("KPM_LAB_FORK", fork)
            assert lab.reconcilers._forked() == (fork == "1")
            runs[fork] = [
                [(o.returncode, o.stdout) for o in lab.reconcilers.once(flags, dataplane=plane)]
                for plane in ("iptables", "nftables")
                for flags in (("--once", "--dry-run", "--output", "raw"), ("--no-such-flag",))]
            bad = lab.reconcilers.once(("--no-such-flag",))
            assert {o.returncode for o in bad} == {2}
            assert all("unrecognized arguments: --no-such-flag" in o.stderr for o in bad)
        assert runs["1"] == runs["0"]
        pending = [code for plane in runs["1"][::2] for code, _ in plane]
        assert pending == [2, 2], "the dry runs must find the rules to write"
        assert "KPM-" in runs["1"][0][0][1] and "kube-policy-manager" in runs["1"][2][0][1]
        monkeypatch.setenv("KPM_LAB_FORK", "1")
        assert lab.reconcile() == []              # written in the node: read back there in sync
        assert {o.returncode for o in lab.reconcilers.once(("--once", "--dry-run"))} == {0}
