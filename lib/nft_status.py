"""This node at a glance on the nftables dataplane: lib.status's rows and
summary, checked against our `inet kube-policy-manager` table.

A pod's traffic reaches its rules through its addresses' elements in the
verdict maps (kpm-ingress4, kpm-egress4...), which jump to a pod chain
that pods with the same rules share; that chain may jump on to a tier
chain, and its rules match sets. So a pod is in sync when each of its
elements is in the kernel with the desired verdict, every chain it
reaches holds the desired rules, every set they match the desired
elements, and the rules that lead from the base chains to the maps are
there. With new-pod isolation it also needs to be known: its address in a
set that kpm-localsrcN and kpm-localdstN return for, ahead of their jump
to kpm-unknownN.

Everything is read from the desired and the kernel's tables, which both
come from the cycle with the daemon's compile options; the pods'
policies come from the cluster (lib.status.local_pods).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from lib.dataplane import NftablesDataplane
from lib.model import EGRESS, INGRESS, Cluster
from lib.nft_plan import NftPlan
from lib.nft_render import dispatch_map
from lib.nft_state import NAME_PREFIX, Chain, Table, address_element
from lib.ruleset import FAMILIES
from lib.selectors import ClusterIndex
from lib.status import (DIFFERS, IN_SYNC, MISSING, NFTABLES, STALE, ChainStatus, NodeStatus,
                        assemble, local_pods, pod_status)

_TARGET = re.compile(r"(?:^|\s)(?:jump|goto)\s+(\S+)")
_SET_REF = re.compile(r"@([^\s,}]+)")
_DIRECTIONS = ((INGRESS, "ingress"), (EGRESS, "egress"))


def _targets(chain: Chain) -> list[str]:
    return [m.group(1) for r in chain.rules for m in _TARGET.finditer(r.statement)]


def _set_refs(chain: Chain) -> list[str]:
    return [m.group(1) for r in chain.rules for m in _SET_REF.finditer(r.statement)]


def _reach(start: str, chains: dict[str, Chain]) -> list[str]:
    """`start` and every chain its rules lead to, in the order met."""
    seen, todo = [], [start]
    while todo:
        name = todo.pop(0)
        if name in seen or name not in chains:
            continue
        seen.append(name)
        todo += _targets(chains[name])
    return seen


def _contains(elements, address: str) -> bool:
    """Whether an address set's elements (`a`, `a/len`, `a-b`) hold `address`."""
    ip = ipaddress.ip_address(address)
    for e in elements:
        if "-" in e:
            first, last = (ipaddress.ip_address(x) for x in e.split("-", 1))
            if first.version == ip.version and first <= ip <= last:
                return True
        elif "/" in e:
            net = ipaddress.ip_network(e, strict=False)
            if net.version == ip.version and ip in net:
                return True
        elif ipaddress.ip_address(e) == ip:
            return True
    return False


def _leads_to_maps(desired: Table) -> dict[str, list[tuple[str, str]]]:
    """Map name -> the (chain, rule hash) pairs that lead packets to it:
    the rules matching it (`ip daddr vmap @kpm-ingress4`) and, up to the
    base chains, the rules jumping to their chains."""
    chains = desired.chain_map()
    parents: dict[str, list[tuple[str, str]]] = {}
    for chain in desired.chains:
        for rule in chain.rules:
            for m in _TARGET.finditer(rule.statement):
                parents.setdefault(m.group(1), []).append((chain.name, rule.hash))
    out = {}
    for vmap in desired.maps:
        path, todo, seen = [], [], set()
        for chain in desired.chains:
            for rule in chain.rules:
                if f"@{vmap.name}" in rule.statement.split():
                    path.append((chain.name, rule.hash))
                    todo.append(chain.name)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for parent, h in parents.get(name, ()):
                path.append((parent, h))
                if parent in chains:
                    todo.append(parent)
        out[vmap.name] = path
    return out


