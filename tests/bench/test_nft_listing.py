"""`python -m bench.nft_listing --quick` end to end: every figure printed,
the deltas as small as they should be, and no namespace left behind."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = ("table", "full apply (nft -f, from no table)", "list, json", "list, text",
        "parse json (lib.nft_parse.parse)", "parse text (minimal reader, checks nothing)",
        "diff, in sync", "read, same listing again (no parse)", "delta: one element added",
        "delta: one chain rewritten")


def _bench_namespaces() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith("kpm-bench-")}
    except FileNotFoundError:
        return set()


def test_quick_nft_listing_figures_and_cleanup():
    if os.geteuid() != 0:
        pytest.fail("python -m bench.nft_listing needs root: it creates a network namespace")
    before = _bench_namespaces()
    done = subprocess.run([sys.executable, "-m", "bench.nft_listing", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    rows = {line[:46].strip(): line[46:].strip() for line in done.stdout.splitlines()[1:]}
    for label in ROWS:
        assert any(name.startswith(label) for name in rows), label
    assert rows["table"] == "12 chains, 105 rules, 600 elements"
    assert re.fullmatch(r"\d+\.\d{3} s, 1 lines", rows["delta: one element added"])
    chain_lines = int(rows["delta: one chain rewritten"].split(", ")[1].split()[0])
    assert chain_lines < int(rows["full apply (nft -f, from no table)"].split(", ")[1].split()[0])
    assert _bench_namespaces() <= before
