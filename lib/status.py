"""This node at a glance: for each local pod, what isolates it, what it costs
in rules and sets, and whether the kernel holds what it should.

A pod's chain is only enforced when its dispatch rules in the top chains
lead to it and the sets its rules match hold the right members, so all
three are checked, not just the chain. With new-pod isolation a pod also
needs to be recognised as known (its addresses in KPM-LOCAL-SRC/-DST, or
in the known-pods set), or all its traffic is refused: that is checked too.

What the node should hold depends on the compile options the daemon runs
with (drop logging adds a rule to pod chains, new-pod isolation adds
chains and a set), so the caller compiles with the same options.

This module checks the iptables dataplane; lib/nft_status.py checks the
nftables one. Both take the per-pod facts that do not depend on the
dataplane (isolation, policies, admin policies: `local_pods`) and build
their rows and the node's summary with `pod_status` and `assemble`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lib.compile import (FORWARD_CHAIN, INPUT_CHAIN, LOCAL_DST_CHAIN, LOCAL_SRC_CHAIN,
                         UNKNOWN_CHAIN, local_set_name, np_tier_chain_name, pod_chain_name)
from lib.cycle import count
from lib.model import EGRESS, INGRESS, Cluster, NetworkPolicy, Pod
from lib.plan import Change, KernelState, Plan, TableState
from lib.ruleset import FAMILIES, Chain, DesiredState
from lib.selectors import ClusterIndex
from lib.terminal import paint, printable

IN_SYNC, DIFFERS, MISSING, STALE = "in sync", "differs", "missing", "stale"
IPTABLES, NFTABLES = "iptables", "nftables"      # the dataplanes (lib.dataplane's names)


@dataclass(frozen=True)
class ChainStatus:
    name: str
    family: int
    direction: str              # "ingress" or "egress"
    rules: int                  # desired rules (0 for a stale chain)
    state: str                  # IN_SYNC, DIFFERS, MISSING, or STALE (in the kernel, not desired)
    reason: str = ""


@dataclass(frozen=True)
class PodStatus:
    pod: str                    # namespace/name
    ips: tuple[str, ...]
    ingress_isolated: bool
    egress_isolated: bool
    policies: tuple[str, ...]   # every NetworkPolicy selecting the pod, either direction
    admin_policies: tuple[str, ...]   # admin policies selecting it, in evaluation order ("ANP a", "BANP default")
    rules: int                  # rules of its chains, all families
    sets: tuple[str, ...]       # sets its rules match
    chains: tuple[ChainStatus, ...]
    state: str                  # IN_SYNC, DIFFERS or MISSING
    reasons: tuple[str, ...] = ()
    known: Optional[bool] = None  # with new-pod isolation: the kernel recognises its addresses


@dataclass(frozen=True)
class NodeStatus:
    node: str
    backend: Optional[str]      # the iptables backend (nft, legacy); None on the nftables dataplane
    families: tuple[int, ...]
    policies: int
    local_pods: int
    rules: int
    sets: int
    set_members: int
    in_sync: bool               # the plan is empty
    changes: int
    drift: int
    pods: tuple[PodStatus, ...] = ()
    node_changes: tuple[Change, ...] = ()   # pending changes that are no pod's chain or set
    dataplane: str = IPTABLES

    def as_dict(self) -> dict:
        return asdict(self)


def _top_hashes(table: Optional[TableState]) -> dict[str, set]:
    if table is None:
        return {}
    return {name: {r.hash for r in table.chains.get(name, ())}
            for name in (FORWARD_CHAIN, INPUT_CHAIN)}


def _chain_status(chain: Chain, direction: str, family: int, desired: DesiredState,
                  table: Optional[TableState], top: dict[str, set],
                  kernel: KernelState) -> ChainStatus:
    rules = len(chain.rules)
    saved = table.chains.get(chain.name) if table is not None else None
    if saved is None:
        return ChainStatus(chain.name, family, direction, rules, MISSING)
    if tuple(r.hash for r in saved) != chain.hashes:
        return ChainStatus(chain.name, family, direction, rules, DIFFERS, "rules differ")
    for top_chain in desired.family(family).chains:
        if top_chain.name not in (FORWARD_CHAIN, INPUT_CHAIN):
            continue
        for rule in top_chain.rules:
            if chain.name in rule.args and rule.hash not in top.get(top_chain.name, ()):
                return ChainStatus(chain.name, family, direction, rules, DIFFERS,
                                   f"not reached: dispatch rule missing from {top_chain.name}")
    wanted = desired.set_map()
    for name in _sets_of(chain, wanted):
        have = kernel.sets.get(name)
        if have is None or have.members != wanted[name].members:
            return ChainStatus(chain.name, family, direction, rules, DIFFERS,
                               f"set {name} {'missing' if have is None else 'members differ'}")
    return ChainStatus(chain.name, family, direction, rules, IN_SYNC)


def _sets_of(chain: Chain, sets: dict) -> list[str]:
    return sorted({a for r in chain.rules for a in r.args if a in sets})


@dataclass(frozen=True)
class _Recognition:
    """How one family's new-pod isolation recognises known pods, desired and
    in the kernel: the RETURN rules of pods with chains, by their address
    argument (`10.244.1.10/32`), and what of them the kernel has ahead of
    the jump to KPM-UNKNOWN; the set of the other pods."""
    family: int
    rules: dict            # chain name -> {address argument: [rule hash, ...]}
    ahead: dict            # chain name -> set of rule hashes before the jump to KPM-UNKNOWN
    local_set: str
    wanted: frozenset      # members the set should hold
    held: Optional[frozenset]   # members it holds; None when it is missing


def _recognition(family: int, chains: dict[str, Chain], wanted_sets: dict,
                 table: Optional[TableState], kernel: KernelState) -> Optional[_Recognition]:
    if LOCAL_SRC_CHAIN not in chains:
        return None                      # new pods are not isolated in this family
    rules, ahead = {}, {}
    for name in (LOCAL_SRC_CHAIN, LOCAL_DST_CHAIN):
        by_arg: dict[str, list[str]] = {}
        for rule in chains[name].rules:
            for arg in rule.args:
                by_arg.setdefault(arg, []).append(rule.hash)
        rules[name] = by_arg
        hashes = set()
        for saved in (table.chains.get(name, ()) if table is not None else ()):
            if saved.target == UNKNOWN_CHAIN:
                break
            hashes.add(saved.hash)
        ahead[name] = hashes
    name = local_set_name(family)
    wanted = wanted_sets.get(name)
    held = kernel.sets.get(name)
    return _Recognition(family, rules, ahead, name,
                        wanted.members if wanted is not None else frozenset(),
                        held.members if held is not None else None)


def _unknown_reasons(pod: Pod, r: _Recognition) -> list[str]:
    """Why the kernel would take `pod` for an unknown address, refusing all
    its traffic ([] when it recognises it). A pod with chains is known by a
    RETURN rule per address in KPM-LOCAL-SRC and -DST, any other by the set."""
    addrs = [ip for ip in pod.ips if (":" in ip) == (r.family == 6)]
    host = [f"{a}/{128 if r.family == 6 else 32}" for a in addrs]
    reasons, by_rule = [], False
    for name in (LOCAL_SRC_CHAIN, LOCAL_DST_CHAIN):
        mine = [h for arg in host for h in r.rules[name].get(arg, ())]
        by_rule = by_rule or bool(mine)
        if mine and not set(mine) <= r.ahead[name]:
            reasons.append(f"not known to {name} (IPv{r.family}): its traffic is refused")
    if by_rule:
        return reasons
    expected = sorted(set(addrs) & r.wanted)
    if r.held is None and expected:
        reasons.append(f"not known (IPv{r.family}): set {r.local_set} missing: "
                       "its traffic is refused")
    elif r.held is not None:
        missing = [a for a in expected if a not in r.held]
        if missing:
            reasons.append(f"not known (IPv{r.family}): {', '.join(missing)} missing from set "
                           f"{r.local_set}: its traffic is refused")
    return reasons


def _describe(change: Change) -> str:
    text = f"{change.kind} {change.name}" + (f" (IPv{change.family})" if change.family else "")
    text += f": {change.detail}" if change.detail else ""
    return text + (" DRIFT" if change.drift else "")


@dataclass(frozen=True)
class PodFacts:
    """What the cluster says of one local pod, whatever the dataplane."""
    pod: Pod
    policies: tuple[NetworkPolicy, ...]     # selecting it, either direction
    admin: tuple                            # admin policies selecting it, in evaluation order


def local_pods(cluster: Cluster, node: str, index: ClusterIndex) -> list[PodFacts]:
    """The node's pods (not host-network), in pod order, with their policies."""
    out = []
    for pod in index.pods:
        if pod.node != node:
            continue
        admin = [a for a in cluster.admin_policies if index.admin_selects(a, pod)]
        if cluster.baseline is not None and index.admin_selects(cluster.baseline, pod):
            admin.append(cluster.baseline)
        out.append(PodFacts(pod, tuple(index.policies_for(pod)), tuple(admin)))
    return out


