"""Drop logging with real packets: a refused connection leaves an NFLOG
record naming the direction and the pod, with the packet's addresses; an
allowed one leaves none; a pod whose policies and namespace ask for nothing
is refused silently; the rate limit holds. First with options chosen per
cycle in this process, then through the real reconcile.py and the flags an
operator types (--log-drops and its -target, -group, -rate and -burst), and
the annotations without the flag.

Every test runs on both dataplanes: iptables' NFLOG target and nftables'
`log group N` statement send the same records. Records are read with
tests/nflog.py, bound to the NFLOG group inside the node's namespace. (The LOG target is only loaded and read back here: in a
namespace other than the host's it writes only when the host-wide sysctl
net.netfilter.nf_log_all_netns is 1, and host sysctls are not ours to
change.)
"""
from __future__ import annotations

import textwrap
import time

import pytest
import yaml

from lib.compile import LOG
from lib.dataplane import IPTABLES
from lib.objects import LOG_DROPS_ANNOTATION
from tests.lab.apiobjects import state_objects
from tests.lab.case import IPV4, IPV6, parse_case
from tests.lab.enforce import enforce, in_sync, options_for
from tests.lab.lab import Lab
from tests.lab.traffic import ALLOWED, REFUSED, probe
from tests.nflog import NflogListener

PORT = 8080
GROUP = 100
NODES = ("node-1", "node-2")
CASE = textwrap.dedent("""
    name: drop-log
    cluster:
      nodes: [{name: node-1}, {name: node-2}]
      namespaces: [{name: x}, {name: y}]
      pods:
        - {namespace: x, name: a, node: node-1, labels: {app: a}, ports: [{containerPort: 8080}]}
        - {namespace: x, name: b, node: node-1, labels: {app: b}, ports: [{containerPort: 8080}]}
        - {namespace: x, name: c, node: node-2, labels: {app: c}, ports: [{containerPort: 8080}]}
        - {namespace: y, name: d, node: node-1, labels: {app: d}, ports: [{containerPort: 8080}]}
    policies:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: b-in
          namespace: x
          annotations: {kube-policy-manager/log-drops: "true"}
        spec:
          podSelector: {matchLabels: {app: b}}
          ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: a-out
          namespace: x
          annotations: {kube-policy-manager/log-drops: "true"}
        spec:
          podSelector: {matchLabels: {app: a}}
          policyTypes: [Egress]
          egress: [{to: [{podSelector: {matchLabels: {app: b}}}]}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-in, namespace: y}
        spec: {podSelector: {}}
    expect:
      - {port: 8080, all: allow}
""")


def connect(lab: Lab, src: str, dst: str, family: str = IPV4) -> str:
    s, d = lab.endpoint(src), lab.endpoint(dst)
    return probe(s.netns, d.address(family), PORT, "TCP", family)


def record_of(listener: NflogListener, lab: Lab, src: str, dst: str, family: str = IPV4, timeout=2.0):
    s, d = lab.endpoint(src).address(family), lab.endpoint(dst).address(family)
    return listener.wait_for(lambda r: (r.src, r.dst, r.dport) == (s, d, PORT), timeout)


def cycle(lab: Lab, **options) -> None:
    for node in NODES:
        enforce(lab, node, options_for(lab, node, **options))


