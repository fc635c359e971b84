"""The CI rules of tests/conftest.py, run on a throwaway test file in a child pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SKIPS = '''
import pytest

def test_peer_missing():
    pytest.skip("pebble is not installed")

def test_needs_openbsd():
    pytest.skip("needs OpenBSD: rcctl")

def test_passes():
    pass
'''


def run_child(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_child.py"
    test.write_text(SKIPS)
    env = {**os.environ, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(test)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


def test_a_skip_fails_under_ci_unless_it_needs_openbsd(tmp_path):
    result = run_child(tmp_path, "true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed, 1 skipped" in result.stdout
    assert "FAILED" in result.stdout and "pebble is not installed" in result.stdout
    laptop = run_child(tmp_path, "")
    assert laptop.returncode == 0 and "1 passed, 2 skipped" in laptop.stdout, laptop.stdout