def pod_status(facts: PodFacts, chains: list[ChainStatus], sets: set[str],
               unknown_reasons: list[str], checked: bool) -> PodStatus:
    """One row: missing when a chain is, differs when any chain is not in
    sync or the kernel would not recognise the pod (`checked`: new-pod
    isolation applies to one of its families)."""
    states = {c.state for c in chains}
    state = MISSING if MISSING in states else IN_SYNC if states <= {IN_SYNC} else DIFFERS
    if state == IN_SYNC and unknown_reasons:
        state = DIFFERS
    reasons = tuple(f"{c.name} (IPv{c.family} {c.direction}): {c.state}"
                    + (f", {c.reason}" if c.reason else "")
                    for c in chains if c.state != IN_SYNC) + tuple(unknown_reasons)
    pod, policies = facts.pod, facts.policies
    return PodStatus(
        pod=pod.key, ips=pod.ips,
        ingress_isolated=any(INGRESS in p.policy_types for p in policies),
        egress_isolated=any(EGRESS in p.policy_types for p in policies),
        policies=tuple(p.key for p in policies),
        admin_policies=tuple(a.key for a in facts.admin),
        rules=sum(c.rules for c in chains), sets=tuple(sorted(sets)),
        chains=tuple(chains), state=state, reasons=reasons,
        known=not unknown_reasons if checked else None)


