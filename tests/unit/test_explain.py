"""lib.explain: the NetworkPolicy API evaluated directly, one connection at a
time, over a table of cases that covers each point of the semantics."""
from __future__ import annotations

import dataclasses
import json

import pytest

from lib.explain import EndpointError, explain, parse_port, render, resolve
from lib.model import EGRESS, INGRESS, UDP, SCTP, Problem
from tests.unit.builders import (block, both_peer, cluster, cport, namespace, ns_peer, pod,
                                 pods_peer, policy, pport, rule, sel)

NODES = {"n1": ("192.168.0.1",), "n2": ("192.168.0.2",)}

OBJECTS = [
    namespace("x", team="a"), namespace("y", team="b"), namespace("z"),
    namespace("kube-system"),
    pod("x/web", "n1", ["10.244.1.10", "fd00::10"], {"app": "web"},
        ports=[cport(80, "http"), cport(53, "dns", UDP)]),
    pod("x/db", "n1", "10.244.1.11", {"app": "db"}),
    pod("x/client", "n2", ["10.244.2.10", "fd00::2:10"], {"role": "client"}),
    pod("y/client", "n2", "10.244.2.20", {"role": "client"}),
    pod("y/other", "n2", "10.244.2.21", {"role": "other"}),
    pod("z/free", "n3", "10.244.3.30"),
    pod("kube-system/agent-n1", "n1", "192.168.0.1", host_network=True),
    pod("kube-system/agent-n2", "n2", "192.168.0.2", host_network=True),
]

WEB = sel({"app": "web"})
CLIENTS = sel({"role": "client"})
DENY_WEB_INGRESS = policy("x/deny-web", WEB)
DENY_CLIENT_EGRESS = policy("x/deny-client-out", CLIENTS, types=[EGRESS])


def allow_web_from(*peers, ports=None, name="x/allow-web"):
    return policy(name, WEB, ingress=[rule(peers or None, ports)])


def client_egress(*peers, ports=None):
    return policy("x/client-out", CLIENTS, egress=[rule(peers or None, ports)], types=[EGRESS])


