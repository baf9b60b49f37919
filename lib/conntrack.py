"""Connections that outlive a narrowed policy, and their removal.

Our chains RETURN every packet of a connection conntrack already knows
(ctstate RELATED,ESTABLISHED), so a connection opened while a policy allowed
it keeps flowing after the policy stops allowing it. After an apply, the
entries of the flows this node enforces and the policy no longer allows are
deleted from the conntrack table: their next packet is then judged by the
rules as a new one, and refused.

Judging is done with `lib.explain`, the direct evaluator of the API, so a flow
is cut only when the API says this node should refuse it. A flow is judged on
the address it really goes to: for a flow through a Service, the pod the
destination NAT chose (the source of the reply tuple), as the FORWARD chain
sees it.

Listing the table costs one process per family and a parse of every entry, so
cleanup runs only after a cycle that applied changes that may narrow (see
lib.cycle.may_narrow), never on idle cycles: a policy can only start refusing
a flow through a change that we apply, and adding members to our sets never
refuses one.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

from lib.explain import EndpointError, admin_selects, explain
from lib.kernel import (DEFAULT_TIMEOUT, FAMILY_NAMES, Kernel, KernelError, ipv6_available,
                        run, start)
from lib.model import EGRESS, INGRESS, Cluster, NetworkPolicy, Pod
from lib.selectors import matches

CONNTRACK = "conntrack"
FAMILY_OPTION = {4: "ipv4", 6: "ipv6"}
_FAMILY_HEADER = {"ipv4": 4, "ipv6": 6}

# Protocols conntrack keys by ports, and those it keys by addresses alone
# (for ICMP the echo id, which no policy looks at). Others (gre, udplite,
# dccp, ...) are skipped: no policy can name them and `conntrack -D` needs
# protocol-specific keys for some of them.
PORTED = ("tcp", "udp", "sctp")
PORTLESS = ("icmp", "icmpv6")
GENERIC = "unknown"        # what conntrack prints for a protocol it has no tracker for

MAX_ERRORS = 5             # error messages kept in the stats; the rest are only counted

_NOTHING_DELETED = re.compile(r"\b0 flow entries have been deleted")


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, by its ORIGINAL direction (who opened it).

    `protocol` is conntrack's name (tcp, udp, sctp, icmp, icmpv6) or, for a
    protocol without a tracker, its number. `nat_dst` / `nat_dport` are set
    only when destination NAT sent the flow elsewhere (a Service): where the
    packets really go, read from the reply direction."""
    family: int
    protocol: str
    src: str
    dst: str
    sport: Optional[int] = None
    dport: Optional[int] = None
    nat_dst: Optional[str] = None
    nat_dport: Optional[int] = None

    @property
    def target(self) -> str:
        """The destination as our filter chains see it (after DNAT)."""
        return self.nat_dst or self.dst

    @property
    def target_port(self) -> Optional[int]:
        return self.nat_dport if self.nat_dport is not None else self.dport


@dataclass(frozen=True)
class Listing:
    """Flows read from `conntrack -L`, and how many lines were not a flow we judge."""
    flows: tuple[Flow, ...] = ()
    skipped: int = 0
    first_skipped: str = ""      # one example, for the log


@dataclass(frozen=True)
class CleanupStats:
    listed: int = 0              # flows read from the table
    skipped: int = 0             # lines not read as a flow (unknown format or protocol)
    stale: int = 0               # flows this node enforces that the policy no longer allows
    commands: int = 0            # `conntrack -D` processes run
    deleted: int = 0             # entries removed
    failed: int = 0              # `conntrack -D` runs that failed
    seconds: float = 0.0
    errors: tuple[str, ...] = () # first MAX_ERRORS failure messages
    first_skipped: str = ""      # one skipped line, to see what was not understood

    @property
    def ok(self) -> bool:
        return not self.errors

    def log_fields(self) -> dict:
        return {"listed": self.listed, "skipped": self.skipped, "stale": self.stale,
                "commands": self.commands, "deleted": self.deleted, "failed": self.failed,
                "seconds": round(self.seconds, 4), "first_skipped": self.first_skipped}