def assemble(cluster: Cluster, desired, plan, node: str, backend: Optional[str],
             families: tuple[int, ...], pods: list[PodStatus], reported: set[str],
             dataplane: str = IPTABLES, plane=None) -> NodeStatus:
    """The node's status from its pod rows; `reported` names the chains,
    sets and maps the rows account for, the plan's other changes are the
    node's. `plane` counts `desired` (lib.dataplane; None: iptables)."""
    counts = count(cluster, desired, node, plane)
    return NodeStatus(
        node=node, backend=backend, families=tuple(families),
        policies=counts.policies, local_pods=counts.local_pods, rules=counts.rules,
        sets=counts.sets, set_members=counts.set_members,
        in_sync=plan.empty, changes=len(plan.changes),
        drift=sum(1 for c in plan.changes if c.drift), pods=tuple(pods),
        node_changes=tuple(c for c in plan.changes if c.name not in reported),
        dataplane=dataplane)


def node_status(cluster: Cluster, desired: DesiredState, kernel: KernelState, plan: Plan,
                node: str, backend: str, families: tuple[int, ...] = FAMILIES) -> NodeStatus:
    """`desired` is what the cycle compiled for `node` (families this node
    lacks left out), `kernel` what it read, `plan` their diff."""
    index = ClusterIndex(cluster)
    wanted_sets = desired.set_map()
    chain_maps = {f: desired.family(f).chain_map() for f in families}
    tables = {f: kernel.tables.get(f) for f in families}
    tops = {f: _top_hashes(tables[f]) for f in families}
    recognition = [r for r in (_recognition(f, chain_maps[f], wanted_sets, tables[f], kernel)
                               for f in families) if r is not None]
    pods = []
    reported: set[str] = set()          # chain and set names the pod rows account for
    for facts in local_pods(cluster, node, index):
        pod = facts.pod
        chains: list[ChainStatus] = []
        sets: set[str] = set()
        for family in families:
            for direction, name in ((INGRESS, "ingress"), (EGRESS, "egress")):
                for chain_name in (pod_chain_name(pod, direction), np_tier_chain_name(pod, direction)):
                    chain = chain_maps[family].get(chain_name)
                    table = tables[family]
                    if chain is None:
                        if table is not None and chain_name in table.chains:
                            chains.append(ChainStatus(chain_name, family, name, 0, STALE,
                                                      "in the kernel, not desired"))
                        continue
                    sets.update(_sets_of(chain, wanted_sets))
                    chains.append(_chain_status(chain, name, family, desired, table,
                                                tops[family], kernel))
        checked = [r for r in recognition if any((":" in ip) == (r.family == 6) for ip in pod.ips)]
        unknown_reasons = [why for r in checked for why in _unknown_reasons(pod, r)]
        reported.update(c.name for c in chains)
        reported.update(sets)
        pods.append(pod_status(facts, chains, sets, unknown_reasons, bool(checked)))
    return assemble(cluster, desired, plan, node, backend, families, pods, reported)