# (id, policies, source, destination, port, protocol, allowed, egress, ingress)
# where egress / ingress list the Direction fields to check.
CASES = [
    ("no policy: everything is allowed", [], "x/client", "x/web", 80, "TCP", True,
     dict(applies=True, isolated=False), dict(applies=True, isolated=False)),
    ("a policy without rules isolates ingress and refuses", [DENY_WEB_INGRESS],
     "x/client", "x/web", 80, "TCP", False,
     dict(isolated=False, allowed=True),
     dict(isolated=True, allowed=False, policies=("x/deny-web",), allowed_by=())),
    ("ingress isolation does not touch the destination's egress", [DENY_WEB_INGRESS],
     "x/web", "x/client", 80, "TCP", True,
     dict(isolated=False), dict(isolated=False)),
    ("egress isolation of the source refuses", [DENY_CLIENT_EGRESS],
     "x/client", "x/web", 80, "TCP", False,
     dict(isolated=True, allowed=False, policies=("x/deny-client-out",)),
     dict(isolated=False, allowed=True)),
    ("policyTypes Egress ignores ingress rules",
     [policy("x/out-only", WEB, ingress=[rule([pods_peer({"role": "nobody"})])], types=[EGRESS])],
     "x/client", "x/web", 80, "TCP", True,
     dict(isolated=False), dict(isolated=False)),
    ("policies add up: one isolates, another admits",
     [DENY_WEB_INGRESS, allow_web_from(pods_peer({"role": "client"}))],
     "x/client", "x/web", 80, "TCP", True, dict(isolated=False),
     dict(isolated=True, allowed=True, policies=("x/allow-web", "x/deny-web"),
          allowed_by=("x/allow-web ingress[0]",))),
    ("every admitting rule is listed",
     [allow_web_from(pods_peer({"role": "client"})),
      allow_web_from(ns_peer({"team": "a"}), name="x/allow-team-a")],
     "x/client", "x/web", 80, "TCP", True, dict(),
     dict(allowed_by=("x/allow-team-a ingress[0]", "x/allow-web ingress[0]"))),
    ("a podSelector peer picks pods of the policy's namespace only",
     [allow_web_from(pods_peer({"role": "client"}))],
     "y/client", "x/web", 80, "TCP", False, dict(), dict(isolated=True, allowed=False)),
    ("a namespaceSelector peer picks every pod of the namespaces",
     [allow_web_from(ns_peer({"team": "b"}))],
     "y/other", "x/web", 80, "TCP", True, dict(), dict(allowed_by=("x/allow-web ingress[0]",))),
    ("a namespaceSelector peer leaves out other namespaces",
     [allow_web_from(ns_peer({"team": "b"}))],
     "x/client", "x/web", 80, "TCP", False, dict(), dict(allowed=False)),
    ("both selectors in one peer: AND (right namespace, wrong pod)",
     [allow_web_from(both_peer({"team": "b"}, {"role": "client"}))],
     "y/other", "x/web", 80, "TCP", False, dict(), dict(allowed=False)),
    ("both selectors in one peer: AND (both match)",
     [allow_web_from(both_peer({"team": "b"}, {"role": "client"}))],
     "y/client", "x/web", 80, "TCP", True, dict(), dict(allowed=True)),
    ("two peers in one rule: OR",
     [allow_web_from(pods_peer({"role": "nobody"}), ns_peer({"team": "b"}))],
     "y/other", "x/web", 80, "TCP", True, dict(), dict(allowed=True)),
    ("an empty namespaceSelector picks pods of every namespace",
     [allow_web_from(ns_peer())],
     "z/free", "x/web", 80, "TCP", True, dict(), dict(allowed=True)),
    ("a numeric port admits that port",
     [allow_web_from(ports=[pport(80)])],
     "x/client", "x/web", 80, "TCP", True, dict(),
     dict(allowed_by=("x/allow-web ingress[0] ports[0]",))),
    ("a numeric port refuses another port",
     [allow_web_from(ports=[pport(80)])],
     "x/client", "x/web", 81, "TCP", False, dict(), dict(allowed=False)),
    ("a port admits its protocol only",
     [allow_web_from(ports=[pport(80)])],
     "x/client", "x/web", 80, "UDP", False, dict(), dict(allowed=False)),
    ("a protocol without a port admits every port of it",
     [allow_web_from(ports=[pport(None, SCTP)])],
     "x/client", "x/web", 9999, "SCTP", True, dict(),
     dict(allowed_by=("x/allow-web ingress[0] ports[0]",))),
    ("endPort: inside the range",
     [allow_web_from(ports=[pport(8000, end_port=8100)])],
     "x/client", "x/web", 8100, "TCP", True, dict(), dict(allowed=True)),
    ("endPort: past the range",
     [allow_web_from(ports=[pport(8000, end_port=8100)])],
     "x/client", "x/web", 8101, "TCP", False, dict(), dict(allowed=False)),
    ("ingress named port resolves against the destination pod",
     [allow_web_from(ports=[pport("http")])],
     "x/client", "x/web", 80, "TCP", True, dict(), dict(allowed=True)),
    ("ingress named port: another number is refused",
     [allow_web_from(ports=[pport("http")])],
     "x/client", "x/web", 8080, "TCP", False, dict(), dict(allowed=False)),
    ("ingress named port: the protocol must match the declared one",
     [allow_web_from(ports=[pport("dns")])],
     "x/client", "x/web", 53, "TCP", False, dict(), dict(allowed=False)),
    ("egress named port: to a pod declaring it",
     [client_egress(ports=[pport("http")])],
     "x/client", "x/web", 80, "TCP", True,
     dict(isolated=True, allowed_by=("x/client-out egress[0] ports[0]",)), dict()),
    ("egress named port: to a pod not declaring it",
     [client_egress(ports=[pport("http")])],
     "x/client", "x/db", 80, "TCP", False, dict(isolated=True, allowed=False), dict()),
    ("egress named port: to an address outside the cluster",
     [client_egress(ports=[pport("http")])],
     "x/client", "203.0.113.5", 80, "TCP", False, dict(allowed=False),
     dict(applies=False)),
    ("ipBlock admits an address inside its cidr",
     [allow_web_from(block("10.244.2.0/24", "10.244.2.20/32"))],
     "x/client", "x/web", 80, "TCP", True, dict(), dict(allowed=True)),
    ("ipBlock except carves an address out",
     [allow_web_from(block("10.244.2.0/24", "10.244.2.20/32"))],
     "y/client", "x/web", 80, "TCP", False, dict(), dict(allowed=False)),
    ("ipBlock admits an address that is no pod",
     [allow_web_from(block("10.244.2.0/24", "10.244.2.20/32"))],
     "10.244.2.99", "x/web", 80, "TCP", True, dict(applies=False), dict(allowed=True)),
    ("an IPv4 ipBlock never matches IPv6",
     [allow_web_from(block("0.0.0.0/0"))],
     "fd00::2:10", "fd00::10", 80, "TCP", False, dict(), dict(allowed=False)),
    ("egress to the outside through ipBlock except",
     [client_egress(block("0.0.0.0/0", "10.0.0.0/8"))],
     "x/client", "203.0.113.5", 443, "TCP", True, dict(allowed=True), dict(applies=False)),
    ("egress into the excepted range is refused",
     [client_egress(block("0.0.0.0/0", "10.0.0.0/8"))],
     "x/client", "x/web", 443, "TCP", False, dict(allowed=False), dict(isolated=False)),
    ("a host-network pod is never isolated",
     [policy("kube-system/deny-all", sel(), types=[INGRESS, EGRESS])],
     "kube-system/agent-n2", "kube-system/agent-n1", 10250, "TCP", True,
     dict(applies=False), dict(applies=False)),
    ("selectors never pick a host-network pod",
     [DENY_WEB_INGRESS, allow_web_from(ns_peer())],
     "kube-system/agent-n2", "x/web", 80, "TCP", False, dict(applies=False),
     dict(allowed=False)),
    ("a host-network pod is reached as a peer through ipBlock",
     [DENY_WEB_INGRESS, allow_web_from(block("192.168.0.0/16"))],
     "kube-system/agent-n2", "x/web", 80, "TCP", True, dict(), dict(allowed=True)),
    ("a node always reaches its own pods",
     [DENY_WEB_INGRESS], "192.168.0.1", "x/web", 80, "TCP", True,
     dict(applies=False), dict(isolated=True, allowed=True, allowed_by=())),
    ("a host-network pod is its node: own-node rule",
     [DENY_WEB_INGRESS], "kube-system/agent-n1", "x/web", 80, "TCP", True,
     dict(applies=False), dict(allowed=True)),
    ("another node is subject to the policy",
     [DENY_WEB_INGRESS], "192.168.0.2", "x/web", 80, "TCP", False,
     dict(applies=False), dict(allowed=False)),
    ("a pod's egress to its own node is judged",
     [client_egress(block("10.0.0.0/8"))], "x/client", "192.168.0.2", 10250, "TCP", False,
     dict(allowed=False), dict(applies=False)),
    ("policies of another namespace do not apply",
     [policy("y/deny-all", sel(), types=[INGRESS, EGRESS])],
     "x/client", "x/web", 80, "TCP", True, dict(isolated=False), dict(isolated=False)),
    ("a policy whose selector misses the pod does not isolate it",
     [policy("x/deny-db", sel({"app": "db"}))],
     "x/client", "x/web", 80, "TCP", True, dict(), dict(isolated=False)),
    ("IPv6 addresses are judged like IPv4 ones",
     [allow_web_from(block("fd00::2:0/112"))],
     "fd00::2:10", "fd00::10", 80, "TCP", True, dict(), dict(allowed=True)),
]


