"""What a node must enforce, as packet-filter data that no one dataplane owns.

lib/compile.py decides, from the cluster, which chains of which rules each
local pod's traffic meets; a renderer turns that into one dataplane's terms
(lib/iptables_render.py: iptables chains and ipsets). Keeping the decision
apart from the syntax means both dataplanes enforce one evaluation, and a
renderer may lay the same rules out differently (share identical pod
chains, dispatch by map) without deciding anything.

A rule is a match and a verdict. Allowed packets RETURN to whatever follows
our chains (we never accept for the node); refused ones are REJECTed (a TCP
reset for TCP, ICMP port unreachable otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from lib.model import Pod, PolicyPort
from lib.ruleset import IpSet

RETURN, REJECT, JUMP, GOTO, LOG = "return", "reject", "jump", "goto", "log"
VERDICTS = (RETURN, REJECT, JUMP, GOTO, LOG)
NFLOG_TARGET, LOG_TARGET = "nflog", "log"


@dataclass(frozen=True)
class Match:
    """What a packet must carry for the rule to apply; an unset field tests
    nothing. Addresses are CIDR text of the rule's family; protocols are
    lower-case names (tcp, udp, sctp, ipv6-icmp)."""
    in_loopback: bool = False                # arrived on lo (the node to itself)
    src_net: Optional[str] = None
    dst_net: Optional[str] = None
    established: bool = False                # conntrack: RELATED or ESTABLISHED
    src_set: Optional[str] = None            # source address in this address set
    dst_set: Optional[str] = None            # destination address in this address set
    dst_port_set: Optional[str] = None       # (destination address, protocol, port) in this set
    protocol: Optional[str] = None
    dports: Optional[tuple[int, int]] = None  # destination port range, first and last
    icmpv6_type: Optional[int] = None

    def sets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.src_set, self.dst_set, self.dst_port_set) if s)


ANY = Match()


@dataclass(frozen=True)
class LogSpec:
    """Log and go on (the walk continues to the next rule), at most `rate`
    lines a minute after a burst of `burst`."""
    target: str                      # NFLOG_TARGET or LOG_TARGET
    prefix: str
    rate: int
    burst: int
    group: int = 0                   # NFLOG group


@dataclass(frozen=True)
class Verdict:
    kind: str                        # one of VERDICTS
    chain: Optional[str] = None      # JUMP / GOTO target
    log: Optional[LogSpec] = None    # LOG

    def __post_init__(self):
        if self.kind not in VERDICTS:
            raise ValueError(f"verdict {self.kind!r}: must be one of {', '.join(VERDICTS)}")
        if (self.chain is not None) != (self.kind in (JUMP, GOTO)):
            raise ValueError(f"verdict {self.kind}: a chain is given with jump and goto only")
        if (self.log is not None) != (self.kind == LOG):
            raise ValueError(f"verdict {self.kind}: log options are given with log only")


ALLOWED = Verdict(RETURN)
REFUSED = Verdict(REJECT)


@dataclass(frozen=True)
class FilterRule:
    match: Match
    verdict: Verdict
    text: str = ""                   # what the rule stands for: "x/web ingress[0] ports[1]"
    subject: str = ""                # the one pod the rule is for, when only that makes it
                                     # the pod's own ("x/web" of "x/web reject"); a renderer
                                     # that shares chains between pods may leave it out

    @property
    def full_text(self) -> str:
        return f"{self.subject} {self.text}" if self.subject else self.text


@dataclass(frozen=True)
class FilterChain:
    name: str
    rules: tuple[FilterRule, ...] = ()


@dataclass(frozen=True)
class Dispatch:
    """A local pod's address sent into its chain: by source for its egress
    (on the way to other pods and to the node), by destination for its
    ingress."""
    address: str                     # the pod's address, no prefix length
    chain: str
    pod: str                         # namespace/name
    direction: str                   # model.INGRESS or model.EGRESS


@dataclass(frozen=True)
class FamilyIntent:
    """One family's filter: `head` first on both paths (replies, neighbour
    discovery), then the dispatch, then the tails (new-pod isolation);
    `chains` holds every chain that dispatch and rules jump to."""
    family: int
    head: tuple[FilterRule, ...] = ()
    dispatch: tuple[Dispatch, ...] = ()
    forward_tail: tuple[FilterRule, ...] = ()
    input_tail: tuple[FilterRule, ...] = ()
    chains: tuple[FilterChain, ...] = ()     # sorted by name


@dataclass(frozen=True)
class NodeIntent:
    v4: FamilyIntent = FamilyIntent(4)
    v6: FamilyIntent = FamilyIntent(6)
    sets: tuple[IpSet, ...] = ()             # every set a rule tests, both families, by name

    def family(self, family: int) -> FamilyIntent:
        return self.v4 if family == 4 else self.v6


def port_match(port: PolicyPort, pod: Pod, peer: Match = ANY) -> Optional[Match]:
    """The peer's match narrowed to the port entry; None when the entry can
    match nothing (a named port the pod does not declare)."""
    proto = port.protocol.lower()
    if port.port is None:
        return replace(peer, protocol=proto)
    if isinstance(port.port, str):
        numbers = [cp.port for cp in pod.ports
                   if cp.name == port.port and cp.protocol == port.protocol]
        if not numbers:
            return None
        return replace(peer, protocol=proto, dports=(numbers[0], numbers[0]))
    if port.end_port is not None and port.end_port != port.port:
        if port.end_port < port.port:
            return None
        return replace(peer, protocol=proto, dports=(port.port, port.end_port))
    return replace(peer, protocol=proto, dports=(port.port, port.port))
