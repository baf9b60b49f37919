"""Parse `nft -j list table inet kube-policy-manager` into a lib.nft_state.Table.

JSON rather than the text listing: its structure needs no tokenizer (no
quoting rules, no element lists wrapped over lines), its schema is
versioned, and at our scale it is listed and parsed about as fast (figures
in docs/design.md). Only our table is read; any object of another table in
the listing means it is not what we asked for, and is refused, as is
anything that is not the shape nft prints: we never diff against a state
we could only half read.

Rules are compared by the hash in their comment, so a rule read back keeps
its comment, and no statement unless it is untagged: then its expression
list as compact JSON (what someone else inserted, to show it). Elements are kept as nft spells
them (lib.nft_state explains the spelling); protocol numbers, which nft
prints where /etc/protocols lacks a name, become names.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from lib.nft_state import (
    FAMILY, PROTOCOLS, TABLE, AddressSet, BaseHook, Chain, Rule, Table, VerdictMap, tag_of,
)

SCHEMA_VERSION = 1
_MAX_SHOWN = 120
# What nft says when the table is not there, then the command it refused.
_ABSENT_ERROR = "Error: No such file or directory"
_LIST_COMMAND = f"list table {FAMILY} {TABLE}"
# Set properties nft lists that we never write: any of them is a difference.
_SET_EXTRAS = ("policy", "size", "timeout", "gc-interval", "comment", "stmt", "auto-merge")
_COMPACT = (",", ":")


class NftParseError(ValueError):
    """The listing is not what nft prints for our table."""


def table_absent(stderr: str) -> bool:
    """Whether a failed `nft list table` said our table does not exist, as
    opposed to any other failure (no permission, no namespace, no nft)."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    return _ABSENT_ERROR in lines and any(ln.startswith(_LIST_COMMAND) for ln in lines)


def _shown(value: Any) -> str:
    text = json.dumps(value, separators=_COMPACT)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _error(where: str, why: str, value: Any = None) -> NftParseError:
    tail = f": {_shown(value)}" if value is not None else ""
    return NftParseError(f"nft -j listing, {where}: {why}{tail}")


