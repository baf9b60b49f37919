"""An nftables plan for people and scripts: what `--dry-run` prints with
`--dataplane nftables`, in the shapes lib.plan_view gives the iptables one
(`--output json` a document, the default a readable diff)."""
from __future__ import annotations

from typing import Optional

from lib.nft_plan import NftPlan, render as render_payload
from lib.nft_state import Chain, Table
from lib import plan_view
from lib.plan_view import MAX_MEMBERS
from lib.terminal import paint

_GROUP = {"table": "table", "chain": "chains", "set": "sets", "map": "maps"}
_WORDS = {"table-create": "table created", "table-recreate": "table rebuilt",
          "table-delete": "table deleted", "chain-add": "chain{} added",
          "chain-rewrite": "chain{} rewritten", "chain-delete": "chain{} deleted",
          "set-create": "set{} created", "set-members": "set{} updated",
          "set-destroy": "set{} destroyed", "map-create": "map{} created",
          "map-elements": "map{} updated", "map-destroy": "map{} destroyed"}


def _rules(chain: Optional[Chain]) -> list[dict]:
    return [{"hash": r.hash, "comment": r.text, "statement": r.statement}
            for r in (chain.rules if chain else ())]


def _elements(obj) -> set[str]:
    if obj is None:
        return set()
    if isinstance(obj.elements, frozenset):
        return set(obj.elements)
    return {f"{k} : {v}" for k, v in obj.elements.items()}


def describe(change, desired: Table, current: Table) -> dict:
    view = {"kind": change.kind, "family": change.family, "name": change.name,
            "detail": change.detail, "drift": change.drift}
    group = change.kind.split("-")[0]
    if group == "chain":
        view["before"] = _rules(current.chain_map().get(change.name))
        view["after"] = _rules(desired.chain_map().get(change.name))
    elif group in ("set", "map"):
        lookup = "set_map" if group == "set" else "map_map"
        before = _elements(getattr(current, lookup)().get(change.name))
        after = _elements(getattr(desired, lookup)().get(change.name))
        view["elements_added"] = sorted(after - before)
        view["elements_removed"] = sorted(before - after)
    return view


def document(plan: NftPlan, desired: Table, current: Table) -> dict:
    groups: dict[str, list] = {"table": [], "chains": [], "sets": [], "maps": []}
    for change in plan.changes:
        groups[_GROUP[change.kind.split("-")[0]]].append(describe(change, desired, current))
    return {"dataplane": "nftables", "in_sync": plan.empty, "changes": len(plan.changes),
            "drift": sum(1 for c in plan.changes if c.drift), **groups,
            "payloads": {"nft": plan.payload}}


def summary(plan: NftPlan) -> str:
    return plan_view.summary(plan, _WORDS)


def _block(view: dict, color: bool, max_members: int) -> str:
    head = f"{view['kind']} {view['name']}: {view['detail']}"
    if view["drift"]:
        head += "  [drift]"
    lines = [paint(head, "drift" if view["drift"] else "header", color)]
    if "before" in view:
        kept = {r["hash"] for r in view["after"]} & {r["hash"] for r in view["before"]}
        lines += [paint(f"- {r['comment'] or r['statement']}", "remove", color)
                  for r in view["before"] if r["hash"] not in kept]
        lines += [paint(f"+ {r['statement']}  # {r['comment']}", "add", color)
                  for r in view["after"] if r["hash"] not in kept]
    for sign, key, style in (("+", "elements_added", "add"), ("-", "elements_removed", "remove")):
        items = view.get(key, [])
        lines += [paint(f"{sign} {e}", style, color) for e in items[:max_members]]
        if len(items) > max_members:
            lines.append(f"  ... {len(items) - max_members} more")
    return "\n".join(lines) + "\n"


def render_diff(plan: NftPlan, desired: Table, current: Table, color: bool = False,
                max_members: int = MAX_MEMBERS) -> str:
    blocks = [_block(describe(c, desired, current), color, max_members) for c in plan.changes]
    drift = any(c.drift for c in plan.changes)
    last = paint(summary(plan), "drift" if drift else "header", color)
    return "".join(blocks) + ("\n" if blocks else "") + last + "\n"


def render_raw(plan: NftPlan) -> str:
    return render_payload(plan)
