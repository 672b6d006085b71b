"""pytest plugin for machines without pycddlib: a test that fails only because ``cdd`` cannot be imported is
reported as skipped (with that reason) instead of failed; so is a test module whose import fails for that reason
(tests/geometry/test_enumerate.py imports pyro_cpa.geometry.polytope, hence cdd, at the top: all its tests skip).

The library imports pycddlib lazily, only for the S >= 3 region enumeration, so on a machine where it cannot be
installed (the device machine has no wheel for its Python) the rest of the suite still runs and the S >= 3 tests
show up as skips, not as noise among real failures. Any other failure is left as it is. Used by
``benchmarks/device_check.sh`` only when ``import cdd`` fails::

    PYTHONPATH=benchmarks:$PYTHONPATH python -m pytest -p skip_without_cdd ...
"""
from __future__ import annotations

import pytest

REASON = "needs pycddlib (cdd), which is not installed on this machine"


def _missing_cdd(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from/during is the failed import of ``cdd``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "cdd":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    # a collection error carries only its formatted traceback: match the import error's own line
    if report.failed and "ModuleNotFoundError: No module named 'cdd'" in str(report.longrepr):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0, f"Skipped: {REASON} (the module imports it)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _missing_cdd(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {REASON}")
