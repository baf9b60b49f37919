"""The nftables state we want in, or read from, our own table: chains of
tagged rules, address sets and verdict maps, with the names and the element
spellings that `nft` lists back.

The same types serve the desired state (what the renderer makes of the
dataplane-neutral intent) and the kernel's (what lib.nft_parse makes of the
listing), so the diff compares like with like: chains by the hashes in
their rules' comments, sets and maps by their elements as text, spelled
here exactly as nft 1.0.6 lists them (see the functions at the end).

Names. Everything lives in `table inet kube-policy-manager`, both families.
Every name of ours starts with `kpm-` (which also keeps it clear of nft's
keywords), is lower case and at most MAX_NAME characters:
  kpm-forward, kpm-input          base chains (hooks forward and input)
  kpm-ingress4/6, kpm-egress4/6   verdict maps: pod address -> jump to its chain
  kpm-i4-<hash>, kpm-e4-<hash>    pod chains (ingress, egress; 6 for IPv6), named
                                  by their content so that pods with the same
                                  rules share one chain
  kpm-n4-<hash>, kpm-p4-<hash>    address sets, named-port sets (ipset's hashes)
  kpm-an4-<hash>                  an address set of single addresses (plain)
A digit right after the kind says the family (`name_family`); base chains
serve both.
"""
from __future__ import annotations

import bisect
import functools
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from lib.ruleset import COMMENT_TAG, HASH_LEN, short_hash

FAMILY = "inet"
TABLE = "kube-policy-manager"
NAME_PREFIX = "kpm-"
MAX_NAME = 255               # the kernel refuses longer chain and set names
MAX_COMMENT = 128            # nft refuses longer comments ("128 characters maximum")
MAX_TEXT = MAX_COMMENT - len(COMMENT_TAG) - HASH_LEN - 1   # readable part after "kpm:<hash> "

FORWARD = NAME_PREFIX + "forward"
INPUT = NAME_PREFIX + "input"
# Before iptables-nft's and the legacy filter tables (priority 0, `filter`)
# so that our refusals come first; after conntrack (-200) so `ct state` works.
PRIORITY = -10

ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
ADDR_PROTO_PORT = {f: f"{ADDR[f]} . inet_proto . inet_service" for f in ADDR}
KEY_FAMILY = {key: f for f, key in ADDR.items()} | {key: f for f, key in ADDR_PROTO_PORT.items()}
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite"}  # the ones with ports
_PORTED = frozenset(PROTOCOLS.values())

_NAME = re.compile(r"kpm-[a-z0-9][a-z0-9-]*")
_TAG = re.compile(re.escape(COMMENT_TAG) + r"([0-9a-f]{%d})(?: |$)" % HASH_LEN)
_UNSAFE_TEXT = re.compile(r"[^A-Za-z0-9._/:\[\]=,+ -]")
_FAMILY_OF_NAME = re.compile(r"kpm-[a-z]+([46])(?:-|$)")


def name_family(name: str) -> int:
    """4 or 6 for a per-family name (`kpm-i4-...`, `kpm-egress6`), 0 for
    names that serve both (the base chains)."""
    m = _FAMILY_OF_NAME.match(name)
    return int(m.group(1)) if m else 0


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None


def hashed_name(kind: str, family: int, *parts: str) -> str:
    """`kpm-<kind><family>-<20 hex of parts>`; kind "i", "e" (chains), "n", "p" (sets)."""
    return f"{NAME_PREFIX}{kind}{family}-{short_hash(*parts)}"


def tag_of(comment: Optional[str]) -> Optional[str]:
    """The hash of a "kpm:<hash> ..." comment; None for anything else."""
    m = _TAG.match(comment) if comment else None
    return m.group(1) if m else None


# --- types ------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One rule: its statement and its comment. A rule we write has the
    comment "kpm:<hash> <text>", the hash covering statement and text
    (`tagged`); a rule read back holds what nft listed (lib.nft_parse), and
    is compared by that hash alone, never by nft's re-formatting."""
    statement: str
    comment: Optional[str] = None

    @property
    def hash(self) -> Optional[str]:
        return tag_of(self.comment)

    @property
    def text(self) -> str:
        """The comment without its tag: what the rule is for."""
        if self.hash is None:
            return self.comment or ""
        return self.comment[len(COMMENT_TAG) + HASH_LEN + 1:]


def safe_text(text: str) -> str:
    """lib.ruleset's safe alphabet plus the space (an nft comment is always
    quoted), cut to what fits beside the tag."""
    return _UNSAFE_TEXT.sub("_", text)[:MAX_TEXT]


@functools.lru_cache(maxsize=16384)      # pods under alike policies repeat their rules
def tagged(statement: str, text: str = "") -> Rule:
    """The rule we write for `statement`, its comment within nft's limit."""
    digest = short_hash(statement, "#", text, length=HASH_LEN)
    body = safe_text(text)
    return Rule(statement, f"{COMMENT_TAG}{digest} {body}".rstrip())


