"""The filter state we want in the kernel: chains of tagged rules, and ipsets.

Each rule carries a short content hash in its comment. Comparing with
`iptables-save` output then only needs the hashes, never the way iptables
re-formats a rule (`-m tcp` added, `/32` appended, quoting changed).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

PREFIX = "KPM-"
MAX_CHAIN_NAME = 28          # iptables limit
MAX_SET_NAME = 31            # ipset limit
COMMENT_TAG = "kpm:"         # every comment we write starts with "kpm:<hash> "
HASH_LEN = 12
MAX_COMMENT = 200            # iptables accepts 255; keep room for the tag

FAMILIES = (4, 6)
SET_FAMILY = {4: "inet", 6: "inet6"}
HASH_NET = "hash:net"
HASH_IP_PORT = "hash:ip,port"

_UNSAFE = re.compile(r"[^A-Za-z0-9._/:\[\]=,+-]")


def short_hash(*parts: str, length: int = 20) -> str:
    """Deterministic name component: hex digest of the parts, NUL-separated."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def safe_comment(text: str) -> str:
    """Comment text that cannot break a restore line or a terminal: a safe
    alphabet only, bounded length. Names from the API pass through unchanged
    when they are valid Kubernetes names."""
    return _UNSAFE.sub("_", text)[:MAX_COMMENT]


def set_member(net) -> list[str]:
    """Members as `ipset save` prints them: host routes bare, a /0 as its two halves."""
    if net.prefixlen == 0:
        return [h.with_prefixlen for h in net.subnets()]
    if net.prefixlen == net.max_prefixlen:
        return [str(net.network_address)]
    return [net.with_prefixlen]


@dataclass(frozen=True)
class Rule:
    """One rule of one chain: iptables arguments (matches and target, no
    comment) plus readable text. Its identity is the hash of both."""
    args: tuple[str, ...]
    text: str = ""

    @property
    def hash(self) -> str:
        return short_hash(*self.args, "#", self.text, length=HASH_LEN)

    @property
    def comment(self) -> str:
        body = safe_comment(self.text)
        return f"{COMMENT_TAG}{self.hash} {body}".rstrip()

    def restore_args(self) -> tuple[str, ...]:
        """Arguments as written to iptables-restore, comment match first."""
        return ("-m", "comment", "--comment", self.comment) + self.args


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()

    @property
    def hashes(self) -> tuple[str, ...]:
        return tuple(r.hash for r in self.rules)


@dataclass(frozen=True)
class Hook:
    """A jump rule of ours that must be the first rule of a built-in chain."""
    builtin: str                 # "FORWARD", "INPUT"
    rule: Rule                   # args end with ("-j", "KPM-...")


@dataclass(frozen=True)
class IpSet:
    name: str
    kind: str                    # HASH_NET or HASH_IP_PORT
    family: int                  # 4 or 6
    members: frozenset[str] = frozenset()   # canonical member strings (see lib.ipsets)


@dataclass(frozen=True)
class FamilyState:
    """Everything we own in the filter table of one family."""
    family: int
    chains: tuple[Chain, ...] = ()          # sorted by name, all named PREFIX...
    hooks: tuple[Hook, ...] = ()

    def chain_map(self) -> dict[str, Chain]:
        return {c.name: c for c in self.chains}


@dataclass(frozen=True)
class DesiredState:
    v4: FamilyState = field(default_factory=lambda: FamilyState(4))
    v6: FamilyState = field(default_factory=lambda: FamilyState(6))
    sets: tuple[IpSet, ...] = ()            # both families, sorted by name

    def family(self, family: int) -> FamilyState:
        return self.v4 if family == 4 else self.v6

    def set_map(self) -> dict[str, IpSet]:
        return {s.name: s for s in self.sets}
