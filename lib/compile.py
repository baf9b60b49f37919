"""Turn the cluster's policies into what one node must enforce (lib.intent),
for either dataplane to render.

The layout (top chains, one chain per isolated local pod, peer sets) is the
one of docs/design.md. Peer sets are named by their content so that editing
a policy never changes the members of a set an older rule still uses.

A pod's chain holds the tiers in order: the AdminNetworkPolicies selecting
it (by priority; the first rule that matches decides: Allow returns, Deny
refuses, Pass goes to the next tier), then its NetworkPolicies or, where
none selects it, the BaselineAdminNetworkPolicy; what nothing decides is
allowed. A Pass jumps into a chain of the pod's NetworkPolicy tier only
when one is needed.

Two opt-in additions, chosen with CompileOptions:

- drop logging: an NFLOG (or LOG) rule, rate-limited, just before a pod
  chain's REJECT rules; it does not end the walk, so no verdict changes;
- isolating new pods: an address inside this node's pod ranges that no
  cycle has seen as a local pod is refused, as source and as destination,
  so a pod that starts between two cycles has no network rather than an
  open one. Known pods are recognised in two ways, each hitless in the
  apply order: pods without chains through the set KPM-L4-/KPM-L6- (its
  members are added in the first apply step, before any rule changes),
  isolated pods through a rule per address written in the same
  iptables-restore transaction as their chains, so that an isolated pod
  never passes as known before its chains exist.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Union

from lib import iptables_render
from lib.admin_rules import PASS_VERDICT, AdminRules, admin_rules_of
from lib.intent import LOG as LOG_VERDICT
from lib.intent import (ALLOWED, ANY, GOTO, JUMP, REFUSED, Dispatch, FamilyIntent, FilterChain,
                        FilterRule, LogSpec, Match, NodeIntent, Verdict, port_match)
from lib.iptables_render import FORWARD_CHAIN, INPUT_CHAIN  # noqa: F401 - names of the top chains
from lib.model import (ADMIN, EGRESS, INGRESS, AdminPolicy, Cluster, NetworkPolicy, Peer, Pod, PolicyPort,
                       PolicyRule, Problem)
from lib.ruleset import HASH_IP_PORT, HASH_NET, PREFIX, DesiredState, IpSet, set_member, short_hash
from lib.selectors import ClusterIndex

INGRESS_CHAIN_PREFIX = PREFIX + "I-"
EGRESS_CHAIN_PREFIX = PREFIX + "E-"
INGRESS_TIER_PREFIX = PREFIX + "IN-"       # a pod's NetworkPolicy tier, when a Pass goes to it
EGRESS_TIER_PREFIX = PREFIX + "EN-"
LOCAL_SRC_CHAIN = PREFIX + "LOCAL-SRC"     # source inside this node's pod ranges: known?
LOCAL_DST_CHAIN = PREFIX + "LOCAL-DST"     # destination likewise
UNKNOWN_CHAIN = PREFIX + "UNKNOWN"         # refuses what the two above did not recognise
ND_TYPES = (133, 134, 135, 136, 137)   # router/neighbour solicitation and advertisement, redirect

NFLOG, LOG = "nflog", "log"
LOG_TARGETS = (NFLOG, LOG)
# Longest prefixes the kernel keeps: iptables-legacy silently cuts longer
# ones (NFLOG keeps 63 characters, LOG 29), which could cut off our hash.
PREFIX_MAX = {NFLOG: 63, LOG: 29}
DROP_PREFIX = "KPM DROP"
MAX_LOG_RATE = 10000                   # iptables' own bound for --limit and --limit-burst
_PREFIX_SAFE = re.compile(r"[A-Za-z0-9._/:-]+")
_PREFIX_HASH = 6                       # hex characters added to a cut or altered name


@dataclass(frozen=True)
class CompileOptions:
    """What the node asks for beyond the NetworkPolicy API. The default is
    the plain enforcer; annotations ask for drop logging on their own.

    log_drops: log the refusals of every isolated local pod (and, with
      isolate_new_pods, of unknown addresses); without it, only pods whose
      Namespace or applying NetworkPolicy carries the log-drops annotation.
    log_target: NFLOG (read by ulogd or any nfnetlink_log listener) or LOG
      (the kernel log; in a network namespace other than the host's it
      writes only when the host allows it, net.netfilter.nf_log_all_netns).
    log_group: the NFLOG group.
    log_rate / log_burst: at most log_rate lines a minute per pod chain,
      after a burst of log_burst.
    isolate_new_pods / pod_cidrs: refuse traffic to and from addresses in
      this node's pod ranges (pod_cidrs, either family) that are not a
      known local pod.
    """
    log_drops: bool = False
    log_target: str = NFLOG
    log_group: int = 100
    log_rate: int = 10
    log_burst: int = 5
    isolate_new_pods: bool = False
    pod_cidrs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.log_target not in LOG_TARGETS:
            raise ValueError(f"log target {self.log_target!r}: must be one of {', '.join(LOG_TARGETS)}")
        for name, low, high in (("log group", 0, 65535), ("log rate", 1, MAX_LOG_RATE),
                                ("log burst", 1, MAX_LOG_RATE)):
            value = getattr(self, name.replace(" ", "_"))
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} {value!r}: must be an integer from {low} to {high}")
        cidrs = []
        for text in self.pod_cidrs:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except (TypeError, ValueError):
                raise ValueError(f"pod CIDR {text!r}: not a network in CIDR form") from None
            if net.prefixlen == 0:
                raise ValueError(f"pod CIDR {text}: covers every address; give this node's own "
                                 "pod range")
            if str(net) not in cidrs:
                cidrs.append(str(net))
        object.__setattr__(self, "pod_cidrs", tuple(cidrs))
        if self.isolate_new_pods and not cidrs:
            raise ValueError("isolating new pods needs this node's pod CIDRs")

    def cidrs(self, family: int) -> tuple[str, ...]:
        return tuple(c for c in self.pod_cidrs if ipaddress.ip_network(c).version == family)


DEFAULT_OPTIONS = CompileOptions()

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_DIRECTION = {INGRESS: "ingress", EGRESS: "egress"}
_HOST_LEN = {4: 32, 6: 128}


def pod_chain_name(pod: Pod, direction: str) -> str:
    """Stable per pod, so a policy change rewrites only the chains of the pods it selects."""
    prefix = INGRESS_CHAIN_PREFIX if direction == INGRESS else EGRESS_CHAIN_PREFIX
    return prefix + short_hash(pod.key)


def np_tier_chain_name(pod: Pod, direction: str) -> str:
    prefix = INGRESS_TIER_PREFIX if direction == INGRESS else EGRESS_TIER_PREFIX
    return prefix + short_hash(pod.key)


def local_set_name(family: int) -> str:
    """Stable, not content-addressed: adding a pod changes only its members."""
    return f"{PREFIX}L{family}-" + short_hash("local pods", str(family))


def log_prefix(what: str, subject: str, target: str, by: str = "") -> str:
    """`KPM DROP <what> <subject> [<by> ]`, within the target's limit and in a
    safe alphabet; `by` names an admin policy that refused (`anp/name`). A
    subject that had to be cut or altered keeps its start and gains a hash of
    its full text, so that two pods (or policies) never share a prefix."""
    limit = PREFIX_MAX[target]
    head = f"{DROP_PREFIX} {what} " if subject else f"{DROP_PREFIX} {what}"
    if not subject:
        return head[:limit - 1] + " "
    parts = [subject] + ([by] if by else [])
    text = " ".join(parts)
    if all(_PREFIX_SAFE.fullmatch(p) for p in parts) and len(head) + len(text) + 1 <= limit:
        return f"{head}{text} "
    mark = "~" + short_hash(*parts, length=_PREFIX_HASH)
    room = max(0, limit - len(head) - len(mark) - 1)
    kept = " ".join(re.sub(r"[^A-Za-z0-9._/:-]", "_", p) for p in parts)[:room]
    return f"{head}{kept}{mark} "


def log_rule(options: CompileOptions, prefix: str, text: str, match: Match = ANY) -> FilterRule:
    """Rate-limited and non-terminating: the packet goes on to the REJECT that follows."""
    spec = LogSpec(options.log_target, prefix, options.log_rate, options.log_burst,
                   options.log_group)
    return FilterRule(match, Verdict(LOG_VERDICT, log=spec), text)


def peers_scope(namespace: str, peers: Optional[tuple[Peer, ...]]) -> str:
    """The policy's namespace when what the peers match depends on it (a
    podSelector without a namespaceSelector), else "": peers that select by
    namespace labels or address (and "any peer", None) match the same
    everywhere, so the same peers in many namespaces' policies share a set."""
    if peers is None:
        return ""
    if any(p.pod_selector is not None and p.namespace_selector is None for p in peers):
        return namespace
    return ""