@dataclass(frozen=True)
class BaseHook:
    """What makes a chain a base chain."""
    hook: str                    # "forward", "input"
    priority: int = PRIORITY
    policy: str = "accept"
    type: str = "filter"

    def spec(self) -> str:
        return (f"type {self.type} hook {self.hook} priority {self.priority}; "
                f"policy {self.policy};")


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()
    base: Optional[BaseHook] = None      # None: a regular chain, entered by jump/goto

    @property
    def hashes(self) -> tuple[Optional[str], ...]:
        return tuple(r.hash for r in self.rules)


@dataclass(frozen=True)
class AddressSet:
    """A set of addresses (`ipv4_addr`, with `interval` for networks) or of
    (address, protocol, port) for named egress ports."""
    name: str
    key: str                                  # ADDR[f] or ADDR_PROTO_PORT[f]
    interval: bool = False
    elements: frozenset[str] = frozenset()    # as nft lists them (see below)
    extra: tuple[str, ...] = ()               # read back: anything else nft listed
                                              # (other flags, timeout, size...); () in ours

    @property
    def family(self) -> int:
        return KEY_FAMILY.get(self.key, 0)


@dataclass(frozen=True)
class VerdictMap:
    """A map from address to verdict: the per-pod dispatch of a base chain."""
    name: str
    key: str                                  # ADDR[f]
    interval: bool = False
    elements: Mapping[str, str] = field(default_factory=dict)   # element -> "jump kpm-..."
    extra: tuple[str, ...] = ()               # read back: as AddressSet.extra; a map of
                                              # another data type lists "data <type>"

    @property
    def family(self) -> int:
        return KEY_FAMILY.get(self.key, 0)


@dataclass(frozen=True)
class Table:
    """Our table. `exists` is False only for a kernel without it; its
    contents are then empty."""
    chains: tuple[Chain, ...] = ()            # sorted by name
    sets: tuple[AddressSet, ...] = ()
    maps: tuple[VerdictMap, ...] = ()
    exists: bool = True
    flags: tuple[str, ...] = ()               # read back: table flags (dormant...); () in ours

    def chain_map(self) -> dict[str, Chain]:
        return {c.name: c for c in self.chains}

    def set_map(self) -> dict[str, AddressSet]:
        return {s.name: s for s in self.sets}

    def map_map(self) -> dict[str, VerdictMap]:
        return {m.name: m for m in self.maps}


ABSENT = Table(exists=False)


# --- element spelling ---------------------------------------------------------
# nft prints addresses with inet_ntop: IPv6 compressed (RFC 5952, as Python
# does) except that ::a.b.c.d and ::ffff:a.b.c.d keep a dotted IPv4 tail.
# An interval element is listed as a bare address when it holds one
# address, as a prefix when it is one, as "a-b" otherwise. nft refuses
# overlapping elements in an interval set ("conflicting intervals") and
# does not merge adjacent ones: elements must be disjoint, and are listed
# as they were added.

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_text(address: Address) -> str:
    """As nft prints it: with the C library's inet_ntop, which nft calls
    (the dotted IPv4 tails of ::a.b.c.d and ::ffff:a.b.c.d included)."""
    return socket.inet_ntop(_AF[address.version], address.packed)


def network_text(net: Network) -> str:
    if net.prefixlen == net.max_prefixlen:
        return address_text(net.network_address)
    return f"{address_text(net.network_address)}/{net.prefixlen}"


_BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _span(member: str) -> tuple[int, int, int]:
    """(version, first, last) of an address or CIDR, host bits cleared.
    Plain spellings (an address, maybe a decimal prefix length) are read
    with inet_pton, the rest by ipaddress, which reads the same and more
    (netmasks) and raises ValueError on anything else: a set of a
    thousand pods is read in a millisecond rather than tens."""
    text = member.strip()
    addr, slash, length = text.partition("/")
    version = 6 if ":" in addr else 4
    bits = _BITS[version]
    try:
        value = int.from_bytes(socket.inet_pton(_AF[version], addr), "big")
    except OSError:
        value = None
    if value is None or "%" in addr or (slash and not (length.isascii() and length.isdigit())) \
            or (slash and int(length) > bits):
        net = ipaddress.ip_network(text, strict=False)
        return net.version, int(net.network_address), int(net.broadcast_address)
    prefix = int(length) if slash else bits
    size = 1 << (bits - prefix)
    first = value & ~(size - 1)
    return version, first, first + size - 1


def _element_text(version: int, value: int, prefix: int) -> str:
    if version == 4:
        text = socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    else:
        text = _ipv6_text(value)
    return text if prefix == _BITS[version] else f"{text}/{prefix}"


