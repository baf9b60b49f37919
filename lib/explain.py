"""Why is a connection allowed or refused? Evaluates the policy APIs
directly on the model, pair by pair, apart from the compiler: it is the
reference the compiled rules are checked against, and what an operator
reads when a connection fails.

Each direction goes through the tiers in order: the AdminNetworkPolicies
selecting the pod (by priority, then name; the first rule that matches
decides, a Pass goes on to NetworkPolicy), then the NetworkPolicies
selecting it (if any does, they decide), then the BaselineAdminNetworkPolicy
(its first matching rule decides); what nothing decided is allowed.
"""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Optional

from lib.model import (ALLOW, BASELINE, DENY, EGRESS, INGRESS, PASS, PROTOCOLS, TCP, AdminPeer,
                       AdminPolicy, AdminRule, Cluster, NetworkPolicy, Peer, Pod, PolicyPort,
                       PolicyRule)
from lib.selectors import NAME_LABEL, matches
from lib.terminal import paint, printable


class EndpointError(ValueError):
    pass


def parse_port(text: str) -> tuple[int, str]:
    """`PORT[/PROTOCOL]` as typed on the command line: (80, "TCP") from
    "80", (53, "UDP") from "53/udp"."""
    number, sep, protocol = text.partition("/")
    protocol = protocol.upper() if sep else TCP
    if protocol not in PROTOCOLS:
        raise ValueError(f"{text}: protocol must be one of {', '.join(PROTOCOLS)}")
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ValueError(f"{text}: port must be a number from 1 to 65535")
    return int(number), protocol


@dataclass(frozen=True)
class Endpoint:
    text: str                  # as given
    ip: str                    # the address used for this family
    pod: Optional[Pod] = None  # None for an address outside the cluster's pods
    node: Optional[str] = None # set when the address is a node's own (or a host-network pod's)

    @property
    def name(self) -> str:
        return self.pod.key if self.pod else self.ip


@dataclass(frozen=True)
class Direction:
    direction: str                         # "egress" (of the source) or "ingress" (of the destination)
    applies: bool                          # False: the endpoint is not a pod this API can isolate
    isolated: bool = False
    policies: tuple[str, ...] = ()         # policies selecting the pod with this policy type
    allowed_by: tuple[str, ...] = ()       # "ns/name ingress[0] ports[1]" entries that admit it
    allowed: bool = True
    reason: str = ""
    tier: str = ""                         # what decided: "AdminNetworkPolicy", "NetworkPolicy",
                                           # "BaselineAdminNetworkPolicy"; "" nothing did
    decided_by: str = ""                   # the deciding admin rule: "ANP name rule 0: Deny"
    admin_policies: tuple[str, ...] = ()   # admin policies selecting the pod: "ANP name", "BANP default"
    passed_by: str = ""                    # the admin rule that passed it on to NetworkPolicy


@dataclass(frozen=True)
class Explanation:
    source: str
    destination: str
    port: int
    protocol: str
    family: int
    allowed: bool
    egress: Direction = field(default=None)
    ingress: Direction = field(default=None)
    notes: tuple[str, ...] = ()            # problems of the policies involved (rules dropped)

    def as_dict(self) -> dict:
        return asdict(self)


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _pick_ip(pod: Pod, family: Optional[int]) -> Optional[str]:
    for ip in pod.ips:
        if family is None or _family(ip) == family:
            return ip
    return None