def net_set_name(namespace: str, peers: tuple[Peer, ...], family: int) -> str:
    return f"{PREFIX}N{family}-" + short_hash(peers_scope(namespace, peers), repr(peers),
                                               str(family))


def port_set_name(namespace: str, peers: Optional[tuple[Peer, ...]], family: int,
                  protocol: str, port_name: str) -> str:
    return f"{PREFIX}P{family}-" + short_hash(peers_scope(namespace, peers), repr(peers),
                                               str(family), protocol, port_name)


def block_networks(cidr: str, excepts: Iterable[str], family: int) -> list[Network]:
    """cidr minus its excepts, collapsed; empty when cidr is of the other family."""
    whole = ipaddress.ip_network(cidr, strict=False)
    if whole.version != family:
        return []
    parts = [whole]
    for text in excepts:
        hole = ipaddress.ip_network(text, strict=False)
        if hole.version != family:
            continue
        kept: list[Network] = []
        for part in parts:
            if hole.supernet_of(part):
                continue
            if part.supernet_of(hole):
                kept.extend(part.address_exclude(hole))
            else:
                kept.append(part)
        parts = kept
    return list(ipaddress.collapse_addresses(parts))


def _split_ips(pod: Pod) -> dict[int, tuple[str, ...]]:
    """Family -> the pod's addresses. objects.py hands them over valid and in
    canonical text, so the text tells the family without parsing it again."""
    return {4: tuple(t for t in pod.ips if ":" not in t), 6: tuple(t for t in pod.ips if ":" in t)}


