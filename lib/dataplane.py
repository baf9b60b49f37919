"""The two dataplanes behind one face, so that the cycle, the loop and the
commands never ask which one runs.

A dataplane turns the node's intent (lib.intent) into its desired state,
reads its own state from the kernel, diffs, applies, and describes a plan
(raw, json, diff). Each also knows the other one's objects: a node that
switches dataplanes finds them left by the previous run, and they are
removed only once the new dataplane's rules are in force (`settle`), so the
switch leaves no moment unenforced and nothing behind.
"""
from __future__ import annotations

from typing import Optional

from lib import iptables_render, logs, nft_plan, nft_plan_view, nft_render
from lib import plan as iptables_plan
from lib import plan_view
from lib.intent import NodeIntent
from lib.kernel import Kernel, KernelError
from lib.nft_kernel import NftKernel
from lib.nft_state import Table, merged_spans, spans_cover
from lib.ruleset import DesiredState

IPTABLES, NFTABLES = "iptables", "nftables"
DATAPLANES = (IPTABLES, NFTABLES)


def missing_binary(err: KernelError) -> bool:
    return "not found in PATH" in str(err)


class _Dataplane:
    name = ""

    def __init__(self, kernel, other=None):
        self.kernel = kernel
        self.other = other                 # the other dataplane's kernel, for leftovers
        self._settled = other is None

    # what lib.conntrack and the cycle read of a kernel
    @property
    def families(self):
        return self.kernel.families

    @property
    def netns(self):
        return getattr(self.kernel, "netns", None)

    @property
    def timeout(self):
        return getattr(self.kernel, "timeout", None)

    def read(self):
        return self.kernel.read()

    def prefetch(self) -> None:
        """Begin the next read() now, where the kernel can (nftables)."""
        getattr(self.kernel, "prefetch", lambda: None)()

    def drop_prefetch(self) -> None:
        getattr(self.kernel, "drop_prefetch", lambda: None)()

    def apply(self, plan):
        return self.kernel.apply(plan)

    def settle(self) -> None:
        """Once our rules are in force: remove what the other dataplane left
        (a node switched from it). A failure is logged and tried again next
        cycle, as the other rules only narrow further what ours already
        enforce."""
        if self._settled:
            return
        try:
            current = self.other.read()
            cleanup = self._other_cleanup(current)
            if not cleanup.empty:
                self.other.apply(cleanup)
                logs.get().info(f"removed the {self._other_name()} dataplane's rules",
                                extra={"event": "dataplane-switch", "dataplane": self.name,
                                       "removed": self._other_name(),
                                       "changes": len(cleanup.changes)})
        except KernelError as err:
            if not missing_binary(err):
                logs.get().warning(f"could not remove the {self._other_name()} dataplane's "
                                   f"rules: {err}", extra={"event": "dataplane-switch-error"})
                return
        self._settled = True

    def _other_name(self) -> str:
        return NFTABLES if self.name == IPTABLES else IPTABLES


class IptablesDataplane(_Dataplane):
    """Chains in the shared filter tables through iptables-restore, peers in ipsets."""
    name = IPTABLES

    def render(self, intent: NodeIntent):
        return iptables_render.render(intent)

    def diff(self, desired, current):
        return iptables_plan.diff(desired, current)

    def cleanup_plan(self, current):
        return iptables_plan.cleanup(current)

    @staticmethod
    def empty_desired():
        return DesiredState()

    def _other_cleanup(self, current: Table):
        return nft_plan.cleanup(current)

    def raw(self, plan) -> str:
        return iptables_plan.render(plan)

    def document(self, plan, desired, current) -> dict:
        return plan_view.document(plan, desired, current)

    def render_diff(self, plan, desired, current, color: bool = False) -> str:
        return plan_view.render_diff(plan, desired, current, color=color)

    def may_narrow(self, plan, desired) -> bool:
        return iptables_may_narrow(plan, desired)

    @staticmethod
    def counts(desired) -> tuple[int, int, int]:
        rules = sum(len(c.rules) for f in (desired.v4, desired.v6) for c in f.chains)
        return rules, len(desired.sets), sum(len(s.members) for s in desired.sets)


class NftablesDataplane(_Dataplane):
    """Our own `inet kube-policy-manager` table through one `nft -f` transaction."""
    name = NFTABLES

    def __init__(self, kernel, other=None):
        super().__init__(kernel, other)
        self._seen_table = False
        self._sets = nft_render.SetMemo()

    def render(self, intent: NodeIntent) -> Table:
        return nft_render.render(intent, self._sets)

    def diff(self, desired: Table, current: Table):
        # Our table was there before if we wrote it this process, or if the
        # last read found it: a missing one is then drift, not a first start.
        return nft_plan.diff(desired, current, table_expected=self._seen_table)

    def read(self):
        table = self.kernel.read()
        if table.exists:
            self._seen_table = True
        return table

    def apply(self, plan):
        stats = self.kernel.apply(plan)
        self._seen_table = True
        return stats

    def cleanup_plan(self, current: Table):
        return nft_plan.cleanup(current)

    @staticmethod
    def empty_desired() -> Table:
        return Table()

    def _other_cleanup(self, current):
        return iptables_plan.cleanup(current)

    def raw(self, plan) -> str:
        return nft_plan_view.render_raw(plan)

    def document(self, plan, desired, current) -> dict:
        return nft_plan_view.document(plan, desired, current)

    def render_diff(self, plan, desired, current, color: bool = False) -> str:
        return nft_plan_view.render_diff(plan, desired, current, color=color)

    def may_narrow(self, plan, desired: Table) -> bool:
        return nft_may_narrow(plan, desired)

    @staticmethod
    def counts(desired: Table) -> tuple[int, int, int]:
        rules = sum(len(c.rules) for c in desired.chains)
        return (rules, len(desired.sets),
                sum(len(s.elements) for s in desired.sets))


