"""The rules of AdminNetworkPolicies and the BaselineAdminNetworkPolicy, as
filter rules of one local pod's chain.

Each admin rule becomes, per port entry, one match with the rule's action:
Allow returns (the packet goes on to the node's other rules), Deny rejects
(logged first when asked), Pass goes to the pod's NetworkPolicy tier (a
placeholder that lib/compile.py points at the pod's own tier chain).
Peers are one address set per rule, content-addressed like NetworkPolicy
peers, holding the pods, nodes and networks the peers name.
"""
from __future__ import annotations

import ipaddress
from typing import Optional

from lib.intent import ALLOWED, ANY, GOTO, REFUSED, FilterRule, Match, Verdict, port_match
from lib.model import ALLOW, DENY, EGRESS, INGRESS, AdminPeer, AdminPolicy, AdminRule, Pod
from lib.ruleset import HASH_IP_PORT, HASH_NET, PREFIX, IpSet, set_member, short_hash

# Where a Pass rule goes: replaced by the pod's NetworkPolicy tier chain (or
# by a return when that tier holds nothing), never rendered as it is.
PASS_TARGET = "(networkpolicy tier)"
PASS_VERDICT = Verdict(GOTO, PASS_TARGET)

_DIRECTION = {INGRESS: "ingress", EGRESS: "egress"}


def admin_rules_of(policy: AdminPolicy, direction: str) -> tuple[AdminRule, ...]:
    return policy.ingress if direction == INGRESS else policy.egress


def admin_set_name(peers: tuple[AdminPeer, ...], family: int) -> str:
    return f"{PREFIX}N{family}-" + short_hash("admin", repr(peers), str(family))


def admin_port_set_name(peers: Optional[tuple[AdminPeer, ...]], family: int, port_name: str) -> str:
    return f"{PREFIX}P{family}-" + short_hash("admin", repr(peers), str(family), port_name)


class AdminRules:
    """Admin rules of one node's compilation, sharing the compiler's sets
    and address tables (lib.compile._Compiler)."""

    def __init__(self, comp, log_rule):
        self.comp = comp
        self.log_rule = log_rule        # (prefix, text, match) -> the LOG FilterRule
        self._memo: dict[tuple, list[FilterRule]] = {}
        self._nets: dict[tuple, list] = {}

    # sets ----------------------------------------------------------------

    def networks(self, peers: tuple[AdminPeer, ...], family: int) -> list:
        key = (peers, family)
        hit = self._nets.get(key)
        if hit is None:
            nets = [ipaddress.ip_network(n) for p in peers for n in p.networks]
            hit = self._nets[key] = list(ipaddress.collapse_addresses(
                n for n in nets if n.version == family))
        return hit

    def peer_set(self, peers: tuple[AdminPeer, ...], family: int) -> str:
        """Every address the peers name: their pods', their nodes' and their
        networks; an address inside one of the networks is left to it."""
        comp = self.comp
        name = admin_set_name(peers, family)
        if name in comp.sets:
            return name
        nets = self.networks(peers, family)
        members = {m for net in nets for m in set_member(net)}
        hosts: list[str] = []
        for peer in peers:
            for pod in comp.index.admin_pods(peer):
                hosts.extend(comp.address_texts(pod, family))
            if peer.node_selector is not None:
                for node in comp.index.nodes_selected(peer.node_selector):
                    hosts.extend(ip for ip in node.ips if (":" in ip) == (family == 6))
        for text in hosts:
            if nets and any(ipaddress.ip_address(text) in net for net in nets):
                continue
            members.add(text)
        comp.sets[name] = IpSet(name, HASH_NET, family, frozenset(members))
        return name

    def port_set(self, peers: Optional[tuple[AdminPeer, ...]], family: int, port_name: str) -> str:
        """(address, protocol, port) of the peer pods declaring `port_name`,
        whatever its protocol (a namedPort carries none): pods the peers
        select and pods inside the peers' networks. Nodes declare no ports."""
        comp = self.comp
        name = admin_port_set_name(peers, family, port_name)
        if name in comp.sets:
            return name
        members = set()

        def add(pod: Pod) -> None:
            for cp in pod.ports:
                if cp.name == port_name:
                    members.update(f"{a},{cp.protocol.lower()}:{cp.port}"
                                   for a in comp.address_texts(pod, family))

        if peers is None:
            for pod in comp.index.pods:
                add(pod)
        else:
            for peer in peers:
                for pod in comp.index.admin_pods(peer):
                    add(pod)
            nets = self.networks(peers, family)
            if nets:
                for pod in comp.index.pods:
                    if any(a in net for a in comp.addresses(pod, family) for net in nets):
                        add(pod)
        comp.sets[name] = IpSet(name, HASH_IP_PORT, family, frozenset(members))
        return name

    # rules ---------------------------------------------------------------

    def rules(self, policy: AdminPolicy, direction: str, pod: Pod, family: int,
              prefix: Optional[str]) -> list[FilterRule]:
        """The policy's rules for `pod` in order. `prefix`: log Deny rules'
        refusals with it (None: not logged). Shared by every pod the policy
        selects, unless an ingress named port resolves against the pod's
        own ports or the log prefix names the pod."""
        rules = admin_rules_of(policy, direction)
        own_ports = direction == INGRESS and any(
            isinstance(p.port, str) for r in rules for p in (r.ports or ()))
        key = (id(policy), direction, family, pod.ports if own_ports else None, prefix)
        hit = self._memo.get(key)
        if hit is None:
            hit = []
            for rule in sorted(rules, key=lambda r: r.index):
                text = f"{policy.key} {_DIRECTION[direction]}[{rule.index}]"
                for match, match_text in self.matches(rule, direction, pod, family, text):
                    if rule.action == ALLOW:
                        hit.append(FilterRule(match, ALLOWED, match_text))
                    elif rule.action == DENY:
                        if prefix is not None:
                            hit.append(self.log_rule(prefix, match_text + " log", match))
                        hit.append(FilterRule(match, REFUSED, match_text))
                    else:
                        hit.append(FilterRule(match, PASS_VERDICT, match_text))
            self._memo[key] = hit
        return hit

    def matches(self, rule: AdminRule, direction: str, pod: Pod, family: int,
                text: str) -> list[tuple[Match, str]]:
        peer = ANY
        if rule.peers is not None:
            name = self.peer_set(rule.peers, family)
            peer = Match(src_set=name) if direction == INGRESS else Match(dst_set=name)
        if rule.ports is None:
            return [(peer, text)]
        out = []
        for i, port in enumerate(rule.ports):
            port_text = f"{text} ports[{i}]"
            if isinstance(port.port, str):
                if direction == EGRESS:
                    out.append((Match(dst_port_set=self.port_set(rule.peers, family, port.port)),
                                port_text))
                else:
                    out.extend((Match(src_set=peer.src_set, protocol=cp.protocol.lower(),
                                      dports=(cp.port, cp.port)), port_text)
                               for cp in pod.ports if cp.name == port.port)
                continue
            match = port_match(port, pod, peer)
            if match is not None:
                out.append((match, port_text))
        return out