@pytest.mark.parametrize("how", ["in-process", "reconcile.py"])
def test_refusals_are_logged_where_annotations_ask_and_nowhere_else(root, prefix, how, dataplane):
    """Without --log-drops, by an in-process cycle and by `reconcile.py --once`."""
    case = parse_case(yaml.safe_load(CASE), f"test_drop_log.py[{how}]")
    (state,) = case.states

    def cycle_all(lab: Lab) -> None:
        if how == "in-process":
            cycle(lab)
        else:
            assert_ok(reconcile_py(lab, "--once"))

    with Lab(case, prefix, dataplane=dataplane) as lab:
        lab.set_state(state)
        cycle_all(lab)
        with NflogListener(lab.network.node_ns("node-1"), GROUP) as heard:
            # refused by x/b's ingress (annotated policy), on x/b's node
            for family in (IPV4, IPV6):
                assert connect(lab, "x/c", "x/b", family) == REFUSED
                record = record_of(heard, lab, "x/c", "x/b", family)
                assert record is not None, f"no record of x/c -> x/b {family}: {heard.records()}"
                assert (record.prefix, record.hook, record.protocol, record.group) == \
                    ("KPM DROP in x/b ", "FORWARD", "tcp", GROUP)
                assert record.family == (4 if family == IPV4 else 6)
            # refused by x/a's egress (annotated policy): to another node's pod, to its own node
            assert connect(lab, "x/a", "x/c") == REFUSED
            assert record_of(heard, lab, "x/a", "x/c").prefix == "KPM DROP out x/a "
            assert connect(lab, "x/a", "node:node-1") == REFUSED
            to_node = record_of(heard, lab, "x/a", "node:node-1")
            assert (to_node.prefix, to_node.hook) == ("KPM DROP out x/a ", "INPUT")
            # allowed: nothing logged
            heard.clear()
            assert connect(lab, "x/a", "x/b") == ALLOWED
            assert connect(lab, "x/b", "x/c") == ALLOWED
            # refused by a policy that asks for no logging: nothing logged either
            assert connect(lab, "x/b", "y/d") == REFUSED
            assert record_of(heard, lab, "x/b", "y/d", timeout=1.0) is None
            assert heard.records() == [] and heard.errors() == []

            # the namespace annotation: every isolated pod of y now logs
            objs = state_objects(case, state)
            for ns in objs["namespaces"]:
                if ns["metadata"]["name"] == "y":
                    ns["metadata"]["annotations"] = {LOG_DROPS_ANNOTATION: "true"}
            lab.api.set_state(**objs)
            cycle_all(lab)
            heard.clear()
            # 20 refusals in a row: the rewritten chain's burst (5) is logged,
            # then at most one every 6 s (10 a minute)
            results = [connect(lab, "x/b", "y/d") for _ in range(20)]
            assert results == [REFUSED] * 20
            to_d = lab.endpoint("y/d").ipv4
            logged = heard.wait_count(lambda r: r.dst == to_d, 5, timeout=3.0)
            time.sleep(0.5)                          # room for any record beyond the burst
            logged = [r for r in heard.records() if r.dst == to_d]
            assert 5 <= len(logged) <= 6, [r.line() for r in logged]
            assert {r.prefix for r in logged} == {"KPM DROP in y/d "}
            assert heard.errors() == []
        assert all(in_sync(lab, n, options_for(lab, n)) for n in NODES)
        assert_ok(reconcile_py(lab, "--once", "--dry-run"))


def test_the_global_switch_and_the_log_target(root, prefix, dataplane):
    data = yaml.safe_load(CASE)
    for pol in data["policies"]:
        pol["metadata"].pop("annotations", None)
    case = parse_case(data, "test_drop_log.py[global]")
    (state,) = case.states
    with Lab(case, prefix, dataplane=dataplane) as lab:
        lab.set_state(state)
        cycle(lab)
        with NflogListener(lab.network.node_ns("node-1"), GROUP) as heard:
            assert connect(lab, "x/c", "x/b") == REFUSED
            assert record_of(heard, lab, "x/c", "x/b", timeout=1.0) is None
            cycle(lab, log_drops=True)
            assert connect(lab, "x/c", "x/b") == REFUSED
            assert record_of(heard, lab, "x/c", "x/b").prefix == "KPM DROP in x/b "
            assert connect(lab, "x/b", "y/d") == REFUSED
            assert record_of(heard, lab, "x/b", "y/d").prefix == "KPM DROP in y/d "
            assert connect(lab, "x/a", "x/b") == ALLOWED                  # verdicts unchanged
            assert all(in_sync(lab, n, options_for(lab, n, log_drops=True)) for n in NODES)

            # LOG instead of NFLOG: the kernel takes the rules and reads them back as written
            cycle(lab, log_drops=True, log_target=LOG)
            heard.clear()
            assert connect(lab, "x/c", "x/b") == REFUSED
            assert connect(lab, "x/a", "x/b") == ALLOWED
            assert record_of(heard, lab, "x/c", "x/b", timeout=1.0) is None
        if dataplane == IPTABLES:
            saved = lab.node_exec("node-1", ["iptables-nft-save", "-t", "filter"]).stdout
            assert '-j LOG --log-prefix "KPM DROP in x/b "' in saved
            assert "NFLOG" not in saved
        else:
            listed = lab.node_exec("node-1", ["nft", "list", "table", "inet", "kube-policy-manager"])
            assert listed.returncode == 0, listed.stderr
            assert 'log prefix "KPM DROP in x/b "' in listed.stdout
            assert " group " not in listed.stdout
        assert all(in_sync(lab, n, options_for(lab, n, log_drops=True, log_target=LOG)) for n in NODES)


