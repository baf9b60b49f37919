"""Diff the desired filter state against the kernel's, and render the
restore payloads that turn one into the other, in hitless order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from lib.ruleset import (
    FAMILIES, MAX_CHAIN_NAME, MAX_SET_NAME, PREFIX, SET_FAMILY, Chain, DesiredState, FamilyState,
    Hook, IpSet, Rule,
)


@dataclass(frozen=True)
class SavedRule:
    """One rule as `iptables-save` printed it."""
    chain: str
    spec: tuple[str, ...]          # tokens after "-A CHAIN", unquoted, as saved
    hash: Optional[str] = None     # our tag from a "kpm:<hash> ..." comment, if any
    target: Optional[str] = None   # the -j / -g target, if any


@dataclass(frozen=True)
class TableState:
    """The filter table of one family, as read back from the kernel."""
    family: int
    chains: dict = field(default_factory=dict)   # name -> tuple[SavedRule, ...], every chain
    policies: dict = field(default_factory=dict) # built-in chain name -> policy ("ACCEPT", ...)


@dataclass(frozen=True)
class KernelState:
    tables: dict = field(default_factory=dict)   # family (4, 6) -> TableState
    sets: dict = field(default_factory=dict)     # name -> IpSet, owned (KPM-) sets only


@dataclass(frozen=True)
class Change:
    """One line of the plan summary, for logs and --dry-run."""
    kind: str       # "chain-add", "chain-rewrite", "chain-delete", "hook", "set-create",
                    # "set-members", "set-destroy"
    family: int     # 4 or 6
    name: str
    detail: str = ""
    drift: bool = False   # True when the kernel lost something we had written


@dataclass(frozen=True)
class Plan:
    ipset_prepare: str = ""                 # ipset restore input: create, add
    iptables: dict = field(default_factory=dict)          # family -> iptables-restore input
    iptables_cleanup: dict = field(default_factory=dict)  # family -> iptables-restore input
    ipset_cleanup: str = ""                 # ipset restore input: del, destroy
    changes: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.ipset_prepare or self.ipset_cleanup
                    or any(self.iptables.values()) or any(self.iptables_cleanup.values()))


# ---------------------------------------------------------------------------
# Functions. lib.iptables_save builds the types above, so it is imported only
# once they exist, and as a module: its attributes are looked up at call time.
# ---------------------------------------------------------------------------
from lib import iptables_save  # noqa: E402

BUILTIN_CHAINS = ("INPUT", "FORWARD", "OUTPUT")   # of the filter table
MAXELEM = 1048576
_VERDICTS = ("REJECT", "DROP")
_RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}


def _owned(name: Optional[str]) -> bool:
    return bool(name) and name.startswith(PREFIX)


def _ours(rule: SavedRule) -> bool:
    """A rule we wrote or must remove: our tag, or a jump into our chains."""
    return rule.hash is not None or _owned(rule.target)


def _target(rule: Rule) -> Optional[str]:
    return iptables_save.saved_rule("", rule.args).target


def _line(*head: str, args: tuple[str, ...]) -> str:
    return " ".join(head + tuple(iptables_save.quote(a) for a in args))


def _transaction(lines: list[str]) -> str:
    return "".join(["*filter\n"] + [line + "\n" for line in lines] + ["COMMIT\n"]) if lines else ""


def _builtins(table: TableState) -> set[str]:
    return {n for n in table.chains if not _owned(n) and (n in table.policies or n in BUILTIN_CHAINS)}


def _foreign_referenced(table: TableState) -> dict[str, str]:
    """Owned chains a foreign user chain jumps to: they cannot be deleted
    (the kernel refuses) and are not ours to unhook, so they are only
    flushed. An empty chain just returns, so this keeps nothing open."""
    refs: dict[str, str] = {}
    builtins = _builtins(table)
    for name, rules in table.chains.items():
        if _owned(name) or name in builtins:
            continue
        for r in rules:
            if _owned(r.target):
                refs.setdefault(r.target, name)
    return refs


def _check_desired(desired: DesiredState) -> None:
    """Refuse a desired state whose payload would touch what is not ours or
    fail to load; better an error naming the object than a failing restore."""
    for family in FAMILIES:
        fs = desired.family(family)
        names = {c.name for c in fs.chains}
        for chain in fs.chains:
            if not _owned(chain.name) or len(chain.name) > MAX_CHAIN_NAME:
                raise ValueError(f"IPv{family} chain {chain.name!r}: name must start with {PREFIX}"
                                 f" and have at most {MAX_CHAIN_NAME} characters")
            for i, rule in enumerate(chain.rules):
                target = _target(rule)
                if _owned(target) and target not in names:
                    raise ValueError(f"IPv{family} chain {chain.name}: rules[{i}] jumps to "
                                     f"{target}, which the desired state does not hold")
        for hook in fs.hooks:
            target = _target(hook.rule)
            if _owned(hook.builtin) or hook.builtin in names:
                raise ValueError(f"IPv{family} hook {hook.builtin}: must be a built-in chain")
            if not _owned(target) or target not in names:
                raise ValueError(f"IPv{family} hook {hook.builtin}: target {target} is not a "
                                 "chain of the desired state")
    for s in desired.sets:
        if not _owned(s.name) or len(s.name) > MAX_SET_NAME:
            raise ValueError(f"set {s.name!r}: name must start with {PREFIX} and have at most "
                             f"{MAX_SET_NAME} characters")
        if s.family not in SET_FAMILY:
            raise ValueError(f"set {s.name}: family {s.family} is not 4 or 6")


# --- sets -------------------------------------------------------------------

def _create(s: IpSet) -> str:
    return f"create {s.name} {s.kind} family {SET_FAMILY[s.family]} maxelem {MAXELEM}"


def _diff_sets(desired: DesiredState, current: KernelState):
    creates: list[str] = []
    adds: list[str] = []
    recreates: list[str] = []
    dels: list[str] = []
    destroys: list[str] = []
    changes: list[Change] = []
    have: dict[str, IpSet] = current.sets
    want = desired.set_map()
    for name in sorted(want):
        s = want[name]
        k = have.get(name)
        if k is None:
            creates.append(_create(s))
            adds += [f"add {name} {m}" for m in sorted(s.members)]
            changes.append(Change("set-create", s.family, name, f"+{len(s.members)} members"))
        elif (k.kind, k.family) != (s.kind, s.family):
            recreates += [f"destroy {name}", _create(s)] + [f"add {name} {m}" for m in sorted(s.members)]
            changes.append(Change("set-create", s.family, name,
                                  f"recreate (was {k.kind} family {SET_FAMILY.get(k.family, k.family)}),"
                                  f" +{len(s.members)} members", drift=True))
        else:
            plus = sorted(s.members - k.members)
            minus = sorted(k.members - s.members)
            adds += [f"add {name} {m}" for m in plus]
            dels += [f"del {name} {m}" for m in minus]
            if plus or minus:
                changes.append(Change("set-members", s.family, name, f"+{len(plus)} -{len(minus)} members"))
    for name in sorted(set(have) - set(want)):
        k = have[name]
        destroys.append(f"destroy {name}")
        changes.append(Change("set-destroy", k.family, name, f"{len(k.members)} members"))
    prepare = "".join(line + "\n" for line in creates + adds + recreates)
    cleanup_ = "".join(line + "\n" for line in dels + destroys)
    return prepare, cleanup_, changes


# --- chains and hooks ---------------------------------------------------------

def hashes_drift(want: Sequence[str], have: Sequence[Optional[str]],
                 refuses: Callable[[int], bool]) -> str:
    """Why a chain whose rule hashes read back (`have`, None for an untagged
    rule) differ from the desired ones looks tampered with rather than out
    of date; "" when an earlier desired state explains it. `refuses(i)`
    says whether desired rule i is a REJECT/DROP (our chains end in those,
    and new rules go before them)."""
    untagged = list(have).count(None)
    if untagged:
        return f"{untagged} untagged rule{'s' if untagged > 1 else ''}"
    wanted = Counter(want)
    if any(n > wanted[h] for h, n in Counter(have).items() if h in wanted):
        return "duplicated rules"
    if not have and want:
        return "emptied"
    if len(have) < len(want) and tuple(have) == tuple(want[:len(have)]):
        if any(refuses(i) for i in range(len(have), len(want))):
            return "lost its final rules"
    return ""


def _chain_drift(chain: Chain, saved: tuple[SavedRule, ...]) -> str:
    return hashes_drift(chain.hashes, [r.hash for r in saved],
                        lambda i: _target(chain.rules[i]) in _VERDICTS)


def _diff_chains(fs: FamilyState, table: TableState):
    declare: list[str] = []
    append: list[str] = []
    changes: list[Change] = []
    for chain in fs.chains:
        saved = table.chains.get(chain.name)
        if saved is None:
            changes.append(Change("chain-add", fs.family, chain.name, f"{len(chain.rules)} rules"))
        elif tuple(r.hash for r in saved) != chain.hashes:
            why = _chain_drift(chain, saved)
            detail = f"rewrite {len(chain.rules)} rules" + (f"; {why}" if why else "")
            changes.append(Change("chain-rewrite", fs.family, chain.name, detail, drift=bool(why)))
        else:
            continue
        declare.append(f":{chain.name} - [0:0]")
        append += [_line("-A", chain.name, args=r.restore_args()) for r in chain.rules]
    return declare, append, changes


def _hook_drift(want: list[Hook], rules: tuple[SavedRule, ...], table: TableState) -> str:
    reasons = []
    for i, hook in enumerate(want):
        at = [j for j, r in enumerate(rules) if r.hash == hook.rule.hash]
        if len(at) > 1:
            reasons.append(f"{len(at)} copies")
        elif at and at[0] != i:
            reasons.append(f"moved to {at[0] + 1}")
        elif not at and _target(hook.rule) in table.chains and not any(_ours(r) for r in rules):
            reasons.append("missing")
    if any(r.hash is None and _owned(r.target) for r in rules):
        reasons.append("untagged jump")
    return ", ".join(reasons)


def _unhook(builtin: str, rules: tuple[SavedRule, ...]) -> list[str]:
    return [_line("-D", builtin, args=r.spec) for r in rules if _ours(r)]


def _diff_hooks(fs: FamilyState, table: TableState):
    lines: list[str] = []
    changes: list[Change] = []
    wanted: dict[str, list[Hook]] = {}
    for hook in fs.hooks:
        wanted.setdefault(hook.builtin, []).append(hook)
    for builtin in sorted(_builtins(table) | set(wanted)):
        want = wanted.get(builtin, [])
        rules = table.chains.get(builtin, ())
        ours = [r for r in rules if _ours(r)]
        if [r.hash for r in rules[:len(want)]] == [h.rule.hash for h in want] and len(ours) == len(want):
            continue
        lines += _unhook(builtin, rules)
        lines += [_line("-I", builtin, "1", args=h.rule.restore_args()) for h in reversed(want)]
        parts = [f"remove {len(ours)}"] if ours else []
        if want:
            parts.append("insert " + ", ".join(str(_target(h.rule)) for h in want) + " at 1")
        why = _hook_drift(want, rules, table)
        detail = ", ".join(parts) + (f"; {why}" if why else "")
        changes.append(Change("hook", fs.family, builtin, detail, drift=bool(why)))
    return lines, changes


def _remove_chains(family: int, table: TableState, names: list[str]):
    """-F of each chain then -X of each, except chains a foreign chain
    still jumps to (flushed only, when not empty already)."""
    refs = _foreign_referenced(table)
    flush = [n for n in names if table.chains[n] or n not in refs]
    delete = [n for n in names if n not in refs]
    changes = []
    for n in names:
        detail = f"{len(table.chains[n])} rules"
        if n in refs:
            if not table.chains[n]:
                continue
            detail += f"; kept empty, {refs[n]} jumps to it"
        changes.append(Change("chain-delete", family, n, detail))
    return [f"-F {n}" for n in flush], [f"-X {n}" for n in delete], changes


def diff(desired: DesiredState, current: KernelState) -> Plan:
    """The plan that makes the kernel's owned state equal the desired one.

    Nothing but names starting with PREFIX is ever written, apart from the
    hook rules in built-in chains; built-in chains are never declared, so
    their policies and foreign rules stay as they are.

    Sets: new sets are created and all members of all sets added before
    anything else; stale members and sets go last. A set of ours that
    exists with another type or family (someone else made it: our names
    encode both) is destroyed and recreated at the end of the prepare
    payload; if a rule uses it, ipset refuses and the failure is reported
    rather than worked around.

    Drift (Change.drift) is flagged only where no earlier desired state can
    explain the kernel's content, so that policy edits never raise it:
    an owned chain with an untagged rule, with a rule of ours duplicated,
    emptied, or a prefix of the desired chain missing a REJECT/DROP of its
    tail (our chains end in REJECT, and new rules go before it); a hook
    moved away from position 1, present more than once, missing while its
    target chain exists (we had written both together), or an untagged jump
    into our chains in a built-in chain; a set of ours with the wrong type
    or family. Missing members are not drift: pods come and go.

    A stale chain that a foreign user chain jumps to is only flushed: the
    kernel refuses to delete it, and unhooking foreign rules is not ours
    to do.
    """
    _check_desired(desired)
    prepare, set_cleanup, set_changes = _diff_sets(desired, current)
    main: dict[int, str] = {}
    stale: dict[int, str] = {}
    chain_changes: list[Change] = []
    hook_changes: list[Change] = []
    delete_changes: list[Change] = []
    for family in FAMILIES:
        fs = desired.family(family)
        table = current.tables.get(family) or TableState(family)
        declare, append, changes = _diff_chains(fs, table)
        hook_lines, hooks = _diff_hooks(fs, table)
        wanted = fs.chain_map()
        names = sorted(n for n in table.chains if _owned(n) and n not in wanted)
        flush, delete, deletes = _remove_chains(family, table, names)
        main[family] = _transaction(declare + append + hook_lines)
        stale[family] = _transaction(flush + delete)
        chain_changes += changes
        hook_changes += hooks
        delete_changes += deletes
    set_first = [c for c in set_changes if c.kind != "set-destroy"]
    set_last = [c for c in set_changes if c.kind == "set-destroy"]
    return Plan(ipset_prepare=prepare, iptables=main, iptables_cleanup=stale,
                ipset_cleanup=set_cleanup,
                changes=tuple(set_first + chain_changes + hook_changes + delete_changes + set_last))


def cleanup(current: KernelState) -> Plan:
    """Remove everything we own: hook rules from the built-in chains and
    every owned chain flushed in one transaction, deleted in a second (a
    chain a foreign user chain jumps to stays, empty), then every owned set
    destroyed."""
    main: dict[int, str] = {}
    stale: dict[int, str] = {}
    changes: list[Change] = []
    for family in FAMILIES:
        table = current.tables.get(family) or TableState(family)
        unhook: list[str] = []
        for builtin in sorted(_builtins(table)):
            lines = _unhook(builtin, table.chains[builtin])
            if lines:
                unhook += lines
                changes.append(Change("hook", family, builtin, f"remove {len(lines)}"))
        names = sorted(n for n in table.chains if _owned(n))
        flush, delete, deletes = _remove_chains(family, table, names)
        main[family] = _transaction(unhook + flush)
        stale[family] = _transaction(delete)
        changes += deletes
    destroys = []
    for name in sorted(current.sets):
        destroys.append(f"destroy {name}\n")
        changes.append(Change("set-destroy", current.sets[name].family, name,
                              f"{len(current.sets[name].members)} members"))
    return Plan(iptables=main, iptables_cleanup=stale, ipset_cleanup="".join(destroys),
                changes=tuple(changes))


def render(plan: Plan) -> str:
    """The payloads in the order they are applied, each under a `# ` header
    naming the command that takes it. Empty payloads are left out."""
    sections = [("ipset restore -exist: create sets, add members", plan.ipset_prepare)]
    sections += [(f"{_RESTORE[f]} --noflush: IPv{f} chains and hooks", plan.iptables[f])
                 for f in sorted(plan.iptables)]
    sections += [(f"{_RESTORE[f]} --noflush: IPv{f} stale chains", plan.iptables_cleanup[f])
                 for f in sorted(plan.iptables_cleanup)]
    sections.append(("ipset restore -exist: delete members, destroy sets", plan.ipset_cleanup))
    return "".join(f"# {header}\n{payload}" for header, payload in sections if payload)
