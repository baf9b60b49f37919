"""A packet tracer for the subset of iptables that lib.compile writes.

It walks a DesiredState the way the kernel walks the filter table: from the
hook in a built-in chain into our chains, with jump / RETURN / REJECT
semantics and the set lookups of ipset. Any argument it does not know makes
it raise, so a test can never pass because a match was silently ignored.

LOG and NFLOG do not end the walk; the tracer records what they would log
(`Tracer.logged`). A rate limit (`-m limit`) is taken as not yet reached,
and is accepted only in front of those two targets: anywhere else the
verdict would depend on how much traffic came before.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from lib.ruleset import HASH_IP_PORT, HASH_NET, DesiredState, IpSet, Rule

ALLOW, REJECT = "allow", "reject"
PORT_PROTOCOLS = ("tcp", "udp", "sctp")
PROTOCOLS = PORT_PROTOCOLS + ("icmp", "ipv6-icmp")
CT_STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED")
REJECT_WITH = {4: ("tcp-reset", "icmp-port-unreachable"),
               6: ("tcp-reset", "icmp6-port-unreachable")}
MAX_DEPTH = 16
LOG_TARGETS = ("LOG", "NFLOG")
PREFIX_MAX = {"LOG": 29, "NFLOG": 63}     # what the kernel keeps; iptables-legacy cuts silently
PREFIX_CHARS = re.compile(r"[A-Za-z0-9 ._/:~-]+")
RATE = re.compile(r"([1-9][0-9]*)/(second|minute|hour|day)")
MAX_RATE = 10000


class TraceError(Exception):
    """The state holds something the tracer (or iptables) would not accept."""


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str = "tcp"                 # lower-case, as after -p
    dport: Optional[int] = None        # tcp/udp/sctp only
    state: str = "NEW"                 # conntrack state
    icmpv6_type: Optional[int] = None  # ipv6-icmp only
    in_iface: Optional[str] = None     # input interface, for -i ("lo": the node to itself)

    def __post_init__(self):
        if self.proto not in PROTOCOLS:
            raise TraceError(f"packet protocol {self.proto!r} unknown")
        if self.state not in CT_STATES:
            raise TraceError(f"packet state {self.state!r} unknown")
        if (self.dport is None) == (self.proto in PORT_PROTOCOLS):
            raise TraceError(f"packet {self}: a port is needed for tcp/udp/sctp and only for them")


@dataclass(frozen=True)
class _Match:
    src: Optional[ipaddress._BaseNetwork] = None
    dst: Optional[ipaddress._BaseNetwork] = None
    proto: Optional[str] = None
    dport: Optional[tuple[int, int]] = None
    ctstates: Optional[frozenset[str]] = None
    icmpv6_type: Optional[int] = None
    sets: tuple[tuple[IpSet, tuple, tuple[str, ...]], ...] = ()   # set, parsed members, flags
    in_iface: Optional[str] = None
    limited: bool = False
    target: str = ""
    goto: bool = False                 # -g: when the chain gone to ends, so does this one
    reject_with: Optional[str] = None
    log_prefix: Optional[str] = None
    log_group: Optional[int] = None


def _parse(rule: Rule, family: int, sets: dict[str, IpSet]) -> _Match:
    args = list(rule.args)
    fields: dict = {}
    set_matches = []
    i = 0

    def put(key: str, value) -> None:
        if key in fields:
            raise TraceError(f"rule {rule.args}: {key} given twice")
        fields[key] = value

    def take() -> str:
        nonlocal i
        if i >= len(args):
            raise TraceError(f"rule {rule.args}: missing value after {args[i - 1]!r}")
        value = args[i]
        i += 1
        return value

    while i < len(args):
        tok = take()
        if tok in ("-s", "-d"):
            net = ipaddress.ip_network(take(), strict=True)
            if net.version != family:
                raise TraceError(f"rule {rule.args}: {net} in the IPv{family} table")
            put("src" if tok == "-s" else "dst", net)
        elif tok == "-p":
            proto = take()
            if proto not in PROTOCOLS or (proto, family) in (("icmp", 6), ("ipv6-icmp", 4)):
                raise TraceError(f"rule {rule.args}: protocol {proto!r} in IPv{family}")
            put("proto", proto)
        elif tok == "--dport":
            if fields.get("proto") not in PORT_PROTOCOLS:
                raise TraceError(f"rule {rule.args}: --dport without -p tcp/udp/sctp")
            text = take()
            lo, _, hi = text.partition(":")
            first, last = int(lo), int(hi or lo)
            if not (0 <= first <= last <= 65535):
                raise TraceError(f"rule {rule.args}: bad port range {text}")
            put("dport", (first, last))
        elif tok == "--icmpv6-type":
            if fields.get("proto") != "ipv6-icmp":
                raise TraceError(f"rule {rule.args}: --icmpv6-type without -p ipv6-icmp")
            put("icmpv6_type", int(take()))
        elif tok == "-i":
            put("in_iface", take())
        elif tok == "-m":
            module = take()
            if module == "set":
                if take() != "--match-set":
                    raise TraceError(f"rule {rule.args}: -m set without --match-set")
                name, flags = take(), tuple(take().split(","))
                ipset = sets.get(name)
                if ipset is None:
                    raise TraceError(f"rule {rule.args}: set {name} is not in the state")
                if ipset.family != family:
                    raise TraceError(f"rule {rule.args}: IPv{ipset.family} set in IPv{family}")
                dims = 1 if ipset.kind == HASH_NET else 2 if ipset.kind == HASH_IP_PORT else 0
                if len(flags) != dims or any(f not in ("src", "dst") for f in flags):
                    raise TraceError(f"rule {rule.args}: flags {flags} for {ipset.kind}")
                set_matches.append((ipset, _members(ipset), flags))
            elif module == "conntrack":
                if take() != "--ctstate":
                    raise TraceError(f"rule {rule.args}: -m conntrack without --ctstate")
                states = frozenset(take().split(","))
                if not states <= set(CT_STATES):
                    raise TraceError(f"rule {rule.args}: unknown ctstate in {states}")
                put("ctstates", states)
            elif module in PORT_PROTOCOLS:
                if fields.get("proto") != module:
                    raise TraceError(f"rule {rule.args}: -m {module} without -p {module}")
            elif module == "limit":
                if take() != "--limit" or not RATE.fullmatch(rate := take()) \
                        or int(rate.partition("/")[0]) > MAX_RATE:
                    raise TraceError(f"rule {rule.args}: -m limit needs --limit N/second|minute|hour|day")
                if i < len(args) and args[i] == "--limit-burst":
                    take()
                    burst = take()
                    if not burst.isdigit() or not 1 <= int(burst) <= MAX_RATE:
                        raise TraceError(f"rule {rule.args}: bad --limit-burst {burst!r}")
                put("limited", True)
            else:
                raise TraceError(f"rule {rule.args}: unknown match module {module!r}")
        elif tok in ("-j", "-g"):
            put("target", take())
            if tok == "-g":
                put("goto", True)
        elif tok == "--reject-with":
            if fields.get("target") != "REJECT":
                raise TraceError(f"rule {rule.args}: --reject-with outside REJECT")
            how = take()
            if how not in REJECT_WITH[family]:
                raise TraceError(f"rule {rule.args}: --reject-with {how} in IPv{family}")
            if how == "tcp-reset" and fields.get("proto") != "tcp":
                raise TraceError(f"rule {rule.args}: tcp-reset needs -p tcp")
            put("reject_with", how)
        elif tok in ("--log-prefix", "--nflog-prefix"):
            target = "LOG" if tok == "--log-prefix" else "NFLOG"
            if fields.get("target") != target:
                raise TraceError(f"rule {rule.args}: {tok} outside {target}")
            prefix = take()
            if len(prefix) > PREFIX_MAX[target] or not PREFIX_CHARS.fullmatch(prefix):
                raise TraceError(f"rule {rule.args}: {target} prefix {prefix!r} is longer than "
                                 f"{PREFIX_MAX[target]} or holds unsafe characters")
            put("log_prefix", prefix)
        elif tok == "--nflog-group":
            if fields.get("target") != "NFLOG":
                raise TraceError(f"rule {rule.args}: --nflog-group outside NFLOG")
            group = take()
            if not group.isdigit() or int(group) > 65535:
                raise TraceError(f"rule {rule.args}: NFLOG group {group!r}")
            put("log_group", int(group))
        else:
            raise TraceError(f"rule {rule.args}: argument {tok!r} not understood")
    if not fields.get("target"):
        raise TraceError(f"rule {rule.args}: no target")
    if fields.get("goto") and fields["target"] in ("RETURN", "REJECT") + LOG_TARGETS:
        raise TraceError(f"rule {rule.args}: -g needs a chain, not {fields['target']}")
    if fields.get("limited") and fields["target"] not in LOG_TARGETS:
        raise TraceError(f"rule {rule.args}: a rate limit in front of {fields['target']} would make "
                         "the verdict depend on earlier traffic")
    if fields["target"] in LOG_TARGETS and "log_prefix" not in fields:
        raise TraceError(f"rule {rule.args}: {fields['target']} without a prefix")
    return _Match(sets=tuple(set_matches), **fields)


@functools.lru_cache(maxsize=None)
def _members(ipset: IpSet) -> tuple:
    """Parsed members, checked as `ipset restore` would check them."""
    out = []
    for member in sorted(ipset.members):
        if ipset.kind == HASH_NET:
            net = ipaddress.ip_network(member, strict=True)
            if net.prefixlen == 0 or "/" in member and net.prefixlen == net.max_prefixlen:
                raise TraceError(f"set {ipset.name}: member {member!r} is not in canonical form")
            entry = net
        elif ipset.kind == HASH_IP_PORT:
            ip_text, _, port_text = member.rpartition(",")
            proto, _, number = port_text.partition(":")
            if proto not in PORT_PROTOCOLS or not number.isdigit():
                raise TraceError(f"set {ipset.name}: member {member!r}")
            net = ipaddress.ip_address(ip_text)
            entry = (net, proto, int(number))
        else:
            raise TraceError(f"set {ipset.name}: kind {ipset.kind!r}")
        if net.version != ipset.family:
            raise TraceError(f"set {ipset.name}: member {member!r} in an IPv{ipset.family} set")
        out.append(entry)
    return tuple(out)


def _in_set(ipset: IpSet, members: tuple, flags: tuple[str, ...], packet: Packet) -> bool:
    addr = ipaddress.ip_address(packet.src if flags[0] == "src" else packet.dst)
    if ipset.kind == HASH_NET:
        return any(addr in net for net in members)
    if flags[1] != "dst":
        raise TraceError(f"set {ipset.name}: only destination ports are traced")
    if packet.proto not in PORT_PROTOCOLS:
        return False
    return (addr, packet.proto, packet.dport) in members


def _matches(m: _Match, packet: Packet) -> bool:
    if m.src is not None and ipaddress.ip_address(packet.src) not in m.src:
        return False
    if m.dst is not None and ipaddress.ip_address(packet.dst) not in m.dst:
        return False
    if m.proto is not None and packet.proto != m.proto:
        return False
    if m.dport is not None and not (m.dport[0] <= packet.dport <= m.dport[1]):
        return False
    if m.icmpv6_type is not None and packet.icmpv6_type != m.icmpv6_type:
        return False
    if m.ctstates is not None and packet.state not in m.ctstates:
        return False
    if m.in_iface is not None and packet.in_iface != m.in_iface:
        return False
    return all(_in_set(s, members, flags, packet) for s, members, flags in m.sets)


class Tracer:
    """Evaluates packets against one family of one DesiredState."""

    def __init__(self, state: DesiredState, family: int):
        self.family = family
        fam = state.family(family)
        self.sets = state.set_map()
        self.chains = {c.name: [_parse(r, family, self.sets) for r in c.rules] for c in fam.chains}
        self.hooks: dict[str, list[_Match]] = {}
        for hook in fam.hooks:
            self.hooks.setdefault(hook.builtin, []).append(_parse(hook.rule, family, self.sets))
        self.path: list[str] = []
        self.logged: list[tuple[str, str]] = []    # (LOG or NFLOG, prefix) of the last verdict

    def verdict(self, hook: str, packet: Packet) -> str:
        for addr in (packet.src, packet.dst):
            if ipaddress.ip_address(addr).version != self.family:
                raise TraceError(f"packet address {addr} in the IPv{self.family} table")
        if hook not in self.hooks:
            raise TraceError(f"no hook in {hook}")
        self.path = [hook]
        self.logged = []
        result = self._walk(self.hooks[hook], packet, 0)
        return REJECT if result == "REJECT" else ALLOW

    def _walk(self, rules: list[_Match], packet: Packet, depth: int) -> Optional[str]:
        if depth > MAX_DEPTH:
            raise TraceError("jump loop")
        for m in rules:
            if not _matches(m, packet):
                continue
            if m.target == "RETURN":
                return "RETURN"
            if m.target == "REJECT":
                if m.reject_with is None:
                    raise TraceError("REJECT without --reject-with")
                return "REJECT"
            if m.target in LOG_TARGETS:
                self.logged.append((m.target, m.log_prefix))
                continue
            if m.target not in self.chains:
                raise TraceError(f"jump to unknown chain or target {m.target!r}")
            self.path.append(m.target)
            if self._walk(self.chains[m.target], packet, depth + 1) == "REJECT":
                return "REJECT"
            if m.goto:
                return "RETURN"
        return None


def trace(state: DesiredState, family: int, hook: str, packet: Packet) -> str:
    """ALLOW when the packet leaves our chains (falls through or RETURNs), else REJECT."""
    return Tracer(state, family).verdict(hook, packet)