# --- through reconcile.py's own flags ----------------------------------------------------
#
# The same cluster, enforced by the real reconcile.py (--once in each node's
# namespace, against the lab's API server), so that the flags an operator
# types are what is checked, not CompileOptions built here.

CLI_GROUP = 7
CLI_FLAGS = ("--log-drops", "--log-drops-target", "nflog", "--log-drops-group", str(CLI_GROUP),
             "--log-drops-rate", "1", "--log-drops-burst", "3")


def reconcile_py(lab: Lab, *flags: str) -> list:
    """reconcile.py FLAGS on every node; the outcomes."""
    return lab.reconcilers.once(flags)


def assert_ok(outcomes) -> None:
    wrong = [o.describe("reconcile.py") for o in outcomes if o.returncode != 0]
    assert not wrong, "\n".join(wrong)


def test_reconcile_py_log_drops_flags(root, prefix, dataplane):
    data = yaml.safe_load(CASE)
    for pol in data["policies"]:
        pol["metadata"].pop("annotations", None)          # the flag alone asks for logging
    case = parse_case(data, "test_drop_log.py[reconcile.py flags]")
    (state,) = case.states
    with Lab(case, prefix, dataplane=dataplane) as lab:
        lab.set_state(state)
        node_ns = lab.network.node_ns("node-1")
        with NflogListener(node_ns, CLI_GROUP) as heard, NflogListener(node_ns, GROUP) as default:
            assert_ok(reconcile_py(lab, "--once", *CLI_FLAGS))
            # x/a's egress chain: a burst of 3 (--log-drops-burst), then 1 a minute
            # (--log-drops-rate): 8 refusals in a row leave 3 records
            assert [connect(lab, "x/a", "x/c") for _ in range(8)] == [REFUSED] * 8
            to_c = lab.endpoint("x/c").ipv4
            heard.wait_count(lambda r: r.dst == to_c, 3, timeout=3.0)
            time.sleep(0.5)                          # room for any record beyond the burst
            logged = [r for r in heard.records() if r.dst == to_c]
            assert len(logged) == 3, [r.line() for r in logged]
            assert {(r.prefix, r.hook, r.group) for r in logged} == {
                ("KPM DROP out x/a ", "FORWARD", CLI_GROUP)}
            # refused by x/b's ingress: named by direction and pod, with the packet's addresses
            for family in (IPV4, IPV6):
                assert connect(lab, "x/c", "x/b", family) == REFUSED
                record = record_of(heard, lab, "x/c", "x/b", family)
                assert record is not None, f"no record of x/c -> x/b {family}: {heard.records()}"
                assert (record.prefix, record.protocol) == ("KPM DROP in x/b ", "tcp")
            # a pod whose policy and namespace ask for nothing: the flag covers it
            assert connect(lab, "x/b", "y/d") == REFUSED
            assert record_of(heard, lab, "x/b", "y/d").prefix == "KPM DROP in y/d "
            # allowed connections leave no record
            heard.clear()
            assert connect(lab, "x/a", "x/b") == ALLOWED
            assert connect(lab, "x/b", "x/c") == ALLOWED
            assert record_of(heard, lab, "x/a", "x/b", timeout=1.0) is None
            assert heard.records() == [] and heard.errors() == []
            assert default.records() == [] and default.errors() == []   # only the group given
        # the node holds what the flags ask for, and only with them
        assert_ok(reconcile_py(lab, "--once", "--dry-run", *CLI_FLAGS))
        assert_ok(reconcile_py(lab, "status", *CLI_FLAGS))
        plain = reconcile_py(lab, "--once", "--dry-run")
        # node-2's only pod, x/c, is isolated by nothing: the flag changes nothing there
        assert {o.node: o.returncode for o in plain} == {"node-1": 2, "node-2": 0}


