"""Parsing `nft -j list table inet kube-policy-manager`, against listings
the real nft printed (fixtures/nft, made by make_fixtures.sh)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.nft_parse import NftParseError, parse, table_absent
from lib.nft_state import BaseHook, tag_of
from tests.unit.fixtures.nft.our_table import DESIRED, E6, I4, N4

FIXTURES = Path(__file__).parent / "fixtures" / "nft"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def doc(name: str = "table.json") -> dict:
    return json.loads(fixture(name))


def test_the_table_read_back_is_the_table_written():
    table = parse(fixture("table.json"))
    assert table.exists and table.flags == ()
    assert [c.name for c in table.chains] == [c.name for c in DESIRED.chains]
    for got, want in zip(table.chains, DESIRED.chains):
        assert got.hashes == want.hashes, got.name
        assert got.base == want.base
        assert [r.comment for r in got.rules] == [r.comment for r in want.rules]
    assert table.sets == DESIRED.sets         # key, interval flag and elements, as nft spells them
    assert table.maps == DESIRED.maps


def test_base_chains_read_with_hook_priority_policy_and_type():
    chains = parse(fixture("table.json")).chain_map()
    assert chains["kpm-forward"].base == BaseHook("forward", -10, "accept", "filter")
    assert chains["kpm-input"].base == BaseHook("input", -10, "accept", "filter")
    assert chains[I4].base is None


def test_tagged_rules_keep_their_comment_only():
    chain = parse(fixture("table.json")).chain_map()[I4]
    assert all(r.statement == "" for r in chain.rules)
    assert chain.rules[0].text == "default/allow-client ingress[0] ports[0]"


def test_what_someone_changed_is_read_as_it_is():
    table = parse(fixture("drifted.json"))
    chains = table.chain_map()
    inserted = chains[I4].rules[0]
    assert (inserted.hash, inserted.comment) == (None, None)
    assert '"accept"' in inserted.statement and '"dport"' in inserted.statement
    assert chains[I4].hashes[1:] == DESIRED.chain_map()[I4].hashes
    assert chains[E6].rules == ()
    assert table.set_map()[N4].elements == DESIRED.set_map()[N4].elements - {"10.244.1.7"}
    assert dict(table.map_map()["kpm-ingress4"].elements) == {"10.244.1.5": f"jump {I4}"}


def test_objects_others_added_to_our_table():
    table = parse(fixture("foreign-objects.json"))
    assert table.chain_map()["someones-chain"].rules[0].hash is None
    timeouts = table.set_map()["kpm-n4-timeouts"]
    assert (timeouts.interval, timeouts.extra) == (False, ("flag timeout", "timeout 3600"))
    assert timeouts.elements == {"10.0.0.1"}
    marks = table.map_map()["kpm-marks4"]
    assert marks.extra == ("data mark",) and dict(marks.elements) == {"10.0.0.1": "1"}
    # the named counter is not a chain, set or map: skipped
    assert {c.name for c in table.chains} == {c.name for c in DESIRED.chains} | {"someones-chain"}


def test_a_dormant_table_reads_as_flagged():
    # nft 1.0.6 prints the flags of a dormant table as "inet": only their presence counts
    assert parse(fixture("dormant.json")).flags == ('flags "inet"',)


def test_absence_is_told_apart_from_other_failures():
    assert table_absent(fixture("absent.stderr"))
    assert not table_absent(fixture("no-netns.stderr"))     # also "No such file or directory"
    assert not table_absent("Error: Operation not permitted\nlist table inet kube-policy-manager\n")
    assert not table_absent("Error: No such file or directory\nlist table inet other\n")


def _with(change) -> str:
    d = doc()
    change(d["nftables"])
    return json.dumps(d)


def _find(items: list, kind: str, name: str) -> dict:
    return next(i[kind] for i in items if kind in i and i[kind].get("name") == name)


@pytest.mark.parametrize("text,message", [
    ("", "not JSON"),
    ('{"nftables": [', "not JSON"),
    ("[1, 2]", "expected an object with an 'nftables' list"),
    ('{"nftables": {}}', "expected an object with an 'nftables' list"),
    ('{"nftables": [{"metainfo": {"json_schema_version": 1}}]}', "no table inet kube-policy-manager"),
    ('{"nftables": [{"metainfo": {"json_schema_version": 2}}]}', "JSON schema version 2"),
    ('{"nftables": [{"table": {"family": "inet", "name": "kube-policy-manager"}, "x": 1}]}',
     "expected an object with one key"),
    ('{"nftables": [{"table": {"family": "ip", "name": "kube-policy-manager"}}]}',
     "table of table ip kube-policy-manager"),
])
def test_corrupt_listings_are_refused(text, message):
    with pytest.raises(NftParseError, match=message):
        parse(text)


def test_objects_of_another_table_are_refused():
    text = _with(lambda items: items.append(
        {"chain": {"family": "inet", "table": "other", "name": "forward", "handle": 1}}))
    with pytest.raises(NftParseError, match=r"nftables\[\d+\]: chain of table inet other"):
        parse(text)


def test_objects_without_their_table_are_refused():
    text = _with(lambda items: items.remove(next(i for i in items if "table" in i)))
    with pytest.raises(NftParseError, match="objects of inet kube-policy-manager without the table"):
        parse(text)


def test_a_rule_of_an_undeclared_chain_is_refused():
    text = _with(lambda items: items.remove(
        next(i for i in items if "chain" in i and i["chain"]["name"] == I4)))
    with pytest.raises(NftParseError, match=f"rule of chain {I4}, which the listing does not declare"):
        parse(text)


@pytest.mark.parametrize("edit,message", [
    (lambda items: _find(items, "set", N4).__setitem__("elem", [{"bogus": 1}]),
     "element is not an address, prefix, range or concatenation"),
    (lambda items: _find(items, "set", N4).__setitem__("elem", "10.0.0.1"), "'elem' must be a list"),
    (lambda items: _find(items, "set", N4).__setitem__("flags", [1]), "flags must be a string"),
    (lambda items: _find(items, "set", N4).__setitem__("elem", [{"prefix": {"addr": "10.0.0.0"}}]),
     "element is not"),
    (lambda items: _find(items, "map", "kpm-egress4").__setitem__("elem", [["10.0.0.1"]]),
     r"map element must be a \[key, data\] pair"),
    (lambda items: _find(items, "map", "kpm-egress4").__setitem__(
        "elem", [["10.0.0.1", {"jump": {}}]]), "map data is not a verdict"),
    (lambda items: _find(items, "map", "kpm-egress4").__setitem__(
        "elem", [["10.0.0.1", {"drop": None}], ["10.0.0.1", {"drop": None}]]), "listed twice"),
    (lambda items: _find(items, "chain", "kpm-forward").__setitem__("prio", "filter"),
     "'prio' must be a number"),
    (lambda items: _find(items, "chain", "kpm-forward").pop("type"), "'type' must be a non-empty"),
    (lambda items: next(i["rule"] for i in items if "rule" in i).__setitem__("comment", 7),
     "'comment' must be a string"),
    (lambda items: next(i["rule"] for i in items if "rule" in i).pop("expr"), "'expr' must be a list"),
    (lambda items: items.append(next(i for i in items if "chain" in i)), "listed twice"),
])
def test_malformed_objects_are_refused_with_where_and_why(edit, message):
    with pytest.raises(NftParseError, match=message) as err:
        parse(_with(edit))
    assert "nft -j listing, nftables[" in str(err.value)


def test_element_options_and_protocol_numbers_are_read_as_the_element():
    def edit(items):
        _find(items, "set", N4)["elem"] = [{"elem": {"val": "10.9.9.9", "counter": {"packets": 1}}}]
        p4 = next(i["set"] for i in items if "set" in i and i["set"]["name"].startswith("kpm-p4-"))
        p4["elem"] = [{"concat": ["10.244.1.9", 6, 5432]}]
    table = parse(_with(edit))
    assert table.set_map()[N4].elements == {"10.9.9.9"}
    (p4,) = [s for s in table.sets if s.name.startswith("kpm-p4-")]
    assert p4.elements == {"10.244.1.9 . tcp . 5432"}


def test_every_rule_of_ours_in_the_fixture_is_tagged():
    rules = [i["rule"] for i in doc()["nftables"] if "rule" in i]
    assert rules and all(tag_of(r.get("comment")) for r in rules)
