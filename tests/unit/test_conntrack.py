"""lib.conntrack, pure parts: reading `conntrack -L`, choosing the flows a
narrowed policy no longer allows, and the `conntrack -D` commands for them.

The fixtures under fixtures/conntrack were printed by conntrack 1.4.7 inside
a namespace routing two pod namespaces (10.244.0.10 / fd00::10 client,
10.244.0.20 / fd00::20 server, node side 169.254.1.1): real TCP, UDP, ICMP,
ICMPv6 and raw protocol-253 traffic, a connection through a DNAT rule
(10.96.0.1:443 -> 10.244.0.20:8080), and entries made with `conntrack -I`
for SCTP (the kernel here cannot send it), GRE, UDP-Lite and a zoned entry.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from lib.conntrack import (Flow, delete_commands, parse_addresses, parse_line, parse_listing,
                           stale_flows)
from lib.explain import explain
from lib.model import EGRESS, INGRESS, UDP, Cluster
from tests.unit.builders import (a_networks, a_pods, anp, arule, banp, ns_subject, pods_subject,
                                 with_admin, block, cport, namespace, pod, pods_peer, policy, pport, rule,
                                 sel)

FIXTURES = Path(__file__).parent / "fixtures" / "conntrack"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- parsing ------------------------------------------------------------------

def test_ipv4_extended_listing_reads_every_tracked_protocol():
    listing = parse_listing(fixture("list-ipv4-extended.txt"))
    flows = set(listing.flows)
    assert Flow(4, "tcp", "10.244.0.10", "10.244.0.20", 36664, 8080) in flows
    assert Flow(4, "udp", "10.244.0.10", "10.244.0.20", 45866, 53) in flows
    assert Flow(4, "sctp", "10.244.0.10", "10.244.0.20", 40000, 80) in flows
    assert Flow(4, "icmp", "10.244.0.10", "10.244.0.20") in flows
    assert Flow(4, "253", "10.244.0.10", "10.244.0.20") in flows
    # node to pod, and pod to the node's own address
    assert Flow(4, "tcp", "169.254.1.1", "10.244.0.20", 55846, 8080) in flows
    assert Flow(4, "udp", "10.244.0.10", "169.254.1.1", 60545, 5353) in flows
    # mark and zone do not get in the way
    assert Flow(4, "udp", "10.244.0.10", "10.244.0.20", 5000, 5001) in flows
    assert len(listing.flows) == 9


def test_gre_and_udplite_lines_are_skipped_and_counted():
    listing = parse_listing(fixture("list-ipv4-extended.txt"))
    assert listing.skipped == 2
    assert listing.first_skipped.split()[2] in ("gre", "udplite")
    assert not any(f.protocol in ("gre", "udplite", "47", "136") for f in listing.flows)


def test_dnat_flow_keeps_original_tuple_and_where_it_really_goes():
    listing = parse_listing(fixture("list-ipv4-extended.txt"))
    (nat,) = [f for f in listing.flows if f.dst == "10.96.0.1"]
    assert nat == Flow(4, "tcp", "10.244.0.10", "10.96.0.1", 49490, 443,
                       nat_dst="10.244.0.20", nat_dport=8080)
    assert (nat.target, nat.target_port) == ("10.244.0.20", 8080)


def test_plain_flow_target_is_its_destination():
    flow = Flow(4, "tcp", "10.244.0.10", "10.244.0.20", 36664, 8080)
    assert (flow.target, flow.target_port) == ("10.244.0.20", 8080)


def test_ipv6_extended_listing():
    listing = parse_listing(fixture("list-ipv6-extended.txt"))
    assert listing.skipped == 0
    assert set(listing.flows) == {
        Flow(6, "sctp", "fd00::10", "fd00::20", 40001, 80),
        Flow(6, "tcp", "fd00::10", "fd00::20", 59192, 8080),
        Flow(6, "udp", "fd00::10", "fd00::20", 39401, 53),
        Flow(6, "253", "fd00::10", "fd00::20"),
        Flow(6, "icmpv6", "fd00::10", "fd00::20"),
    }


def test_default_format_reads_the_same_flows_as_extended():
    default = parse_listing(fixture("list-default.txt"))
    v4 = parse_listing(fixture("list-ipv4-extended.txt"))
    v6 = parse_listing(fixture("list-ipv6-extended.txt"))
    assert sorted(default.flows, key=repr) == sorted(v4.flows + v6.flows, key=repr)
    assert default.skipped == v4.skipped + v6.skipped


@pytest.mark.parametrize("line", [
    "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.",
    "tcp      6 431997 ESTABLISHED src=10.244.0.10 dst=10.244.0.20 sport=1 dport=2",  # no reply
    "tcp      6 431997 ESTABLISHED src=10.244.0.10 dst=10.244.0.20 sport=1 "
    "src=10.244.0.20 dst=10.244.0.10 sport=2 dport=1",                             # no dport
    "tcp      6 1 src=10.244.0.999 dst=10.244.0.20 sport=1 dport=2 "
    "src=10.244.0.20 dst=10.244.0.10 sport=2 dport=1",                             # bad address
    "udp      17 1 src=10.244.0.10 dst=10.244.0.20 sport=1 dport=70000 "
    "src=10.244.0.20 dst=10.244.0.10 sport=70000 dport=1",                         # bad port
    "ipv4     2 tcp      6 1 src=fd00::10 dst=fd00::20 sport=1 dport=2 "
    "src=fd00::20 dst=fd00::10 sport=2 dport=1",                                   # family mismatch
    "tcp      6 1 src=10.244.0.10 dst=fd00::20 sport=1 dport=2 "
    "src=fd00::20 dst=10.244.0.10 sport=2 dport=1",                                # mixed families
    "<flow type=\"new\"><meta direction=\"original\">",                             # xml
    "tcp",
])
def test_unreadable_lines_are_skipped(line):
    assert parse_line(line) is None
    listing = parse_listing(fixture("list-ipv4-extended.txt") + line + "\n\n")
    assert listing.skipped == 3          # the two of the fixture, plus this one
    assert len(listing.flows) == 9


@given(st.text())
def test_parser_never_raises(text):
    listing = parse_listing(text)
    assert listing.skipped + len(listing.flows) <= len(text.splitlines())


def test_addresses_of_ip_addr_show():
    assert parse_addresses(fixture("ip-addr.txt")) == (
        "127.0.0.1", "::1", "169.254.1.1", "fe80::3cee:a7ff:fe65:fe60", "fe80::1",
        "fe80::6426:b1ff:fe4f:6eab")


def test_addresses_with_peer_and_noncanonical_ipv6():
    text = ("2: eth0    inet 10.0.0.1 peer 10.0.0.2/32 scope global eth0\\  valid_lft forever\n"
            "2: eth0    inet6 FD00:0:0::1/64 scope global \\       valid_lft forever\n"
            "3: eth1    link/ether 00:11:22:33:44:55 brd ff:ff:ff:ff:ff:ff\n")
    assert parse_addresses(text) == ("10.0.0.1", "fd00::1")


# --- judging ------------------------------------------------------------------

NODE = "n1"
NODE_ADDRESSES = ("127.0.0.1", "::1", "172.18.0.1", "169.254.1.1", "fe80::1")
CLIENT, SERVER, FRONTEND = "10.244.0.10", "10.244.0.20", "10.244.0.30"
CLIENT6, SERVER6 = "fd00::10", "fd00::20"
REMOTE, REMOTE_PEER = "10.244.1.5", "10.244.1.6"
EXTERNAL = "192.0.2.7"

PODS = (
    pod("a/client", NODE, (CLIENT, CLIENT6), {"app": "client"}),
    pod("a/server", NODE, (SERVER, SERVER6), {"app": "server"}),
    pod("a/frontend", NODE, FRONTEND, {"app": "frontend"}),
    pod("a/remote", "n2", REMOTE, {"app": "remote"}),
    pod("a/remote-peer", "n2", REMOTE_PEER, {"app": "peer"}),
    pod("kube-system/agent", NODE, "172.18.0.1", {"app": "agent"}, host_network=True),
)


def cluster(*policies) -> Cluster:
    return Cluster((namespace("a"), namespace("kube-system")), PODS, tuple(policies))


def tcp(src, dst, dport, sport=40000, **nat) -> Flow:
    return Flow(6 if ":" in src else 4, "tcp", src, dst, sport, dport, **nat)


def stale(flows, c, addresses=NODE_ADDRESSES):
    return stale_flows(flows, c, NODE, addresses)


SERVER_INGRESS_9090_FROM_FRONTEND = policy(
    "a/server-in", sel({"app": "server"}),
    ingress=[rule([pods_peer({"app": "frontend"})], [pport(9090)])])
CLIENT_EGRESS_DNS_ONLY = policy(
    "a/client-out", sel({"app": "client"}),
    egress=[rule(None, [pport(53, UDP)])], types=[EGRESS])


def test_no_policy_nothing_is_stale():
    flows = [tcp(CLIENT, SERVER, 8080), tcp(CLIENT6, SERVER6, 8080)]
    assert stale(flows, cluster()) == []


def test_egress_narrowed_cuts_what_the_source_may_no_longer_send():
    c = cluster(CLIENT_EGRESS_DNS_ONLY)
    cut = tcp(CLIENT, SERVER, 8080)
    cut6 = tcp(CLIENT6, SERVER6, 8080)
    to_outside = tcp(CLIENT, EXTERNAL, 443)
    dns = Flow(4, "udp", CLIENT, "10.96.0.10", 5353, 53)
    ping = Flow(4, "icmp", CLIENT, SERVER)
    assert stale([cut, cut6, to_outside, dns, ping], c) == [cut, cut6, to_outside, ping]


def test_ingress_narrowed_cuts_peers_and_ports_no_longer_admitted():
    c = cluster(SERVER_INGRESS_9090_FROM_FRONTEND)
    wrong_peer = tcp(CLIENT, SERVER, 9090)
    wrong_port = tcp(FRONTEND, SERVER, 8080)
    from_outside = tcp(EXTERNAL, SERVER, 9090)
    from_remote = tcp(REMOTE, SERVER, 9090)
    udp_same_port = Flow(4, "udp", FRONTEND, SERVER, 40000, 9090)
    allowed = tcp(FRONTEND, SERVER, 9090)
    flows = [wrong_peer, wrong_port, from_outside, from_remote, udp_same_port, allowed]
    assert stale(flows, c) == [wrong_peer, wrong_port, from_outside, from_remote, udp_same_port]


def test_ipv6_flows_are_judged_too():
    c = cluster(SERVER_INGRESS_9090_FROM_FRONTEND)
    assert stale([tcp(CLIENT6, SERVER6, 9090)], c) == [tcp(CLIENT6, SERVER6, 9090)]


def test_flows_from_the_node_to_its_pods_are_kept():
    c = cluster(policy("a/deny-all", sel(), ingress=[], egress=[], types=[INGRESS, EGRESS]))
    probes = [tcp("169.254.1.1", SERVER, 8080), tcp("172.18.0.1", SERVER, 8080),
              tcp("fe80::1", SERVER6, 8080), Flow(4, "icmp", "169.254.1.1", CLIENT)]
    assert stale(probes, c) == []


def test_node_addresses_are_what_tells_a_probe_from_an_outsider():
    c = cluster(policy("a/deny-all", sel(), ingress=[]))
    probe = tcp("169.254.1.1", SERVER, 8080)
    assert stale([probe], c, addresses=()) == [probe]


def test_pod_to_node_is_egress_and_can_be_cut():
    c = cluster(CLIENT_EGRESS_DNS_ONLY)
    to_node = tcp(CLIENT, "172.18.0.1", 10250)
    assert stale([to_node], c) == [to_node]
    allow_node = policy("a/client-node", sel({"app": "client"}),
                        egress=[rule([block("172.18.0.1/32")])], types=[EGRESS])
    assert stale([to_node], cluster(CLIENT_EGRESS_DNS_ONLY, allow_node)) == []


def test_flows_this_node_does_not_enforce_are_kept():
    deny_all = policy("a/deny-all", sel(), ingress=[], egress=[], types=[INGRESS, EGRESS])
    c = cluster(deny_all)
    foreign = [
        tcp(REMOTE_PEER, REMOTE, 80),          # both pods on another node
        tcp(EXTERNAL, "198.51.100.1", 80),     # not pods at all
        tcp(EXTERNAL, "172.18.0.1", 22),       # to the node itself
        tcp("172.18.0.1", EXTERNAL, 443),      # host-network pod: never isolated
    ]
    assert stale(foreign, c) == []


def test_remote_ingress_is_the_other_nodes_business():
    """client may send to remote (egress allows all), remote refuses it: only
    the remote node, which enforces remote's ingress, cuts it."""
    remote_in = policy("a/remote-in", sel({"app": "remote"}), ingress=[])
    c = cluster(remote_in)
    assert not explain(c, CLIENT, REMOTE, 80, node_addresses={NODE: NODE_ADDRESSES}).allowed
    assert stale([tcp(CLIENT, REMOTE, 80)], c) == []


