"""A plan as people and scripts read it: what each change does to the
kernel, rule by rule and member by member, with the kernel's current
content beside the desired one, and drift named as drift.

`plan.render` stays the exact restore input; this is the same plan
explained. Both views are built from one description per change
(`describe`), so the readable diff and the JSON never disagree.
"""
from __future__ import annotations

import difflib
import re
from typing import Optional

from lib import iptables_save
from lib.plan import Change, KernelState, Plan, SavedRule, TableState
from lib.ruleset import (COMMENT_TAG, HASH_LEN, PREFIX, SET_FAMILY, DesiredState, Rule,
                         safe_comment)
from lib.terminal import paint, printable

CONTEXT = 2               # unchanged rules shown around a change in a rewritten chain
MAX_MEMBERS = 50          # set members listed per side in the readable diff

_TAG = re.compile(re.escape(COMMENT_TAG) + r"[0-9a-f]{%d}(?: |$)" % HASH_LEN)
_SIGN = {"chain-add": "+", "chain-rewrite": "~", "chain-delete": "-", "hook": "~",
         "set-create": "+", "set-members": "~", "set-destroy": "-"}
_GROUP = {"chain-add": "chains", "chain-rewrite": "chains", "chain-delete": "chains",
          "hook": "hooks", "set-create": "sets", "set-members": "sets", "set-destroy": "sets"}


# --- one description per change ------------------------------------------------

def _comment_text(comment: str) -> str:
    """Our comment without its `kpm:<hash>` tag; a foreign one as it is."""
    m = _TAG.match(comment)
    return comment[m.end():] if m else comment


def rule_view(rule: Rule) -> dict:
    """A desired rule: its identity, its comment as the kernel will show it
    (so that it reads the same as the rules read back), its arguments."""
    return {"hash": rule.hash, "comment": safe_comment(rule.text), "args": list(rule.args)}


def saved_view(rule: SavedRule) -> dict:
    """A rule read from the kernel, in the shape of `rule_view`: the first
    comment match is taken out of the arguments and shown as the comment."""
    args: list[str] = []
    comment: Optional[str] = None
    spec = rule.spec
    i = 0
    while i < len(spec):
        if (comment is None and spec[i:i + 3] == ("-m", "comment", "--comment")
                and i + 3 < len(spec)):
            comment = _comment_text(spec[i + 3])
            i += 4
            continue
        args.append(spec[i])
        i += 1
    return {"hash": rule.hash, "comment": comment, "args": args}


def _ours(rule: SavedRule) -> bool:
    """A rule in a built-in chain that the plan counts as ours: tagged, or a jump to our chains."""
    return rule.hash is not None or (rule.target or "").startswith(PREFIX)


def _drift_reason(change: Change) -> Optional[str]:
    """lib.plan appends the reason to the detail after "; "; a recreated set
    is drift by itself (our set names encode type and family)."""
    if not change.drift:
        return None
    _, sep, why = change.detail.partition("; ")
    if sep:
        return why
    if change.kind == "set-create":
        return "the set exists with another type or family"
    return change.detail


def _table(current: KernelState, family: int) -> TableState:
    return current.tables.get(family) or TableState(family)


def describe(change: Change, desired: DesiredState, current: KernelState) -> dict:
    """What `change` does, with the state before and after it."""
    view = {"kind": change.kind, "family": change.family, "name": change.name,
            "detail": change.detail, "drift": change.drift, "drift_reason": _drift_reason(change)}
    if change.kind.startswith("chain-"):
        saved = _table(current, change.family).chains.get(change.name, ())
        want = desired.family(change.family).chain_map().get(change.name)
        view["before"] = [saved_view(r) for r in saved]
        view["after"] = [rule_view(r) for r in want.rules] if want else []
    elif change.kind == "hook":
        rules = _table(current, change.family).chains.get(change.name, ())
        view["before"] = [dict(saved_view(r), position=i)
                          for i, r in enumerate(rules, 1) if _ours(r)]
        hooks = [h for h in desired.family(change.family).hooks if h.builtin == change.name]
        view["after"] = [dict(rule_view(h.rule), position=i) for i, h in enumerate(hooks, 1)]
    else:
        have = current.sets.get(change.name)
        want = desired.set_map().get(change.name)
        ref = want or have
        view["type"] = ref.kind
        if have and want and (have.kind, have.family) != (want.kind, want.family):
            view["was"] = f"{have.kind} family {SET_FAMILY.get(have.family, have.family)}"
        before = have.members if have is not None else frozenset()
        after = want.members if want is not None else frozenset()
        view["members_added"] = sorted(after - before)
        view["members_removed"] = sorted(before - after)
    return view


def document(plan: Plan, desired: DesiredState, current: KernelState) -> dict:
    """The plan for scripts (`--output json`): every change described, the
    drift flags, and the exact payloads in apply order."""
    groups: dict[str, list] = {"chains": [], "hooks": [], "sets": []}
    for change in plan.changes:
        groups[_GROUP[change.kind]].append(describe(change, desired, current))
    return {
        "in_sync": plan.empty,
        "changes": len(plan.changes),
        "drift": sum(1 for c in plan.changes if c.drift),
        **groups,
        "payloads": {
            "ipset_prepare": plan.ipset_prepare,
            "iptables": {str(f): plan.iptables[f] for f in sorted(plan.iptables)},
            "iptables_cleanup": {str(f): plan.iptables_cleanup[f]
                                 for f in sorted(plan.iptables_cleanup)},
            "ipset_cleanup": plan.ipset_cleanup,
        },
    }