class _Compiler:
    """One node's compilation: memo tables shared by every pod of the node."""

    def __init__(self, index: ClusterIndex, options: CompileOptions = DEFAULT_OPTIONS):
        self.index = index
        self.admin = AdminRules(self, lambda prefix, text, match: log_rule(options, prefix, text, match))
        self.sets: dict[str, IpSet] = {}
        self._ips: dict[int, dict] = {}            # id(pod) -> _split_ips(pod); the index keeps pods alive
        self._parsed: dict[str, Address] = {}      # address text -> address, for ipBlock containment
        self._rules_memo: dict[tuple, list[FilterRule]] = {}
        self._block_memo: dict[tuple[tuple[Peer, ...], int], list[Network]] = {}
        self._net_name_memo: dict[tuple[str, tuple[Peer, ...], int], str] = {}
        self._declared: Optional[dict[tuple[str, str], list[tuple[Pod, int]]]] = None

    # addresses and sets ------------------------------------------------

    def address_texts(self, pod: Pod, family: int) -> tuple[str, ...]:
        hit = self._ips.get(id(pod))
        if hit is None:
            hit = self._ips[id(pod)] = _split_ips(pod)
        return hit[family]

    def addresses(self, pod: Pod, family: int) -> tuple[Address, ...]:
        """Parsed only where an ipBlock asks whether it holds a pod."""
        out = []
        for text in self.address_texts(pod, family):
            addr = self._parsed.get(text)
            if addr is None:
                addr = self._parsed[text] = ipaddress.ip_address(text)
            out.append(addr)
        return tuple(out)

    def blocks(self, peers: tuple[Peer, ...], family: int) -> list[Network]:
        key = (peers, family)
        hit = self._block_memo.get(key)
        if hit is None:
            nets: list[Network] = []
            for peer in peers:
                if peer.ip_block is not None:
                    nets.extend(block_networks(peer.ip_block.cidr, peer.ip_block.excepts, family))
            hit = self._block_memo[key] = list(ipaddress.collapse_addresses(nets))
        return hit

    def net_set(self, namespace: str, peers: tuple[Peer, ...], family: int) -> str:
        key = (namespace, peers, family)
        name = self._net_name_memo.get(key)
        if name is not None:
            return name
        name = self._net_name_memo[key] = net_set_name(namespace, peers, family)
        if name in self.sets:
            return name
        nets = self.blocks(peers, family)
        members = {m for net in nets for m in set_member(net)}
        for pod in self.index.peers_pods(namespace, peers):
            if nets:
                members.update(str(a) for a in self.addresses(pod, family)
                               if not any(a in net for net in nets))
            else:
                members.update(self.address_texts(pod, family))
        self.sets[name] = IpSet(name, HASH_NET, family, frozenset(members))
        return name

    def declared(self, port_name: str, protocol: str) -> list[tuple[Pod, int]]:
        """Non-host-network pods declaring a container port of that name and protocol."""
        if self._declared is None:
            table: dict[tuple[str, str], list[tuple[Pod, int]]] = {}
            for pod in self.index.pods:
                for cp in pod.ports:
                    if cp.name:
                        table.setdefault((cp.name, cp.protocol), []).append((pod, cp.port))
            self._declared = table
        return self._declared.get((port_name, protocol), [])

    def port_set(self, namespace: str, peers: Optional[tuple[Peer, ...]], family: int,
                 protocol: str, port_name: str) -> str:
        name = port_set_name(namespace, peers, family, protocol, port_name)
        if name in self.sets:
            return name
        proto = protocol.lower()
        members = set()

        def add(pod: Pod, number: int, texts: Iterable[str]) -> None:
            members.update(f"{text},{proto}:{number}" for text in texts)

        if peers is None:
            for pod, number in self.declared(port_name, protocol):
                add(pod, number, self.address_texts(pod, family))
        else:
            selected = self.index.peers_pods(namespace, peers)
            for pod in selected:
                for cp in pod.ports:
                    if cp.name == port_name and cp.protocol == protocol:
                        add(pod, cp.port, self.address_texts(pod, family))
            nets = self.blocks(peers, family)
            if nets:
                # an ipBlock reaches pods by address, selected or not
                for pod, number in self.declared(port_name, protocol):
                    add(pod, number, (str(a) for a in self.addresses(pod, family)
                                      if any(a in net for net in nets)))
        self.sets[name] = IpSet(name, HASH_IP_PORT, family, frozenset(members))
        return name

    # chains -------------------------------------------------------------

    def policy_rules(self, policy: NetworkPolicy, direction: str, pod: Pod,
                     family: int) -> list[FilterRule]:
        rules = policy.ingress if direction == INGRESS else policy.egress
        # Every pod a policy selects gets the same rules, except where an
        # ingress named port resolves against the pod's own ports.
        own_ports = direction == INGRESS and any(
            isinstance(p.port, str) for r in rules for p in (r.ports or ()))
        key = (id(policy), direction, family, pod.ports if own_ports else None)
        hit = self._rules_memo.get(key)
        if hit is None:
            hit = []
            for rule in sorted(rules, key=lambda r: r.index):
                hit.extend(self.rule_entries(policy, direction, rule, pod, family))
            self._rules_memo[key] = hit
        return hit

    def rule_entries(self, policy: NetworkPolicy, direction: str, rule: PolicyRule,
                     pod: Pod, family: int) -> list[FilterRule]:
        text = f"{policy.key} {_DIRECTION[direction]}[{rule.index}]"
        peer = ANY
        if rule.peers is not None:
            peer = _peer_match(direction, self.net_set(policy.namespace, rule.peers, family))
        if rule.ports is None:
            return [FilterRule(peer, ALLOWED, text)]
        out = []
        for i, port in enumerate(rule.ports):
            port_text = f"{text} ports[{i}]"
            if isinstance(port.port, str) and direction == EGRESS:
                pset = self.port_set(policy.namespace, rule.peers, family, port.protocol, port.port)
                out.append(FilterRule(Match(dst_port_set=pset, protocol=port.protocol.lower()),
                                      ALLOWED, port_text))
                continue
            match = port_match(port, pod, peer)
            if match is not None:
                out.append(FilterRule(match, ALLOWED, port_text))
        return out

    def np_tier(self, pod: Pod, direction: str, policies: list[NetworkPolicy],
                family: int, log: Optional[FilterRule] = None) -> list[FilterRule]:
        """The NetworkPolicies selecting the pod: what one of them allows
        returns, the rest is refused."""
        rules: list[FilterRule] = []
        for policy in policies:
            rules.extend(self.policy_rules(policy, direction, pod, family))
        if log is not None:
            rules.append(log)
        rules.append(FilterRule(ANY, REFUSED, "reject", subject=pod.key))
        return rules

    def pod_chains(self, pod: Pod, direction: str, tiers: "_Tiers", family: int,
                   logs: "_Logs") -> list[FilterChain]:
        """The pod's chain for one direction, tier after tier: the admin
        policies' rules in order (the first that matches decides), then the
        NetworkPolicies selecting the pod, or, when none does, the baseline
        policy's rules; a packet nothing decided is allowed. A Pass goes to
        the pod's NetworkPolicy tier, a chain of its own when a Pass needs
        it; empty when the chain would allow everything."""
        head: list[FilterRule] = []
        for policy in tiers.admin:
            head.extend(self.admin.rules(policy, direction, pod, family,
                                         logs.admin_prefix(pod, direction, policy)))
        if tiers.networkpolicies:
            tier = self.np_tier(pod, direction, tiers.networkpolicies, family,
                                logs.np_rule(pod, direction, tiers.networkpolicies))
        elif tiers.baseline is not None:
            tier = _without_trailing_allows(self.admin.rules(
                tiers.baseline, direction, pod, family,
                logs.admin_prefix(pod, direction, tiers.baseline)))
        else:
            tier = []
        name = pod_chain_name(pod, direction)
        if tier and any(r.verdict == PASS_VERDICT for r in head):
            tier_name = np_tier_chain_name(pod, direction)
            goto = Verdict(GOTO, tier_name)
            head = [replace(r, verdict=goto) if r.verdict == PASS_VERDICT else r for r in head]
            head.append(FilterRule(ANY, goto, f"{_DIRECTION[direction]} networkpolicy tier",
                                   subject=pod.key))
            return [FilterChain(name, tuple(head)), FilterChain(tier_name, tuple(tier))]
        head = [replace(r, verdict=ALLOWED) if r.verdict == PASS_VERDICT else r for r in head]
        rules = _without_trailing_allows(head + tier)
        return [FilterChain(name, tuple(rules))] if rules else []