def resolve(cluster: Cluster, text: str, family: Optional[int] = None,
            node_addresses: Optional[Mapping[str, tuple[str, ...]]] = None) -> Endpoint:
    """`namespace/pod`, a pod or node address, or any address / CIDR (its network address)."""
    nodes = node_addresses or {}
    if "/" in text and not _looks_like_cidr(text):
        ns, _, name = text.partition("/")
        pod = next((p for p in cluster.pods if p.namespace == ns and p.name == name), None)
        if pod is None:
            raise EndpointError(f"{text}: no such running pod with an address")
        ip = _pick_ip(pod, family)
        if ip is None:
            raise EndpointError(f"{text}: the pod has no IPv{family} address")
        return Endpoint(text, ip, pod, pod.node if pod.host_network else None)
    try:
        ip = str(ipaddress.ip_network(text, strict=False).network_address)
    except ValueError:
        raise EndpointError(f"{text}: not namespace/pod, an IP address or a CIDR") from None
    if family is not None and _family(ip) != family:
        raise EndpointError(f"{text}: not an IPv{family} address")
    owner = next((p for p in cluster.pods if not p.host_network and ip in p.ips), None)
    node = next((n for n, addrs in sorted(nodes.items()) if ip in addrs), None)
    if owner is None and node is None:
        host = next((p for p in cluster.pods if p.host_network and ip in p.ips), None)
        node = host.node if host else None
    return Endpoint(text, ip, owner, node)


def _looks_like_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


def _namespace_labels(cluster: Cluster, name: str) -> Mapping[str, str]:
    for ns in cluster.namespaces:
        if ns.name == name:
            return ns.label_map
    return {NAME_LABEL: name}


def _peer_matches(cluster: Cluster, policy: NetworkPolicy, peer: Peer, other: Endpoint) -> bool:
    if peer.ip_block is not None:
        addr = ipaddress.ip_address(other.ip)
        net = ipaddress.ip_network(peer.ip_block.cidr)
        if addr.version != net.version or addr not in net:
            return False
        return not any(addr in ipaddress.ip_network(e) for e in peer.ip_block.excepts
                       if ipaddress.ip_network(e).version == addr.version)
    pod = other.pod
    if pod is None or pod.host_network:
        return False     # selectors never match host-network pods or outside addresses
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not matches(peer.namespace_selector, _namespace_labels(cluster, pod.namespace)):
        return False
    return peer.pod_selector is None or matches(peer.pod_selector, pod.label_map)


def _port_matches(entry: PolicyPort, port: int, protocol: str, dst: Endpoint) -> bool:
    if entry.protocol != protocol:
        return False
    if entry.port is None:
        return True
    if isinstance(entry.port, int):
        return entry.port <= port <= (entry.end_port or entry.port)
    if dst.pod is None or dst.pod.host_network:
        return False     # a named port is resolved against the destination pod's containers
    return any(cp.name == entry.port and cp.protocol == protocol and cp.port == port
               for cp in dst.pod.ports)


def _rule_admits(cluster, policy, rule: PolicyRule, direction: str, other: Endpoint,
                 port: int, protocol: str, dst: Endpoint) -> Optional[str]:
    if rule.peers is not None and not any(
            _peer_matches(cluster, policy, peer, other) for peer in rule.peers):
        return None
    label = f"{policy.key} {direction.lower()}[{rule.index}]"
    if rule.ports is None:
        return label
    for i, entry in enumerate(rule.ports):
        if _port_matches(entry, port, protocol, dst):
            return f"{label} ports[{i}]"
    return None


