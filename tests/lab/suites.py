"""Which conformance cases run, decided once for the whole test session.

The project's own cases (tests/cases) are the suite. The sample cases of a
`shared/cases` folder beside the checkout run in addition when that folder
is there; a clone on its own has none, and passes without them. CI sets
KPM_REQUIRE_SHARED_CASES=1, so that a CI layout that lost the folder fails
instead of silently running fewer cases.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT_FOLDER = REPO / "tests" / "cases"
SHARED_FOLDER = REPO.parent / "shared" / "cases"
REQUIRE_SHARED = "KPM_REQUIRE_SHARED_CASES"


def _collect() -> dict[str, Path]:
    folders = {"cases": PROJECT_FOLDER}
    if SHARED_FOLDER.is_dir():
        folders["shared"] = SHARED_FOLDER
    return {f"{label}/{f.name}": f
            for label, folder in folders.items() for f in sorted(folder.glob("*.yaml"))}


# label/file.yaml -> path; every test that runs cases takes them from here.
CASES: dict[str, Path] = _collect()


def shared_required() -> bool:
    return os.environ.get(REQUIRE_SHARED, "") not in ("", "0")


def case_params() -> list:
    """Every case file, as pytest params named `folder/file.yaml`."""
    return [pytest.param(path, id=name) for name, path in CASES.items()]