def test_service_flow_is_judged_on_the_pod_nat_chose():
    c = cluster(SERVER_INGRESS_9090_FROM_FRONTEND)
    to_server = tcp(CLIENT, "10.96.0.1", 443, nat_dst=SERVER, nat_dport=8080)
    to_remote = tcp(CLIENT, "10.96.0.1", 443, sport=40001, nat_dst=REMOTE, nat_dport=8080)
    assert stale([to_server, to_remote], c) == [to_server]
    # the service port is not the pod's: only the port after NAT is judged
    admitted = tcp(FRONTEND, "10.96.0.1", 80, nat_dst=SERVER, nat_dport=9090)
    assert stale([admitted], c) == []


def test_protocol_without_ports_follows_rules_without_ports():
    ports_only = policy("a/server-in", sel({"app": "server"}),
                        ingress=[rule([pods_peer({"app": "client"})], [pport(8080)])])
    any_port = policy("a/server-in", sel({"app": "server"}),
                      ingress=[rule([pods_peer({"app": "client"})])])
    flows = [Flow(4, "icmp", CLIENT, SERVER), Flow(6, "icmpv6", CLIENT6, SERVER6),
             Flow(4, "253", CLIENT, SERVER)]
    assert stale(flows, cluster(ports_only)) == flows
    assert stale(flows, cluster(any_port)) == []