def _str(body: dict, key: str, where: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _error(where, f"{key!r} must be a non-empty string", body)
    return value


def _int(body: dict, key: str, where: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _error(where, f"{key!r} must be a number", body)
    return value


def _names(value: Any, where: str, what: str) -> tuple[str, ...]:
    """A string or a list of strings (nft prints one flag either way)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _error(where, f"{what} must be a string or a list of strings", value)


# --- elements -----------------------------------------------------------------

def _part(value: Any, kind: str, where: str) -> str:
    if kind == "inet_proto" and isinstance(value, int) and value in PROTOCOLS:
        return PROTOCOLS[value]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _error(where, "element part must be a string or a number", value)


def _element(value: Any, kinds: tuple[str, ...], where: str) -> str:
    """One element (a key) as text: `10.0.0.5`, `10.0.0.0/24`,
    `10.0.0.1-10.0.0.9`, `10.244.1.10 . tcp . 8080`."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return _part(value, kinds[0], where)
    if isinstance(value, dict) and len(value) == 1:
        kind, body = next(iter(value.items()))
        if kind == "prefix" and isinstance(body, dict):
            addr = body.get("addr")
            length = body.get("len")
            if isinstance(addr, str) and isinstance(length, int) and not isinstance(length, bool):
                return f"{addr}/{length}"
        elif kind == "range" and isinstance(body, list) and len(body) == 2:
            return f"{_part(body[0], kinds[0], where)}-{_part(body[1], kinds[0], where)}"
        elif kind == "concat" and isinstance(body, list) and len(body) == len(kinds):
            return " . ".join(_element(p, (k,), where) for p, k in zip(body, kinds))
        elif kind == "elem" and isinstance(body, dict) and "val" in body:
            return _element(body["val"], kinds, where)   # an element with options of its own
    raise _error(where, "element is not an address, prefix, range or concatenation", value)


def _verdict(value: Any, where: str) -> str:
    """`jump kpm-...`, `goto kpm-...`, `drop`, `accept`, `return`, `continue`."""
    if isinstance(value, dict) and len(value) == 1:
        kind, body = next(iter(value.items()))
        if kind in ("jump", "goto") and isinstance(body, dict) and isinstance(body.get("target"), str):
            return f"{kind} {body['target']}"
        if kind in ("accept", "drop", "return", "continue") and body is None:
            return kind
    raise _error(where, "map data is not a verdict", value)


def _set_shape(body: dict, where: str) -> tuple[str, tuple[str, ...], bool, tuple[str, ...]]:
    """Key type (as nft writes it), its parts, the interval flag, and the
    properties we never write."""
    kinds = _names(body.get("type"), where, "type")
    flags = _names(body.get("flags", []), where, "flags")
    extra = tuple(f"flag {f}" for f in flags if f != "interval")
    extra += tuple(f"{k} {_shown(body[k])}" for k in _SET_EXTRAS if k in body)
    return " . ".join(kinds), kinds, "interval" in flags, extra


def _elements(body: dict, where: str) -> list:
    elems = body.get("elem", [])
    if not isinstance(elems, list):
        raise _error(where, "'elem' must be a list", elems)
    return elems


def _address_set(body: dict, where: str) -> AddressSet:
    key, kinds, interval, extra = _set_shape(body, where)
    elems = _elements(body, where)
    plain = [e for e in elems if type(e) is str and e] if len(kinds) == 1 else ()
    if len(plain) == len(elems) and kinds[0] != "inet_proto":
        elements = frozenset(plain)           # bare addresses, most of a listing: as they are
    else:
        elements = frozenset(_element(e, kinds, where) for e in elems)
    return AddressSet(_str(body, "name", where), key, interval, elements, extra)


def _verdict_map(body: dict, where: str) -> VerdictMap:
    key, kinds, interval, extra = _set_shape(body, where)
    data = _str(body, "map", where)
    if data != "verdict":
        extra += (f"data {data}",)
    elements: dict[str, str] = {}
    for pair in _elements(body, where):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _error(where, "map element must be a [key, data] pair", pair)
        element = _element(pair[0], kinds, where)
        if element in elements:
            raise _error(where, f"element {element} listed twice", pair)
        elements[element] = _verdict(pair[1], where) if data == "verdict" else _shown(pair[1])
    return VerdictMap(_str(body, "name", where), key, interval, elements, extra)


# --- chains and rules -----------------------------------------------------------

def _base(body: dict, where: str) -> Optional[BaseHook]:
    if "hook" not in body:
        return None
    policy = body.get("policy", "accept")
    if not isinstance(policy, str):
        raise _error(where, "'policy' must be a string", body)
    return BaseHook(hook=_str(body, "hook", where), priority=_int(body, "prio", where),
                    policy=policy, type=_str(body, "type", where))


def _rule(body: dict, where: str) -> Rule:
    """A tagged rule keeps only its comment, all the diff compares; an
    untagged one also its expressions, to show what someone inserted."""
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise _error(where, "'comment' must be a string", body)
    expr = body.get("expr")
    if not isinstance(expr, list):
        raise _error(where, "'expr' must be a list", body)
    if tag_of(comment) is not None:
        return Rule("", comment)
    return Rule(json.dumps(expr, separators=_COMPACT), comment)


# --- the listing ----------------------------------------------------------------

def _items(text: str) -> list:
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise NftParseError(f"nft -j listing: not JSON: {err}") from None
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise NftParseError("nft -j listing: expected an object with an 'nftables' list, got "
                            + _shown(doc))
    return items


def _check_schema(body: Any, where: str) -> None:
    version = body.get("json_schema_version", SCHEMA_VERSION) if isinstance(body, dict) else None
    if version != SCHEMA_VERSION:
        raise _error(where, f"JSON schema version {version!r}, this program reads "
                            f"version {SCHEMA_VERSION}", body)


def parse(text: str) -> Table:
    """Our table from nft's JSON listing of it; objects other than chains,
    rules, sets and maps (counters, quotas, flowtables) are skipped."""
    found = False
    flags: tuple[str, ...] = ()
    chains: dict[str, tuple[Optional[BaseHook], list[Rule]]] = {}
    sets: dict[str, AddressSet] = {}
    maps: dict[str, VerdictMap] = {}
    for i, item in enumerate(_items(text)):
        where = f"nftables[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise _error(where, "expected an object with one key", item)
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            _check_schema(body, where)
            continue
        if not isinstance(body, dict):
            raise _error(where, f"{kind} must be an object", body)
        owner = (body.get("family"), body.get("name") if kind == "table" else body.get("table"))
        if owner != (FAMILY, TABLE):
            raise _error(where, f"{kind} of table {owner[0]} {owner[1]}, not of {FAMILY} {TABLE}",
                         body)
        where = f"{where} ({kind} {body.get('name') or body.get('chain') or ''})".replace(" )", ")")
        if kind == "table":
            found = True
            # nft 1.0.6 prints a table's flags wrongly ("flags": "inet" for dormant):
            # only whether there are any can be trusted.
            if "flags" in body:
                flags = (f"flags {_shown(body['flags'])}",)
        elif kind == "chain":
            name = _str(body, "name", where)
            if name in chains:
                raise _error(where, f"chain {name} listed twice")
            chains[name] = (_base(body, where), [])
        elif kind == "rule":
            chain = _str(body, "chain", where)
            if chain not in chains:
                raise _error(where, f"rule of chain {chain}, which the listing does not declare",
                             body)
            chains[chain][1].append(_rule(body, where))
        elif kind == "set":
            s = _address_set(body, where)
            if s.name in sets or s.name in maps:
                raise _error(where, f"set {s.name} listed twice")
            sets[s.name] = s
        elif kind == "map":
            m = _verdict_map(body, where)
            if m.name in sets or m.name in maps:
                raise _error(where, f"map {m.name} listed twice")
            maps[m.name] = m
    if not found:
        if chains or sets or maps:
            raise NftParseError(f"nft -j listing: objects of {FAMILY} {TABLE} without the table")
        raise NftParseError(f"nft -j listing: no table {FAMILY} {TABLE} in it")
    return Table(
        chains=tuple(Chain(n, tuple(rules), base) for n, (base, rules) in sorted(chains.items())),
        sets=tuple(sets[n] for n in sorted(sets)),
        maps=tuple(maps[n] for n in sorted(maps)),
        exists=True, flags=flags)