def _without_trailing_allows(rules: list[FilterRule]) -> list[FilterRule]:
    """A chain that ends by returning needs no return rules at its end."""
    end = len(rules)
    while end and rules[end - 1].verdict == ALLOWED:
        end -= 1
    return rules[:end]


@dataclass(frozen=True)
class _Tiers:
    """What decides one direction of one local pod."""
    admin: tuple[AdminPolicy, ...] = ()          # in evaluation order
    networkpolicies: tuple[NetworkPolicy, ...] = ()
    baseline: Optional[AdminPolicy] = None

    def __bool__(self) -> bool:
        return bool(self.admin or self.networkpolicies or self.baseline is not None)


class _Logs:
    """Which refusals of which pod are logged, and under which prefix."""

    def __init__(self, cluster: Cluster, options: CompileOptions):
        self.options = options
        self.namespaces = {ns.name for ns in cluster.namespaces if ns.log_drops}

    def _wanted(self, pod: Pod, asked: bool) -> bool:
        return self.options.log_drops or pod.namespace in self.namespaces or asked

    def np_rule(self, pod: Pod, direction: str, policies) -> Optional[FilterRule]:
        if not self._wanted(pod, any(p.log_drops for p in policies)):
            return None
        what = "in" if direction == INGRESS else "out"
        return log_rule(self.options, log_prefix(what, pod.key, self.options.log_target),
                        f"{pod.key} log {_DIRECTION[direction]} drops")

    def admin_prefix(self, pod: Pod, direction: str, policy: AdminPolicy) -> Optional[str]:
        if not self._wanted(pod, policy.log_drops):
            return None
        what = "in" if direction == INGRESS else "out"
        by = f"{'anp' if policy.kind == ADMIN else 'banp'}/{policy.name}"
        return log_prefix(what, pod.key, self.options.log_target, by)


