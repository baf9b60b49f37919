"""A node's intent in nftables terms: our own table, per-pod dispatch by
verdict map, pod chains shared by content, peers as native sets.

Layout (docs/design.md draws it):
  kpm-forward, kpm-input       base chains, hooks forward and input, policy
                               accept: they only refuse, and a packet they
                               let through still meets every other table
  kpm-forward4 / kpm-input4    per family: replies first, then the dispatch
  (6 for IPv6)                 (`ip saddr vmap @kpm-egress4`, `ip daddr vmap
                               @kpm-ingress4`), then the new-pod tails
  kpm-i4-<hash>, kpm-e4-<hash> pod chains named by their rules, so pods with
                               the same policies share one chain and the
                               rule count does not grow with local pods
  kpm-ni4-/kpm-ne4-<hash>      a pod's NetworkPolicy tier, when a Pass goes there
  kpm-n4-<hash>, kpm-p4-<hash> address sets (interval) and (address . protocol
                               . port) sets, the iptables dataplane's ipsets
                               under lower-case names
  kpm-an4-<hash>               an address set that holds single addresses
                               only (pods, nodes): a plain hash set

Every statement is built in one fixed order and every chain is named by a
hash of its content: a chain that does not change keeps its name and is
never rewritten, and a pod moving to other policies only changes its map
element.
"""
from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Mapping, Optional

from lib import compile as compiler
from lib.intent import (GOTO, JUMP, LOG, LOG_TARGET, REJECT, RETURN, FamilyIntent,
                        FilterRule, Match, NodeIntent)
from lib.model import EGRESS
from lib.nft_state import (ADDR, ADDR_PROTO_PORT, FORWARD, INPUT, NAME_PREFIX, AddressSet,
                           BaseHook, Chain, Rule, Table, VerdictMap, address_element,
                           interval_elements, network_text, port_element, tagged)
from lib.ruleset import HASH_NET, IpSet, short_hash

IP = {4: "ip", 6: "ip6"}
NFPROTO = {4: "ipv4", 6: "ipv6"}
BASE = {FORWARD: BaseHook("forward"), INPUT: BaseHook("input")}

# Intent chain prefix -> nft kind; a chain of these kinds is named by its content.
_CONTENT_KINDS = ((compiler.INGRESS_TIER_PREFIX, "ni"), (compiler.EGRESS_TIER_PREFIX, "ne"),
                  (compiler.INGRESS_CHAIN_PREFIX, "i"), (compiler.EGRESS_CHAIN_PREFIX, "e"))
_FIXED = {compiler.LOCAL_SRC_CHAIN: "localsrc", compiler.LOCAL_DST_CHAIN: "localdst",
          compiler.UNKNOWN_CHAIN: "unknown"}


def set_name(ipset_name: str) -> str:
    """The nft name of one of the intent's sets (`KPM-N4-...` -> `kpm-n4-...`)."""
    return ipset_name.lower()


def _single_addresses(s: IpSet) -> bool:
    return s.kind == HASH_NET and not any("/" in m for m in s.members)


def nft_set_name(s: IpSet) -> str:
    """A set of single addresses (peer pods, nodes) is a plain hash set:
    nft fills, lists and updates it several times quicker than an interval
    set, which it must keep disjoint. The shape is in the name (`kpm-an4-`),
    so that a set whose members change shape becomes another set: nft
    cannot change a set's flags in place."""
    name = set_name(s.name)
    if _single_addresses(s):
        return NAME_PREFIX + "a" + name[len(NAME_PREFIX):]
    return name


def forward_chain(family: int) -> str:
    return f"{FORWARD}{family}"


def input_chain(family: int) -> str:
    return f"{INPUT}{family}"


def dispatch_map(direction: str, family: int) -> str:
    return f"{NAME_PREFIX}{'egress' if direction == EGRESS else 'ingress'}{family}"


def render_set(s: IpSet) -> AddressSet:
    name = nft_set_name(s)
    if s.kind == HASH_NET and name != set_name(s.name):      # single addresses: plain
        return AddressSet(name, ADDR[s.family], False,
                          frozenset(map(address_element, s.members)))
    if s.kind == HASH_NET:
        return AddressSet(name, ADDR[s.family], True, interval_elements(s.members))
    return AddressSet(name, ADDR_PROTO_PORT[s.family], False,
                      frozenset(map(port_element, s.members)))


def _net(text: str) -> str:
    return network_text(ipaddress.ip_network(text, strict=False))


