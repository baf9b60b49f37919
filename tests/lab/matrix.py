"""Connectivity matrices for people: one grid per probed port, rows are sources."""
from __future__ import annotations

from typing import Sequence

from .case import IPV4, Table
from .lab import Cell, CellResult
from .traffic import ALLOWED, SKIPPED

_GREEN, _RED, _YELLOW, _DIM, _RESET = "\033[32m", "\033[31m", "\033[1;33m", "\033[2m", "\033[0m"


def _mark(result: CellResult | None, colour: bool, compare: bool) -> tuple[str, int]:
    """The printed mark and its visible width."""
    if result is None:
        text, code = "-", _DIM
    elif result.got == SKIPPED:
        text, code = "s", _DIM
    else:
        text = "." if result.got == ALLOWED else "X"
        code = _GREEN if result.got == ALLOWED else _RED
        if compare and not result.passed:
            text, code = text + "!", _YELLOW
    return (f"{code}{text}{_RESET}" if colour else text), len(text)


def render_matrices(tables: Sequence[Table], results: Sequence[CellResult], colour: bool = False,
                    compare: bool = True) -> list[str]:
    by_cell = {r.cell: r for r in results}
    lines = []
    for t in tables:
        rows, cols = list(t.rows), list(t.columns)
        family = "" if t.family == IPV4 else f" over {t.family}"
        lines.append(f"  port {t.port}/{t.protocol}{family}")
        width = max(len(r) for r in rows) + 2
        widths = [max(len(c), 2) + 2 for c in cols]
        lines.append("    " + " " * width + "".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        for src in rows:
            parts = []
            for dst, w in zip(cols, widths):
                text, visible = _mark(by_cell.get(Cell(src, dst, t.port, t.protocol, t.family)), colour, compare)
                parts.append(text + " " * (w - visible))
            lines.append("    " + src.ljust(width) + "".join(parts).rstrip())
        lines.append("")
    return lines