def _direction(cluster, endpoint: Endpoint, direction: str, other: Endpoint,
               port: int, protocol: str, dst: Endpoint) -> Direction:
    pod = endpoint.pod
    name = direction.lower()
    if pod is None or pod.host_network:
        if pod is not None:
            why = f"{pod.key} uses the host network: never isolated"
        elif endpoint.node is not None:
            why = f"{endpoint.ip} is an address of node {endpoint.node}: never isolated"
        else:
            why = f"{endpoint.ip} is not a pod of the cluster: nothing here isolates it"
        return Direction(name, applies=False, reason=why)
    admins = [a for a in cluster.admin_policies if admin_selects(cluster, a, pod)]
    baseline = cluster.baseline
    if baseline is not None and not admin_selects(cluster, baseline, pod):
        baseline = None
    listed = tuple(a.key for a in admins) + ((baseline.key,) if baseline is not None else ())
    passed_by = ""
    for policy in admins:
        hit = _admin_decides(cluster, policy, direction, other, port, protocol, dst)
        if hit is None:
            continue
        label, action = hit
        if action == PASS:
            passed_by = f"{label}: Pass"
            break
        return Direction(name, True, False, (), (label,) if action == ALLOW else (),
                         action == ALLOW, f"{label}: {action}", "AdminNetworkPolicy",
                         f"{label}: {action}", listed)
    selecting = [p for p in sorted(cluster.policies, key=lambda p: p.key)
                 if p.namespace == pod.namespace and direction in p.policy_types
                 and matches(p.pod_selector, pod.label_map)]
    passed = f" (passed on by {passed_by})" if passed_by else ""
    if selecting:
        admitted = []
        for policy in selecting:
            for rule in (policy.ingress if direction == INGRESS else policy.egress):
                hit = _rule_admits(cluster, policy, rule, direction, other, port, protocol, dst)
                if hit:
                    admitted.append(hit)
        keys = tuple(p.key for p in selecting)
        if admitted:
            return Direction(name, True, True, keys, tuple(admitted), True,
                             f"admitted by {admitted[0]}{passed}", "NetworkPolicy", "", listed,
                             passed_by)
        return Direction(name, True, True, keys, (), False,
                         f"isolated by {', '.join(keys)} and no rule admits it{passed}",
                         "NetworkPolicy", "", listed, passed_by)
    if baseline is not None:
        hit = _admin_decides(cluster, baseline, direction, other, port, protocol, dst)
        if hit is not None:
            label, action = hit
            return Direction(name, True, False, (), (label,) if action == ALLOW else (),
                             action == ALLOW, f"{label}: {action}{passed}",
                             "BaselineAdminNetworkPolicy", f"{label}: {action}", listed, passed_by)
    if passed_by:
        why = f"passed on by {passed_by}; no policy isolates {pod.key} for {name}"
    elif listed:
        why = f"no admin rule matches and no policy isolates {pod.key} for {name}"
    else:
        why = f"no policy isolates {pod.key} for {name}"
    return Direction(name, applies=True, reason=why, admin_policies=listed, passed_by=passed_by)


# --- the admin tiers ----------------------------------------------------------

def admin_selects(cluster: Cluster, policy: AdminPolicy, pod: Pod) -> bool:
    return (not pod.host_network
            and matches(policy.subject.namespace_selector, _namespace_labels(cluster, pod.namespace))
            and matches(policy.subject.pod_selector, pod.label_map))


def _admin_peer_matches(cluster: Cluster, peer: AdminPeer, other: Endpoint) -> bool:
    if peer.networks:
        addr = ipaddress.ip_address(other.ip)
        return any(addr in n for n in map(ipaddress.ip_network, peer.networks)
                   if n.version == addr.version)
    if peer.node_selector is not None:
        return any(other.ip in n.ips for n in cluster.nodes if matches(peer.node_selector, n.label_map))
    pod = other.pod
    if pod is None or pod.host_network or peer.namespace_selector is None:
        return False
    return (matches(peer.namespace_selector, _namespace_labels(cluster, pod.namespace))
            and (peer.pod_selector is None or matches(peer.pod_selector, pod.label_map)))


def _admin_port_matches(entry: PolicyPort, port: int, protocol: str, dst: Endpoint) -> bool:
    if isinstance(entry.port, str) and entry.protocol is None:
        # namedPort: the destination pod's container port of that name, whatever its protocol
        if dst.pod is None or dst.pod.host_network:
            return False
        return any(cp.name == entry.port and cp.port == port and cp.protocol == protocol
                   for cp in dst.pod.ports)
    return _port_matches(entry, port, protocol, dst)


