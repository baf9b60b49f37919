"""ipset save parsing and canonical members, against real `ipset save` output."""
from __future__ import annotations

from pathlib import Path

import pytest

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