def _peer_match(direction: str, address_set: str) -> Match:
    """The peer is the source of what a pod receives, the destination of what it sends."""
    return Match(src_set=address_set) if direction == INGRESS else Match(dst_set=address_set)


def _head(family: int) -> tuple[FilterRule, ...]:
    rules = [FilterRule(Match(established=True), ALLOWED, "replies")]
    if family == 6:
        rules.extend(FilterRule(Match(protocol="ipv6-icmp", icmpv6_type=t), ALLOWED,
                                f"neighbour discovery {t}") for t in ND_TYPES)
    return tuple(rules)


HOOKS = iptables_render.HOOKS


def compile_node(cluster: Cluster, node: str, index: Optional[ClusterIndex] = None,
                 options: CompileOptions = DEFAULT_OPTIONS) -> DesiredState:
    """The iptables filter state of `node` (see intend_node)."""
    return iptables_render.render(intend_node(cluster, node, index, options))


def intend_node(cluster: Cluster, node: str, index: Optional[ClusterIndex] = None,
                options: CompileOptions = DEFAULT_OPTIONS) -> NodeIntent:
    """What `node` must enforce, for any dataplane. Pass `index` to share one
    index between several nodes' compilations of the same cluster; `options`
    for what the node asks for beyond the NetworkPolicy API (the default:
    nothing)."""
    index = index or ClusterIndex(cluster)
    comp = _Compiler(index, options)
    local = [p for p in index.pods if p.node == node]      # non-host-network, in pod order
    logs = _Logs(index.cluster, options)
    decided: list[tuple[Pod, dict[str, _Tiers]]] = []
    for pod in local:
        applying = index.policies_for(pod)
        admin = [a for a in cluster.admin_policies if index.admin_selects(a, pod)]
        baseline = cluster.baseline
        if baseline is not None and not index.admin_selects(baseline, pod):
            baseline = None
        tiers = {}
        for direction in (EGRESS, INGRESS):
            t = _Tiers(tuple(a for a in admin if admin_rules_of(a, direction)),
                       tuple(p for p in applying if direction in p.policy_types),
                       baseline if baseline is not None and admin_rules_of(baseline, direction)
                       else None)
            if t:
                tiers[direction] = t
        if tiers:
            decided.append((pod, tiers))

    families = {}
    for family in (4, 6):
        chains: list[FilterChain] = []
        dispatch: list[Dispatch] = []
        with_chains: list[tuple[Pod, tuple[str, ...]]] = []
        for pod, tiers in decided:
            addrs = comp.address_texts(pod, family)
            if not addrs:
                continue
            made = False
            for direction, t in tiers.items():
                pod_chains = comp.pod_chains(pod, direction, t, family, logs)
                if not pod_chains:
                    continue
                made = True
                chains.extend(pod_chains)
                dispatch.extend(Dispatch(a, pod_chains[0].name, pod.key, direction) for a in addrs)
            if made:
                with_chains.append((pod, addrs))
        forward_tail: list[FilterRule] = []
        input_tail: list[FilterRule] = []
        cidrs = options.cidrs(family) if options.isolate_new_pods else ()
        if cidrs:
            isolated_keys = {pod.key for pod, _ in with_chains}
            known = frozenset(t for pod in local if pod.key not in isolated_keys
                              for t in comp.address_texts(pod, family))
            local_set = IpSet(local_set_name(family), HASH_NET, family, known)
            comp.sets[local_set.name] = local_set
            chains += _unknown_chains(family, with_chains, local_set.name, options)
            forward_tail += [FilterRule(Match(src_net=c), Verdict(JUMP, LOCAL_SRC_CHAIN),
                                        f"source in pod range {c}") for c in cidrs]
            forward_tail += [FilterRule(Match(dst_net=c), Verdict(JUMP, LOCAL_DST_CHAIN),
                                        f"destination in pod range {c}") for c in cidrs]
            # The node's own traffic to itself comes back in on lo, from any
            # of its addresses, a gateway address inside a pod range included.
            input_tail += [FilterRule(Match(in_loopback=True), ALLOWED, "the node to itself")]
            input_tail += [FilterRule(Match(src_net=c), Verdict(JUMP, LOCAL_SRC_CHAIN),
                                      f"source in pod range {c}") for c in cidrs]
        families[family] = FamilyIntent(family, _head(family), tuple(dispatch),
                                        tuple(forward_tail), tuple(input_tail),
                                        tuple(sorted(chains, key=lambda c: c.name)))

    used = {name for fam in families.values() for c in fam.chains for r in c.rules
            for name in r.match.sets()}
    sets = tuple(comp.sets[name] for name in sorted(used))
    return NodeIntent(v4=families[4], v6=families[6], sets=sets)


