"""What a newcomer gets: the committed tree, cloned into an empty folder with
nothing beside it, must set itself up and pass `make unit` as the README says.

It catches what the working tree hides: a test that reads a folder outside
the repository, a file that exists here but was never committed, an install
step that only this machine had done. It clones the commit checked out
(HEAD), not uncommitted changes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 900          # seconds: a virtualenv from the requirements, then the unit tests


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, timeout=120).stdout


def test_a_fresh_clone_passes_make_unit(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    alone = tmp_path / "empty"
    alone.mkdir()
    clone = alone / "kube-policy-manager"
    _git("clone", "--quiet", "--no-hardlinks", str(REPO), str(clone), cwd=tmp_path)
    assert sorted(p.name for p in alone.iterdir()) == ["kube-policy-manager"]
    # The environment of a user's shell: nothing of this test run's.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTEST_ADDOPTS", "KPM_REQUIRE_SHARED_CASES")
           and not k.startswith("PYTEST_")}
    done = subprocess.run(["make", "unit"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    assert done.returncode == 0, f"make unit failed in a fresh clone of HEAD:\n{tail}"
    assert " passed" in done.stdout, tail