def test_named_port_resolved_on_the_target_pod():
    named = pod("a/server", NODE, SERVER, {"app": "server"}, ports=[cport(8080, "http")])
    c = Cluster((namespace("a"),), (PODS[0], named),
                (policy("a/server-in", sel({"app": "server"}),
                        ingress=[rule(None, [pport("http")])]),))
    assert stale([tcp(CLIENT, SERVER, 8080), tcp(CLIENT, SERVER, 8081)], c) == [
        tcp(CLIENT, SERVER, 8081)]


def test_agrees_with_explain_on_the_directions_this_node_enforces():
    """Every pairing of this small cluster's addresses: a flow is stale exactly
    when explain refuses the egress of a local source or the ingress of a
    local target."""
    c = cluster(SERVER_INGRESS_9090_FROM_FRONTEND, CLIENT_EGRESS_DNS_ONLY,
                policy("a/remote-in", sel({"app": "remote"}), ingress=[]))
    local = {CLIENT, SERVER, FRONTEND}
    addresses = [CLIENT, SERVER, FRONTEND, REMOTE, REMOTE_PEER, EXTERNAL, "172.18.0.1",
                 "169.254.1.1"]
    flows = [Flow(4, proto, s, d, 1000, port)
             for s in addresses for d in addresses if s != d
             for proto in ("tcp", "udp") for port in (53, 8080, 9090)]
    expected = []
    for f in flows:
        e = explain(c, f.src, f.dst, f.dport, f.protocol, 4, {NODE: NODE_ADDRESSES})
        if (f.src in local and not e.egress.allowed) or (f.dst in local and not e.ingress.allowed):
            expected.append(f)
    assert expected                      # the cluster does refuse something
    assert stale(flows, c) == expected