def _unknown_chains(family: int, with_chains: list[tuple[Pod, tuple[str, ...]]],
                    local_set: str, options: CompileOptions) -> list[FilterChain]:
    """KPM-LOCAL-SRC / -DST return for a known local pod and send anything
    else to KPM-UNKNOWN. Pods with chains are listed by address, in the same
    transaction as their chains; the others are in the set."""
    out = []
    for name, side, what in ((LOCAL_SRC_CHAIN, "src", "source"),
                             (LOCAL_DST_CHAIN, "dst", "destination")):
        def host(a: str) -> Match:
            net = f"{a}/{_HOST_LEN[family]}"
            return Match(src_net=net) if side == "src" else Match(dst_net=net)
        rules = [FilterRule(host(a), ALLOWED, f"{pod.key} known")
                 for pod, addrs in with_chains for a in addrs]
        in_set = Match(src_set=local_set) if side == "src" else Match(dst_set=local_set)
        rules.append(FilterRule(in_set, ALLOWED, "known pods without chains"))
        rules.append(FilterRule(ANY, Verdict(JUMP, UNKNOWN_CHAIN), f"unknown {what}"))
        out.append(FilterChain(name, tuple(rules)))
    refuse = [FilterRule(ANY, REFUSED, "unknown address reject")]
    if options.log_drops:
        refuse.insert(0, log_rule(options, log_prefix("unknown", "", options.log_target),
                                  "log unknown address drops"))
    out.append(FilterChain(UNKNOWN_CHAIN, tuple(refuse)))
    return out


