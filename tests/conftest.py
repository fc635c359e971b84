"""Fixtures for real peers live in tests/fixtures/, one module per peer.

Every test, and every Python process a test starts, may reach loopback
addresses only: tests/loopback_only/sitecustomize.py refuses anything else,
in pytest itself (imported here) and in subprocesses (first on PYTHONPATH).
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARD = ROOT / "tests" / "loopback_only"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(GUARD), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
GUARD_LOG = Path(tempfile.mkdtemp(prefix="loopback-guard-")) / "refused.log"
os.environ["LOOPBACK_GUARD_LOG"] = str(GUARD_LOG)

import tests.loopback_only.sitecustomize  # noqa: E402, F401 - installs the guard in this process


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
    "tests.fixtures.rspamd",
]
