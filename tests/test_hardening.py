"""Issue 12, item 7: umask 077 at start (services started by hooks keep the operator's), no symbolic
link followed where certkeeper opens files it owns (lock files, temp files, the ``.prev`` set)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from certkeeper import cli, control
from certkeeper.core import files
from certkeeper.core.errors import LocalError
from certkeeper.keeper.hooks import run_command
from certkeeper.keeper.store import CertificateStore
from certkeeper.network import runner
from tests.certfactory import make_set
from tests.fixtures.peers import free_port
from tests.test_store import cert_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask_022(monkeypatch):
    """Run with umask 022 as inherited, and restore the test process's umask afterwards."""
    before = os.umask(0o022)
    monkeypatch.setattr(files, "_inherited_umask", None)
    try:
        yield
    finally:
        os.umask(before)


def test_umask_077_while_certkeeper_runs_and_hooks_get_the_inherited_one(tmp_path, umask_022):
    files.restrict_umask()  # what cli.main does first
    try:
        probe = tmp_path / "made-by-certkeeper"
        probe.write_text("x")
        assert stat.S_IMODE(probe.stat().st_mode) == 0o600
        assert files.inherited_umask() == 0o022
        result = run_command(["sh", "-c", "umask"], timeout=10)
        assert result.ok and result.output.strip() == "0022"
    finally:
        os.umask(files.inherited_umask())
    config = tmp_path / "ck.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n')
    assert cli.main(["-c", str(config), "check"]) == 0
    assert os.umask(0o022) == 0o022  # an in-process caller (a test) gets its umask back


def test_state_is_private_even_under_umask_000(tmp_path):
    """A CLI run started with umask 000 (the issue's case): state directory, state file and locks are
    not open to others. The ACME server is a closed port, so the run fails and records the failure."""
    config = tmp_path / "ck.toml"
    config.write_text(f"""state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/ck.sock"
[acme]
directory = "https://127.0.0.1:{free_port()}/dir"
account_key = "{tmp_path}/acme/account.pem"
[http]
listen = ["127.0.0.1:{free_port()}"]
tls_listen = []
[[certificate]]
name = "a.example.com"
key = "{tmp_path}/ssl/private/a.key"
cert = "{tmp_path}/ssl/a.crt"
chain = "{tmp_path}/ssl/a.chain.pem"
fullchain = "{tmp_path}/ssl/a.fullchain.pem"
""")
    done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config), "renew"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, umask=0)
    assert done.returncode == 1, done.stdout + done.stderr
    state = tmp_path / "state"
    made = [state, *state.rglob("*")]
    assert (state / "certificates" / "a.example.com.json").exists()
    # The state directory itself is root's and may be traversed, never listed or written, by the
    # unprivileged roles (core/layout.py); everything in it is private to its owner.
    assert stat.S_IMODE(state.lstat().st_mode) & 0o066 == 0, oct(state.lstat().st_mode)
    for path in made[1:]:
        assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, (path, oct(path.lstat().st_mode))


def test_directories_for_public_files_stay_0755_under_umask_077(tmp_path):
    before = os.umask(0o077)
    try:
        files.write_atomic(tmp_path / "a" / "b" / "c.crt", b"x", 0o644)
        files.write_atomic(tmp_path / "p" / "c.key", b"x", 0o600)
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b" / "c.crt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o700


def test_lock_files_are_not_followed_through_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = tmp_path / "state" / "locks" / "a.example.com.lock"
    lock.parent.mkdir(parents=True)
    lock.symlink_to(victim)
    with pytest.raises(OSError) as info, runner._file_lock(lock):
        pass
    assert info.value.errno == 40  # ELOOP
    sock = tmp_path / "ck.sock"
    Path(f"{sock}.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LocalError, match=r"ck\.sock\.lock: cannot create the lock file"):
        control.lock_instance(sock)
    assert not (tmp_path / "elsewhere").exists()
    assert victim.read_text() == "precious\n"


def test_a_link_planted_at_the_temp_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    final = tmp_path / "state.json"
    files.temp_path(final).symlink_to(victim)
    files.write_atomic(final, b"new\n", 0o600)
    assert final.read_bytes() == b"new\n" and not final.is_symlink()
    assert victim.read_text() == "precious\n"


def test_rollback_refuses_a_symlinked_prev(tmp_path):
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    first, second = make_set(), make_set()
    store.install(cfg, first)
    store.install(cfg, second)
    attacker = make_set()
    planted = tmp_path / "planted.key"
    planted.write_bytes(attacker.key)
    prev_key = Path(f"{cfg.key}.prev")
    prev_key.unlink()
    prev_key.symlink_to(planted)
    assert store.read_previous(cfg) is None  # never read through the link
    with pytest.raises(LocalError, match=r"mail\.example\.com\.key\.prev is a symbolic link; not restoring"):
        store.restore_previous(cfg)
    assert store.read(cfg) == second  # nothing changed