def named_port_problems(cluster: Cluster, index: Optional[ClusterIndex] = None) -> tuple[Problem, ...]:
    """Named ports that no pod the rule could reach declares: such a port
    entry allows nothing, which is almost always a typo."""
    index = index or ClusterIndex(cluster)
    comp = _Compiler(index)
    problems = []
    for policy in sorted(cluster.policies, key=lambda p: (p.namespace, p.name)):
        for direction in (INGRESS, EGRESS):
            if direction not in policy.policy_types:
                continue
            rules = policy.ingress if direction == INGRESS else policy.egress
            for rule in sorted(rules, key=lambda r: r.index):
                for i, port in enumerate(rule.ports or ()):
                    if not isinstance(port.port, str):
                        continue
                    if direction == INGRESS:
                        found = _declares(index.policy_pods(policy), port.port, port.protocol)
                        where = "no pod the policy selects"
                    else:
                        found = _declared_in_reach(comp, policy.namespace, rule.peers, port)
                        where = "no pod this rule can reach"
                    if found:
                        continue
                    problems.append(Problem(
                        "NetworkPolicy", policy.key,
                        f"spec.{_DIRECTION[direction]}[{rule.index}].ports[{i}].port",
                        f"named port {port.port!r} ({port.protocol}) is declared by {where}"))
    return tuple(problems)


def _declares(pods: Iterable[Pod], name: str, protocol: str) -> bool:
    return any(cp.name == name and cp.protocol == protocol for p in pods for cp in p.ports)


def _declared_in_reach(comp: _Compiler, namespace: str, peers: Optional[tuple[Peer, ...]],
                       port: PolicyPort) -> bool:
    declaring = comp.declared(port.port, port.protocol)
    if peers is None:
        return bool(declaring)
    if _declares(comp.index.peers_pods(namespace, peers), port.port, port.protocol):
        return True
    nets = comp.blocks(peers, 4) + comp.blocks(peers, 6)
    return any(a in n for pod, _ in declaring for f in (4, 6)
               for a in comp.addresses(pod, f) for n in nets)
