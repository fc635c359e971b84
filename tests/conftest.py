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
# The fleet tests run a fleet worker's etcd client (gRPC, with its threads) and a keeper in this one
# process; in the product they are separate processes. gRPC's fork handlers would make every child
# the keeper starts while those threads run (a `cat` run as the signer's user) die of SIGBUS.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# The unprivileged roles (another user when the suite runs as root) log refusals here too.
GUARD_LOG.parent.chmod(0o755)
GUARD_LOG.touch(mode=0o666)
GUARD_LOG.chmod(0o666)

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


def pytest_configure(config: pytest.Config) -> None:
    """As root, a base directory of this session's own: pytest makes /tmp/pytest-of-root private again at
    every session start, which would cut the unprivileged roles off from a running suite's directories."""
    if os.geteuid() == 0 and not config.option.basetemp:
        config.option.basetemp = tempfile.mkdtemp(prefix="certkeeper-tests-")


@pytest.fixture(autouse=True, scope="session")
def roles_reach_tmp_paths(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Run as root, the listener and the network workers are the configured user: let it traverse
    (not list) the tests' temporary directories and their parents, as it can /var/db."""
    if os.geteuid() != 0:
        return
    base = tmp_path_factory.getbasetemp()
    for directory in (base, *base.parents):
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod((mode & 0o7777) | 0o011)
    mktemp = tmp_path_factory.mktemp

    def traversable(basename: str, numbered: bool = True) -> Path:
        path = mktemp(basename, numbered)
        path.chmod(0o711)
        return path

    tmp_path_factory.mktemp = traversable  # type: ignore[method-assign]


pytest_plugins = [
    "tests.fixtures.pebble",
    "tests.fixtures.bind",
    "tests.fixtures.mailservices",
    "tests.fixtures.rspamd",
    "tests.fixtures.dnssec",
]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A 0755 directory under /tmp: another user (a signer's, smtpd's filter) must be able to enter it
    to read a key (pytest's tmp_path is 0700)."""
    import shutil

    root = Path(tempfile.mkdtemp(prefix="certkeeper-open-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)