def of(kernel) -> _Dataplane:
    """`kernel` as a dataplane: a dataplane as it is, an iptables Kernel
    (or a stand-in for one) as the iptables dataplane, with no leftovers to
    look for."""
    if isinstance(kernel, _Dataplane):
        return kernel
    return alone(kernel)


def alone(kernel) -> _Dataplane:
    """A dataplane over `kernel` that looks for no leftovers (for --cleanup)."""
    return NftablesDataplane(kernel) if isinstance(kernel, NftKernel) else IptablesDataplane(kernel)


def build(name: str, backend: Optional[str], netns: Optional[str] = None,
          families=(4, 6), **kernel_options) -> _Dataplane:
    """The dataplane `name` in `netns`, with the other one's kernel to clear
    leftovers from. `backend` is the iptables backend (None: iptables not
    usable here, as on a node with nft alone)."""
    nft = NftKernel(netns, families, **{k: v for k, v in kernel_options.items()
                                        if k in ("timeout", "ipv6_sysctl_dir")})
    ipt = Kernel(backend, netns, families, **kernel_options) if backend else None
    if name == NFTABLES:
        return NftablesDataplane(nft, ipt)
    if name == IPTABLES:
        if ipt is None:
            raise ValueError("dataplane iptables: no iptables backend")
        return IptablesDataplane(ipt, nft)
    raise ValueError(f"dataplane {name!r}: must be one of {', '.join(DATAPLANES)}")


# --- may a plan narrow? -----------------------------------------------------------

def iptables_may_narrow(the_plan, desired) -> bool:
    """Whether applying the plan can make the node refuse a flow it allowed,
    which is when the conntrack entries of refused flows must be cut.

    A plan cannot narrow when all it does is create sets and add members to
    them, and every rule of ours that matches a set that gains members
    RETURNs (allows) on a match: a new member then only allows more, and a
    new set is referenced by no rule yet. Anything else may narrow: an
    iptables payload (a rewritten chain loses RETURN rules or gains a pod's
    isolation, a hook restored after someone removed it puts every pod under
    policy again, a deleted or added chain comes with such rewrites),
    members deleted, sets destroyed, a set recreated with another type (the
    `destroy` lines of the prepare payload), or a member added to a set that
    an admin Deny or Pass rule matches."""
    if any(the_plan.iptables.values()) or any(the_plan.iptables_cleanup.values()):
        return True
    if the_plan.ipset_cleanup:
        return True
    grown = set()
    for line in the_plan.ipset_prepare.splitlines():
        if not line.strip() or line.startswith("create "):
            continue
        if not line.startswith("add "):
            return True
        grown.add(line.split(" ", 2)[1])
    return not _sets_only_allow(desired, grown)


def _sets_only_allow(desired, names: set) -> bool:
    """Every rule matching one of the named sets jumps to RETURN: a member more allows more."""
    for family in (desired.v4, desired.v6):
        for chain in family.chains:
            for rule in chain.rules:
                if "--match-set" not in rule.args or _jump(rule.args) == "RETURN":
                    continue
                if any(rule.args[i + 1] in names for i, a in enumerate(rule.args[:-1])
                       if a == "--match-set"):
                    return False
    return True


def _jump(args: tuple) -> Optional[str]:
    for i, arg in enumerate(args[:-1]):
        if arg in ("-j", "--jump", "-g", "--goto"):
            return args[i + 1]
    return None


_ADD_ELEMENT = f"add element {nft_plan.FAMILY} {nft_plan.TABLE} "
_DELETE_ELEMENT = f"delete element {nft_plan.FAMILY} {nft_plan.TABLE} "
_ADD_SET = f"add set {nft_plan.FAMILY} {nft_plan.TABLE} "


def nft_may_narrow(the_plan, desired: Table) -> bool:
    """As iptables_may_narrow, for an nft payload: only set declarations and
    elements added to sets (not to the dispatch maps, which put a pod under
    policy) whose every user returns on a match. An interval set lists
    adjacent addresses merged (10.0.2.10 and .11 as 10.0.2.10/31), so a
    peer joining may replace an element by a wider one: a deleted element
    that the set's new elements cover takes nothing away."""
    maps = {m.name for m in desired.maps}
    sets = desired.set_map()
    spans: dict[str, list] = {}                 # interval set -> its merged spans, once
    grown = set()
    for line in the_plan.payload.splitlines():
        if line.startswith(_ADD_SET):
            continue
        if line.startswith(_DELETE_ELEMENT):
            name, _, elements = line[len(_DELETE_ELEMENT):].partition(" ")
            s = sets.get(name)
            if s is None or not s.interval:
                return True
            if name not in spans:
                spans[name] = merged_spans(s.elements)
            if not spans_cover(spans[name], _element_list(elements)):
                return True
            grown.add(name)
            continue
        if not line.startswith(_ADD_ELEMENT):
            return True
        name = line[len(_ADD_ELEMENT):].split(" ", 1)[0]
        if name in maps:
            return True
        grown.add(name)
    for chain in desired.chains:
        for rule in chain.rules:
            words = rule.statement.split()
            if words and words[-1] == "return":
                continue
            if any(w.startswith("@") and w[1:] in grown for w in words):
                return True
    return False


def _element_list(braced: str) -> list[str]:
    """`{ a, b }` of an element line: its elements."""
    return [e.strip() for e in braced.strip().strip("{}").split(",") if e.strip()]