def match_statement(m: Match, family: int, names: Optional[Mapping[str, str]] = None) -> str:
    """`names`: the intent's set names -> their nft names (nft_set_name);
    a set not in it keeps its lower-cased name."""
    ip = IP[family]

    def ref(intent_set: str) -> str:
        return (names or {}).get(intent_set) or set_name(intent_set)

    out: list[str] = []
    if m.in_loopback:
        out.append('iifname "lo"')
    if m.src_net is not None:
        out.append(f"{ip} saddr {_net(m.src_net)}")
    if m.dst_net is not None:
        out.append(f"{ip} daddr {_net(m.dst_net)}")
    if m.established:
        out.append("ct state established,related")
    if m.src_set is not None:
        out.append(f"{ip} saddr @{ref(m.src_set)}")
    if m.dst_set is not None:
        out.append(f"{ip} daddr @{ref(m.dst_set)}")
    if m.dst_port_set is not None:
        out.append(f"{ip} daddr . meta l4proto . th dport @{ref(m.dst_port_set)}")
    if m.protocol is not None:
        if m.dports is not None:
            first, last = m.dports
            out.append(f"{m.protocol} dport {first if first == last else f'{first}-{last}'}")
        else:
            out.append(f"meta l4proto {m.protocol}")
    if m.icmpv6_type is not None:
        out.append(f"icmpv6 type {m.icmpv6_type}")
    return " ".join(out)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


class _FamilyRenderer:
    """One family's chains. Chains are named by their content, so a chain
    is rendered after every chain it jumps to: their names are part of it."""

    def __init__(self, fi: FamilyIntent, set_names: Mapping[str, str]):
        self.family = fi.family
        self.set_names = set_names
        self.intent = {c.name: c for c in fi.chains}
        self.names: dict[str, str] = {}           # intent chain -> nft chain
        self.chains: dict[str, Chain] = {}        # nft name -> chain
        self.sets: list[AddressSet] = []          # listed-address sets made while folding
        self._rejects: dict[Match, tuple[str, ...]] = {}

    def match(self, m: Match) -> str:
        return match_statement(m, self.family, self.set_names)

    def target(self, name: str) -> str:
        hit = self.names.get(name)
        if hit is None:
            chain = self.intent.get(name)
            if chain is None:
                raise ValueError(f"intent: a rule jumps to chain {name}, which it does not hold")
            rules = self.rules(chain.rules, name)
            hit = self.names[name] = self._name(name, rules)
            self.chains.setdefault(hit, Chain(hit, rules))
        return hit

    def all_of(self, chains: list[str], direction: str) -> str:
        """One address, several pods (the API may list a finished pod's
        address on a new pod before the old one is gone): a chain that
        jumps to each pod's chain in turn, so that the address meets every
        pod's policies, as the iptables dataplane's dispatch rules make it."""
        rules = tuple(tagged(f"jump {c}", "every pod of one address") for c in chains)
        kind = "e" if direction == EGRESS else "i"
        digest = short_hash(*(part for r in rules for part in (r.statement, r.comment or "")))
        name = f"{NAME_PREFIX}{kind}{self.family}-{digest}"
        self.chains.setdefault(name, Chain(name, rules))
        return name

    def _name(self, name: str, rules: tuple[Rule, ...]) -> str:
        if name in _FIXED:
            return f"{NAME_PREFIX}{_FIXED[name]}{self.family}"
        kind = next((k for prefix, k in _CONTENT_KINDS if name.startswith(prefix)), "c")
        digest = short_hash(*(part for r in rules for part in (r.statement, r.comment or "")))
        return f"{NAME_PREFIX}{kind}{self.family}-{digest}"

    def verdict(self, rule: FilterRule) -> list[str]:
        v = rule.verdict
        if v.kind == RETURN:
            return [self.match(rule.match) + " return"]
        if v.kind in (JUMP, GOTO):
            return [_join(self.match(rule.match), f"{v.kind} {self.target(v.chain)}")]
        if v.kind == LOG:
            limit = f"limit rate {v.log.rate}/minute burst {v.log.burst} packets"
            log = f'log prefix "{v.log.prefix}"'
            if v.log.target != LOG_TARGET:
                log += f" group {v.log.group}"
            return [_join(self.match(rule.match), limit, log)]
        assert v.kind == REJECT
        hit = self._rejects.get(rule.match)      # nearly every pod chain ends alike
        if hit is None:
            hit = self._rejects[rule.match] = self._reject(rule.match)
        return list(hit)

    def _reject(self, m: Match) -> tuple[str, ...]:
        out = []
        if m.protocol in (None, "tcp"):
            tcp = self.match(replace(m, protocol="tcp"))
            out.append(f"{tcp} reject with tcp reset")
        if m.protocol != "tcp":
            out.append(_join(self.match(m), "reject with icmpx port-unreachable"))
        return tuple(out)

    def rules(self, rules, chain: str = "") -> tuple[Rule, ...]:
        out: list[Rule] = []
        run: list[FilterRule] = []

        def flush():
            if run:
                out.extend(self._listed(chain, run))
                run.clear()

        for rule in rules:
            if _listable(rule) and (not run or _side(run[0]) == _side(rule)):
                run.append(rule)
                continue
            flush()
            if _listable(rule):
                run.append(rule)
                continue
            out.extend(tagged(s, rule.text) for s in self.verdict(rule))
        flush()
        return tuple(out)

    def _listed(self, chain: str, run: list[FilterRule]) -> list[Rule]:
        """Host addresses that return, one rule each in the intent (the
        known pods of the new-pod chains), as one set: the rule stays one
        whatever the number of pods."""
        side = _side(run[0])
        name = f"{NAME_PREFIX}h{self.family}-{short_hash(chain, side, str(len(self.sets)))}"
        addresses = [(r.match.src_net or r.match.dst_net).split("/")[0] for r in run]
        self.sets.append(AddressSet(name, ADDR[self.family], False,
                                    frozenset(address_element(a) for a in addresses)))
        where = "saddr" if side == "src" else "daddr"
        return [tagged(f"{IP[self.family]} {where} @{name} return", f"listed {side} addresses")]