@dataclass(frozen=True)
class _Node:
    """Both tables, indexed once for every pod's checks."""
    desired: Table
    kernel: Table
    chains: dict
    kchains: dict
    sets: dict
    ksets: dict
    maps: dict
    kmaps: dict
    leads: dict

    @classmethod
    def of(cls, desired: Table, kernel: Table) -> "_Node":
        return cls(desired, kernel, desired.chain_map(), kernel.chain_map(), desired.set_map(),
                   kernel.set_map(), desired.map_map(), kernel.map_map(), _leads_to_maps(desired))

    def chain_problem(self, name: str) -> Optional[tuple[str, str]]:
        """(state, reason) of one chain a pod reaches; None when in sync."""
        have = self.kchains.get(name)
        if have is None:
            return MISSING, ""
        if have.hashes != self.chains[name].hashes:
            return DIFFERS, "rules differ"
        for s in sorted(set(_set_refs(self.chains[name]))):
            want = self.sets.get(s)
            if want is None:
                continue                     # a map: checked through the elements
            held = self.ksets.get(s)
            if held is None:
                return DIFFERS, f"set {s} missing"
            if held.elements != want.elements:
                return DIFFERS, f"set {s} members differ"
        return None

    def unreached(self, map_name: str) -> Optional[str]:
        """Why packets would not get to `map_name`; None when they would."""
        for chain, h in self.leads.get(map_name, ()):
            have = self.kchains.get(chain)
            if have is None or h not in have.hashes:
                return f"not reached: dispatch rule missing from {chain}"
        return None


def _pod_chains(node: _Node, addrs: list[str], family: int, direction: str, name: str,
                sets: set[str], held_chains: set[str]) -> list[ChainStatus]:
    """The chains one family and direction of a pod reaches, each with its
    state; `held_chains` gains the chains its kernel elements reach."""
    map_name = dispatch_map(direction, family)
    want = node.maps.get(map_name)
    have = node.kmaps.get(map_name)
    out: list[ChainStatus] = []
    for addr in addrs:
        element = address_element(addr)
        verdict = want.elements.get(element) if want is not None else None
        held = have.elements.get(element) if have is not None else None
        if held is not None:
            held_chains.update(_reach(held.split()[-1], node.kchains))
        if verdict is None:
            if held is not None:
                out.append(ChainStatus(held.split()[-1], family, name, 0, STALE,
                                       f"{element} in {map_name}, not desired"))
            continue
        elsewhere = held is not None and held != verdict
        for i, chain in enumerate(_reach(verdict.split()[-1], node.chains)):
            if any(c.name == chain for c in out):
                continue
            rules = len(node.chains[chain].rules)
            sets.update(s for s in _set_refs(node.chains[chain]) if s in node.sets)
            problem = node.chain_problem(chain)
            if i == 0:
                problem = _dispatch_problem(node, element, map_name, held, verdict) or problem
            elif elsewhere and problem is not None and problem[0] == MISSING:
                # the pod's traffic meets older rules, under their own names
                problem = DIFFERS, "rules differ"
            state, reason = problem if problem is not None else (IN_SYNC, "")
            out.append(ChainStatus(chain, family, name, rules, state, reason))
    return out


def _dispatch_problem(node: _Node, element: str, map_name: str, held: Optional[str],
                      verdict: str) -> Optional[tuple[str, str]]:
    """Whether the pod's address leads to its chain: its element in the
    map, with the desired verdict, and the rules up to the map."""
    if held is None:
        return MISSING, f"{element} missing from {map_name}"
    if held != verdict:
        return DIFFERS, f"rules differ: {element} in {map_name} leads to {held.split()[-1]}"
    why = node.unreached(map_name)
    return (DIFFERS, why) if why else None


@dataclass(frozen=True)
class _Recognition:
    """How one family's new-pod isolation knows a local pod: the desired
    rules of kpm-localsrcN and -dstN that return for addresses in a set,
    and whether the kernel holds each ahead of the jump to kpm-unknownN."""
    family: int
    returns: dict          # chain -> [(set name, rule hash)] ahead of the unknown jump
    ahead: dict            # chain -> rule hashes the kernel has before that jump (chains
                           # the kernel lacks left out: they refuse nothing)