def interval_elements(members: Iterable[str]) -> frozenset[str]:
    """Addresses and CIDRs of one family (ipset spellings: `10.0.0.5`,
    `10.0.0.0/24`, the two `/1` halves of everything) as the disjoint
    elements nft lists for them: overlapping and adjacent networks are
    merged into the fewest prefixes, host bits cleared."""
    spans = sorted(_span(m) for m in members)
    if len({v for v, _, _ in spans}) > 1:
        raise ValueError("interval elements: IPv4 and IPv6 mixed in one set")
    if not spans:
        return frozenset()
    version, bits = spans[0][0], _BITS[spans[0][0]]
    merged: list[list[int]] = []
    for _, first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    out = []
    for first, last in merged:
        while first <= last:
            # the largest aligned block at `first` that ends by `last`
            size = first & -first if first else 1 << bits
            while size > last - first + 1:
                size >>= 1
            out.append(_element_text(version, first, bits - size.bit_length() + 1))
            first += size
    return frozenset(out)


def element_span(element: str) -> tuple[int, int]:
    """An interval element as nft lists it (address, prefix or `a-b`) as
    its first and last address."""
    if "-" in element:
        first, last = (_address(p.strip())[1] for p in element.split("-"))
        return first, last
    _, first, last = _span(element)
    return first, last


def merged_spans(elements: Iterable[str]) -> list[tuple[int, int]]:
    """The elements of an interval set as sorted spans, adjacent ones joined."""
    merged: list[list[int]] = []
    for first, last in sorted(element_span(e) for e in elements):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(a, b) for a, b in merged]


def spans_cover(spans: list[tuple[int, int]], elements: Iterable[str]) -> bool:
    """Whether every address of `elements` lies in one of `spans` (merged_spans)."""
    starts = [a for a, _ in spans]
    for element in elements:
        first, last = element_span(element)
        i = bisect.bisect_right(starts, first) - 1
        if i < 0 or last > spans[i][1]:
            return False
    return True


def _address(text: str) -> tuple[int, int]:
    """(version, value) of an address: inet_pton for the plain spellings,
    ipaddress (which raises ValueError) for the rest."""
    version = 6 if ":" in text else 4
    try:
        return version, int.from_bytes(socket.inet_pton(_AF[version], text), "big")
    except OSError:
        address = ipaddress.ip_address(text)
        return address.version, int(address)


def _ipv6_text(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


@functools.lru_cache(maxsize=65536)      # a pod's address stands in many sets
def address_element(member: str) -> str:
    """One address as a non-interval set or map lists it."""
    af = socket.AF_INET6 if ":" in member else socket.AF_INET
    try:                               # the common case, quickly: as inet_ntop spells it, as nft
        return socket.inet_ntop(af, socket.inet_pton(af, member))
    except OSError:
        pass                           # other spellings: below
    text = member.strip()
    if "%" in text:                    # a scope: ipaddress's reading
        return address_text(ipaddress.ip_address(text))
    version, value = _address(text)
    return _element_text(version, value, _BITS[version])


def port_element(member: str) -> str:
    """An ipset hash:ip,port member (`10.244.1.10,tcp:8080`) as the
    `ADDR . inet_proto . inet_service` element nft lists:
    `10.244.1.10 . tcp . 8080`."""
    addr, sep, port = member.strip().rpartition(",")
    proto, colon, number = port.rpartition(":")
    if not sep or not colon:
        raise ValueError(f"port element {member!r}: expected ADDRESS,PROTO:PORT")
    return _port_triple(member, addr, proto, number)


def _port_triple(what: str, addr: str, proto: str, number: str) -> str:
    proto = proto.lower()
    if proto not in _PORTED:
        raise ValueError(f"port element {what!r}: expected ADDRESS,PROTO:PORT")
    value = int(number)
    if not 0 <= value <= 65535:
        raise ValueError(f"port element {what!r}: port {value} out of range")
    return f"{address_element(addr)} . {proto} . {value}"


def canonical_element(key: str, interval: bool, element: str) -> str:
    """`element` (already in nft's syntax) spelled as nft lists it, for
    checking what is about to be written; raises ValueError. Each element
    is read once: a first table checks tens of thousands."""
    family = KEY_FAMILY.get(key)
    if family is None:
        raise ValueError(f"element {element!r}: unsupported key type {key}")
    if key == ADDR_PROTO_PORT[family]:
        addr, proto, port = element.split(" . ")
        proto = proto.strip()
        if proto.isdigit():
            proto = PROTOCOLS.get(int(proto), proto)
        spelled = _port_triple(element, addr.strip(), proto, port)
        version = 6 if ":" in spelled.partition(" . ")[0] else 4
    elif not interval:
        spelled = address_element(element)
        version = 6 if ":" in spelled else 4
    elif "-" in element:
        first, last = (ipaddress.ip_address(p.strip()) for p in element.split("-"))
        if first.version != last.version:
            raise ValueError(f"element {element!r}: not of type {key}")
        nets = list(ipaddress.summarize_address_range(first, last))
        spelled = (network_text(nets[0]) if len(nets) == 1
                   else f"{address_text(first)}-{address_text(last)}")
        version = first.version
    else:
        version, first, last = _span(element)
        spelled = _element_text(version, first,
                                _BITS[version] - (last - first + 1).bit_length() + 1)
    if version != family:
        raise ValueError(f"element {element!r}: not of type {key}")
    return spelled
