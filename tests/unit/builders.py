"""Short constructors for lib.model values, so a test reads like the manifest it stands for."""
from __future__ import annotations

from typing import Iterable, Optional, Union

from lib.model import (EGRESS, INGRESS, TCP, Cluster, ContainerPort, IPBlock, LabelSelector,
                       Namespace, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule, Requirement,
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