ADMIN_CASE = textwrap.dedent("""
    name: drop-log-admin
    cluster:
      nodes: [{name: node-1}, {name: node-2}]
      namespaces: [{name: x}, {name: y}]
      pods:
        - {namespace: x, name: a, node: node-1, labels: {app: a}, ports: [{containerPort: 8080}]}
        - {namespace: x, name: b, node: node-1, labels: {app: b}, ports: [{containerPort: 8080}]}
        - {namespace: y, name: d, node: node-2, labels: {app: d}, ports: [{containerPort: 8080}]}
    policies:
      - apiVersion: policy.networking.k8s.io/v1alpha1
        kind: AdminNetworkPolicy
        metadata:
          name: guard-x
          annotations: {kube-policy-manager/log-drops: "true"}
        spec:
          priority: 10
          subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
          ingress:
            - {action: Deny, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: y}}}]}
          egress:
            - {action: Deny, to: [{networks: [172.18.0.0/24, "fd00:172:18::/64"]}]}
      - apiVersion: policy.networking.k8s.io/v1alpha1
        kind: BaselineAdminNetworkPolicy
        metadata: {name: default}
        spec:
          subject: {namespaces: {}}
          ingress:
            - {action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}]}
    expect:
      - {port: 8080, all: allow}
""")


def test_admin_refusals_are_logged_under_the_refusing_policy(root, prefix, dataplane):
    """An annotated AdminNetworkPolicy's Deny logs, named by pod and policy,
    for ingress on the pod's node and for egress to a node; the baseline's
    Deny, not annotated, logs only with --log-drops."""
    case = parse_case(yaml.safe_load(ADMIN_CASE), "test_drop_log.py[admin]")
    (state,) = case.states
    with Lab(case, prefix, dataplane=dataplane) as lab:
        lab.set_state(state)
        assert_ok(reconcile_py(lab, "--once"))
        with NflogListener(lab.network.node_ns("node-1"), GROUP) as heard:
            for family in (IPV4, IPV6):
                assert connect(lab, "y/d", "x/a", family) == REFUSED
                record = record_of(heard, lab, "y/d", "x/a", family)
                assert record is not None, f"no record of y/d -> x/a {family}: {heard.records()}"
                assert (record.prefix, record.hook) == ("KPM DROP in x/a anp/guard-x ", "FORWARD")
            assert connect(lab, "x/a", "node:node-1") == REFUSED
            to_node = record_of(heard, lab, "x/a", "node:node-1")
            assert (to_node.prefix, to_node.hook) == ("KPM DROP out x/a anp/guard-x ", "INPUT")
            assert connect(lab, "x/a", "x/b") == REFUSED                # the baseline's Deny
            assert record_of(heard, lab, "x/a", "x/b", timeout=1.0) is None
            assert_ok(reconcile_py(lab, "--once", "--log-drops"))
            heard.clear()
            assert connect(lab, "x/a", "x/b") == REFUSED
            assert record_of(heard, lab, "x/a", "x/b").prefix == "KPM DROP in x/b banp/default "
            assert connect(lab, "x/b", "x/a") == ALLOWED
            assert record_of(heard, lab, "x/b", "x/a", timeout=1.0) is None
            assert heard.errors() == []
