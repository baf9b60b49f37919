"""Diff the desired nftables table against the one read back, and render
the one `nft -f -` transaction that turns one into the other.

nft applies a whole payload or nothing, and packets see the old ruleset
or the new one, never a mix: hitless needs no step order across
processes, only an order inside the payload that nft accepts, since each
command must find what it names:

  1. add chain (new chains, empty), add set / add map (new sets and maps)
  2. delete element (stale elements, and map elements whose verdict
     changes): before the adds, as an interval set refuses an element
     that overlaps one still there
  3. add element
  4. flush chain + add rule, for each chain that differs; add rule for new ones
  5. flush chain of each stale chain, so nothing refers to stale objects
  6. delete set / delete map (stale), then delete chain (stale): a chain
     is in use while a rule jumps to it or a map element holds it

A table that is missing, or whose objects have the wrong shape (a base
chain with another hook, priority, type or policy; a set of another type
or flags; table flags such as dormant; objects not named kpm-...), is
built whole: `delete table`
(when present), `add table` and everything, in the same one transaction.
The kernel cannot change a base chain's hook or priority in place, and a
set in use cannot be deleted without rewriting its users; rebuilding the
table is as atomic as any other transaction.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from lib.nft_state import (
    ADDR, FAMILY, KEY_FAMILY, MAX_COMMENT, TABLE, AddressSet, Chain, Table,
    VerdictMap, canonical_element, name_family, valid_name,
)
from lib.plan import Change, hashes_drift
from lib.ruleset import COMMENT_TAG, HASH_LEN

ELEMENTS_PER_LINE = 500        # elements per add/delete element line
_T = f"{FAMILY} {TABLE}"
_REFERENCE = re.compile(r"(?:^|[\s{,:])(jump|goto)\s+([^\s,}]+)|@([^\s,}]+)")
_REFUSING = ("reject", "drop")
_UNSAFE_STATEMENT = re.compile(r"[\n\r;#]")
_OUR_COMMENT = re.compile(re.escape(COMMENT_TAG) + r"[0-9a-f]{%d}(?: [^\"\n\r\\]*)?" % HASH_LEN)
_BASE_POLICY = "accept"        # we only narrow: a base chain of ours lets through what it does not refuse


@dataclass(frozen=True)
class NftPlan:
    payload: str = ""                   # nft -f input, one transaction
    changes: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.payload

    @property
    def lines(self) -> int:
        return self.payload.count("\n")


# --- checks -------------------------------------------------------------------

def _tokens(statement: str) -> list[str]:
    return statement.split()


@functools.lru_cache(maxsize=65536)
def _rule_references(statement: str, comment: Optional[str]) -> tuple[tuple[str, str], ...]:
    """What one rule names, (verb, name) with the verb `jump`, `goto` or `@`
    for a set, once its statement and comment are found safe to write.
    Cached: a loop checks the same rules every cycle, and which of those
    names exist is checked apart."""
    s, c = statement, comment
    if not s.strip() or _UNSAFE_STATEMENT.search(s) or s.count('"') % 2:
        raise ValueError(f"statement {s!r} must be one nft statement "
                         "(no newline, ';' or '#', quotes paired)")
    if "accept" in _tokens(s):
        raise ValueError(f"statement {s!r} accepts; our rules only return or refuse")
    if c is None or len(c) > MAX_COMMENT or not _OUR_COMMENT.fullmatch(c):
        raise ValueError(f"comment {c!r} must be kpm:<hash> text, at most "
                         f"{MAX_COMMENT} characters, without quotes or backslashes")
    return tuple((m.group(1), m.group(2)) if m.group(2) is not None else ("@", m.group(3))
                 for m in _REFERENCE.finditer(s))


def _check_rule(chain: Chain, i: int, names: set[str], sets: set[str]) -> None:
    rule = chain.rules[i]
    try:
        references = _rule_references(rule.statement, rule.comment)
    except ValueError as err:
        raise ValueError(f"nft chain {chain.name}: rules[{i}]: {err}") from None
    for verb, name in references:
        if name not in (sets if verb == "@" else names):
            what = f"set @{name}" if verb == "@" else f"{verb} {name}"
            raise ValueError(f"nft chain {chain.name}: rules[{i}]: {what}, which the desired "
                             "state does not hold")


def _check_verdict(where: str, verdict: str, names: set[str]) -> None:
    kind, _, target = verdict.partition(" ")
    if kind in ("jump", "goto") and target in names:
        return
    if kind in ("drop", "return", "continue") and not target:
        return
    raise ValueError(f"{where}: verdict {verdict!r} must be drop, return, continue, or jump/goto "
                     "to a chain of the desired state")


def _check_desired(desired: Table) -> None:
    """Refuse a desired table that would not load or would do what we never
    do (accept, a base chain policy other than accept); better an error
    naming the object than a failing transaction."""
    if not desired.exists or desired.flags:
        raise ValueError("nft desired table: must exist, without flags")
    names = {c.name for c in desired.chains}
    sets = [s.name for s in desired.sets] + [m.name for m in desired.maps]
    for name in [c.name for c in desired.chains] + sets:
        if not valid_name(name):
            raise ValueError(f"nft name {name!r}: must be kpm- then lower-case letters, digits "
                             "and '-', at most 255 characters")
    if len(names) != len(desired.chains) or len(set(sets)) != len(sets):
        raise ValueError("nft desired table: chain, set and map names must be unique")
    set_names = set(sets)
    for chain in desired.chains:
        if chain.base is not None and chain.base.policy != _BASE_POLICY:
            raise ValueError(f"nft chain {chain.name}: base chain policy must be accept, "
                             f"not {chain.base.policy}")
        for i in range(len(chain.rules)):
            _check_rule(chain, i, names, set_names)
    for s in desired.sets:
        if s.key not in KEY_FAMILY or (s.interval and s.key not in ADDR.values()) or s.extra:
            raise ValueError(f"nft set {s.name}: key {s.key!r} (interval {s.interval}) is not "
                             "an address or address . inet_proto . inet_service")
    for m in desired.maps:
        if m.key not in ADDR.values() or m.extra:
            raise ValueError(f"nft map {m.name}: key {m.key!r} is not an address type")
        for element, verdict in m.elements.items():
            _check_verdict(f"nft map {m.name}: element {element}", verdict, names)


def _check_elements(name: str, key: str, interval: bool, elements: Iterable[str]) -> None:
    """Elements about to be added must be spelled as nft lists them, or the
    next read would never match and every cycle would write them again."""
    for e in elements:
        try:
            spelled = canonical_element(key, interval, e)
        except ValueError as err:
            raise ValueError(f"nft set {name}: element {e!r}: {err}") from None
        if spelled != e:
            raise ValueError(f"nft set {name}: element {e!r} is listed by nft as {spelled!r}")


# --- payload lines ---------------------------------------------------------------

def _add_chain(chain: Chain) -> str:
    if chain.base is None:
        return f"add chain {_T} {chain.name}"
    return f"add chain {_T} {chain.name} {{ {chain.base.spec()} }}"


def _add_set(s: AddressSet) -> str:
    flags = " flags interval;" if s.interval else ""
    return f"add set {_T} {s.name} {{ type {s.key};{flags} }}"


def _add_map(m: VerdictMap) -> str:
    flags = " flags interval;" if m.interval else ""
    return f"add map {_T} {m.name} {{ type {m.key} : verdict;{flags} }}"


def _element_lines(verb: str, name: str, elements: list[str]) -> list[str]:
    return [f"{verb} element {_T} {name} {{ {', '.join(elements[i:i + ELEMENTS_PER_LINE])} }}"
            for i in range(0, len(elements), ELEMENTS_PER_LINE)]


def _rule_lines(chain: Chain) -> list[str]:
    return [f'add rule {_T} {chain.name} {r.statement} comment "{r.comment}"' for r in chain.rules]


def _pairs(elements: dict[str, str], keys: Iterable[str]) -> list[str]:
    return [f"{k} : {elements[k]}" for k in sorted(keys)]


def _lines(groups: Iterable[list[str]]) -> str:
    return "".join(line + "\n" for group in groups for line in group)


# --- building the whole table -------------------------------------------------------

def _shape_problems(desired: Table, current: Table) -> list[str]:
    """What of the current table cannot be brought in line without
    rebuilding it; [] when an incremental change does."""
    why: list[str] = []
    if current.flags:
        why.append(f"table has {', '.join(current.flags)}")
    # Someone else's objects in our table, under names nft's syntax may not
    # even be able to write back: deleting the table needs no name.
    foreign = [f"{kind} {name}" for kind, items in
               (("chain", current.chains), ("set", current.sets), ("map", current.maps))
               for name in (x.name for x in items) if not valid_name(name)]
    if foreign:
        why.append(f"holds {', '.join(foreign)}, not named by us")
    chains = current.chain_map()
    for chain in desired.chains:
        have = chains.get(chain.name)
        if have is not None and have.base != chain.base:
            why.append(f"chain {chain.name}: {_hook_text(have)}, want {_hook_text(chain)}")
    sets, maps = current.set_map(), current.map_map()
    for s in desired.sets:
        if s.name in maps:
            why.append(f"set {s.name}: exists as a map")
        elif s.name in sets and _set_shape(sets[s.name]) != _set_shape(s):
            why.append(f"set {s.name}: {_shape_text(sets[s.name])}, want {_shape_text(s)}")
    for m in desired.maps:
        if m.name in sets:
            why.append(f"map {m.name}: exists as a set")
        elif m.name in maps and _set_shape(maps[m.name]) != _set_shape(m):
            why.append(f"map {m.name}: {_shape_text(maps[m.name])}, want {_shape_text(m)}")
    return why


def _hook_text(chain: Chain) -> str:
    b = chain.base
    if b is None:
        return "a regular chain"
    return f"type {b.type} hook {b.hook} priority {b.priority} policy {b.policy}"


def _set_shape(s: AddressSet | VerdictMap) -> tuple:
    return (s.key, s.interval, s.extra)


def _shape_text(s: AddressSet | VerdictMap) -> str:
    return " ".join([f"type {s.key}"] + (["flags interval"] if s.interval else []) + list(s.extra))


def _build(desired: Table, current: Table, why: list[str], expected: bool) -> NftPlan:
    head = [f"delete table {_T}"] if current.exists else []
    head.append(f"add table {_T}")
    if current.exists:
        changes = [Change("table-recreate", 0, TABLE, "; ".join(why), drift=True)]
    else:
        changes = [Change("table-create", 0, TABLE, "table missing" if expected else "",
                          drift=expected)]
    declare, elements = [], []
    for chain in desired.chains:
        declare.append(_add_chain(chain))
        changes.append(Change("chain-add", name_family(chain.name), chain.name,
                              f"{len(chain.rules)} rules"))
    for s in desired.sets:
        _check_elements(s.name, s.key, s.interval, s.elements)
        declare.append(_add_set(s))
        elements += _element_lines("add", s.name, sorted(s.elements))
        changes.append(Change("set-create", s.family, s.name, f"+{len(s.elements)} elements"))
    for m in desired.maps:
        _check_elements(m.name, m.key, m.interval, m.elements)
        declare.append(_add_map(m))
        elements += _element_lines("add", m.name, _pairs(dict(m.elements), m.elements))
        changes.append(Change("map-create", m.family, m.name, f"+{len(m.elements)} elements"))
    rules = [line for chain in desired.chains for line in _rule_lines(chain)]
    return NftPlan(_lines([head, declare, elements, rules]), tuple(changes))


# --- the incremental diff ---------------------------------------------------------

def _refuses(chain: Chain, i: int) -> bool:
    return any(t in _REFUSING for t in _tokens(chain.rules[i].statement))


def _diff_chains(desired: Table, current: Table):
    declare, rewrite, changes = [], [], []
    have = current.chain_map()
    for chain in desired.chains:
        old = have.get(chain.name)
        if old is None:
            declare.append(_add_chain(chain))
            rewrite += _rule_lines(chain)
            lost = chain.base is not None      # written with the table, never apart from it
            changes.append(Change("chain-add", name_family(chain.name), chain.name,
                                  f"{len(chain.rules)} rules" + ("; base chain missing" if lost else ""),
                                  drift=lost))
        elif old.hashes != chain.hashes:
            why = hashes_drift(chain.hashes, old.hashes, lambda i: _refuses(chain, i))
            rewrite.append(f"flush chain {_T} {chain.name}")
            rewrite += _rule_lines(chain)
            changes.append(Change("chain-rewrite", name_family(chain.name), chain.name,
                                  f"rewrite {len(chain.rules)} rules" + (f"; {why}" if why else ""),
                                  drift=bool(why)))
    return declare, rewrite, changes


def _diff_sets(desired: Table, current: Table):
    declare, dels, adds, changes = [], [], [], []
    have = current.set_map()
    for s in desired.sets:
        old = have.get(s.name)
        plus = sorted(s.elements - old.elements) if old else sorted(s.elements)
        minus = sorted(old.elements - s.elements) if old else []
        _check_elements(s.name, s.key, s.interval, plus)
        if old is None:
            declare.append(_add_set(s))
            changes.append(Change("set-create", s.family, s.name, f"+{len(plus)} elements"))
        elif plus or minus:
            changes.append(Change("set-members", s.family, s.name,
                                  f"+{len(plus)} -{len(minus)} elements"))
        dels += _element_lines("delete", s.name, minus)
        adds += _element_lines("add", s.name, plus)
    return declare, dels, adds, changes


def _diff_maps(desired: Table, current: Table):
    declare, dels, adds, changes = [], [], [], []
    have = current.map_map()
    for m in desired.maps:
        want = dict(m.elements)
        old = dict(have[m.name].elements) if m.name in have else None
        if old is None:
            declare.append(_add_map(m))
            plus, minus, moved = sorted(want), [], []
        else:
            plus = sorted(k for k in want if k not in old)
            minus = sorted(k for k in old if k not in want)
            moved = sorted(k for k in want if k in old and old[k] != want[k])
        _check_elements(m.name, m.key, m.interval, plus)
        dels += _element_lines("delete", m.name, sorted(minus + moved))
        adds += _element_lines("add", m.name, _pairs(want, plus + moved))
        if old is None:
            changes.append(Change("map-create", m.family, m.name, f"+{len(plus)} elements"))
        elif plus or minus or moved:
            changes.append(Change("map-elements", m.family, m.name,
                                  f"+{len(plus)} -{len(minus)} ~{len(moved)} elements"))
    return declare, dels, adds, changes


def _stale(desired: Table, current: Table):
    flush, delete_sets, delete_chains, changes = [], [], [], []
    wanted_chains = {c.name for c in desired.chains}
    wanted_sets = {s.name for s in desired.sets} | {m.name for m in desired.maps}
    for chain in current.chains:
        if chain.name not in wanted_chains:
            flush.append(f"flush chain {_T} {chain.name}")
            delete_chains.append(f"delete chain {_T} {chain.name}")
            changes.append(Change("chain-delete", name_family(chain.name), chain.name,
                                  f"{len(chain.rules)} rules"))
    for s in current.sets:
        if s.name not in wanted_sets:
            delete_sets.append(f"delete set {_T} {s.name}")
            changes.append(Change("set-destroy", s.family, s.name, f"{len(s.elements)} elements"))
    for m in current.maps:
        if m.name not in wanted_sets:
            delete_sets.append(f"delete map {_T} {m.name}")
            changes.append(Change("map-destroy", m.family, m.name, f"{len(m.elements)} elements"))
    return flush, delete_sets, delete_chains, changes


def diff(desired: Table, current: Table, table_expected: bool = False) -> NftPlan:
    """The plan that makes our table in the kernel equal `desired`; empty
    when they are equal. Nothing outside our table is ever named.

    Drift (Change.drift) is flagged where no earlier desired state explains
    the kernel: the table missing while `table_expected` (the caller has
    seen or written it before: a first start finds no table either), the
    table or an object of the wrong shape, a base chain missing from an
    existing table, and in a chain: untagged rules, duplicated rules, an
    emptied chain, a chain that lost its final reject rules. Elements
    missing from or extra in a set or map are not drift: pods come and go.
    """
    _check_desired(desired)
    why = _shape_problems(desired, current) if current.exists else []
    if not current.exists or why:
        return _build(desired, current, why, table_expected)
    declare_chains, rewrite, chain_changes = _diff_chains(desired, current)
    declare_sets, set_dels, set_adds, set_changes = _diff_sets(desired, current)
    declare_maps, map_dels, map_adds, map_changes = _diff_maps(desired, current)
    flush, delete_sets, delete_chains, stale_changes = _stale(desired, current)
    payload = _lines([declare_chains, declare_sets, declare_maps, set_dels, map_dels,
                      set_adds, map_adds, rewrite, flush, delete_sets, delete_chains])
    return NftPlan(payload, tuple(set_changes + map_changes + chain_changes + stale_changes))


def cleanup(current: Table) -> NftPlan:
    """Remove our table, and so everything in it; nothing else changes."""
    if not current.exists:
        return NftPlan()
    rules = sum(len(c.rules) for c in current.chains)
    detail = (f"{len(current.chains)} chains, {rules} rules, {len(current.sets)} sets, "
              f"{len(current.maps)} maps")
    return NftPlan(f"delete table {_T}\n", (Change("table-delete", 0, TABLE, detail),))


def render(plan: NftPlan) -> str:
    """The payload as applied, under a `# ` header naming the command."""
    if plan.empty:
        return ""
    return f"# nft -f - : one transaction, {plan.lines} lines\n{plan.payload}"