# --- the readable diff ---------------------------------------------------------

def _token(arg: str) -> str:
    try:
        return iptables_save.quote(arg)
    except ValueError:          # a line break or NUL that only a foreign rule can hold
        return repr(arg)


def rule_text(view: dict) -> str:
    args = " ".join(_token(a) for a in view["args"])
    text = f"[{view['position']}] {args}" if "position" in view else args
    if view.get("comment"):
        text += f"   # {view['comment']}"
    elif view.get("hash") is None and "position" not in view:
        text += "   # (not written by kube-policy-manager)"
    return text


def _rule_lines(before: list, after: list) -> list[tuple[str, str]]:
    """(mark, text) lines: `-` for rules only in the kernel, `+` for rules
    only desired, ` ` for a few unchanged ones around them; rules are
    matched by their hash, so iptables' own spelling never shows as a change."""
    if not before:
        return [("+", rule_text(r)) for r in after]
    if not after:
        return [("-", rule_text(r)) for r in before]
    matcher = difflib.SequenceMatcher(None, [r["hash"] for r in before],
                                      [r["hash"] for r in after], autojunk=False)
    lines: list[tuple[str, str]] = []
    opcodes = matcher.get_opcodes()
    for n, (op, i1, i2, j1, j2) in enumerate(opcodes):
        if op == "equal":
            same = after[j1:j2]
            head = same[:CONTEXT] if n > 0 else []
            tail = same[-CONTEXT:] if n < len(opcodes) - 1 else []
            if len(head) + len(tail) >= len(same):
                lines += [(" ", rule_text(r)) for r in same]
                continue
            lines += [(" ", rule_text(r)) for r in head]
            hidden = len(same) - len(head) - len(tail)
            lines.append((".", f"... {hidden} unchanged rule{'s' if hidden > 1 else ''}"))
            lines += [(" ", rule_text(r)) for r in tail]
            continue
        lines += [("-", rule_text(r)) for r in before[i1:i2]]
        lines += [("+", rule_text(r)) for r in after[j1:j2]]
    return lines


def _member_lines(added: list, removed: list, limit: int) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    for mark, members in (("+", added), ("-", removed)):
        lines += [(mark, m) for m in members[:limit]]
        if len(members) > limit:
            lines.append((".", f"... {len(members) - limit} more to "
                               f"{'add' if mark == '+' else 'remove'} (--output json lists them all)"))
    return lines


def _header(view: dict) -> str:
    what = {"chains": "chain", "hooks": "hook", "sets": "set"}[_GROUP[view["kind"]]]
    name = view["name"]
    if what == "set":
        name += f" {view['type']}"
    detail = view["detail"].partition("; ")[0] if view["drift"] else view["detail"]
    return f"{_SIGN[view['kind']]} {what} {name} (IPv{view['family']}): {detail}"


_MARK_STYLE = {"+": "add", "-": "remove", " ": "dim", ".": "dim"}


def render_view(view: dict, color: bool = False, max_members: int = MAX_MEMBERS) -> str:
    header = printable(_header(view))
    sign = _SIGN[view["kind"]]
    header = paint(header, {"+": "add", "-": "remove"}.get(sign, "header"), color)
    if view["drift"]:
        header += "  " + paint(printable(f"DRIFT: {view['drift_reason']}"), "drift", color)
    if "members_added" in view:
        body = _member_lines(view["members_added"], view["members_removed"], max_members)
    elif view["kind"] == "hook":
        # every rule of ours leaves the built-in chain and the hooks go back on top
        body = ([("-", rule_text(r)) for r in view["before"]]
                + [("+", rule_text(r)) for r in view["after"]])
    else:
        body = _rule_lines(view["before"], view["after"])
    lines = [header]
    for mark, text in body:
        line = f"    {mark} {printable(text)}" if mark != "." else f"      {printable(text)}"
        lines.append(paint(line, _MARK_STYLE[mark], color))
    return "\n".join(lines) + "\n"


_WORDS = {"chain-add": "chain{} added", "chain-rewrite": "chain{} rewritten",
          "chain-delete": "chain{} deleted", "hook": "hook change{}",
          "set-create": "set{} created", "set-members": "set{} updated",
          "set-destroy": "set{} destroyed"}


def summary(plan, words: dict = _WORDS) -> str:
    """One line: the changes pending by kind (`words`: kind -> phrase, `{}`
    where a plural s goes), and how many are drift."""
    if plan.empty:
        return "in sync: nothing to change"
    counts: dict[str, int] = {}
    for change in plan.changes:
        counts[change.kind] = counts.get(change.kind, 0) + 1
    parts = [f"{n} " + words[k].format("s" if n > 1 else "") for k, n in counts.items()]
    total = len(plan.changes)
    text = f"{total} change{'s' if total != 1 else ''} pending: " + ", ".join(parts)
    drift = sum(1 for c in plan.changes if c.drift)
    if drift:
        text += (f"; {drift} of them drift (the kernel was changed by something "
                 f"other than kube-policy-manager)")
    return text


def render_diff(plan: Plan, desired: DesiredState, current: KernelState,
                color: bool = False, max_members: int = MAX_MEMBERS) -> str:
    """The readable diff (`--dry-run` default): one block per change in
    apply order, then a summary line."""
    blocks = [render_view(describe(c, desired, current), color, max_members) for c in plan.changes]
    drift = any(c.drift for c in plan.changes)
    last = paint(summary(plan), "drift" if drift else "header", color)
    return "".join(blocks) + ("\n" if blocks else "") + last + "\n"
