"""Short constructors for lib.model values, so a test reads like the manifest it stands for."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional, Union

from lib.model import (ADMIN, BASELINE, EGRESS, INGRESS, TCP, AdminPeer, AdminPolicy, AdminRule,
                       AdminSubject, Cluster, ContainerPort, IPBlock, LabelSelector, Namespace,
                       NetworkPolicy, Node, Peer, Pod, PolicyPort, PolicyRule, Requirement,
                       freeze_labels)

NAME_LABEL = "kubernetes.io/metadata.name"


def req(key: str, operator: str, *values: str) -> Requirement:
    return Requirement(key, operator, tuple(values))


def sel(labels: Optional[dict] = None, *expressions: Requirement) -> LabelSelector:
    """sel() is the empty selector (everything)."""
    return LabelSelector(freeze_labels(labels), tuple(expressions))


def namespace(name: str, **labels: str) -> Namespace:
    """As the API server stores it: with its name label."""
    return Namespace(name, freeze_labels({NAME_LABEL: name, **labels}))


def cport(port: int, name: Optional[str] = None, protocol: str = TCP) -> ContainerPort:
    return ContainerPort(port, protocol, name)


def pod(key: str, node: str = "n1", ips: Union[str, Iterable[str]] = (), labels: Optional[dict] = None,
        ports: Iterable[ContainerPort] = (), host_network: bool = False) -> Pod:
    ns, name = key.split("/")
    ips = (ips,) if isinstance(ips, str) else tuple(ips)
    return Pod(ns, name, node, ips, freeze_labels(labels), host_network, tuple(ports))


def pods_peer(labels: Optional[dict] = None, *expressions: Requirement) -> Peer:
    """podSelector alone: pods of the policy's namespace."""
    return Peer(pod_selector=sel(labels, *expressions))


def ns_peer(labels: Optional[dict] = None, *expressions: Requirement) -> Peer:
    """namespaceSelector alone: every pod of the matching namespaces."""
    return Peer(namespace_selector=sel(labels, *expressions))


def both_peer(ns_labels: Optional[dict], pod_labels: Optional[dict]) -> Peer:
    return Peer(pod_selector=sel(pod_labels), namespace_selector=sel(ns_labels))


def block(cidr: str, *excepts: str) -> Peer:
    return Peer(ip_block=IPBlock(cidr, tuple(excepts)))


def pport(port: Union[int, str, None] = None, protocol: str = TCP,
          end_port: Optional[int] = None) -> PolicyPort:
    return PolicyPort(protocol, port, end_port)


def rule(peers: Optional[Iterable[Peer]] = None,
         ports: Optional[Iterable[PolicyPort]] = None) -> PolicyRule:
    """peers/ports None: any peer / any port, as when from/to or ports is absent."""
    return PolicyRule(None if peers is None else tuple(peers),
                      None if ports is None else tuple(ports))


def policy(key: str, selector: LabelSelector = LabelSelector(),
           ingress: Optional[Iterable[PolicyRule]] = None,
           egress: Optional[Iterable[PolicyRule]] = None,
           types: Optional[Iterable[str]] = None) -> NetworkPolicy:
    """policyTypes default as the API server does: Ingress, plus Egress when
    egress rules are given. Rules get their index from their position."""
    ns, name = key.split("/")
    ingress_rules = tuple(r.__class__(r.peers, r.ports, i) for i, r in enumerate(ingress or ()))
    egress_rules = tuple(r.__class__(r.peers, r.ports, i) for i, r in enumerate(egress or ()))
    if types is None:
        types = [INGRESS] + ([EGRESS] if egress_rules else [])
    return NetworkPolicy(ns, name, selector, frozenset(types), ingress_rules, egress_rules)


def cluster(*objects: Union[Namespace, Pod, NetworkPolicy, Iterable]) -> Cluster:
    """A Cluster from any mix of namespaces, pods and policies (or lists of them)."""
    flat: list = []
    for obj in objects:
        if isinstance(obj, (Namespace, Pod, NetworkPolicy)):
            flat.append(obj)
        else:
            flat.extend(obj)
    return Cluster(
        namespaces=tuple(o for o in flat if isinstance(o, Namespace)),
        pods=tuple(o for o in flat if isinstance(o, Pod)),
        policies=tuple(o for o in flat if isinstance(o, NetworkPolicy)),
    )


# --- the admin tiers -----------------------------------------------------

def ns_subject(labels: Optional[dict] = None) -> AdminSubject:
    """subject.namespaces: every pod of the matching namespaces."""
    return AdminSubject(sel(labels))


def pods_subject(ns_labels: Optional[dict], pod_labels: Optional[dict]) -> AdminSubject:
    return AdminSubject(sel(ns_labels), sel(pod_labels))


def a_namespaces(labels: Optional[dict] = None) -> AdminPeer:
    return AdminPeer(namespace_selector=sel(labels), pod_selector=sel())


def a_pods(ns_labels: Optional[dict], pod_labels: Optional[dict]) -> AdminPeer:
    return AdminPeer(namespace_selector=sel(ns_labels), pod_selector=sel(pod_labels))


def a_nodes(labels: Optional[dict] = None) -> AdminPeer:
    return AdminPeer(node_selector=sel(labels))


def a_networks(*cidrs: str) -> AdminPeer:
    return AdminPeer(networks=tuple(cidrs))


def named(name: str) -> PolicyPort:
    """namedPort: no protocol, the container port's own."""
    return PolicyPort(None, name)


def arule(action: str, peers: Optional[Iterable[AdminPeer]] = None,
          ports: Optional[Iterable[PolicyPort]] = None, name: str = "") -> AdminRule:
    return AdminRule(action, None if peers is None else tuple(peers),
                     None if ports is None else tuple(ports), name)


def _indexed(rules) -> tuple[AdminRule, ...]:
    return tuple(AdminRule(r.action, r.peers, r.ports, r.name, i) for i, r in enumerate(rules or ()))


def anp(name: str, priority: Optional[int], subject: AdminSubject,
        ingress: Optional[Iterable[AdminRule]] = None,
        egress: Optional[Iterable[AdminRule]] = None, log_drops: bool = False) -> AdminPolicy:
    return AdminPolicy(ADMIN, name, subject, priority, _indexed(ingress), _indexed(egress), log_drops)


def banp(subject: AdminSubject, ingress: Optional[Iterable[AdminRule]] = None,
         egress: Optional[Iterable[AdminRule]] = None, log_drops: bool = False) -> AdminPolicy:
    return AdminPolicy(BASELINE, "default", subject, None, _indexed(ingress), _indexed(egress),
                       log_drops)


def node(name: str, ips: Iterable[str], **labels: str) -> Node:
    return Node(name, freeze_labels(labels), tuple(ips))


def with_admin(c: Cluster, admin: Iterable[AdminPolicy] = (), baseline: Optional[AdminPolicy] = None,
               nodes: Iterable[Node] = ()) -> Cluster:
    """The cluster with admin policies in evaluation order (priority, then name)."""
    ordered = sorted(admin, key=lambda a: (a.priority is not None, a.priority or 0, a.name))
    return replace(c, admin_policies=tuple(ordered), baseline=baseline, nodes=tuple(nodes))
