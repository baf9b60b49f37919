"""Element spellings, rule tags and names of the nftables state, against
what the real nft listed (fixtures/nft/spellings.json)."""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from lib import nft_parse
from lib.nft_state import (
    ADDR, ADDR_PROTO_PORT, MAX_COMMENT, address_text, canonical_element, hashed_name,
    interval_elements, name_family, port_element, tag_of, tagged, valid_name,
)
from tests.unit.fixtures.nft.our_table import SPELLINGS

FIXTURES = Path(__file__).parent / "fixtures" / "nft"


def listed_spellings() -> dict[int, str]:
    """spell-<i> -> the one element nft listed for SPELLINGS[i]."""
    doc = json.loads((FIXTURES / "spellings.json").read_text())
    out = {}
    for item in doc["nftables"]:
        if "set" in item:
            s = item["set"]
            kinds = tuple(s["type"]) if isinstance(s["type"], list) else (s["type"],)
            (elem,) = s["elem"]
            out[int(s["name"].split("-")[1])] = nft_parse._element(elem, kinds, s["name"])
    return out


@pytest.mark.parametrize("i", range(len(SPELLINGS)), ids=[e for _, _, e in SPELLINGS])
def test_canonical_element_is_what_nft_lists(i):
    key, interval, element = SPELLINGS[i]
    assert canonical_element(key, interval, element) == listed_spellings()[i]


def test_what_nft_lists_is_its_own_spelling():
    # the planner refuses an element whose spelling canonical_element changes
    for i, (key, interval, _) in enumerate(SPELLINGS):
        listed = listed_spellings()[i]
        assert canonical_element(key, interval, listed) == listed, listed


_V4 = st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_V6 = st.integers(min_value=0, max_value=2**128 - 1).map(
    lambda n: st.sampled_from([ipaddress.IPv6Address(n).compressed,
                               ipaddress.IPv6Address(n).exploded])).flatmap(lambda s: s)


@given(st.sampled_from([4, 6]).flatmap(lambda f: st.tuples(
    st.just(f), _V4 if f == 4 else _V6, st.integers(min_value=0, max_value=129),
    st.sampled_from(["", "/", "port", "PORT"]))), st.booleans())
def test_a_canonical_spelling_is_its_own_spelling(spec, interval):
    family, address, length, shape = spec
    if shape == "/":
        element, key = f"{address}/{length}", ADDR[family]
    elif shape:
        proto = "tcp" if shape == "port" else "TCP"
        element, key, interval = f"{address} . {proto} . {length}", ADDR_PROTO_PORT[family], False
    else:
        element, key = address, ADDR[family]
    try:
        spelled = canonical_element(key, interval, element)
    except ValueError:
        return                       # refused spellings are the planner's error
    assert canonical_element(key, interval, spelled) == spelled


def test_the_spellings_nft_lists_back():
    listed = listed_spellings()
    by_input = {SPELLINGS[i][2]: listed[i] for i in listed if SPELLINGS[i][1]}
    assert by_input["10.0.0.5/32"] == "10.0.0.5"            # a host network is a bare address
    assert by_input["0.0.0.0/0"] == "0.0.0.0/0"              # /0 is fine in an interval set
    assert by_input["10.0.2.0-10.0.2.255"] == "10.0.2.0/24"  # a range that is a prefix
    assert by_input["10.0.3.1-10.0.3.9"] == "10.0.3.1-10.0.3.9"
    assert by_input["10.0.4.7-10.0.4.7"] == "10.0.4.7"
    assert by_input["FD00:0:0:1::/64"] == "fd00:0:0:1::/64"
    assert by_input["::ffff:0:0/96"] == "::ffff:0.0.0.0/96"  # inet_ntop's dotted tails
    assert by_input["::0.1.0.0"] == "::0.1.0.0"
    assert by_input["::ffff:0:0:1"] == "::ffff:0:0:1"
    assert listed[SPELLINGS.index((ADDR_PROTO_PORT[4], False, "10.244.1.10 . 17 . 53"))] == \
        "10.244.1.10 . udp . 53"