@pytest.mark.parametrize("name, policies, src, dst, port, protocol, allowed, egress, ingress",
                         CASES, ids=[c[0] for c in CASES])
def test_semantics(name, policies, src, dst, port, protocol, allowed, egress, ingress):
    c = cluster(OBJECTS, policies)
    e = explain(c, src, dst, port, protocol, node_addresses=NODES)
    assert e.allowed is allowed, render(e)
    for direction, want in (("egress", egress), ("ingress", ingress)):
        got = getattr(e, direction)
        assert got.direction == direction
        for key, value in want.items():
            assert getattr(got, key) == value, f"{direction}.{key}: {render(e)}"
    assert e.allowed == (e.egress.allowed and e.ingress.allowed)


def test_a_denied_direction_says_which_policies_isolate_it():
    c = cluster(OBJECTS, [DENY_WEB_INGRESS, allow_web_from(pods_peer({"role": "nobody"}))])
    e = explain(c, "x/client", "x/web", 80)
    assert e.ingress.reason == "isolated by x/allow-web, x/deny-web and no rule admits it"
    text = render(e)
    assert text.splitlines()[0] == "x/client -> x/web 80/TCP (IPv4): DENIED"
    assert "  ingress of x/web: isolated, refuses: isolated by x/allow-web, x/deny-web" in text
    assert "    selected by: x/allow-web, x/deny-web" in text
    assert "  egress of x/client: not isolated, allows: no policy isolates x/client for egress" in text


def test_render_names_the_admitting_rule_and_the_others():
    c = cluster(OBJECTS, [allow_web_from(pods_peer({"role": "client"})),
                          allow_web_from(ns_peer({"team": "a"}), name="x/allow-team-a")])
    text = render(explain(c, "x/client", "x/web", 80))
    assert "ALLOWED" in text
    assert "admitted by x/allow-team-a ingress[0]" in text
    assert "    also admitted by x/allow-web ingress[0]" in text


