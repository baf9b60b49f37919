"""This node at a glance: for each local pod, what isolates it, what it costs
in rules and sets, and whether the kernel holds what it should.

A pod's chain is only enforced when its dispatch rules in the top chains
lead to it and the sets its rules match hold the right members, so all
three are checked, not just the chain.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lib.compile import FORWARD_CHAIN, INPUT_CHAIN, pod_chain_name
from lib.cycle import count
from lib.model import EGRESS, INGRESS, Cluster
from lib.plan import KernelState, Plan, TableState
from lib.ruleset import FAMILIES, Chain, DesiredState
from lib.selectors import ClusterIndex
from lib.terminal import paint, printable

IN_SYNC, DIFFERS, MISSING, STALE = "in sync", "differs", "missing", "stale"


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
    policies: tuple[str, ...]   # every policy selecting the pod, either direction
    rules: int                  # rules of its chains, all families
    sets: tuple[str, ...]       # sets its rules match
    chains: tuple[ChainStatus, ...]
    state: str                  # IN_SYNC, DIFFERS or MISSING
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeStatus:
    node: str
    backend: str
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


def node_status(cluster: Cluster, desired: DesiredState, kernel: KernelState, plan: Plan,
                node: str, backend: str, families: tuple[int, ...] = FAMILIES) -> NodeStatus:
    """`desired` is what the cycle compiled for `node` (families this node
    lacks left out), `kernel` what it read, `plan` their diff."""
    index = ClusterIndex(cluster)
    wanted_sets = desired.set_map()
    chain_maps = {f: desired.family(f).chain_map() for f in families}
    tables = {f: kernel.tables.get(f) for f in families}
    tops = {f: _top_hashes(tables[f]) for f in families}
    pods = []
    for pod in index.pods:
        if pod.node != node:
            continue
        policies = index.policies_for(pod)
        chains: list[ChainStatus] = []
        sets: set[str] = set()
        for family in families:
            for direction, name in ((INGRESS, "ingress"), (EGRESS, "egress")):
                chain_name = pod_chain_name(pod, direction)
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
        states = {c.state for c in chains}
        state = MISSING if MISSING in states else IN_SYNC if states <= {IN_SYNC} else DIFFERS
        reasons = tuple(f"{c.name} (IPv{c.family} {c.direction}): {c.state}"
                        + (f", {c.reason}" if c.reason else "")
                        for c in chains if c.state != IN_SYNC)
        pods.append(PodStatus(
            pod=pod.key, ips=pod.ips,
            ingress_isolated=any(INGRESS in p.policy_types for p in policies),
            egress_isolated=any(EGRESS in p.policy_types for p in policies),
            policies=tuple(p.key for p in policies),
            rules=sum(c.rules for c in chains), sets=tuple(sorted(sets)),
            chains=tuple(chains), state=state, reasons=reasons))
    counts = count(cluster, desired, node)
    return NodeStatus(
        node=node, backend=backend, families=tuple(families),
        policies=counts.policies, local_pods=counts.local_pods, rules=counts.rules,
        sets=counts.sets, set_members=counts.set_members,
        in_sync=plan.empty, changes=len(plan.changes),
        drift=sum(1 for c in plan.changes if c.drift), pods=tuple(pods))


def summary(s: NodeStatus) -> str:
    if s.in_sync:
        kernel = "kernel in sync"
    else:
        kernel = f"kernel out of sync ({s.changes} change{'s' if s.changes != 1 else ''} pending"
        kernel += f", {s.drift} drift)" if s.drift else ")"
    families = "+".join(f"IPv{f}" for f in s.families)
    members = f"{s.set_members} member{'s' if s.set_members != 1 else ''}"
    return (f"node {s.node}: {s.policies} policies, {s.local_pods} local pods, {s.rules} rules, "
            f"{s.sets} sets ({members}); {kernel}; backend {s.backend}, {families}")


_COLUMNS = ("POD", "INGRESS", "EGRESS", "POLICIES", "RULES", "SETS", "KERNEL")


def render_table(s: NodeStatus, color: bool = False) -> str:
    """One row per local pod, a summary line, then why each pod that is
    not in sync differs."""
    rows = [_COLUMNS]
    for p in s.pods:
        rows.append((printable(p.pod), "isolated" if p.ingress_isolated else "-",
                     "isolated" if p.egress_isolated else "-", str(len(p.policies)),
                     str(p.rules), str(len(p.sets)), p.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
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
    return "\n".join(lines) + "\n"