def _host(net: str) -> bool:
    return net.endswith("/32") or net.endswith("/128")


def _listable(rule: FilterRule) -> bool:
    """A RETURN for one host address and nothing else."""
    m = rule.match
    if rule.verdict.kind != RETURN:
        return False
    if m.src_net is not None:
        return _host(m.src_net) and m == Match(src_net=m.src_net)
    if m.dst_net is not None:
        return _host(m.dst_net) and m == Match(dst_net=m.dst_net)
    return False


def _side(rule: FilterRule) -> str:
    return "src" if rule.match.src_net is not None else "dst"


def render_family(fi: FamilyIntent, set_names: Optional[Mapping[str, str]] = None
                  ) -> tuple[list[Chain], list[AddressSet], list[VerdictMap]]:
    """Nothing for a family the node does not hold (an empty intent).
    `set_names`: the intent's set names -> their nft names."""
    if not (fi.head or fi.dispatch or fi.chains or fi.forward_tail or fi.input_tail):
        return [], [], []
    f = fi.family
    r = _FamilyRenderer(fi, set_names or {})
    maps = {}
    for direction in (EGRESS, "ingress"):
        targets: dict[str, list[str]] = {}
        for d in fi.dispatch:
            if (d.direction == EGRESS) == (direction == EGRESS):
                chains_of = targets.setdefault(address_element(d.address), [])
                if r.target(d.chain) not in chains_of:
                    chains_of.append(r.target(d.chain))
        elements = {a: f"jump {r.all_of(c, direction) if len(c) > 1 else c[0]}"
                    for a, c in targets.items()}
        name = dispatch_map(direction, f)
        maps[direction] = VerdictMap(name, ADDR[f], False, elements)
    head = r.rules(fi.head, "head")
    egress = tagged(f"{IP[f]} saddr vmap @{maps[EGRESS].name}", "egress dispatch")
    ingress = tagged(f"{IP[f]} daddr vmap @{maps['ingress'].name}", "ingress dispatch")
    forward = head + (egress, ingress) + r.rules(fi.forward_tail, "forward")
    inputs = head + (egress,) + r.rules(fi.input_tail, "input")
    chains = list(r.chains.values())
    chains += [Chain(forward_chain(f), forward), Chain(input_chain(f), inputs)]
    return chains, r.sets, list(maps.values())


class SetMemo:
    """The sets of the last render, for a process that renders every cycle:
    a set whose members did not change is not spelled again (comparing two
    frozensets costs a millisecond; spelling a large set's elements, tens)."""

    def __init__(self):
        self._last: dict[str, tuple[frozenset, AddressSet]] = {}

    def render(self, sets) -> list[AddressSet]:
        out, kept = [], {}
        for s in sets:
            hit = self._last.get(s.name)
            if hit is None or hit[0] != s.members:     # the name says kind and family
                hit = (s.members, render_set(s))
            kept[s.name] = hit
            out.append(hit[1])
        self._last = kept
        return out


def render(intent: NodeIntent, memo: Optional[SetMemo] = None) -> Table:
    """`memo`: the sets of the last render, to reuse those that did not change."""
    chains: list[Chain] = []
    sets = memo.render(intent.sets) if memo is not None else [render_set(s) for s in intent.sets]
    set_names = {s.name: n.name for s, n in zip(intent.sets, sets)}
    maps: list[VerdictMap] = []
    into = {FORWARD: [], INPUT: []}
    for fi in (intent.v4, intent.v6):
        c, s, m = render_family(fi, set_names)
        if not c:
            continue
        chains += c
        sets += s
        maps += m
        into[FORWARD].append(tagged(f"meta nfproto {NFPROTO[fi.family]} jump {forward_chain(fi.family)}",
                                    f"IPv{fi.family}"))
        into[INPUT].append(tagged(f"meta nfproto {NFPROTO[fi.family]} jump {input_chain(fi.family)}",
                                  f"IPv{fi.family}"))
    chains += [Chain(name, tuple(rules), BASE[name]) for name, rules in into.items()]
    return Table(tuple(sorted(chains, key=lambda c: c.name)),
                 tuple(sorted(sets, key=lambda s: s.name)),
                 tuple(sorted(maps, key=lambda m: m.name)))