def test_render_explains_the_own_node_rule():
    c = cluster(OBJECTS, [DENY_WEB_INGRESS])
    text = render(explain(c, "192.168.0.1", "x/web", 80, node_addresses=NODES))
    assert "from x/web's own node n1: always allowed (kubelet probes)" in text
    assert "192.168.0.1 is an address of node n1: never isolated" in text


def test_without_node_addresses_a_node_is_an_outside_address():
    c = cluster(OBJECTS, [DENY_WEB_INGRESS])
    e = explain(c, "192.168.0.5", "x/web", 80, node_addresses=NODES)
    assert not e.allowed
    assert "not a pod of the cluster" in e.egress.reason


def test_render_has_no_colour_unless_asked_and_escapes_control_characters():
    c = cluster(OBJECTS, [DENY_WEB_INGRESS])
    e = explain(c, "x/client", "x/web", 80)
    assert "\x1b" not in render(e)
    assert "\x1b[1;31mDENIED\x1b[0m" in render(e, color=True)
    odd = dataclasses.replace(e, notes=("NetworkPolicy x/a: spec: bad \x1b[2J",))
    assert "\\x1b[2J" in render(odd) and "\x1b[2J" not in render(odd)


def test_problems_of_the_policies_involved_are_noted():
    problem = Problem("NetworkPolicy", "x/deny-web", "spec.ingress[0].ports[0].port",
                      "must be a number or a name")
    unrelated = Problem("NetworkPolicy", "y/other", "spec", "bad")
    c = dataclasses.replace(cluster(OBJECTS, [DENY_WEB_INGRESS]), problems=(problem, unrelated))
    e = explain(c, "x/client", "x/web", 80)
    assert e.notes == (str(problem),)
    assert f"  note: {problem}" in render(e)


def test_as_dict_is_json_with_the_verdict_and_both_directions():
    c = cluster(OBJECTS, [DENY_WEB_INGRESS])
    doc = json.loads(json.dumps(explain(c, "x/client", "x/web", 80).as_dict()))
    assert doc["allowed"] is False
    assert doc["ingress"]["policies"] == ["x/deny-web"] and doc["ingress"]["isolated"] is True
    assert doc["egress"]["isolated"] is False and doc["egress"]["allowed"] is True


def test_the_family_picks_the_address_of_dual_stack_pods():
    c = cluster(OBJECTS)
    assert explain(c, "x/client", "x/web", 80).family == 4
    e = explain(c, "x/client", "x/web", 80, family=6)
    assert e.family == 6


@pytest.mark.parametrize("text, family, ip, pod, node", [
    ("x/web", None, "10.244.1.10", "x/web", None),
    ("x/web", 6, "fd00::10", "x/web", None),
    ("10.244.1.10", None, "10.244.1.10", "x/web", None),
    ("10.244.1.0/24", None, "10.244.1.0", None, None),
    ("FD00:0:0::10", None, "fd00::10", "x/web", None),
    ("192.168.0.2", None, "192.168.0.2", None, "n2"),
    ("kube-system/agent-n1", None, "192.168.0.1", "kube-system/agent-n1", "n1"),
])
def test_resolve(text, family, ip, pod, node):
    e = resolve(cluster(OBJECTS), text, family, NODES)
    assert (e.ip, e.pod.key if e.pod else None, e.node) == (ip, pod, node)


@pytest.mark.parametrize("text, family, message", [
    ("x/nope", None, "x/nope: no such running pod with an address"),
    ("y/client", 6, "y/client: the pod has no IPv6 address"),
    ("web", None, "web: not namespace/pod, an IP address or a CIDR"),
    ("10.0.0.1", 6, "10.0.0.1: not an IPv6 address"),
])
def test_resolve_refuses(text, family, message):
    with pytest.raises(EndpointError) as err:
        resolve(cluster(OBJECTS), text, family)
    assert str(err.value) == message


@pytest.mark.parametrize("text, expected", [
    ("80", (80, "TCP")), ("53/udp", (53, "UDP")), ("9/SCTP", (9, "SCTP")), ("65535/tcp", (65535, "TCP")),
])
def test_parse_port(text, expected):
    assert parse_port(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0", "port must be a number from 1 to 65535"),
    ("65536", "port must be a number from 1 to 65535"),
    ("http", "port must be a number from 1 to 65535"),
    ("80/icmp", "protocol must be one of TCP, UDP, SCTP"),
    ("-1", "port must be a number from 1 to 65535"),
])
def test_parse_port_refuses(text, message):
    with pytest.raises(ValueError) as err:
        parse_port(text)
    assert str(err.value) == f"{text}: {message}"
