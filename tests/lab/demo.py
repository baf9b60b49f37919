"""The first thing to run: a small cluster, connectivity before and after a policy,
and the rules the reconciler wrote for it."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from .case import load_case, policy_label
from .cluster import LAB_PREFIX, new_run_token, remove_leftovers, remove_run
from .lab import CellResult, Lab
from .matrix import render_matrices

DEMO_CASE = Path(__file__).with_name("demo.yaml")


def _use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def owned_rules(lab: Lab, node: str, families: tuple[str, ...] = ("iptables-save", "ip6tables-save")) -> list[str]:
    """Our iptables-save lines and ipsets on one node."""
    lines = []
    for tool in families:
        out = lab.node_exec(node, [tool, "-t", "filter"]).stdout
        picked = [ln for ln in out.splitlines() if "KPM-" in ln]
        if picked:
            lines.append(f"# {tool} -t filter (KPM- chains and hooks)")
            lines += picked
    sets = lab.node_exec(node, ["ipset", "save"]).stdout
    picked = [ln for ln in sets.splitlines() if " KPM-" in ln]
    if picked:
        lines.append("# ipset save (KPM- sets)")
        lines += picked
    return lines


def _busiest_node(lab: Lab) -> str:
    """The node with the most rules of ours: the interesting one to show."""
    counts = {n.name: len(owned_rules(lab, n.name)) for n in lab.case.nodes}
    return max(counts, key=lambda n: counts[n])


def demo(case_path: Optional[str] = None, emit: Callable[[str], None] = print) -> int:
    case = load_case(case_path or DEMO_CASE)
    state = case.states[0]
    colour = _use_colour()
    remove_leftovers()
    token = new_run_token()
    failed: list[CellResult] = []
    errors: list[str] = []
    try:
        with Lab(case, f"{LAB_PREFIX}{token}-1-") as lab:
            emit(f"{case.name}: {' '.join(case.description.split())}" if case.description else case.name)
            emit(f"cluster: {len(case.nodes)} nodes, {len(state.pods)} pods, namespaces "
                 f"{', '.join(ns.name for ns in state.namespaces)}")
            emit("")
            lab.set_state(replace(state, policies=()))
            errors += lab.reconcile()
            before = lab.check(state.expect)
            emit("Without any policy ('.' connects, 'X' refused; rows are sources):")
            for line in render_matrices(state.expect, before, colour=colour, compare=False):
                emit(line)
            names = ", ".join(policy_label(p) for p in state.policies)
            emit(f"Applying {len(state.policies)} policies ({names}) and running the reconciler on every node...")
            lab.set_state(state)
            errors += lab.reconcile()
            after = lab.check(state.expect)
            emit("")
            emit("With the policies ('!' marks a cell that differs from the case's expectation):")
            for line in render_matrices(state.expect, after, colour=colour, compare=True):
                emit(line)
            failed = [r for r in after if not r.passed and not r.skipped]
            node = _busiest_node(lab)
            emit(f"Rules written on {node} (namespace {lab.network.node_ns(node)}):")
            for line in owned_rules(lab, node, ("iptables-save",)):
                emit(f"  {line}")
            emit("  (IPv6: the same chains, in ip6tables-save)")
            emit("")
            for e in errors:
                emit(e)
            if failed or errors:
                emit(f"{len(failed) + len(errors)} problems: see above")
            else:
                emit("every cell as expected. More cases: python -m tests.lab run tests/cases")
    finally:
        remove_run(token)
    return 1 if failed or errors else 0
