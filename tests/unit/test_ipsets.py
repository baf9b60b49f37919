"""ipset save parsing and canonical members, against real `ipset save` output."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.ipsets import IpsetParseError, canonical_member, parse_save
from lib.ruleset import HASH_IP_PORT, HASH_NET, IpSet
from tests.unit.fixtures.save.our_rules import CANONICAL, DESIRED

FIXTURES = Path(__file__).parent / "fixtures" / "save"


@pytest.mark.parametrize("kind, member, canonical", [
    (HASH_NET, "10.0.0.1/32", "10.0.0.1"),
    (HASH_NET, "10.0.0.1", "10.0.0.1"),
    (HASH_NET, "10.1.0.0/16", "10.1.0.0/16"),
    (HASH_NET, "10.1.2.3/16", "10.1.0.0/16"),
    (HASH_NET, " 10.1.0.0/16 ", "10.1.0.0/16"),
    (HASH_NET, "fd00::0:1/128", "fd00::1"),
    (HASH_NET, "FD00:0:0:1::/64", "fd00:0:0:1::/64"),
    (HASH_NET, "2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
    (HASH_IP_PORT, "fd00::0:1,TCP:80", "fd00::1,tcp:80"),
    (HASH_IP_PORT, "10.0.0.5,53", "10.0.0.5,tcp:53"),
    (HASH_IP_PORT, "10.0.0.5,udp:53", "10.0.0.5,udp:53"),
    (HASH_IP_PORT, "10.0.0.5,SCTP:80", "10.0.0.5,sctp:80"),
])
def test_canonical_member(kind, member, canonical):
    assert canonical_member(kind, member) == canonical


@pytest.mark.parametrize("kind, member, why", [
    (HASH_NET, "0.0.0.0/0", "/0 is refused"),
    (HASH_NET, "::/0", "/0 is refused"),
    (HASH_NET, "10.0.0.300", "not an address or CIDR"),
    (HASH_NET, "10.0.0.0/33", "not an address or CIDR"),
    (HASH_IP_PORT, "10.0.0.5", "expected ADDRESS,PROTO:PORT"),
    (HASH_IP_PORT, "10.0.0.0/24,tcp:80", "not an IP address"),
    (HASH_IP_PORT, "10.0.0.5,tcp:http", "port must be"),
    (HASH_IP_PORT, "10.0.0.5,tcp:70000", "out of range"),
    (HASH_IP_PORT, "10.0.0.5,icmp:8", "protocol icmp has no ports"),
    ("bitmap:port", "80", "unsupported set type bitmap:port"),
])
def test_bad_members_are_refused_naming_the_member(kind, member, why):
    with pytest.raises(IpsetParseError, match=why) as err:
        canonical_member(kind, member)
    assert repr(member) in str(err.value)


# IPv4 text near the forms ipset prints: mostly valid dotted quads, networks
# with and without host bits, and octets, prefixes and ports with leading
# zeros, out of range or not numbers; any protocol spelling.
_valid_quad = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_octet = st.one_of(st.integers(0, 255).map(str), st.integers(0, 300).map(lambda n: f"0{n}"),
                   st.sampled_from(["", "256", "1a", "\u0661"]))
_quad = st.one_of(_valid_quad, _valid_quad, st.lists(_octet, min_size=3, max_size=5).map(".".join))
_network = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 32)).map(
    lambda t: f"{ipaddress.IPv4Address(t[0] >> (32 - t[1]) << (32 - t[1]))}/{t[1]}")
_prefix = st.one_of(st.integers(0, 33).map(str), st.sampled_from(["024", "", "x"]))
_nets = st.one_of(_quad, _network, st.tuples(_quad, _prefix).map("/".join))
_port = st.one_of(st.integers(0, 70000).map(str), st.sampled_from(["080", "00", "", "x"]))
_ports = st.tuples(_quad, st.sampled_from(["tcp", "udp", "TCP", "sctp", "udplite", "icmp", ""]),
                   _port).map(lambda t: f"{t[0]},{t[1]}:{t[2]}" if t[1] else f"{t[0]},{t[2]}")


def _expected_net(member: str) -> str:
    """What ipaddress makes of a hash:net member, by the rules of canonical_member."""
    try:
        net = ipaddress.ip_network(member, strict=False)
    except ValueError:
        return "error"
    if net.prefixlen == 0:
        return "error"
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _expected_ip_port(member: str) -> str:
    addr, _, port = member.rpartition(",")
    proto, colon, number = port.rpartition(":")
    proto = proto.lower() if colon else "tcp"
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "error"
    if (proto not in ("tcp", "udp", "sctp", "udplite") or not number.isdigit()
            or len(number) > 5 or int(number) > 65535 or (colon and not proto.isalpha())):
        return "error"
    return f"{ip.compressed},{proto}:{int(number)}"


def _canonical_or_error(kind: str, member: str) -> str:
    try:
        return canonical_member(kind, member)
    except IpsetParseError:
        return "error"


@settings(max_examples=3000, deadline=None)
@given(_nets)
def test_hash_net_members_read_as_ipaddress_reads_them(member):
    assert _canonical_or_error(HASH_NET, member) == _expected_net(member)


@settings(max_examples=3000, deadline=None)
@given(_ports)
def test_ip_port_members_read_as_ipaddress_reads_them(member):
    assert _canonical_or_error(HASH_IP_PORT, member) == _expected_ip_port(member)


def test_canonical_member_spells_members_as_ipset_save_prints_them():
    printed = parse_save((FIXTURES / "ipset-canonical.save").read_text())
    assert set(printed) == set(CANONICAL)
    for name, (kind, family, inputs) in CANONICAL.items():
        assert (printed[name].kind, printed[name].family) == (kind, family)
        assert {canonical_member(kind, m) for m in inputs} == printed[name].members


def test_canonical_member_is_idempotent_on_printed_members():
    for s in parse_save((FIXTURES / "ipset-canonical.save").read_text()).values():
        for m in s.members:
            assert canonical_member(s.kind, m) == m


def test_parse_save_keeps_only_our_sets():
    sets = parse_save((FIXTURES / "ipset.save").read_text())
    assert sets == DESIRED.set_map()           # KUBE-CLUSTER-IP and DOCKER-PORTS skipped


def test_parse_save_of_nothing_is_no_set():
    assert parse_save("") == {}


def test_parse_save_reads_family_type_and_ignores_member_options():
    text = (
        "create KPM-N6-x hash:net family inet6 hashsize 1024 maxelem 1048576 comment bucketsize 12\n"
        'add KPM-N6-x fd00::1 comment "a b"\n'
        "add KPM-N6-x fd00:1::/64 timeout 0\n"
        "create KPM-L list:set size 8\n"
    )
    assert parse_save(text) == {
        "KPM-N6-x": IpSet("KPM-N6-x", HASH_NET, 6, frozenset({"fd00::1", "fd00:1::/64"})),
        "KPM-L": IpSet("KPM-L", "list:set", 4, frozenset()),
    }


def test_an_odd_member_in_our_set_is_kept_as_printed():
    text = ("create KPM-P4-x hash:ip,port family inet hashsize 1024 maxelem 65536\n"
            "add KPM-P4-x 10.0.0.1,icmp:echo-request\n"
            "add KPM-P4-x 10.0.0.1,tcp:80\n")
    assert parse_save(text)["KPM-P4-x"].members == {"10.0.0.1,icmp:echo-request", "10.0.0.1,tcp:80"}


@pytest.mark.parametrize("text, why", [
    ("add KPM-N4-x 10.0.0.1\n", "line 1: member for undeclared set KPM-N4-x"),
    ("create KPM-N4-x hash:net\nflush KPM-N4-x\n", "line 2: unknown command flush"),
    ("create KPM-N4-x hash:net family inet7\n", "line 1: family must be inet or inet6"),
    ("create KPM-N4-x hash:net\ncreate KPM-N4-x hash:net\n", "line 2: set KPM-N4-x created twice"),
    ("create KPM-N4-x\n", "line 1: expected create NAME TYPE"),
    ("create KPM-N4-x hash:net\nadd KPM-N4-x\n", "line 2: expected add NAME MEMBER"),
])
def test_corrupt_save_is_refused_with_the_line(text, why):
    with pytest.raises(IpsetParseError, match="ipset save " + why):
        parse_save(text)