# --- parsing ----------------------------------------------------------------

def _digits(text: Optional[str]) -> bool:
    return text is not None and text.isascii() and text.isdigit()


@functools.lru_cache(maxsize=65536)
def _parse_address(text: str) -> Optional[tuple[int, str]]:
    if ":" not in text:                 # IPv4 as inet_ntop spells it, which is ipaddress's
        try:
            return 4, socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
        except OSError:
            pass
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return addr.version, str(addr)


def _address(text: Optional[str]) -> Optional[tuple[int, str]]:
    """(family, canonical text); cached, as a table repeats the same few addresses."""
    return None if text is None else _parse_address(text)


def _port(text: Optional[str]) -> Optional[int]:
    if not _digits(text):
        return None
    value = int(text)
    return value if value <= 65535 else None


def parse_line(line: str) -> Optional[Flow]:
    """One line of `conntrack -L`, in the default or the extended format
    (which starts with `ipv4 2` / `ipv6 10`); None when it is not a flow of a
    protocol we judge."""
    tokens = line.split()
    family = None
    if len(tokens) >= 2 and tokens[0] in _FAMILY_HEADER and _digits(tokens[1]):
        family = _FAMILY_HEADER[tokens[0]]
        tokens = tokens[2:]
    if len(tokens) < 3 or not _digits(tokens[1]):
        return None
    name, number = tokens[0], tokens[1]
    tuples: list[dict[str, str]] = []
    for token in tokens[2:]:
        key, sep, value = token.partition("=")
        if not sep:
            continue                   # timeout, state, [FLAGS]
        if key == "src":
            if len(tuples) == 2:
                break
            tuples.append({})
        if tuples and key not in tuples[-1]:
            tuples[-1][key] = value
    if len(tuples) < 2:
        return None
    orig, reply = tuples
    src, dst, reply_src = (_address(orig.get("src")), _address(orig.get("dst")),
                           _address(reply.get("src")))
    if src is None or dst is None or reply_src is None:
        return None
    version = src[0]
    if dst[0] != version or reply_src[0] != version or family not in (None, version):
        return None
    nat_dst = reply_src[1] if reply_src[1] != dst[1] else None
    if name in PORTED:
        sport, dport, reply_sport = (_port(orig.get("sport")), _port(orig.get("dport")),
                                     _port(reply.get("sport")))
        if sport is None or dport is None or reply_sport is None:
            return None
        return Flow(version, name, src[1], dst[1], sport, dport, nat_dst,
                    reply_sport if reply_sport != dport else None)
    if name in PORTLESS:
        return Flow(version, name, src[1], dst[1], nat_dst=nat_dst)
    if name == GENERIC:
        return Flow(version, number, src[1], dst[1], nat_dst=nat_dst)
    return None


def parse_listing(text: str) -> Listing:
    """Every line of a `conntrack -L` output; a line we cannot read is counted, never fatal."""
    flows, skipped, first = [], 0, ""
    for line in text.splitlines():
        if not line.strip():
            continue
        flow = parse_line(line)
        if flow is None:
            skipped += 1
            first = first or line.strip()
        else:
            flows.append(flow)
    return Listing(tuple(flows), skipped, first)


def parse_addresses(text: str) -> tuple[str, ...]:
    """The addresses of `ip -o addr show`, without prefix length, in canonical text."""
    found: list[str] = []
    for line in text.splitlines():
        tokens = line.split()
        for i, token in enumerate(tokens[:-1]):
            if token in ("inet", "inet6"):
                addr = _address(tokens[i + 1].split("/", 1)[0])
                if addr is not None and addr[1] not in found:
                    found.append(addr[1])
                break
    return tuple(found)


# --- judging ----------------------------------------------------------------

def _canonical(ip: str) -> str:
    addr = _address(ip)
    return addr[1] if addr is not None else ip


