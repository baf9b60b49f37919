"""Parse `ipset save` output into our sets, and spell members the way
`ipset save` prints them, so desired and kernel members compare as strings.
"""
from __future__ import annotations

import ipaddress
import re

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


def canonical_member(kind: str, member: str) -> str:
    """The member as `ipset save` prints it: host networks as bare addresses,
    host bits cleared, IPv6 compressed, protocol in lower case."""
    member = member.strip(_ASCII_SPACE)
    if kind == HASH_NET:
        return _net(member)
    if kind == HASH_IP_PORT:
        return _ip_port(member)
    raise IpsetParseError(f"member {member!r}: unsupported set type {kind}")


def _shown(line: str) -> str:
    return line if len(line) <= _MAX_SHOWN else line[:_MAX_SHOWN] + "..."


def parse_save(text: str) -> dict[str, IpSet]:
    """Our sets (named PREFIX...) from `ipset save` output; other sets are
    skipped after a structural check.

    Per-member options (timeout, comment, nomatch) are ignored: we never
    write them. A member of ours that cannot be canonicalized is kept as
    printed, so the diff sees it as stale and deletes it rather than the
    whole cycle failing on one odd entry someone added.
    """
    kinds: dict[str, str] = {}
    families: dict[str, int] = {}
    members: dict[str, set[str]] = {}
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(_ASCII_SPACE)
        if not line or line.startswith("#"):
            continue
        fields = _FIELDS.split(line)

        def error(why: str) -> IpsetParseError:
            return IpsetParseError(f"ipset save line {lineno}: {why}: {_shown(raw)!r}")

        if fields[0] == "create":
            if len(fields) < 3:
                raise error("expected create NAME TYPE ...")
            name, kind = fields[1], fields[2]
            if name in kinds:
                raise error(f"set {name} created twice")
            options = fields[3:]
            family = 4
            if "family" in options:
                i = options.index("family")
                if i + 1 >= len(options) or options[i + 1] not in _FAMILIES:
                    raise error("family must be inet or inet6")
                family = _FAMILIES[options[i + 1]]
            kinds[name], families[name] = kind, family
            members[name] = set()
        elif fields[0] == "add":
            if len(fields) < 3:
                raise error("expected add NAME MEMBER ...")
            name, member = fields[1], fields[2]
            if name not in kinds:
                raise error(f"member for undeclared set {name}")
            if not name.startswith(PREFIX):
                continue
            try:
                member = canonical_member(kinds[name], member)
            except IpsetParseError:
                pass
            members[name].add(member)
        else:
            raise error(f"unknown command {fields[0]}")
    return {
        name: IpSet(name=name, kind=kinds[name], family=families[name],
                    members=frozenset(members[name]))
        for name in sorted(kinds) if name.startswith(PREFIX)
    }