def test_interval_elements_merge_overlapping_and_adjacent_networks():
    assert interval_elements(["10.0.0.5", "10.0.0.0/24", "10.0.1.0/24", "10.0.3.0/24",
                              "172.16.0.9/32", "10.0.3.7/24"]) == \
        {"10.0.0.0/23", "10.0.3.0/24", "172.16.0.9"}
    assert interval_elements(["0.0.0.0/1", "128.0.0.0/1"]) == {"0.0.0.0/0"}
    assert interval_elements(["::/1", "8000::/1"]) == {"::/0"}
    assert interval_elements(["fd00::0:7", "fd00:0:0:2::/64"]) == {"fd00::7", "fd00:0:0:2::/64"}
    assert interval_elements([]) == frozenset()
    with pytest.raises(ValueError, match="mixed"):
        interval_elements(["10.0.0.1", "fd00::1"])


def test_port_elements_from_ipset_members():
    assert port_element("10.244.1.10,tcp:8080") == "10.244.1.10 . tcp . 8080"
    assert port_element("FD00::0:9,UDP:53") == "fd00::9 . udp . 53"
    for bad in ("10.244.1.10,8080", "10.244.1.10,icmp:1", "10.244.1.10,tcp:70000", "x,tcp:1"):
        with pytest.raises(ValueError):
            port_element(bad)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_ipv6_text_reads_back_as_the_same_address(n):
    address = ipaddress.IPv6Address(n)
    text = address_text(address)
    assert ipaddress.IPv6Address(text) == address
    assert text == text.lower() and ":::" not in text


def test_ipv6_text_has_dotted_tails_only_where_inet_ntop_prints_them():
    assert address_text(ipaddress.ip_address("::ffff:1.2.3.4")) == "::ffff:1.2.3.4"
    assert address_text(ipaddress.ip_address("::1.2.3.4")) == "::1.2.3.4"
    assert address_text(ipaddress.ip_address("::1")) == "::1"
    assert address_text(ipaddress.ip_address("::2")) == "::2"
    assert address_text(ipaddress.ip_address("64:ff9b::a00:1")) == "64:ff9b::a00:1"
    assert address_text(ipaddress.ip_address("::")) == "::"


def test_canonical_element_refuses_the_wrong_family_or_key():
    with pytest.raises(ValueError, match="not of type"):
        canonical_element(ADDR[4], True, "fd00::1")
    with pytest.raises(ValueError, match="unsupported key"):
        canonical_element("mark", False, "1")


def test_tagged_rule_comment_is_within_nfts_limit_and_names_its_hash():
    rule = tagged("ip saddr @kpm-n4-x return", "x" * 500)
    assert len(rule.comment) == MAX_COMMENT
    assert rule.comment.startswith(f"kpm:{rule.hash} ")
    assert rule.text == "x" * (MAX_COMMENT - 17)
    # the hash covers the statement and the text, not the cut
    assert tagged("ip saddr @kpm-n4-y return", "x" * 500).hash != rule.hash
    assert tagged("ip saddr @kpm-n4-x return", "x" * 501).hash != rule.hash
    assert tagged("reject", 'a "quoted" it\'s').comment.endswith(" a _quoted_ it_s")
    assert tagged("reject").comment == f"kpm:{tagged('reject').hash}"


def test_tag_of_reads_only_our_tags():
    assert tag_of("kpm:0123456789ab text") == "0123456789ab"
    assert tag_of("kpm:0123456789ab") == "0123456789ab"
    for other in (None, "", "no mail", "kpm:0123456789abc", "kpm:0123456789AB x", "kpm:01234 x"):
        assert tag_of(other) is None


def test_names():
    assert hashed_name("i", 4, "web").startswith("kpm-i4-") and len(hashed_name("i", 4, "web")) == 27
    assert name_family(hashed_name("e", 6, "web")) == 6
    assert name_family("kpm-egress4") == 4
    assert name_family("kpm-forward") == 0
    assert valid_name("kpm-forward") and valid_name("kpm-n4-" + "a" * 248)
    for bad in ("kpm-" + "a" * 252, "forward", "kpm-A", "kpm-a b", "kpm-", 'kpm-"x"'):
        assert not valid_name(bad)