def summary(s: NodeStatus) -> str:
    if s.in_sync:
        kernel = "kernel in sync"
    else:
        kernel = f"kernel out of sync ({s.changes} change{'s' if s.changes != 1 else ''} pending"
        kernel += f", {s.drift} drift)" if s.drift else ")"
    families = "+".join(f"IPv{f}" for f in s.families)
    members = f"{s.set_members} member{'s' if s.set_members != 1 else ''}"
    plane = f"dataplane {s.dataplane}" + (f" (backend {s.backend})" if s.backend else "")
    return (f"node {s.node}: {s.policies} policies, {s.local_pods} local pods, {s.rules} rules, "
            f"{s.sets} sets ({members}); {kernel}; {plane}, {families}")


_COLUMNS = ("POD", "INGRESS", "EGRESS", "POLICIES", "RULES", "SETS", "KERNEL")


def render_table(s: NodeStatus, color: bool = False) -> str:
    """One row per local pod, a summary line, then why each pod that is
    not in sync differs, then the node's other pending changes (top chains,
    hooks, new-pod isolation, sets no pod uses). An ADMIN column lists the
    admin policies selecting each pod when any does."""
    admin = any(p.admin_policies for p in s.pods)
    columns = _COLUMNS[:4] + ("ADMIN",) + _COLUMNS[4:] if admin else _COLUMNS
    rows = [columns]
    for p in s.pods:
        row = ["isolated" if p.ingress_isolated else "-", "isolated" if p.egress_isolated else "-",
               str(len(p.policies))]
        if admin:
            row.append(printable(",".join(k.replace(" ", ":") for k in p.admin_policies)) or "-")
        rows.append((printable(p.pod), *row, str(p.rules), str(len(p.sets)), p.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        line = "  ".join(cells).rstrip()
        if n == 0:
            line = paint(line, "header", color)
        elif row[-1] != IN_SYNC:
            line = "  ".join(cells[:-1]) + "  " + paint(row[-1], "bad", color)
        lines.append(line)
    lines.append("")
    lines.append(paint(summary(s), "ok" if s.in_sync else "bad", color))
    for p in s.pods:
        for reason in p.reasons:
            lines.append(f"  {printable(p.pod)}: {printable(reason)}")
    for change in s.node_changes:
        lines.append(f"  node: {printable(_describe(change))}")
    return "\n".join(lines) + "\n"
