"""The nft planner: desired table x table read back (real listings from
fixtures/nft) -> one nft -f payload and its change records."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lib.nft_parse import parse
from lib.nft_plan import ELEMENTS_PER_LINE, NftPlan, cleanup, diff, render
from lib.nft_state import (
    ABSENT, ADDR, FORWARD, AddressSet, BaseHook, Chain, Rule, Table, VerdictMap, hashed_name,
    tagged,
)
from tests.unit.fixtures.nft.our_table import DESIRED, E6, I4, N4, N6

FIXTURES = Path(__file__).parent / "fixtures" / "nft"
T = "inet kube-policy-manager"


def kernel(name: str = "table.json") -> Table:
    return parse((FIXTURES / name).read_text())


def replace(table: Table, **changes) -> Table:
    return dataclasses.replace(table, **changes)


def with_chain(table: Table, chain: Chain) -> Table:
    chains = {c.name: c for c in table.chains}
    chains[chain.name] = chain
    return replace(table, chains=tuple(chains[n] for n in sorted(chains)))


def with_set(table: Table, s: AddressSet) -> Table:
    sets = {x.name: x for x in table.sets}
    sets[s.name] = s
    return replace(table, sets=tuple(sets[n] for n in sorted(sets)))


def with_map(table: Table, m: VerdictMap) -> Table:
    maps = {x.name: x for x in table.maps}
    maps[m.name] = m
    return replace(table, maps=tuple(maps[n] for n in sorted(maps)))


def lines(plan: NftPlan) -> list[str]:
    return plan.payload.splitlines()


def kinds(plan: NftPlan) -> list[tuple[str, str, bool]]:
    return [(c.kind, c.name, c.drift) for c in plan.changes]


# --- in sync ----------------------------------------------------------------

def test_in_sync_plans_nothing():
    plan = diff(DESIRED, kernel())
    assert plan.empty and plan.payload == "" and plan.changes == () and plan.lines == 0
    assert render(plan) == ""


# --- small changes, small payloads ---------------------------------------------

def test_one_element_added_is_one_add_element_line():
    s = DESIRED.set_map()[N4]
    desired = with_set(DESIRED, replace(s, elements=s.elements | {"10.244.9.9"}))
    plan = diff(desired, kernel())
    assert lines(plan) == [f"add element {T} {N4} {{ 10.244.9.9 }}"]
    assert kinds(plan) == [("set-members", N4, False)]
    assert plan.changes[0].detail == "+1 -0 elements" and plan.changes[0].family == 4


def test_one_element_removed_is_one_delete_element_line():
    s = DESIRED.set_map()[N6]
    (gone,) = [e for e in s.elements if e.startswith("2001:")]
    plan = diff(with_set(DESIRED, replace(s, elements=s.elements - {gone})), kernel())
    assert lines(plan) == [f"delete element {T} {N6} {{ {gone} }}"]
    assert plan.changes[0].family == 6


def test_a_changed_chain_is_flushed_and_rewritten_alone():
    chain = DESIRED.chain_map()[I4]
    new = replace(chain, rules=(tagged("tcp dport 8443 return", "new rule"),) + chain.rules)
    plan = diff(with_chain(DESIRED, new), kernel())
    assert lines(plan)[0] == f"flush chain {T} {I4}"
    assert lines(plan)[1:] == [f'add rule {T} {I4} {r.statement} comment "{r.comment}"'
                               for r in new.rules]
    assert kinds(plan) == [("chain-rewrite", I4, False)]


def test_a_new_pod_gets_its_chain_elements_and_map_entry_in_one_payload():
    chain = Chain(hashed_name("i", 4, "db"), (tagged("tcp dport 5432 return", "db"),
                                              tagged("reject", "db")))
    ingress = DESIRED.map_map()["kpm-ingress4"]
    desired = with_map(with_chain(DESIRED, chain), replace(
        ingress, elements={**ingress.elements, "10.244.1.8": f"jump {chain.name}"}))
    out = lines(diff(desired, kernel()))
    assert out == [
        f"add chain {T} {chain.name}",
        f"add element {T} kpm-ingress4 {{ 10.244.1.8 : jump {chain.name} }}",
    ] + [f'add rule {T} {chain.name} {r.statement} comment "{r.comment}"' for r in chain.rules]


def test_a_pod_moved_to_another_chain_is_a_delete_then_add_of_its_element():
    egress = DESIRED.map_map()["kpm-egress4"]
    desired = with_map(DESIRED, replace(egress, elements={"10.244.1.5": f"jump {I4}"}))
    plan = diff(desired, kernel())
    assert lines(plan) == [f"delete element {T} kpm-egress4 {{ 10.244.1.5 }}",
                           f"add element {T} kpm-egress4 {{ 10.244.1.5 : jump {I4} }}"]
    assert plan.changes[0].detail == "+0 -0 ~1 elements"


def test_stale_objects_go_last_sets_before_chains():
    chain = DESIRED.chain_map()[E6]
    desired = replace(DESIRED, chains=tuple(c for c in DESIRED.chains if c.name != E6),
                      sets=tuple(s for s in DESIRED.sets if s.name != N6),
                      maps=tuple(m for m in DESIRED.maps if m.name != "kpm-egress6"))
    desired = with_chain(desired, replace(
        DESIRED.chain_map()[FORWARD],
        rules=tuple(r for r in DESIRED.chain_map()[FORWARD].rules if "egress6" not in r.statement)))
    desired = with_chain(desired, replace(
        DESIRED.chain_map()["kpm-input"],
        rules=tuple(r for r in DESIRED.chain_map()["kpm-input"].rules if "egress6" not in r.statement)))
    i6 = desired.chain_map()[hashed_name("i", 6, "web")]
    desired = with_chain(desired, replace(i6, rules=tuple(r for r in i6.rules if N6 not in r.statement)))
    out = lines(diff(desired, kernel()))
    rewrites = [i for i, ln in enumerate(out) if ln.startswith("add rule")]
    assert out.index(f"flush chain {T} {chain.name}") > max(rewrites)
    assert out.index(f"delete set {T} {N6}") > out.index(f"flush chain {T} {chain.name}")
    assert out.index(f"delete map {T} kpm-egress6") > out.index(f"flush chain {T} {chain.name}")
    assert out[-1] == f"delete chain {T} {chain.name}"


def test_interval_elements_are_deleted_before_overlapping_ones_are_added():
    s = DESIRED.set_map()[N4]
    assert "10.244.2.0/23" in s.elements      # 10.244.2.0/24 and 10.244.3.0/24, merged
    desired = with_set(DESIRED, replace(s, elements=(s.elements - {"10.244.2.0/23"})
                                        | {"10.244.2.0/24", "10.244.3.0/25"}))
    out = lines(diff(desired, kernel()))
    assert out == [f"delete element {T} {N4} {{ 10.244.2.0/23 }}",
                   f"add element {T} {N4} {{ 10.244.2.0/24, 10.244.3.0/25 }}"]


def test_many_elements_are_split_over_lines():
    n = ELEMENTS_PER_LINE + 3
    elements = frozenset(f"10.1.{i // 250}.{i % 250}" for i in range(n))
    s = AddressSet(hashed_name("n", 4, "many"), ADDR[4], True, elements)
    out = lines(diff(with_set(DESIRED, s), kernel()))
    assert out[0] == f"add set {T} {s.name} {{ type ipv4_addr; flags interval; }}"
    assert [ln.count(",") + 1 for ln in out[1:]] == [ELEMENTS_PER_LINE, 3]
    assert {e for ln in out[1:] for e in ln.split("{ ")[1].rstrip(" }").split(", ")} == elements


# --- drift ----------------------------------------------------------------------

def test_what_someone_changed_is_repaired_and_named_drift_where_it_is():
    plan = diff(DESIRED, kernel("drifted.json"))
    got = {(c.kind, c.name): c for c in plan.changes}
    assert got["chain-rewrite", I4].drift and "1 untagged rule" in got["chain-rewrite", I4].detail
    assert got["chain-rewrite", E6].drift and "emptied" in got["chain-rewrite", E6].detail
    # missing elements: pods come and go
    assert not got["set-members", N4].drift and got["set-members", N4].detail == "+1 -0 elements"
    assert not got["map-elements", "kpm-ingress4"].drift
    assert f"add element {T} {N4} {{ 10.244.1.7 }}" in lines(plan)
    assert f"add element {T} kpm-ingress4 {{ 10.244.1.6 : jump {I4} }}" in lines(plan)
    assert len(plan.changes) == 4


def test_a_chain_that_lost_its_reject_rules_is_drift():
    chain = DESIRED.chain_map()[I4]
    current = with_chain(kernel(), replace(chain, rules=chain.rules[:-2]))
    (change,) = diff(DESIRED, current).changes
    assert change.drift and "lost its final rules" in change.detail


def test_a_policy_edit_is_not_drift():
    chain = DESIRED.chain_map()[I4]
    current = with_chain(kernel(), replace(chain, rules=(tagged("tcp dport 1 return", "old"),)
                                           + chain.rules))
    (change,) = diff(DESIRED, current).changes
    assert (change.kind, change.drift) == ("chain-rewrite", False)


def test_a_missing_base_chain_is_drift():
    current = replace(kernel(), chains=tuple(c for c in kernel().chains if c.name != "kpm-input"))
    plan = diff(DESIRED, current)
    assert kinds(plan) == [("chain-add", "kpm-input", True)]
    assert lines(plan)[0] == (f"add chain {T} kpm-input {{ type filter hook input priority -10; "
                              "policy accept; }")


@pytest.mark.parametrize("base,reason", [
    (BaseHook("forward", 0), "priority 0"),
    (BaseHook("forward", -10, "drop"), "policy drop"),
    (BaseHook("input"), "hook input"),
    (None, "a regular chain"),
])
def test_a_base_chain_of_the_wrong_shape_rebuilds_the_table(base, reason):
    current = with_chain(kernel(), replace(kernel().chain_map()[FORWARD], base=base))
    plan = diff(DESIRED, current)
    assert plan.changes[0].kind == "table-recreate" and plan.changes[0].drift
    assert reason in plan.changes[0].detail and FORWARD in plan.changes[0].detail
    assert lines(plan) == [f"delete table {T}"] + lines(diff(DESIRED, ABSENT))
    assert all(not c.drift for c in plan.changes[1:])


@pytest.mark.parametrize("name,reason", [
    ("dormant.json", 'table has flags "inet"'),
    ("foreign-objects.json", "holds chain someones-chain, not named by us"),
])
def test_a_table_someone_reshaped_is_rebuilt(name, reason):
    plan = diff(DESIRED, kernel(name))
    assert kinds(plan)[0] == ("table-recreate", "kube-policy-manager", True)
    assert reason in plan.changes[0].detail
    assert lines(plan)[:2] == [f"delete table {T}", f"add table {T}"]


def test_a_set_of_the_wrong_type_or_flags_rebuilds_the_table():
    s = kernel().set_map()[N4]
    for other in (replace(s, interval=False), replace(s, extra=("flag timeout",)),
                  replace(s, key=ADDR[6])):
        plan = diff(DESIRED, with_set(kernel(), other))
        assert plan.changes[0].kind == "table-recreate" and f"set {N4}:" in plan.changes[0].detail


def test_a_missing_table_is_built_whole_and_drift_only_when_expected():
    plan = diff(DESIRED, ABSENT)
    assert kinds(plan)[0] == ("table-create", "kube-policy-manager", False)
    out = lines(plan)
    assert out[0] == f"add table {T}"
    first_rule = next(i for i, ln in enumerate(out) if ln.startswith("add rule"))
    assert all(ln.startswith(("add chain", "add set", "add map", "add element"))
               for ln in out[1:first_rule])
    assert all(ln.startswith("add rule") for ln in out[first_rule:])
    assert len([ln for ln in out if ln.startswith("add rule")]) == \
        sum(len(c.rules) for c in DESIRED.chains)
    expected = diff(DESIRED, ABSENT, table_expected=True)
    assert expected.payload == plan.payload
    assert expected.changes[0].drift and expected.changes[0].detail == "table missing"


def test_an_empty_desired_table_empties_ours_but_keeps_it():
    plan = diff(Table(), kernel())
    out = lines(plan)
    assert f"delete table {T}" not in out
    assert {ln.split()[0] + " " + ln.split()[1] for ln in out} == \
        {"flush chain", "delete chain", "delete set", "delete map"}


# --- what the planner refuses to write ----------------------------------------------

def _one_chain(*rules: Rule, base=None) -> Table:
    return Table(chains=(Chain("kpm-x", rules, base),))


@pytest.mark.parametrize("desired,message", [
    (_one_chain(tagged("tcp dport 22 accept", "ssh")), "accepts"),
    (_one_chain(tagged("ip saddr vmap { 10.0.0.1 : accept }", "x")), "accepts"),
    (_one_chain(base=BaseHook("forward", policy="drop")), "policy must be accept"),
    (_one_chain(tagged("jump kpm-nowhere", "x")), "jump kpm-nowhere, which the desired"),
    (_one_chain(tagged("ip saddr @kpm-n4-none return", "x")), "set @kpm-n4-none"),
    (_one_chain(tagged("return; flush ruleset", "x")), "one nft statement"),
    (_one_chain(tagged("return # x", "x")), "one nft statement"),
    (_one_chain(tagged('log prefix "x', "x")), "quotes paired"),
    (_one_chain(Rule("return", "no tag")), "comment 'no tag' must be kpm:<hash>"),
    (_one_chain(Rule("return", "kpm:0123456789ab " + "x" * 200)), "at most 128"),
    (Table(chains=(Chain("forward"),)), "name 'forward'"),
    (Table(chains=(Chain("kpm-x"), Chain("kpm-x"))), "unique"),
    (Table(sets=(AddressSet("kpm-s", "mark"),)), "key 'mark'"),
    (Table(sets=(AddressSet("kpm-s", ADDR[4], True, frozenset({"10.0.0.5/32"})),)),
     "element '10.0.0.5/32' is listed by nft as '10.0.0.5'"),
    (Table(sets=(AddressSet("kpm-s", ADDR[4], True, frozenset({"fd00::1"})),)), "not of type"),
    (Table(maps=(VerdictMap("kpm-m", ADDR[4], False, {"10.0.0.1": "accept"}),)), "verdict 'accept'"),
    (Table(maps=(VerdictMap("kpm-m", ADDR[4], False, {"10.0.0.1": "jump kpm-y"}),)),
     "verdict 'jump kpm-y'"),
    (Table(flags=("dormant",)), "without flags"),
])
def test_a_desired_table_that_would_not_load_or_would_accept_is_refused(desired, message):
    with pytest.raises(ValueError, match=message):
        diff(desired, ABSENT)


def test_a_non_canonical_element_is_refused_also_when_only_it_is_new():
    s = DESIRED.set_map()[N4]
    with pytest.raises(ValueError, match=f"nft set {N4}: element '10.244.9.0/16'"):
        diff(with_set(DESIRED, replace(s, elements=s.elements | {"10.244.9.0/16"})), kernel())


# --- cleanup and rendering --------------------------------------------------------

def test_cleanup_deletes_our_table_and_names_nothing_else():
    plan = cleanup(kernel())
    assert plan.payload == f"delete table {T}\n"
    (change,) = plan.changes
    assert (change.kind, change.name) == ("table-delete", "kube-policy-manager")
    rules = sum(len(c.rules) for c in DESIRED.chains)
    assert change.detail == f"6 chains, {rules} rules, 5 sets, 4 maps"
    assert cleanup(ABSENT).empty


def test_every_line_names_our_table_only():
    for plan in (diff(DESIRED, ABSENT), diff(DESIRED, kernel("drifted.json")),
                 diff(DESIRED, kernel("dormant.json")), cleanup(kernel())):
        for line in lines(plan):
            verb, what, family, table = line.split()[:4]
            assert (family, table) == ("inet", "kube-policy-manager"), line


def test_render_is_the_payload_under_a_header():
    plan = diff(DESIRED, ABSENT)
    assert render(plan) == f"# nft -f - : one transaction, {plan.lines} lines\n{plan.payload}"
