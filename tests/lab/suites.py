"""Where the conformance cases live: the project's own, and the shared suite
that sits beside the clone."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {
    "cases": REPO / "tests" / "cases",
    "shared": REPO.parent / "shared" / "cases",
}


def case_params() -> list:
    """Every case file, as pytest params named `folder/file.yaml`."""
    return [pytest.param(f, id=f"{label}/{f.name}")
            for label, folder in FOLDERS.items() for f in sorted(folder.glob("*.yaml"))]