def stale_flows(flows: Iterable[Flow], cluster: Cluster, node: str,
                local_addresses: Sequence[str]) -> list[Flow]:
    """The flows this node enforces that the policy no longer allows.

    This node enforces the egress of its own pods (the flow's source) and the
    ingress of its own pods (the flow's target); host-network pods are never
    isolated. Only those directions are judged: a flow to a pod of another
    node is that node's to cut. Flows from the node's own addresses to its
    pods are always allowed, so kubelet probes are never cut.

    A table holds up to hundreds of thousands of entries, so a direction no
    policy isolates is not judged at all (it allows everything), a verdict is
    computed once per (source, target, protocol, port), and each is computed
    on the cluster reduced to the two endpoints' pods and their namespaces'
    policies: the only parts of the cluster a verdict reads."""
    flows = list(flows)
    local: dict[str, Pod] = {}
    for pod in cluster.pods:
        if pod.node == node and not pod.host_network:
            for ip in pod.ips:
                local[_canonical(ip)] = pod
    if not any(f.src in local or f.target in local for f in flows):
        return []                          # no flow of a pod of ours: nothing to judge
    owners: dict[str, list[Pod]] = {}
    for pod in cluster.pods:
        for ip in pod.ips:
            owners.setdefault(_canonical(ip), []).append(pod)
    policies: dict[str, list[NetworkPolicy]] = {}
    for p in cluster.policies:
        policies.setdefault(p.namespace, []).append(p)
    isolated: dict[tuple[str, str], bool] = {}

    admins = cluster.admin_policies + ((cluster.baseline,) if cluster.baseline else ())

    def enforced(pod: Optional[Pod], direction: str) -> bool:
        if pod is None:
            return False
        key = (pod.key, direction)
        if key not in isolated:
            isolated[key] = any(direction in p.policy_types
                                and matches(p.pod_selector, pod.label_map)
                                for p in policies.get(pod.namespace, ())) or any(
                (a.ingress if direction == INGRESS else a.egress) and admin_selects(cluster, a, pod)
                for a in admins)
        return isolated[key]

    def endpoints(src: str, target: str) -> Cluster:
        pods = tuple(dict.fromkeys(owners.get(src, []) + owners.get(target, [])))
        namespaces = sorted({p.namespace for p in pods if not p.host_network})
        return Cluster(cluster.namespaces, pods,
                       tuple(p for ns in namespaces for p in policies.get(ns, ())),
                       admin_policies=cluster.admin_policies, baseline=cluster.baseline,
                       nodes=cluster.nodes)

    nodes: Mapping[str, tuple[str, ...]] = {
        node: tuple(_canonical(a) for a in local_addresses)}
    verdicts: dict[tuple, tuple[bool, bool]] = {}
    stale = []
    for flow in flows:
        egress = enforced(local.get(flow.src), EGRESS)
        ingress = enforced(local.get(flow.target), INGRESS)
        if not (egress or ingress):
            continue
        key = (flow.family, flow.protocol, flow.src, flow.target, flow.target_port)
        if key not in verdicts:
            try:
                e = explain(endpoints(flow.src, flow.target), flow.src, flow.target,
                            flow.target_port or 0, flow.protocol, flow.family, nodes)
            except EndpointError:
                verdicts[key] = (True, True)     # what cannot be judged is left alone
            else:
                verdicts[key] = (e.egress.allowed, e.ingress.allowed)
        egress_ok, ingress_ok = verdicts[key]
        if (egress and not egress_ok) or (ingress and not ingress_ok):
            stale.append(flow)
    return stale