def _recognition(family: int, node: _Node) -> Optional[_Recognition]:
    names = [f"{NAME_PREFIX}localsrc{family}", f"{NAME_PREFIX}localdst{family}"]
    if names[0] not in node.chains:
        return None                      # new pods are not isolated in this family
    unknown = f"{NAME_PREFIX}unknown{family}"
    returns, ahead = {}, {}
    for name in names:
        mine = []
        for rule in node.chains[name].rules:
            if unknown in rule.statement.split():
                break
            mine += [(s, rule.hash) for s in _SET_REF.findall(rule.statement)]
        returns[name] = mine
        hashes = set()
        for rule in node.kchains[name].rules if name in node.kchains else ():
            if unknown in rule.statement.split():
                break
            hashes.add(rule.hash)
        if name in node.kchains:         # without it the kernel refuses no unknown address
            ahead[name] = hashes
    return _Recognition(family, returns, ahead)


def _unknown_reasons(addrs: list[str], r: _Recognition, node: _Node) -> list[str]:
    """Why the kernel would take a pod's addresses for unknown ones,
    refusing all its traffic ([] when it knows them)."""
    reasons = []
    for addr in addrs:
        for chain, returns in r.returns.items():
            where = [(s, h) for s, h in returns if s in node.sets
                     and _contains(node.sets[s].elements, addr)]
            if not where or chain not in r.ahead:
                continue                 # not known in the desired state, or not refused now
            if not any(h in r.ahead[chain] for _, h in where):
                reasons.append(f"not known to {chain} (IPv{r.family}): its traffic is refused")
                continue
            held = [node.ksets.get(s) for s, _ in where]
            if all(h is None for h in held):
                names = ", ".join(s for s, _ in where)
                reasons.append(f"not known (IPv{r.family}): set {names} missing: "
                               "its traffic is refused")
            elif not any(h is not None and _contains(h.elements, addr) for h in held):
                names = ", ".join(s for s, _ in where)
                reasons.append(f"not known (IPv{r.family}): {addr} missing from set {names}: "
                               "its traffic is refused")
    return list(dict.fromkeys(reasons))


def _explained_maps(node: _Node, addresses: set[str]) -> set[str]:
    """The maps whose every difference is an element of a local pod's
    address: the pod rows tell them, the node's lines need not."""
    out = set()
    for name, want in node.maps.items():
        have = node.kmaps.get(name)
        if have is None:
            continue
        keys = set(want.elements) | set(have.elements)
        differing = {k for k in keys if want.elements.get(k) != have.elements.get(k)}
        if differing <= addresses:
            out.add(name)
    return out


def node_status(cluster: Cluster, desired: Table, kernel: Table, plan: NftPlan, node: str,
                families: tuple[int, ...] = FAMILIES) -> NodeStatus:
    """`desired` is the table the cycle rendered for `node` (families it
    lacks left out), `kernel` the table it read (lib.nft_state.ABSENT when
    there is none), `plan` their diff."""
    index = ClusterIndex(cluster)
    state = _Node.of(desired, kernel)
    recognition = [r for r in (_recognition(f, state) for f in families) if r is not None]
    rows = []
    reported: set[str] = set()
    addresses: set[str] = set()
    for facts in local_pods(cluster, node, index):
        pod = facts.pod
        chains: list[ChainStatus] = []
        sets: set[str] = set()
        unknown: list[str] = []
        held_chains: set[str] = set()
        checked = False
        for family in families:
            addrs = [ip for ip in pod.ips if (":" in ip) == (family == 6)]
            addresses.update(address_element(a) for a in addrs)
            for direction, name in _DIRECTIONS:
                chains += _pod_chains(state, addrs, family, direction, name, sets, held_chains)
            for r in recognition:
                if r.family == family and addrs:
                    checked = True
                    unknown += _unknown_reasons(addrs, r, state)
        reported.update(c.name for c in chains)
        reported.update(sets)
        reported.update(held_chains)        # what it reached before: replaced with it
        rows.append(pod_status(facts, chains, sets, unknown, checked))
    reported |= _explained_maps(state, addresses)
    return assemble(cluster, desired, plan, node, None, families, rows, reported,
                    dataplane=NFTABLES, plane=NftablesDataplane(None))

