"""The cluster as the policy engine sees it: immutable values parsed from API objects.

Everything downstream (selection, compilation) is a pure function of these
types, so they are frozen and hashable, and carry no API noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Optional, Union

TCP, UDP, SCTP = "TCP", "UDP", "SCTP"
PROTOCOLS = (TCP, UDP, SCTP)
INGRESS, EGRESS = "Ingress", "Egress"

# policy.networking.k8s.io: the admin tiers around NetworkPolicy
ADMIN, BASELINE = "AdminNetworkPolicy", "BaselineAdminNetworkPolicy"
ALLOW, DENY, PASS = "Allow", "Deny", "Pass"

Labels = tuple[tuple[str, str], ...]  # sorted (key, value) pairs


def freeze_labels(labels: Optional[Mapping[str, str]]) -> Labels:
    return tuple(sorted((labels or {}).items()))


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry; operator is In, NotIn, Exists or DoesNotExist."""
    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector. The empty selector matches everything.

    `match_nothing` is the fail-closed form of a selector that could not be
    understood: it matches no object at all.
    """
    match_labels: Labels = ()
    match_expressions: tuple[Requirement, ...] = ()
    match_nothing: bool = False


EVERYTHING = LabelSelector()
NOTHING = LabelSelector(match_nothing=True)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = ()
    log_drops: bool = False          # annotation kube-policy-manager/log-drops: "true"

    @cached_property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = TCP
    name: Optional[str] = None


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod that holds an address and is running (others never reach the model).

    Slotted, with its label map made once: a cluster holds tens of thousands
    of pods, and compile walks them all, so their size decides how much of
    the cluster stays in the CPU's cache."""
    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]            # status.podIPs, IPv4 and/or IPv6, canonical text
    labels: Labels = ()
    host_network: bool = False
    ports: tuple[ContainerPort, ...] = ()
    label_map: Mapping[str, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_map", dict(self.labels))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class IPBlock:
    cidr: str                        # normalised network, e.g. "10.0.0.0/8"
    excepts: tuple[str, ...] = ()    # normalised networks inside cidr


@dataclass(frozen=True)
class Peer:
    """One entry of from/to. Exactly one of the two shapes is used:
    selectors (pod_selector and/or namespace_selector) or ip_block.
    A pod_selector without namespace_selector means the policy's namespace.
    """
    pod_selector: Optional[LabelSelector] = None
    namespace_selector: Optional[LabelSelector] = None
    ip_block: Optional[IPBlock] = None


@dataclass(frozen=True)
class PolicyPort:
    """port is a number, a container port name, or None (every port)."""
    protocol: str = TCP
    port: Union[int, str, None] = None
    end_port: Optional[int] = None


@dataclass(frozen=True)
class PolicyRule:
    """One ingress or egress rule.

    peers None: any peer (from/to absent or empty). ports None: any port and
    protocol (ports absent or empty). A rule that failed validation never
    reaches this type: it is dropped, so it allows nothing.
    """
    peers: Optional[tuple[Peer, ...]] = None
    ports: Optional[tuple[PolicyPort, ...]] = None
    index: int = 0                   # position in spec.ingress / spec.egress, for names and comments


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[str]     # subset of {INGRESS, EGRESS}, defaulted as the API server does
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    log_drops: bool = False          # annotation kube-policy-manager/log-drops: "true"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Node:
    """A node as an egress `nodes` peer of an admin policy sees it: its labels
    and the addresses of status.addresses (InternalIP, ExternalIP)."""
    name: str
    labels: Labels = ()
    ips: tuple[str, ...] = ()        # canonical text, IPv4 and/or IPv6

    @cached_property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class AdminSubject:
    """The pods an admin policy applies to: those of the namespaces
    `namespace_selector` matches that `pod_selector` matches (subject
    `namespaces` is the pods form with pod_selector EVERYTHING). Host-network
    pods are never subjects."""
    namespace_selector: LabelSelector
    pod_selector: LabelSelector = EVERYTHING


@dataclass(frozen=True)
class AdminPeer:
    """One entry of an admin rule's from/to; exactly one shape is used:
    pods (namespace_selector, with pod_selector; `namespaces` is pod_selector
    EVERYTHING), nodes (node_selector; egress only) or networks (normalised
    CIDRs; egress only)."""
    namespace_selector: Optional[LabelSelector] = None
    pod_selector: Optional[LabelSelector] = None
    node_selector: Optional[LabelSelector] = None
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminRule:
    """One ingress or egress rule of an admin policy, evaluated in order.

    peers None: any peer; ports None: any port and protocol. Both are None
    only in the fail-closed form of a rule that could not be understood,
    which objects.py turns into a Deny of everything at the rule's place.
    A port entry is a PolicyPort: portNumber (protocol, port), portRange
    (protocol, port, end_port), namedPort (port is the name and protocol is
    None: the protocol the named container port declares)."""
    action: str                      # ALLOW, DENY, PASS (a baseline policy: ALLOW or DENY)
    peers: Optional[tuple[AdminPeer, ...]] = None
    ports: Optional[tuple["PolicyPort", ...]] = None
    name: str = ""                   # the rule's `name`, for logs and explain
    index: int = 0                   # position in spec.ingress / spec.egress


@dataclass(frozen=True)
class AdminPolicy:
    """An AdminNetworkPolicy (kind ADMIN, priority 0-1000, lower first) or
    the BaselineAdminNetworkPolicy named `default` (kind BASELINE, priority
    None). Cluster-scoped."""
    kind: str
    name: str
    subject: AdminSubject
    priority: Optional[int] = None
    ingress: tuple[AdminRule, ...] = ()
    egress: tuple[AdminRule, ...] = ()
    log_drops: bool = False          # annotation kube-policy-manager/log-drops: "true"

    @property
    def key(self) -> str:
        """How logs, comments and explain name it: `ANP name` or `BANP name`."""
        return f"{'ANP' if self.kind == ADMIN else 'BANP'} {self.name}"


@dataclass(frozen=True)
class Problem:
    """A validation error: the object, the field path and what is wrong."""
    kind: str                        # "NetworkPolicy", "Pod", "Namespace", ADMIN, BASELINE, "Node"
    object: str                      # "namespace/name" or "name"
    field: str                       # "spec.ingress[0].ports[1].endPort"
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.object}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Cluster:
    """What one cycle knows: every usable object, plus the problems met on the way."""
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    policies: tuple[NetworkPolicy, ...] = ()
    problems: tuple[Problem, ...] = field(default=(), compare=False)
    # The admin tiers: AdminNetworkPolicies in evaluation order (priority,
    # then name), then at most one baseline policy; nodes only as `nodes` peers.
    admin_policies: tuple[AdminPolicy, ...] = ()
    baseline: Optional[AdminPolicy] = None
    nodes: tuple[Node, ...] = ()
