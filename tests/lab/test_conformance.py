"""Every lab case of the project (and of the shared samples, when they sit
beside the checkout), one test each per dataplane: the policies must mean on
the wire what the Kubernetes API says they mean, whichever dataplane
enforces them, with no cell flipping while a step is applied."""
from __future__ import annotations

import pytest

from tests.lab.case import load_case
from tests.lab.runner import Options, run_case
from tests.lab.suites import CASES, PROJECT_FOLDER, REQUIRE_SHARED, SHARED_FOLDER, case_params, shared_required


def test_the_case_folders_are_there():
    """The project's cases always; the shared samples too when CI asks for them."""
    own = [name for name in CASES if name.startswith("cases/")]
    assert own, f"no lab cases found in {PROJECT_FOLDER}"
    if shared_required():
        shared = [name for name in CASES if name.startswith("shared/")]
        assert shared, (f"{REQUIRE_SHARED} is set but no lab cases were found in {SHARED_FOLDER}: "
                        "the shared samples would silently not run")


@pytest.mark.parametrize("path", case_params())
def test_case(path, dataplane, root, prefix):
    report = run_case(load_case(path), prefix, Options(dataplane=dataplane))
    if not report.ok:
        pytest.fail(f"{report.name} ({path}, {dataplane}):\n" + "\n".join(report.lines()), pytrace=False)
