"""Label selector matching, and an index of the cluster for answering
"which pods does this selector or peer pick" quickly.

The index is built once per cycle and memoizes every answer: many policies
share selectors and peers, and a cluster of 10,000 pods must not be scanned
once per rule.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Optional

from lib.model import (AdminPeer, AdminPolicy, Cluster, LabelSelector, NetworkPolicy, Node, Peer,
                       Pod, Requirement)

NAME_LABEL = "kubernetes.io/metadata.name"


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Kubernetes semantics: matchLabels AND every expression."""
    if selector.match_nothing:
        return False
    for key, value in selector.match_labels:
        if labels.get(key) != value:
            return False
    return all(_requirement_matches(r, labels) for r in selector.match_expressions)


def _requirement_matches(req: Requirement, labels: Mapping[str, str]) -> bool:
    # An operator we do not know matches nothing: a selector we cannot read
    # must never widen what a policy allows.
    if req.operator == "In":
        return req.key in labels and labels[req.key] in req.values
    if req.operator == "NotIn":
        return req.key not in labels or labels[req.key] not in req.values
    if req.operator == "Exists":
        return req.key in labels
    if req.operator == "DoesNotExist":
        return req.key not in labels
    return False


def _pod_order(pod: Pod) -> tuple[str, str]:
    return (pod.namespace, pod.name)


