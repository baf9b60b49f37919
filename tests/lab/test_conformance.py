"""Every lab case of the project and of the shared suite, one test each: the
policies must mean on the wire what the Kubernetes API says they mean."""
from __future__ import annotations

import pytest

from tests.lab.case import load_case
from tests.lab.runner import Options, run_case
from tests.lab.suites import FOLDERS, case_params



def test_both_case_folders_are_there():
    missing = [str(folder) for folder in FOLDERS.values() if not sorted(folder.glob("*.yaml"))]
    assert not missing, f"no lab cases found in {', '.join(missing)}"


@pytest.mark.parametrize("path", case_params())
def test_case(path, root, prefix):
    report = run_case(load_case(path), prefix, Options())
    if not report.ok:
        pytest.fail(f"{report.name} ({path}):\n" + "\n".join(report.lines()), pytrace=False)