def _admin_decides(cluster: Cluster, policy: AdminPolicy, direction: str, other: Endpoint,
                   port: int, protocol: str, dst: Endpoint) -> Optional[tuple[str, str]]:
    """(`ANP name rule i`, action) of the first rule matching, or None."""
    rules: tuple[AdminRule, ...] = policy.ingress if direction == INGRESS else policy.egress
    for rule in sorted(rules, key=lambda r: r.index):
        if rule.peers is not None and not any(
                _admin_peer_matches(cluster, p, other) for p in rule.peers):
            continue
        if rule.ports is not None and not any(
                _admin_port_matches(e, port, protocol, dst) for e in rule.ports):
            continue
        named = f" ({rule.name})" if rule.name else ""
        return f"{policy.key} {direction.lower()} rule {rule.index}{named}", rule.action
    return None


def explain(cluster: Cluster, source: str, destination: str, port: int, protocol: str = "TCP",
            family: Optional[int] = None,
            node_addresses: Optional[Mapping[str, tuple[str, ...]]] = None) -> Explanation:
    """Whether `source` may open a connection to `destination` on `port`:
    the source's egress and the destination's ingress must both allow it.
    `node_addresses` (node name -> addresses) lets a node's own address be
    recognised: a node always reaches its own pods."""
    protocol = protocol.upper()
    dst = resolve(cluster, destination, family, node_addresses)
    fam = _family(dst.ip)
    src = resolve(cluster, source, fam, node_addresses)
    egress = _direction(cluster, src, EGRESS, dst, port, protocol, dst)
    ingress = _direction(cluster, dst, INGRESS, src, port, protocol, dst)
    dst_pod = dst.pod if dst.pod is not None and not dst.pod.host_network else None
    if dst_pod is not None and src.node is not None and src.node == dst_pod.node:
        ingress = replace(ingress, allowed=True, reason=(
            f"from {dst_pod.key}'s own node {src.node}: always allowed (kubelet probes)"))
    involved = set(egress.policies) | set(ingress.policies)
    admins = {k.split(" ", 1)[1] for k in egress.admin_policies + ingress.admin_policies}
    notes = tuple(str(p) for p in cluster.problems
                  if (p.kind == "NetworkPolicy" and p.object in involved)
                  or (p.kind in ("AdminNetworkPolicy", BASELINE) and p.object in admins))
    return Explanation(src.name, dst.name, port, protocol, fam,
                       egress.allowed and ingress.allowed, egress, ingress, notes)


def render(e: Explanation, color: bool = False) -> str:
    """The verdict, then one paragraph per direction: isolated or not, by
    which policies, and the rule that admits the connection or that none does."""
    verdict = paint("ALLOWED", "ok", color) if e.allowed else paint("DENIED", "bad", color)
    lines = [printable(f"{e.source} -> {e.destination} {e.port}/{e.protocol} (IPv{e.family}): ")
             + verdict]
    for d in (e.egress, e.ingress):
        who = e.source if d.direction == "egress" else e.destination
        if not d.applies:
            state = "not isolated"
        elif d.tier in ("AdminNetworkPolicy", "BaselineAdminNetworkPolicy"):
            state = "allows" if d.allowed else paint("refuses", "bad", color)
        elif not d.isolated:
            state = "not isolated, allows"
        else:
            state = f"isolated, {'allows' if d.allowed else paint('refuses', 'bad', color)}"
        lines.append(f"  {d.direction} of {printable(who)}: {state}: {printable(d.reason)}")
        if d.admin_policies:
            lines.append(f"    admin policies: {printable(', '.join(d.admin_policies))}")
        if d.policies:
            lines.append(f"    selected by: {printable(', '.join(d.policies))}")
        for hit in d.allowed_by[1:]:
            lines.append(f"    also admitted by {printable(hit)}")
    for note in e.notes:
        lines.append(f"  note: {printable(note)}")
    return "\n".join(lines) + "\n"
