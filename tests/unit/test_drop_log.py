"""Drop logging: which pod chains log, what the rule looks like, and that
logging never changes a verdict.

Verdicts and log records come from tests/unit/tracer.py, which walks LOG and
NFLOG as the kernel does: the packet goes on to the next rule; the verdict
checks run on the nftables rendering too (tests/unit/nft_tracer.py, where a
`log ... group` is NFLOG and a `log` without one is LOG).
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.compile import (DEFAULT_OPTIONS, LOG, NFLOG, PREFIX_MAX, CompileOptions, compile_node,
                         log_prefix, pod_chain_name)
from lib.model import EGRESS, INGRESS, Namespace, NetworkPolicy
from lib.objects import LOG_DROPS_ANNOTATION, parse_namespace, parse_policy
from lib.ruleset import Chain, DesiredState, FamilyState, Hook, Rule
from tests.unit.builders import cluster, namespace, pod, policy, pport, rule, sel
from tests.unit.test_compile import (EXTERNAL, NODE_IPS, NS_LABELS, POD_SPECS, POLICIES, PodEnd,
                                     Net)
from lib.nft_state import address_element
from tests.unit.dataplanes import NFTABLES, each_dataplane, node_state, tracer_for
from tests.unit.tracer import ALLOW, REJECT, Packet, Tracer, TraceError

PODS = [
    pod("x/a", "n1", ("10.1.0.10", "fd00:1::10"), {"app": "a"}),
    pod("x/b", "n1", ("10.1.0.11", "fd00:1::11"), {"app": "b"}),
    pod("y/a", "n1", ("10.1.0.12", "fd00:1::12"), {"app": "a"}),
    pod("y/b", "n2", ("10.2.0.12", "fd00:2::12"), {"app": "b"}),
]
BY_KEY = {p.key: p for p in PODS}
SAFE = re.compile(r"[A-Za-z0-9 ._/:~-]+")


def logged(p: NetworkPolicy) -> NetworkPolicy:
    return NetworkPolicy(p.namespace, p.name, p.pod_selector, p.policy_types, p.ingress, p.egress,
                         log_drops=True)


def log_rules(state: DesiredState, family: int = 4) -> dict[str, list[Rule]]:
    """Chain name -> its LOG/NFLOG rules, for chains that have any."""
    out = {}
    for chain in state.family(family).chains:
        found = [r for r in chain.rules if "NFLOG" in r.args or "LOG" in r.args]
        if found:
            out[chain.name] = found
    return out


def chain(state: DesiredState, key: str, direction: str, family: int = 4) -> Chain:
    return state.family(family).chain_map()[pod_chain_name(BY_KEY[key], direction)]


# --------------------------------------------------------------------------
# when logging rules appear


def test_nothing_is_logged_by_default():
    c = cluster(namespace("x"), namespace("y"), PODS, policy("x/deny", sel(), types=[INGRESS, EGRESS]))
    state = compile_node(c, "n1")
    assert compile_node(c, "n1", options=DEFAULT_OPTIONS) == state
    assert log_rules(state, 4) == log_rules(state, 6) == {}


def test_a_policy_annotation_logs_the_directions_it_isolates_for_the_pods_it_selects():
    c = cluster(namespace("x"), namespace("y"), PODS,
                logged(policy("x/a-in", sel({"app": "a"}), types=[INGRESS])),
                policy("x/a-out", sel({"app": "a"}), types=[EGRESS]),
                policy("x/b-both", sel({"app": "b"}), types=[INGRESS, EGRESS]),
                policy("y/all", sel(), types=[INGRESS]))
    state = compile_node(c, "n1")
    for family in (4, 6):
        assert set(log_rules(state, family)) == {pod_chain_name(BY_KEY["x/a"], INGRESS)}
    (rule_,) = log_rules(state, 4)[pod_chain_name(BY_KEY["x/a"], INGRESS)]
    assert rule_.args == ("-m", "limit", "--limit", "10/minute", "--limit-burst", "5",
                          "-j", "NFLOG", "--nflog-group", "100", "--nflog-prefix", "KPM DROP in x/a ")


def test_one_annotated_policy_is_enough_among_several():
    c = cluster(namespace("x"), PODS[:2],
                policy("x/plain", sel(), types=[INGRESS, EGRESS]),
                logged(policy("x/egress-logged", sel({"app": "b"}), types=[EGRESS], egress=[rule()])))
    state = compile_node(c, "n1")
    assert set(log_rules(state)) == {pod_chain_name(BY_KEY["x/b"], EGRESS)}
    (rule_,) = log_rules(state)[pod_chain_name(BY_KEY["x/b"], EGRESS)]
    assert rule_.args[-1] == "KPM DROP out x/b "


def test_a_namespace_annotation_logs_every_isolated_pod_of_the_namespace():
    logged_ns = Namespace("x", namespace("x").labels, log_drops=True)
    c = cluster(logged_ns, namespace("y"), PODS,
                policy("x/a-in", sel({"app": "a"}), types=[INGRESS]),
                policy("x/b-out", sel({"app": "b"}), types=[EGRESS]),
                policy("y/all", sel(), types=[INGRESS, EGRESS]))
    state = compile_node(c, "n1")
    assert set(log_rules(state)) == {pod_chain_name(BY_KEY["x/a"], INGRESS),
                                     pod_chain_name(BY_KEY["x/b"], EGRESS)}


def test_the_global_switch_logs_every_pod_chain_of_both_families():
    c = cluster(namespace("x"), namespace("y"), PODS, policy("x/deny", sel(), types=[INGRESS, EGRESS]),
                policy("y/deny", sel(), types=[INGRESS]))
    state = compile_node(c, "n1", options=CompileOptions(log_drops=True))
    for family in (4, 6):
        pod_chains = {ch.name for ch in state.family(family).chains if ch.name[:6] in ("KPM-I-", "KPM-E-")}
        assert len(pod_chains) == 5
        assert set(log_rules(state, family)) == pod_chains
    # nothing outside the pod chains: KPM-FORWARD / KPM-INPUT never refuse
    assert not any(n in log_rules(state) for n in ("KPM-FORWARD", "KPM-INPUT"))


def test_the_log_rule_sits_just_before_the_rejects_and_changes_nothing_else():
    pols = [policy("x/a-in", sel({"app": "a"}), ingress=[rule(None, [pport(80)])])]
    plain = compile_node(cluster(namespace("x"), PODS, pols), "n1")
    with_log = compile_node(cluster(namespace("x"), PODS, [logged(p) for p in pols]), "n1")
    for family in (4, 6):
        before, after = chain(plain, "x/a", INGRESS, family), chain(with_log, "x/a", INGRESS, family)
        unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
        assert [r.args[-1] for r in after.rules[-3:]] == ["KPM DROP in x/a ", "tcp-reset", unreachable]
        assert after.rules[:-3] + after.rules[-2:] == before.rules
        assert after.rules[-3].text == "x/a log ingress drops"
    # the other chains are the same rules, so the plan rewrites one chain per family
    assert plain.sets == with_log.sets
    assert plain.v4.chain_map()["KPM-FORWARD"] == with_log.v4.chain_map()["KPM-FORWARD"]


def test_log_target_group_and_rate_are_options():
    c = cluster(namespace("x"), PODS[:1], policy("x/deny", sel(), types=[INGRESS]))
    options = CompileOptions(log_drops=True, log_target=LOG, log_rate=60, log_burst=20)
    (rule_,) = log_rules(compile_node(c, "n1", options=options))[pod_chain_name(BY_KEY["x/a"], INGRESS)]
    assert rule_.args == ("-m", "limit", "--limit", "60/minute", "--limit-burst", "20",
                          "-j", "LOG", "--log-prefix", "KPM DROP in x/a ")
    options = CompileOptions(log_drops=True, log_group=7)
    (rule_,) = log_rules(compile_node(c, "n1", options=options))[pod_chain_name(BY_KEY["x/a"], INGRESS)]
    assert rule_.args[rule_.args.index("--nflog-group") + 1] == "7"


@pytest.mark.parametrize("kwargs, message", [
    ({"log_target": "syslog"}, "log target 'syslog': must be one of nflog, log"),
    ({"log_group": 65536}, "log group 65536: must be an integer from 0 to 65535"),
    ({"log_group": -1}, "log group -1: must be an integer from 0 to 65535"),
    ({"log_rate": 0}, "log rate 0: must be an integer from 1 to 10000"),
    ({"log_burst": True}, "log burst True: must be an integer from 1 to 10000"),
    ({"log_burst": 10001}, "log burst 10001: must be an integer from 1 to 10000"),
])
def test_bad_log_options_are_refused_with_a_message_naming_the_option(kwargs, message):
    with pytest.raises(ValueError) as err:
        CompileOptions(**kwargs)
    assert str(err.value) == message


# --------------------------------------------------------------------------
# prefixes


@pytest.mark.parametrize("what, subject, target, expected", [
    ("in", "x/a", NFLOG, "KPM DROP in x/a "),
    ("out", "x/a", LOG, "KPM DROP out x/a "),
    ("in", "default/web-7d4f9c5b6-x2x9z", NFLOG, "KPM DROP in default/web-7d4f9c5b6-x2x9z "),
    ("unknown", "", NFLOG, "KPM DROP unknown "),
    ("unknown", "", LOG, "KPM DROP unknown "),
])
def test_prefixes_that_fit_are_written_as_they_are(what, subject, target, expected):
    assert log_prefix(what, subject, target) == expected


def test_long_or_strange_names_are_cut_with_a_hash_of_the_whole_name():
    name = "default/web-7d4f9c5b6-x2x9z"           # 27 characters: too long for LOG
    got = log_prefix("in", name, LOG)
    assert len(got) == PREFIX_MAX[LOG] and got.startswith("KPM DROP in default") and got.endswith(" ")
    assert re.fullmatch(r"KPM DROP in [a-z/]+~[0-9a-f]{6} ", got)
    assert got == log_prefix("in", name, LOG)                        # stable
    assert got != log_prefix("in", "default/web-7d4f9c5b6-x2x9y", LOG)   # same start, other pod
    odd = log_prefix("in", 'x/a"; rm -rf / \n', NFLOG)
    assert SAFE.fullmatch(odd) and odd != log_prefix("in", "x/a__ rm -rf / _", NFLOG)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["in", "out"]), st.text(min_size=1, max_size=300),
       st.sampled_from([NFLOG, LOG]))
def test_every_prefix_is_short_safe_and_named(what, subject, target):
    got = log_prefix(what, subject, target)
    assert len(got) <= PREFIX_MAX[target]
    assert SAFE.fullmatch(got)
    assert got.startswith(f"KPM DROP {what} ") and got.endswith(" ")


def test_prefixes_of_many_similar_pods_are_distinct():
    keys = [f"namespace-with-a-long-name/deployment-5f7c9d8b6-{i:05d}" for i in range(2000)]
    for target in (NFLOG, LOG):
        assert len({log_prefix("in", k, target) for k in keys}) == len(keys)


# --------------------------------------------------------------------------
# the tracer and logging


@each_dataplane
def test_tracer_walks_on_after_a_log_rule_and_records_it(dataplane):
    state = node_state(dataplane, cluster(namespace("x"), PODS, logged(policy(
        "x/a-in", sel({"app": "a"}), ingress=[rule(None, [pport(80)])]))), "n1")
    tracer = tracer_for(state, 4)
    assert tracer.verdict("FORWARD", Packet("10.1.0.11", "10.1.0.10", "tcp", 81)) == REJECT
    assert tracer.logged == [("NFLOG", "KPM DROP in x/a ")]
    assert tracer.verdict("FORWARD", Packet("10.1.0.11", "10.1.0.10", "tcp", 80)) == ALLOW
    assert tracer.logged == []
    assert tracer.verdict("FORWARD", Packet("10.1.0.11", "10.1.0.10", "udp", 53)) == REJECT
    assert tracer.logged == [("NFLOG", "KPM DROP in x/a ")]
    assert tracer.verdict("FORWARD", Packet("10.1.0.11", "10.1.0.10", "tcp", 81, "ESTABLISHED")) == ALLOW
    assert tracer.logged == []


@pytest.mark.parametrize("args", [
    ("-m", "limit", "--limit", "10/minute", "-j", "RETURN"),          # a limited verdict
    ("-m", "limit", "--limit", "10/minute", "-j", "REJECT", "--reject-with", "tcp-reset"),
    ("-m", "limit", "--limit", "fast", "-j", "NFLOG", "--nflog-prefix", "x"),
    ("-m", "limit", "--limit", "10/minute", "--limit-burst", "0", "-j", "NFLOG", "--nflog-prefix", "x"),
    ("-j", "NFLOG", "--nflog-prefix", "A" * 64),
    ("-j", "LOG", "--log-prefix", "A" * 30),
    ("-j", "LOG", "--log-prefix", 'say "hi"'),
    ("-j", "LOG", "--nflog-prefix", "x"),
    ("-j", "NFLOG", "--nflog-group", "65536", "--nflog-prefix", "x"),
    ("-j", "NFLOG", "--nflog-group", "1"),                            # no prefix
    ("-j", "RETURN", "--log-prefix", "x"),
])
def test_tracer_refuses_log_rules_it_cannot_vouch_for(args):
    state = DesiredState(v4=FamilyState(4, (Chain("KPM-FORWARD", (Rule(args),)),),
                                        (Hook("FORWARD", Rule(("-j", "KPM-FORWARD"))),)))
    with pytest.raises(TraceError):
        Tracer(state, 4).verdict("FORWARD", Packet("10.0.0.1", "10.0.0.2", "tcp", 80))


# --------------------------------------------------------------------------
# verdicts never change; every refusal by a logging chain is logged once


def pod_chains(net: Net, pods, nodes=("n1", "n2")) -> dict:
    """Pod chain name -> (pod, direction). An nft pod chain is named by its
    content: its pods are those whose map element jumps to it (a logging
    chain names its pod in the prefix, so it has one)."""
    if net.dataplane != NFTABLES:
        return {pod_chain_name(p, d): (p, d) for p in pods for d in (INGRESS, EGRESS)}
    by_address = {address_element(ip): p for p in pods for ip in p.ips}
    out = {}
    for node in nodes:
        for m in net.state(node).maps:
            direction = EGRESS if m.name.startswith("kpm-egress") else INGRESS
            for address, verdict in m.elements.items():
                out[verdict.split()[1]] = (by_address[address], direction)
    return out


@each_dataplane
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NS_LABELS, POD_SPECS, st.lists(POLICIES, min_size=1, max_size=5, unique_by=lambda p: p.key),
       st.sampled_from([NFLOG, LOG]))
def test_logging_changes_no_verdict_and_logs_each_refusal_once(dataplane, ns_labels, pod_specs, pols,
                                                               target):
    namespaces = [namespace("x", **ns_labels[0]), namespace("y", **ns_labels[1])]
    pods = [pod(f"{ns}/p{i}", node, (f"10.{node[1]}.0.{10 + i}", f"fd00:{node[1]}::{10 + i:x}"),
                labels, ports) for i, (ns, node, labels, ports) in enumerate(pod_specs)]
    c = cluster(namespaces, pods, pols)
    plain = Net(c, dataplane)
    logging = Net(c, dataplane)
    options = CompileOptions(log_drops=True, log_target=target)
    for node in ("n1", "n2"):
        logging._states[node] = node_state(dataplane, c, node, options=options)
    chains = pod_chains(logging, pods)
    ends = {p.key: PodEnd(p.key, p.ips, p.node, False, p) for p in pods}
    ends.update({"node:n1": PodEnd("node:n1", NODE_IPS["n1"], "n1", True),
                 "ext": PodEnd("ext", EXTERNAL, None, False)})
    for src in ends.values():
        for dst in ends.values():
            if src is dst or (src.node is None and dst.node is None) or (src.host and dst.host):
                continue
            for family in (4, 6):
                for port, proto in ((80, "tcp"), (81, "udp")):
                    packet = Packet(src.ip(family), dst.ip(family), proto, port)
                    for node, hook in plain.hops(src, dst):
                        want = plain.tracer(node, family).verdict(hook, packet)
                        tracer = logging.tracer(node, family)
                        assert tracer.verdict(hook, packet) == want, (src.name, dst.name, node, hook)
                        if want == ALLOW:
                            assert tracer.logged == []
                            continue
                        p, direction = chains[tracer.path[-1]]
                        what = "in" if direction == INGRESS else "out"
                        assert tracer.logged == [(target.upper(), log_prefix(what, p.key, target))]


# --------------------------------------------------------------------------
# the annotation, parsed


def netpol(annotations) -> dict:
    meta = {"name": "web", "namespace": "x"}
    if annotations is not ...:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"podSelector": {}}}


def ns_obj(annotations) -> dict:
    meta = {"name": "x"}
    if annotations is not ...:
        meta["annotations"] = annotations
    return {"metadata": meta}


FIELD = 'metadata.annotations["kube-policy-manager/log-drops"]'


@pytest.mark.parametrize("annotations, expected, problems", [
    (..., False, []),
    (None, False, []),
    ({}, False, []),
    ({"other": "true"}, False, []),
    ({LOG_DROPS_ANNOTATION: "true"}, True, []),
    ({LOG_DROPS_ANNOTATION: "True"}, True, []),
    ({LOG_DROPS_ANNOTATION: "false"}, False, []),
    ({LOG_DROPS_ANNOTATION: "yes"}, False,
     [f'{FIELD}: must be "true" or "false", got "yes" (read as false)']),
    ({LOG_DROPS_ANNOTATION: True}, False,
     [f'{FIELD}: must be "true" or "false", got true (read as false)']),
    (["kube-policy-manager/log-drops=true"], False,
     ["metadata.annotations: must be a map of strings to strings, got a list"]),
])
def test_log_drops_annotation(annotations, expected, problems):
    pol, got = parse_policy(netpol(annotations))
    assert pol.log_drops is expected
    assert [str(p) for p in got] == [f"NetworkPolicy x/web: {p}" for p in problems]
    ns, got = parse_namespace(ns_obj(annotations))
    assert ns.log_drops is expected
    assert [str(p) for p in got] == [f"Namespace x: {p}" for p in problems]


def test_annotation_is_kept_when_the_spec_is_unreadable():
    obj = netpol({LOG_DROPS_ANNOTATION: "true"})
    obj["spec"] = "garbage"
    pol, problems = parse_policy(obj)
    assert pol.log_drops and pol.policy_types == frozenset((INGRESS, EGRESS)) and problems


def test_annotation_changes_nothing_else_of_the_policy():
    a, _ = parse_policy(netpol({LOG_DROPS_ANNOTATION: "true"}))
    b, _ = parse_policy(netpol(...))
    assert a != b
    assert (a.pod_selector, a.policy_types, a.ingress) == (b.pod_selector, b.policy_types, b.ingress)
