"""Certificate sets on disk: atomic, with modes and owners, previous set kept, crash-safe (kill -9)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from certkeeper.core import certs
from certkeeper.core.config import CertificateConfig
from certkeeper.keeper.store import CertificateSet, CertificateStore
from tests.certfactory import make_set

ROOT = Path(__file__).resolve().parent.parent


def cert_config(tmp_path: Path, **extra: object) -> CertificateConfig:
    return CertificateConfig(
        name="mail.example.com", domains=("mail.example.com",), key_type="ecdsa-p256",
        key=tmp_path / "ssl/private/mail.example.com.key", cert=tmp_path / "ssl/mail.example.com.crt",
        chain=tmp_path / "ssl/mail.example.com.chain.pem", fullchain=tmp_path / "ssl/mail.example.com.fullchain.pem",
        **extra)  # type: ignore[arg-type]


def test_install_writes_the_four_files_with_modes(tmp_path: Path) -> None:
    cfg = cert_config(tmp_path, key_mode=0o640, key_group="root")
    new = make_set()
    CertificateStore(tmp_path / "state").install(cfg, new)
    assert cfg.key.read_bytes() == new.key
    assert cfg.cert.read_bytes() == new.cert
    assert cfg.chain.read_bytes() == new.chain
    assert cfg.fullchain.read_bytes() == new.cert + new.chain
    assert stat.S_IMODE(cfg.key.stat().st_mode) == 0o640
    assert stat.S_IMODE(cfg.cert.stat().st_mode) == 0o644
    assert cfg.key.stat().st_gid == 0
    assert not list(cfg.key.parent.glob(".*certkeeper-new"))
    assert not (tmp_path / "state/journal/mail.example.com.json").exists()


def test_previous_set_is_kept_and_can_be_restored(tmp_path: Path) -> None:
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    first, second = make_set(), make_set()
    store.install(cfg, first)
    store.install(cfg, second)
    assert store.read(cfg) == second
    assert store.read_previous(cfg) == first
    assert stat.S_IMODE(Path(f"{cfg.key}.prev").stat().st_mode) == 0o600
    store.restore_previous(cfg)
    assert store.read(cfg) == first


def test_unknown_owner_is_a_one_line_error_and_nothing_changes(tmp_path: Path) -> None:
    from certkeeper.core.errors import LocalError

    good = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    first = make_set()
    store.install(good, first)
    bad = cert_config(tmp_path, key_owner="no-such-user-here")
    with pytest.raises(LocalError, match="mail.example.com: no such user 'no-such-user-here'"):
        store.install(bad, make_set())
    assert store.read(good) == first
    assert not list(good.key.parent.glob(".*certkeeper-new"))


CRASHER = """
import os, signal, sys
from pathlib import Path
from certkeeper.keeper.store import CertificateSet, CertificateStore
from tests.test_store import cert_config
tmp = Path(sys.argv[1]); target = sys.argv[2]; nth = int(sys.argv[3])
new = CertificateSet(key=Path(sys.argv[4]).read_bytes(), cert=Path(sys.argv[5]).read_bytes(), chain=b"")
real = getattr(os, target); calls = [0]
def crash(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, target, crash)
CertificateStore(tmp / "state").install(cert_config(tmp), new)
print("finished")
"""


@pytest.mark.parametrize(("target", "nth"), [
    ("write", 1), ("write", 3), ("fsync", 2), ("fsync", 4), ("link", 2), ("replace", 1), ("replace", 3),
    ("replace", 6), ("replace", 7), ("replace", 9),
])
def test_kill_9_during_install_leaves_a_working_set(tmp_path: Path, target: str, nth: int) -> None:
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    old, new = make_set(), make_set()
    store.install(cfg, old)
    (tmp_path / "new.key").write_bytes(new.key)
    (tmp_path / "new.crt").write_bytes(new.cert)
    result = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path), target, str(nth),
                             str(tmp_path / "new.key"), str(tmp_path / "new.crt")],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == -9, result.stderr  # it really was killed mid-install
    # Before recovery the files in place already form a working set or recovery completes it.
    store.recover(cfg)
    current = store.read(cfg)
    assert current is not None
    assert certs.key_matches_cert(current.key, current.cert)
    assert current.key in (old.key, new.key)
    assert not list(cfg.key.parent.glob(".*certkeeper-new"))
    # And the next run succeeds.
    newest = make_set()
    store.install(cfg, newest)
    assert store.read(cfg) == newest


def test_journal_rolls_an_interrupted_install_forward(tmp_path: Path) -> None:
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    old, new = make_set(), make_set()
    store.install(cfg, old)
    # Simulate a crash right after the journal was committed: temp files complete, nothing renamed.
    entries = {}
    for role in ("key", "cert", "chain", "fullchain"):
        final = getattr(cfg, role)
        temp = final.with_name(f".{final.name}.certkeeper-new")
        temp.write_bytes(CertificateSet(new.key, new.cert, new.chain).content(role))
        entries[role] = [str(temp), str(final)]
    journal = tmp_path / "state/journal/mail.example.com.json"
    journal.write_text(json.dumps(entries))
    store.recover(cfg)
    assert store.read(cfg) == CertificateSet(new.key, new.cert, new.chain)
    assert not journal.exists()


def test_a_missing_private_key_directory_is_created_0700(tmp_path: Path) -> None:
    cfg = cert_config(tmp_path)
    CertificateStore(tmp_path / "state").install(cfg, make_set())
    assert stat.S_IMODE(cfg.key.parent.stat().st_mode) == 0o700  # ssl/private
    assert stat.S_IMODE(cfg.cert.parent.stat().st_mode) == 0o755  # ssl


@pytest.mark.parametrize("damage", ["delete-chain", "delete-fullchain", "garble-fullchain", "garble-chain"])
def test_a_lost_or_damaged_chain_file_is_noticed_and_rebuilt_from_the_other(tmp_path: Path, damage: str) -> None:
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    good = make_set()
    store.install(cfg, good)
    assert store.check(cfg) == ""
    action, role = damage.split("-")
    path = getattr(cfg, role)
    if action == "delete":
        path.unlink()
    else:
        path.write_bytes(b"garbage\n")
    assert store.check(cfg).startswith(str(path))
    assert store.repair(cfg).startswith("rebuilt ")
    assert store.check(cfg) == ""
    assert store.read(cfg) == good and cfg.fullchain.read_bytes() == good.fullchain
    assert store.read_previous(cfg) is None  # the damaged set is not kept as a rollback target


def test_when_neither_chain_file_holds_a_chain_it_cannot_be_rebuilt(tmp_path: Path) -> None:
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    store.install(cfg, make_set())
    cfg.chain.unlink()
    cfg.fullchain.unlink()
    assert "holds a chain" in store.check(cfg)
    assert store.repair(cfg) == ""  # the runner then orders a new certificate
