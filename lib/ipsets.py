"""Parse `ipset save` output into our sets, and spell members the way
`ipset save` prints them, so desired and kernel members compare as strings.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Optional

from lib.ruleset import HASH_IP_PORT, HASH_NET, PREFIX, IpSet

_FAMILIES = {"inet": 4, "inet6": 6}
_PORT_PROTOCOLS = ("tcp", "udp", "sctp", "udplite")
_PORT = re.compile(r"^(?:([A-Za-z]+):)?(\d{1,5})$")
_MAX_SHOWN = 120
_ASCII_SPACE = " \t\r\n\f\v"
_FIELDS = re.compile(r"[ \t]+")


class IpsetParseError(ValueError):
    """A member or a save text we cannot read."""


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise IpsetParseError(f"{what}: {text!r} is not an IP address") from None


def _net(member: str) -> str:
    try:
        net = ipaddress.ip_network(member, strict=False)
    except ValueError:
        raise IpsetParseError(f"hash:net member {member!r}: not an address or CIDR") from None
    if net.prefixlen == 0:
        raise IpsetParseError(f"hash:net member {member!r}: /0 is refused by hash:net, use two /1 halves")
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def _ip_port(member: str) -> str:
    addr, sep, port = member.rpartition(",")
    if not sep:
        raise IpsetParseError(f"hash:ip,port member {member!r}: expected ADDRESS,PROTO:PORT")
    ip = _address(addr, f"hash:ip,port member {member!r}")
    m = _PORT.match(port)
    if not m:
        raise IpsetParseError(f"hash:ip,port member {member!r}: port must be [PROTO:]NUMBER")
    proto = (m.group(1) or "tcp").lower()        # ipset's default protocol is tcp
    number = int(m.group(2))
    if proto not in _PORT_PROTOCOLS:
        raise IpsetParseError(f"hash:ip,port member {member!r}: protocol {proto} has no ports")
    if number > 65535:
        raise IpsetParseError(f"hash:ip,port member {member!r}: port {number} out of range")
    return f"{ip.compressed},{proto}:{number}"


# IPv4 members exactly as ipaddress (and ipset) print them: octets up to 255
# without leading zeros, a prefix of 1 to 31 (a /32 is printed bare), a
# lower-case protocol and a port without leading zeros.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_QUAD = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_PRINTED_NET = re.compile(rf"({_QUAD})(?:/([1-9]|[12][0-9]|3[01]))?")
_PRINTED_IP_PORT = re.compile(rf"{_QUAD},(?:{'|'.join(_PORT_PROTOCOLS)}):(0|[1-9][0-9]{{0,4}})")


def _v4_int(text: str) -> int:
    a, b, c, d = text.split(".")
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def _printed(kind: str, member: str) -> bool:
    """Whether `member` is already in the form canonical_member returns, for
    the IPv4 forms `ipset save` prints: those need no ipaddress round trip.
    Anything else, IPv6 included, takes the full path."""
    if kind == HASH_NET:
        m = _PRINTED_NET.fullmatch(member)
        if m is None:
            return False
        if m.group(2) is None:
            return True
        host_bits = 32 - int(m.group(2))
        return _v4_int(m.group(1)) & ((1 << host_bits) - 1) == 0
    if kind == HASH_IP_PORT:
        m = _PRINTED_IP_PORT.fullmatch(member)
        return m is not None and int(m.group(1)) <= 65535
    return False


def canonical_member(kind: str, member: str) -> str:
    """The member as `ipset save` prints it: host networks as bare addresses,
    host bits cleared, IPv6 compressed, protocol in lower case."""
    member = member.strip(_ASCII_SPACE)
    if _printed(kind, member):
        return member
    if kind == HASH_NET:
        return _net(member)
    if kind == HASH_IP_PORT:
        return _ip_port(member)
    raise IpsetParseError(f"member {member!r}: unsupported set type {kind}")


def _shown(line: str) -> str:
    return line if len(line) <= _MAX_SHOWN else line[:_MAX_SHOWN] + "..."


def _line_error(lineno: int, raw: str, why: str) -> IpsetParseError:
    return IpsetParseError(f"ipset save line {lineno}: {why}: {_shown(raw)!r}")


def parse_save(text: str) -> dict[str, IpSet]:
    """Our sets (named PREFIX...) from `ipset save` output; other sets are
    skipped after a structural check.

    Per-member options (timeout, comment, nomatch) are ignored: we never
    write them. A member of ours that cannot be canonicalized is kept as
    printed, so the diff sees it as stale and deletes it rather than the
    whole cycle failing on one odd entry someone added.

    The same address is a member of many sets (a pod is a peer of many
    rules), so each distinct member is canonicalized once per call.
    """
    kinds: dict[str, str] = {}
    families: dict[str, int] = {}
    members: dict[str, set[str]] = {}
    canonical: dict[str, dict[str, str]] = {}    # kind -> member as printed -> canonical
    # The set of the previous add line: ipset prints a set's members together.
    name_of_last = kind_of_last = None
    into: Optional[set[str]] = None
    for lineno, raw in enumerate(text.split("\n"), 1):
        if (raw.startswith("add ") and "\t" not in raw and "  " not in raw
                and raw[-1] not in _ASCII_SPACE):
            fields = raw.split(" ")           # what _FIELDS makes of such a line, quicker
        else:
            line = raw.strip(_ASCII_SPACE)
            if not line or line.startswith("#"):
                continue
            fields = _FIELDS.split(line)
        if fields[0] == "add":
            if len(fields) < 3:
                raise _line_error(lineno, raw, "expected add NAME MEMBER ...")
            name, member = fields[1], fields[2]
            if name != name_of_last:
                if name not in kinds:
                    raise _line_error(lineno, raw, f"member for undeclared set {name}")
                name_of_last, kind_of_last = name, kinds[name]
                into = members[name] if name.startswith(PREFIX) else None
            if into is None:
                continue
            memo = canonical.setdefault(kind_of_last, {})
            spelled = memo.get(member)
            if spelled is None:
                try:
                    spelled = canonical_member(kind_of_last, member)
                except IpsetParseError:
                    spelled = member
                memo[member] = spelled
            into.add(spelled)
        elif fields[0] == "create":
            if len(fields) < 3:
                raise _line_error(lineno, raw, "expected create NAME TYPE ...")
            name, kind = fields[1], fields[2]
            if name in kinds:
                raise _line_error(lineno, raw, f"set {name} created twice")
            options = fields[3:]
            family = 4
            if "family" in options:
                i = options.index("family")
                if i + 1 >= len(options) or options[i + 1] not in _FAMILIES:
                    raise _line_error(lineno, raw, "family must be inet or inet6")
                family = _FAMILIES[options[i + 1]]
            kinds[name], families[name] = kind, family
            members[name] = set()
        else:
            raise _line_error(lineno, raw, f"unknown command {fields[0]}")
    return {
        name: IpSet(name=name, kind=kinds[name], family=families[name],
                    members=frozenset(members[name]))
        for name in sorted(kinds) if name.startswith(PREFIX)
    }