def delete_commands(flows: Iterable[Flow]) -> list[list[str]]:
    """`conntrack -D` argument lists that remove exactly the given flows'
    entries, one per (source, destination, target, port): entries differing
    only by source port share the verdict, so one command removes them all.
    The reply source (and port) filter keeps a Service flow that NAT sent to
    an allowed pod apart from one sent to a refused pod."""
    seen: set[tuple] = set()
    commands = []
    for f in flows:
        key = (f.family, f.protocol, f.src, f.dst, f.dport, f.target, f.target_port)
        if key in seen:
            continue
        seen.add(key)
        args = ["-D", "-f", FAMILY_OPTION[f.family], "-p", f.protocol,
                "-s", f.src, "-d", f.dst, "-r", f.target]
        if f.dport is not None:
            args += ["--dport", str(f.dport), "--reply-port-src", str(f.target_port)]
        commands.append(args)
    return commands


# --- the kernel -------------------------------------------------------------

Target = Union[Kernel, str, None]


def _target(target: Target) -> tuple[Optional[str], float, Optional[tuple[int, ...]]]:
    """(netns, timeout, families) of a Kernel, a namespace name, or None (this namespace)."""
    if target is None or isinstance(target, str):
        return target, DEFAULT_TIMEOUT, None
    families = getattr(target, "families", None)
    return (getattr(target, "netns", None), getattr(target, "timeout", DEFAULT_TIMEOUT),
            tuple(families) if families is not None else None)


def cleanup(target: Target, cluster: Cluster, node: str) -> CleanupStats:
    """Delete the conntrack entries of flows the policy in `cluster` no longer
    allows on `node`. Call it after a cycle that applied changes, with that
    cycle's cluster. Never raises: a failure of `conntrack` or `ip` (missing
    binary, error) is returned in `errors` for the caller to log; when the
    node's addresses cannot be read nothing is deleted, since node-to-pod
    flows could not be told apart."""
    began = time.perf_counter()
    netns, timeout, families = _target(target)
    errors: list[str] = []
    listed = skipped = stale_count = commands = deleted = failed = 0
    first_skipped = ""

    def stats() -> CleanupStats:
        return CleanupStats(listed, skipped, stale_count, commands, deleted, failed,
                            time.perf_counter() - began, tuple(errors[:MAX_ERRORS]),
                            first_skipped)

    try:
        if families is None:
            families = (4, 6) if ipv6_available(netns, timeout=timeout) else (4,)
        # The three listings run side by side: each costs a process start,
        # most of the cleanup's time when the table is small.
        ip_addr = start("conntrack cleanup: ip addr", "ip", ["-o", "addr", "show"],
                        netns=netns, timeout=timeout)
        listings = []
        for family in families:
            step = f"conntrack -L ({FAMILY_NAMES[family]})"
            try:
                listings.append(start(step, CONNTRACK,
                                      ["-L", "-f", FAMILY_OPTION[family], "-o", "extended"],
                                      netns=netns, timeout=timeout))
            except KernelError as err:
                errors.append(str(err))
        try:
            addresses = parse_addresses(ip_addr.result())
        except Exception:
            for running in listings:      # not wanted any more: reaped, not left running
                running.stop()
            raise
        flows: list[Flow] = []
        for running in listings:
            try:
                text = running.result()
            except KernelError as err:
                errors.append(str(err))
                continue
            listing = parse_listing(text)
            flows.extend(listing.flows)
            listed += len(listing.flows)
            skipped += listing.skipped
            first_skipped = first_skipped or listing.first_skipped
        stale = stale_flows(flows, cluster, node, addresses)
        stale_count = len(stale)
        for args in delete_commands(stale):
            commands += 1
            try:
                out = run("conntrack -D", CONNTRACK, args, netns=netns, timeout=timeout)
            except KernelError as err:
                if err.exit_code == 1 and _NOTHING_DELETED.search(str(err)):
                    continue                     # gone meanwhile (closed or timed out)
                failed += 1
                errors.append(str(err))
                continue
            deleted += sum(1 for line in out.splitlines() if line.strip())
    except KernelError as err:
        errors.append(str(err))
    except Exception as exc:  # noqa: BLE001 - cleanup must never end a cycle
        errors.append(f"conntrack cleanup: {type(exc).__name__}: {exc}")
    return stats()
