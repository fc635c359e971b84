"""Fixtures for real peers live in tests/fixtures/, one module per peer.

Every test, and every Python process a test starts, may reach loopback
addresses only: tests/loopback_only/sitecustomize.py refuses anything else,
in pytest itself (imported here) and in subprocesses (first on PYTHONPATH).

Under CI=true a skipped test is a failure (a missing peer must not turn CI
green), except a skip whose reason says it needs OpenBSD (tests/README.md
lists those). Hypothesis runs with the "ci" profile there: derandomized, so a
CI run is reproducible, and bounded; elsewhere with "dev" (random examples).
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
GUARD = ROOT / "tests" / "loopback_only"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(GUARD), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
GUARD_LOG = Path(tempfile.mkdtemp(prefix="loopback-guard-")) / "refused.log"
os.environ["LOOPBACK_GUARD_LOG"] = str(GUARD_LOG)

import tests.loopback_only.sitecustomize  # noqa: E402, F401 - installs the guard in this process

IN_CI = os.environ.get("CI", "").lower() == "true"
ALLOWED_SKIP = "openbsd"  # a skip reason naming OpenBSD may skip in CI; nothing else may

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "dev"))


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if ALLOWED_SKIP in reason.lower():
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which is a failure (only tests that need OpenBSD may skip; "
                       f"see tests/README.md): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    """Fail the test if any of its processes tried to reach a non-loopback peer."""
    before = GUARD_LOG.stat().st_size if GUARD_LOG.exists() else 0
    yield
    if GUARD_LOG.exists() and GUARD_LOG.stat().st_size > before:
        with GUARD_LOG.open() as log:
            log.seek(before)
            refused = log.read().strip().splitlines()
        pytest.fail("tried to reach beyond loopback: " + "; ".join(sorted(set(refused))[:5]))


pytest_plugins = [
    "tests.fixtures.pebble",
    "tests.fixtures.bind",
    "tests.fixtures.mailservices",
]