class ClusterIndex:
    """Pods by namespace, namespace labels, policies by namespace, with
    memoized selector and peer evaluation.

    Host-network pods are left out of every selector answer: they share
    their node's address, so they can only be reached as peers through an
    ipBlock, and no policy applies to them.
    """

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        labels: dict[str, Mapping[str, str]] = {
            ns.name: ns.label_map for ns in cluster.namespaces}
        by_ns: dict[str, list[Pod]] = defaultdict(list)
        self.host_network_pods: tuple[Pod, ...] = tuple(sorted(
            (p for p in cluster.pods if p.host_network), key=_pod_order))
        for pod in cluster.pods:
            if pod.host_network:
                continue
            by_ns[pod.namespace].append(pod)
            # A namespace we have no object for still exists for its pods;
            # the API server would give it only its name label.
            labels.setdefault(pod.namespace, {NAME_LABEL: pod.namespace})
        self.namespace_labels: dict[str, Mapping[str, str]] = dict(sorted(labels.items()))
        self.pods_by_namespace: dict[str, tuple[Pod, ...]] = {
            ns: tuple(sorted(pods, key=_pod_order)) for ns, pods in sorted(by_ns.items())}
        self.pods: tuple[Pod, ...] = tuple(
            p for ns in self.pods_by_namespace for p in self.pods_by_namespace[ns])
        self._ordinal: dict[int, int] = {id(p): i for i, p in enumerate(self.pods)}

        # namespace -> (key, value) -> pods carrying that label, in pod order
        self._postings: dict[str, dict[tuple[str, str], list[Pod]]] = {}
        for ns, pods in self.pods_by_namespace.items():
            postings: dict[tuple[str, str], list[Pod]] = {}
            for pod in pods:
                for pair in pod.labels:
                    found = postings.get(pair)
                    if found is None:
                        postings[pair] = [pod]
                    else:
                        found.append(pod)
            self._postings[ns] = postings

        policies: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for pol in sorted(cluster.policies, key=lambda p: (p.namespace, p.name)):
            policies[pol.namespace].append(pol)
        self.policies_by_namespace: dict[str, tuple[NetworkPolicy, ...]] = {
            ns: tuple(pols) for ns, pols in policies.items()}

        self._ns_memo: dict[LabelSelector, tuple[str, ...]] = {}
        self._pods_memo: dict[tuple[str, LabelSelector], tuple[Pod, ...]] = {}
        self._peer_memo: dict[tuple[Optional[str], Peer], tuple[Pod, ...]] = {}
        self._ordinals_memo: dict[tuple[Optional[str], Peer], frozenset[int]] = {}
        self._peers_memo: dict[tuple[str, tuple[Peer, ...]], tuple[Pod, ...]] = {}
        self._subjects: dict[int, frozenset[int]] = {}
        self._nodes_memo: dict[LabelSelector, tuple[Node, ...]] = {}

    def namespaces_selected(self, selector: LabelSelector) -> tuple[str, ...]:
        """Names of the namespaces the selector matches, sorted."""
        hit = self._ns_memo.get(selector)
        if hit is None:
            hit = tuple(ns for ns, labels in self.namespace_labels.items()
                        if matches(selector, labels))
            self._ns_memo[selector] = hit
        return hit

    def pods_selected(self, namespace: str, selector: LabelSelector) -> tuple[Pod, ...]:
        """Pods of one namespace that the selector matches, sorted by name."""
        key = (namespace, selector)
        hit = self._pods_memo.get(key)
        if hit is None:
            hit = tuple(p for p in self._candidates(namespace, selector)
                        if matches(selector, p.label_map))
            self._pods_memo[key] = hit
        return hit

    def _candidates(self, namespace: str, selector: LabelSelector) -> Iterable[Pod]:
        """The smallest list that surely holds every match: the rarest of
        the selector's matchLabels pairs, else the whole namespace."""
        if selector.match_nothing:
            return ()
        best: Optional[list[Pod]] = None
        postings = self._postings.get(namespace, {})
        for pair in selector.match_labels:
            posting = postings.get(pair, ())
            if best is None or len(posting) < len(best):
                best = posting
                if not best:
                    break
        if best is not None:
            return best
        return self.pods_by_namespace.get(namespace, ())

    def policy_pods(self, policy: NetworkPolicy) -> tuple[Pod, ...]:
        """Pods a policy applies to, on every node."""
        return self.pods_selected(policy.namespace, policy.pod_selector)

    def policies_for(self, pod: Pod) -> tuple[NetworkPolicy, ...]:
        """Policies that apply to a pod, sorted by name; none for host-network pods."""
        if pod.host_network:
            return ()
        return tuple(p for p in self.policies_by_namespace.get(pod.namespace, ())
                     if matches(p.pod_selector, pod.label_map))

    def peer_pods(self, namespace: str, peer: Peer) -> tuple[Pod, ...]:
        """Pods a selector peer of a policy in `namespace` matches, in pod
        order. An ipBlock peer matches no pod here: it is an address range."""
        key = self._peer_key(namespace, peer)
        hit = self._peer_memo.get(key)
        if hit is None:
            hit = self._peer_pods(namespace, peer)
            self._peer_memo[key] = hit
        return hit

    @staticmethod
    def _peer_key(namespace: str, peer: Peer) -> tuple[Optional[str], Peer]:
        # with a namespaceSelector the answer is the same from every namespace
        return (None if peer.namespace_selector is not None else namespace, peer)

    def _peer_ordinals(self, namespace: str, peer: Peer) -> frozenset[int]:
        key = self._peer_key(namespace, peer)
        hit = self._ordinals_memo.get(key)
        if hit is None:
            ordinal = self._ordinal
            hit = frozenset(ordinal[id(p)] for p in self.peer_pods(namespace, peer))
            self._ordinals_memo[key] = hit
        return hit

    def _peer_pods(self, namespace: str, peer: Peer) -> tuple[Pod, ...]:
        if peer.ip_block is not None or (peer.pod_selector is None
                                         and peer.namespace_selector is None):
            return ()
        if peer.namespace_selector is None:
            namespaces: tuple[str, ...] = (namespace,)
        else:
            namespaces = self.namespaces_selected(peer.namespace_selector)
        if peer.pod_selector is None:
            return tuple(p for ns in namespaces for p in self.pods_by_namespace.get(ns, ()))
        return tuple(p for ns in namespaces for p in self.pods_selected(ns, peer.pod_selector))

    def peers_pods(self, namespace: str, peers: tuple[Peer, ...]) -> tuple[Pod, ...]:
        """Union of the pods the peers of one rule match, in pod order."""
        key = (namespace, peers)
        hit = self._peers_memo.get(key)
        if hit is None:
            if len(peers) == 1:
                hit = self.peer_pods(namespace, peers[0])
            else:
                union = frozenset().union(*(self._peer_ordinals(namespace, p) for p in peers))
                pods = self.pods
                hit = tuple(pods[i] for i in sorted(union))
            self._peers_memo[key] = hit
        return hit

    # the admin tiers ------------------------------------------------------

    def admin_pods(self, peer: AdminPeer) -> tuple[Pod, ...]:
        """Pods an admin `pods`/`namespaces` peer matches, cluster-wide, in pod order."""
        if peer.namespace_selector is None:
            return ()
        return self.peer_pods("", Peer(pod_selector=peer.pod_selector,
                                       namespace_selector=peer.namespace_selector))

    def admin_selects(self, policy: AdminPolicy, pod: Pod) -> bool:
        """Whether the admin policy's subject holds the pod (never a host-network one)."""
        hit = self._subjects.get(id(policy))
        if hit is None:
            subject = AdminPeer(namespace_selector=policy.subject.namespace_selector,
                                pod_selector=policy.subject.pod_selector)
            hit = frozenset(self._ordinal[id(p)] for p in self.admin_pods(subject))
            self._subjects[id(policy)] = hit
        ordinal = self._ordinal.get(id(pod))
        return ordinal is not None and ordinal in hit

    def nodes_selected(self, selector: LabelSelector) -> tuple[Node, ...]:
        hit = self._nodes_memo.get(selector)
        if hit is None:
            hit = tuple(n for n in sorted(self.cluster.nodes, key=lambda n: n.name)
                        if matches(selector, n.label_map))
            self._nodes_memo[selector] = hit
        return hit