# --- deleting -----------------------------------------------------------------

def test_delete_commands_group_source_ports_and_filter_on_nat_target():
    flows = [tcp(CLIENT, SERVER, 8080, sport=1), tcp(CLIENT, SERVER, 8080, sport=2),
             tcp(CLIENT, "10.96.0.1", 443, nat_dst=SERVER, nat_dport=8080),
             Flow(6, "udp", CLIENT6, SERVER6, 5, 53),
             Flow(4, "icmp", CLIENT, SERVER), Flow(6, "253", CLIENT6, SERVER6)]
    assert delete_commands(flows) == [
        ["-D", "-f", "ipv4", "-p", "tcp", "-s", CLIENT, "-d", SERVER, "-r", SERVER,
         "--dport", "8080", "--reply-port-src", "8080"],
        ["-D", "-f", "ipv4", "-p", "tcp", "-s", CLIENT, "-d", "10.96.0.1", "-r", SERVER,
         "--dport", "443", "--reply-port-src", "8080"],
        ["-D", "-f", "ipv6", "-p", "udp", "-s", CLIENT6, "-d", SERVER6, "-r", SERVER6,
         "--dport", "53", "--reply-port-src", "53"],
        ["-D", "-f", "ipv4", "-p", "icmp", "-s", CLIENT, "-d", SERVER, "-r", SERVER],
        ["-D", "-f", "ipv6", "-p", "253", "-s", CLIENT6, "-d", SERVER6, "-r", SERVER6],
    ]


def test_no_stale_flow_no_command():
    assert delete_commands([]) == []


def test_admin_tiers_cut_what_they_refuse_and_keep_what_they_allow():
    """An ANP Deny cuts flows no NetworkPolicy isolates; an ANP Allow keeps
    flows a NetworkPolicy refuses; a BANP Deny cuts where no NetworkPolicy
    selects the pod."""
    deny_external = anp("no-external", 1, pods_subject({}, {"app": "client"}),
                        egress=[arule("Deny", [a_networks("192.0.2.0/24")])])
    allow_frontend = anp("frontend-to-server", 2, pods_subject({}, {"app": "server"}),
                         ingress=[arule("Allow", [a_pods({}, {"app": "frontend"})])])
    baseline = banp(ns_subject({}), ingress=[arule("Deny", [a_pods({}, {"app": "remote"})])])
    c = with_admin(cluster(policy("a/deny-server", sel({"app": "server"}), types=[INGRESS])),
                   [deny_external, allow_frontend], baseline)
    to_outside, kept = tcp(CLIENT, EXTERNAL, 443), tcp(FRONTEND, SERVER, 8080)
    refused_by_np, refused_by_banp = tcp(CLIENT, SERVER, 8080), tcp(REMOTE, FRONTEND, 80)
    assert stale([to_outside, kept, refused_by_np, refused_by_banp], c) == [
        to_outside, refused_by_np, refused_by_banp]
