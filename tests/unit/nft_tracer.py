"""A packet tracer for the nftables table that lib/nft_render.py writes.

It walks a lib.nft_state.Table the way the kernel walks our inet table:
from the base chain of the hook (policy accept) through the per-family
chains, the verdict maps (`ip saddr vmap @map`: an element's `jump` or
`goto`, nothing when no element holds the address), jumps, gotos and
returns, and the lookups of interval, plain and concatenated sets. Only
the statement grammar of nft_render.match_statement and its verdicts is
understood; anything else raises, so a test can never pass because a
statement was silently ignored.

Its face is the one of tests/unit/tracer.py (the iptables tracer): the
same Packet, `Tracer(table, family).verdict("FORWARD" | "INPUT", packet)`
giving ALLOW or REJECT, `logged` holding (NFLOG or LOG, prefix) of the
last walk (`log ... group N` is NFLOG, a `log` without a group is LOG),
`path` the chains walked. A `limit` is taken as not yet reached, and is
accepted only in front of a log statement.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Union

from lib.nft_state import (ADDR, ADDR_PROTO_PORT, MAX_COMMENT, AddressSet, Chain, Table,
                           canonical_element, name_family, tag_of, valid_name)
from lib.ruleset import DesiredState
from tests.unit import tracer as iptables_tracer
from tests.unit.tracer import ALLOW, PORT_PROTOCOLS, REJECT, Packet, TraceError

__all__ = ["ALLOW", "REJECT", "Packet", "TraceError", "Tracer", "trace", "tracer_for"]

HOOKS = {"FORWARD": "forward", "INPUT": "input"}
IP = {4: "ip", 6: "ip6"}
NFPROTO = {"ipv4": 4, "ipv6": 6}
L4PROTO = {4: ("tcp", "udp", "sctp", "icmp"), 6: ("tcp", "udp", "sctp", "ipv6-icmp")}
CT_STATES = {"established": "ESTABLISHED", "related": "RELATED", "new": "NEW",
             "invalid": "INVALID", "untracked": "UNTRACKED"}
MAX_DEPTH = 16
PREFIX_MAX = 127                         # nft's log prefix limit
PREFIX_CHARS = re.compile(r"[A-Za-z0-9 ._/:~-]+")
_LIMIT = re.compile(r"limit rate ([1-9][0-9]*)/(second|minute|hour|day) burst ([1-9][0-9]*) packets")
_LOG = re.compile(r'log prefix "([^"]*)"(?: group ([0-9]+))?')


@dataclass(frozen=True)
class _Set:
    name: str
    family: int
    concat: bool                          # address . inet_proto . inet_service
    entries: tuple                        # networks, or (address, proto, port)


@dataclass(frozen=True)
class _Rule:
    """One parsed statement: its tests (each a function of the packet) and what it does."""
    tests: tuple
    action: str                           # return, jump, goto, reject, log, vmap
    target: str = ""                      # chain of jump/goto, map of vmap
    log: Optional[tuple[str, str]] = None
    side: str = ""                        # vmap: saddr or daddr
    text: str = ""


def _entries(s: AddressSet, family: int) -> tuple:
    """Elements as the kernel would hold them, checked as nft would load them."""
    out = []
    for e in sorted(s.elements):
        try:
            spelled = canonical_element(s.key, s.interval, e)
        except ValueError as err:
            raise TraceError(f"set {s.name}: element {e!r}: {err}") from None
        if spelled != e:
            raise TraceError(f"set {s.name}: element {e!r} is listed by nft as {spelled!r}")
        if s.key == ADDR_PROTO_PORT[family]:
            addr, proto, port = (p.strip() for p in e.split(" . "))
            out.append((ipaddress.ip_address(addr), proto, int(port)))
        elif "-" in e:
            first, last = (ipaddress.ip_address(p.strip()) for p in e.split("-"))
            out.append((first, last))
        else:
            net = ipaddress.ip_network(e, strict=True)
            out.append((net.network_address, net.broadcast_address))
    if s.key == ADDR[family] and s.interval:
        ranges = sorted(out)
        for (a1, b1), (a2, b2) in zip(ranges, ranges[1:]):
            if a2 <= b1:
                raise TraceError(f"set {s.name}: elements {a1}-{b1} and {a2}-{b2} overlap "
                                 "(nft: conflicting intervals)")
    elif s.key == ADDR[family] and any(a != b for a, b in out):
        raise TraceError(f"set {s.name}: a network in a set without flags interval")
    return tuple(out)


def _addr(packet: Packet, side: str):
    return ipaddress.ip_address(packet.src if side == "saddr" else packet.dst)


class Tracer:
    """Evaluates packets of one family against one rendered table."""

    def __init__(self, table: Table, family: int):
        if not table.exists or table.flags:
            raise TraceError("table: must exist, without flags")
        self.family = family
        self.sets: dict[str, _Set] = {}
        for s in table.sets:
            self._name(s.name, "set")
            if s.key not in (ADDR[family], ADDR_PROTO_PORT[family]):
                continue                   # the other family's
            if s.extra or (s.interval and s.key != ADDR[family]):
                raise TraceError(f"set {s.name}: shape {s.key} interval {s.interval} {s.extra}")
            self.sets[s.name] = _Set(s.name, family, s.key != ADDR[family], _entries(s, family))
        self.other_sets = {s.name for s in table.sets} | {m.name for m in table.maps}
        self.maps: dict[str, dict] = {}
        self._raw_maps = {m.name: m for m in table.maps}
        self.chains: dict[str, Chain] = {}
        for c in table.chains:
            self._name(c.name, "chain")
            if c.name in self.chains:
                raise TraceError(f"chain {c.name} twice")
            self.chains[c.name] = c
        self.parsed: dict[str, list[_Rule]] = {}
        self.bases: dict[str, list[str]] = {}
        for c in table.chains:
            if c.base is not None:
                if c.base.policy != "accept" or c.base.type != "filter":
                    raise TraceError(f"chain {c.name}: base chain {c.base}")
                self.bases.setdefault(c.base.hook, []).append(c.name)
        for m in table.maps:
            self._name(m.name, "map")
            if m.key != ADDR[family]:
                continue
            if m.interval or m.extra:
                raise TraceError(f"map {m.name}: shape interval {m.interval} {m.extra}")
            elements = {}
            for e, verdict in m.elements.items():
                if canonical_element(m.key, False, e) != e:
                    raise TraceError(f"map {m.name}: element {e!r} not as nft lists it")
                kind, _, chain = verdict.partition(" ")
                if kind not in ("jump", "goto") or chain not in self.chains:
                    raise TraceError(f"map {m.name}: element {e}: verdict {verdict!r}")
                elements[ipaddress.ip_address(e)] = (kind, chain)
            self.maps[m.name] = elements
        for name in self.chains:
            if name_family(name) in (0, family):
                self._rules(name)          # every chain of the family parses, walked or not
        self.path: list[str] = []
        self.logged: list[tuple[str, str]] = []

    @staticmethod
    def _name(name: str, what: str) -> None:
        if not valid_name(name):
            raise TraceError(f"{what} {name!r}: not a valid name of ours")

    def _rules(self, chain: str) -> list[_Rule]:
        if chain not in self.parsed:
            c = self.chains[chain]
            rules = []
            for i, r in enumerate(c.rules):
                if r.comment is None or len(r.comment) > MAX_COMMENT or tag_of(r.comment) is None:
                    raise TraceError(f"chain {chain}: rules[{i}]: comment {r.comment!r}")
                rules.append(self._parse(r.statement))
            self.parsed[chain] = rules
        return self.parsed[chain]

    # --- parsing ------------------------------------------------------------

    def _parse(self, statement: str) -> _Rule:
        s = statement.strip()
        tests: list = []
        seen: set[str] = set()
        family = self.family
        ip = IP[family]

        def once(key: str) -> None:
            if key in seen:
                raise TraceError(f"{statement!r}: {key} tested twice")
            seen.add(key)

        def fail(why: str):
            raise TraceError(f"{statement!r}: {why}")

        words = s.split()
        i = 0
        proto: Optional[str] = None

        def word(k: int) -> str:
            return words[k] if k < len(words) else ""

        while i < len(words):
            w = words[i]
            if w == "iifname":
                if word(i + 1) != '"lo"':
                    fail(f"iifname {word(i + 1)}")
                once("iifname")
                tests.append(lambda p: p.in_iface == "lo")
                i += 2
            elif w == "meta" and word(i + 1) == "nfproto":
                version = NFPROTO.get(word(i + 2))
                if version is None:
                    fail(f"meta nfproto {word(i + 2)}")
                once("nfproto")
                tests.append(lambda p, v=version: v == family)
                i += 3
            elif w in ("ip", "ip6") and word(i + 1) in ("saddr", "daddr"):
                if w != ip:
                    fail(f"{w} in the IPv{family} walk")  # nft_render writes one family per chain
                side, what = word(i + 1), word(i + 2)
                if what == "vmap":
                    name = word(i + 3)
                    if not name.startswith("@") or name[1:] not in self.maps:
                        fail(f"vmap {name}: no IPv{family} verdict map of that name")
                    if i + 4 != len(words):
                        fail("vmap must end the statement")
                    return _Rule(tuple(tests), "vmap", name[1:], side=side, text=statement)
                if what == ".":
                    if word(i + 3) != "meta" or word(i + 4) != "l4proto" or word(i + 5) != "." \
                            or word(i + 6) != "th" or word(i + 7) != "dport" or side != "daddr":
                        fail("concatenation other than daddr . meta l4proto . th dport")
                    ref = word(i + 8)
                    hit = self.sets.get(ref[1:]) if ref.startswith("@") else None
                    if hit is None or not hit.concat:
                        fail(f"{ref}: no IPv{family} address . proto . port set of that name")
                    once("port-set")
                    tests.append(lambda p, e=frozenset(hit.entries): p.proto in PORT_PROTOCOLS and
                                 (ipaddress.ip_address(p.dst), p.proto, p.dport) in e)
                    i += 9
                    continue
                once(side)
                if what.startswith("@"):
                    hit = self.sets.get(what[1:])
                    if hit is None or hit.concat:
                        fail(f"{what}: no IPv{family} address set of that name")
                    tests.append(lambda p, sd=side, e=hit.entries:
                                 any(a <= _addr(p, sd) <= b for a, b in e))
                else:
                    try:
                        net = ipaddress.ip_network(what, strict=True)
                    except ValueError:
                        fail(f"{side} {what!r}: not an address or network")
                    if net.version != family:
                        fail(f"{what} in the IPv{family} walk")
                    if "/" in what and net.prefixlen == net.max_prefixlen:
                        fail(f"{what}: nft lists a host as a bare address")
                    tests.append(lambda p, sd=side, n=net: _addr(p, sd) in n)
                i += 3
            elif w == "ct" and word(i + 1) == "state":
                states = word(i + 2).split(",")
                if not states or any(x not in CT_STATES for x in states):
                    fail(f"ct state {word(i + 2)}")
                once("ct")
                tests.append(lambda p, st=frozenset(CT_STATES[x] for x in states): p.state in st)
                i += 3
            elif w == "meta" and word(i + 1) == "l4proto":
                name = word(i + 2)
                if name not in L4PROTO[family]:
                    fail(f"meta l4proto {name} in IPv{family}")
                once("proto")
                proto = name
                tests.append(lambda p, n=name: p.proto == n)
                i += 3
            elif w in PORT_PROTOCOLS and word(i + 1) == "dport":
                once("proto")
                proto = w
                lo, _, hi = word(i + 2).partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    fail(f"dport {word(i + 2)}")
                first, last = int(lo), int(hi or lo)
                if not 0 <= first <= last <= 65535 or (hi and first == last):
                    fail(f"dport {word(i + 2)}")
                tests.append(lambda p, n=w, a=first, b=last: p.proto == n and a <= p.dport <= b)
                i += 3
            elif w == "icmpv6" and word(i + 1) == "type":
                if family != 6 or proto not in (None, "ipv6-icmp"):
                    fail("icmpv6 type outside IPv6 ICMP")
                once("icmpv6")
                value = word(i + 2)
                if not value.isdigit():
                    fail(f"icmpv6 type {value}")
                tests.append(lambda p, t=int(value): p.proto == "ipv6-icmp" and p.icmpv6_type == t)
                i += 3
            else:
                return self._verdict(statement, words[i:], tuple(tests), proto)
        fail("no verdict")

    def _verdict(self, statement: str, rest: list[str], tests: tuple, proto) -> _Rule:
        text = " ".join(rest)
        if text == "return":
            return _Rule(tests, "return", text=statement)
        if len(rest) == 2 and rest[0] in ("jump", "goto"):
            if rest[1] not in self.chains:
                raise TraceError(f"{statement!r}: {rest[0]} to unknown chain {rest[1]}")
            return _Rule(tests, rest[0], rest[1], text=statement)
        if text == "reject with tcp reset":
            if proto != "tcp":
                raise TraceError(f"{statement!r}: tcp reset needs a tcp match first")
            return _Rule(tests, "reject", text=statement)
        if text == "reject with icmpx port-unreachable":
            return _Rule(tests, "reject", text=statement)
        limit = _LIMIT.match(text)
        if limit:
            log = _LOG.fullmatch(text[limit.end():].strip())
            if log is None:
                raise TraceError(f"{statement!r}: a limit in front of anything but a log "
                                 "would make the verdict depend on earlier traffic")
            prefix, group = log.group(1), log.group(2)
            if len(prefix) > PREFIX_MAX or not PREFIX_CHARS.fullmatch(prefix):
                raise TraceError(f"{statement!r}: log prefix {prefix!r}")
            if group is not None and int(group) > 65535:
                raise TraceError(f"{statement!r}: log group {group}")
            return _Rule(tests, "log", log=("NFLOG" if group is not None else "LOG", prefix),
                         text=statement)
        raise TraceError(f"{statement!r}: {text!r} not understood")

    # --- walking --------------------------------------------------------------

    def verdict(self, hook: str, packet: Packet) -> str:
        for addr in (packet.src, packet.dst):
            if ipaddress.ip_address(addr).version != self.family:
                raise TraceError(f"packet address {addr} in the IPv{self.family} walk")
        if hook not in HOOKS:
            raise TraceError(f"hook {hook!r}: FORWARD or INPUT")
        bases = self.bases.get(HOOKS[hook], [])
        if len(bases) != 1:
            raise TraceError(f"hook {HOOKS[hook]}: {len(bases)} base chains of ours")
        self.path = [bases[0]]
        self.logged = []
        return REJECT if self._walk(bases[0], packet, 0) == "reject" else ALLOW

    def _walk(self, chain: str, packet: Packet, depth: int) -> Optional[str]:
        """"reject", or None when the chain returns (explicitly or at its end)."""
        if depth > MAX_DEPTH:
            raise TraceError("jump loop")
        for rule in self._rules(chain):
            if not all(t(packet) for t in rule.tests):
                continue
            action, target = rule.action, rule.target
            if action == "vmap":
                hit = self.maps[target].get(_addr(packet, rule.side))
                if hit is None:
                    continue
                action, target = hit
            if action == "return":
                return None
            if action == "reject":
                return "reject"
            if action == "log":
                self.logged.append(rule.log)
                continue
            self.path.append(target)
            if self._walk(target, packet, depth + 1) == "reject":
                return "reject"
            if action == "goto":
                return None
        return None


def trace(table: Table, family: int, hook: str, packet: Packet) -> str:
    return Tracer(table, family).verdict(hook, packet)


def tracer_for(state: Union[Table, DesiredState], family: int):
    """The tracer of the dataplane `state` was rendered for."""
    if isinstance(state, Table):
        return Tracer(state, family)
    return iptables_tracer.Tracer(state, family)
