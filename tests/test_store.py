"""Certificate sets on disk: atomic, with modes and owners, previous set kept, crash-safe (kill -9)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
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


# Every file operation an install makes, at the level of the system calls (core/files.py and store.py call
# them through the os module): a crash may come before any one of them.
FILE_OPERATIONS = ("open", "write", "fchmod", "fchown", "fsync", "close", "link", "replace", "rename", "unlink",
                   "mkdir")
CRASHED = 77  # the exit status of a child that "crashed" at its operation


@contextlib.contextmanager
def file_operations(on_call: Callable[[str, tuple[object, ...]], None]) -> Iterator[None]:
    """Call ``on_call(name, args)`` before each file operation of this process."""
    real = {name: getattr(os, name) for name in FILE_OPERATIONS}

    def wrap(name: str) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            on_call(name, args)
            return real[name](*args, **kwargs)
        return call

    for name in FILE_OPERATIONS:
        setattr(os, name, wrap(name))
    try:
        yield
    finally:
        for name, function in real.items():
            setattr(os, name, function)


def files_of(cfg: CertificateConfig) -> tuple[bytes | None, ...]:
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    return tuple(read(getattr(cfg, role)) for role in ("key", "cert", "chain", "fullchain"))


def as_files(s: CertificateSet) -> tuple[bytes, ...]:
    return (s.key, s.cert, s.chain, s.cert + s.chain)


def die_before(k: int) -> Callable[[str, tuple[object, ...]], None]:
    count = [0]

    def on_call(name: str, args: tuple[object, ...]) -> None:
        count[0] += 1
        if count[0] == k:
            os._exit(CRASHED)
    return on_call


def test_a_crash_before_any_file_operation_of_an_install_leaves_a_whole_set(tmp_path: Path) -> None:
    """Not chosen points: every write, rename, fsync, link, unlink... of one install is counted, then for
    each k the install runs in a forked child that dies (os._exit, as kill -9: no cleanup runs) right
    before its k-th operation. recover() must then leave the old set or the new one, never a mix."""
    old, new, newest = make_set(), make_set(), make_set()
    trace: list[str] = []
    cfg = cert_config(tmp_path / "count")
    CertificateStore(tmp_path / "count/state").install(cfg, old)
    with file_operations(lambda name, args: trace.append(name)):
        CertificateStore(tmp_path / "count/state").install(cfg, new)
    assert files_of(cfg) == as_files(new)
    assert {"write", "fsync", "replace", "link", "unlink"} <= set(trace), trace
    assert len(trace) > 40  # four files, their .prev links, the journal: each open, write, fsync, rename...
    outcomes = []
    for k in range(1, len(trace) + 2):  # k = len + 1: the install finished, the crash came after it
        where = tmp_path / f"k{k}"
        cfg = cert_config(where)
        store = CertificateStore(where / "state")
        store.install(cfg, old)
        pid = os.fork()
        if pid == 0:  # the child: install, dying before operation k
            try:
                with file_operations(die_before(k)):
                    CertificateStore(where / "state").install(cfg, new)
                os._exit(0)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        expected = 0 if k == len(trace) + 1 else CRASHED
        assert os.waitstatus_to_exitcode(status) == expected, f"operation {k} ({trace[k - 1]}): the child did " \
            "not stop there: the install does not repeat its own operations"
        store.recover(cfg)
        after = files_of(cfg)
        assert after in (as_files(old), as_files(new)), f"a mix after a crash before operation {k}: {trace[k - 1]}"
        current = store.read(cfg)
        assert current is not None and certs.key_matches_cert(current.key, current.cert)
        assert not list(cfg.key.parent.glob(".*certkeeper-new")) and not list(cfg.cert.parent.glob(".*certkeeper-new"))
        assert not (where / "state/journal/mail.example.com.json").exists()
        outcomes.append("new" if after == as_files(new) else "old")
        store.install(cfg, newest)  # and the next install succeeds
        assert files_of(cfg) == as_files(newest)
    # the crash points really straddle the commit: early ones keep the old set, late ones the new
    assert outcomes[0] == "old" and outcomes[-1] == "new" and outcomes == sorted(outcomes, key=["old", "new"].index)


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


def fsync_trace(work: Callable[[], object]) -> list[tuple[str, str, str]]:
    """(operation, path, target) of every fsync, replace and unlink ``work`` makes, in order; an fsync
    names the file or directory its descriptor is open on."""
    events: list[tuple[str, str, str]] = []

    def on_call(name: str, args: tuple[object, ...]) -> None:
        if name == "fsync":
            assert isinstance(args[0], int)
            events.append(("fsync", os.readlink(f"/proc/self/fd/{args[0]}"), ""))
        elif name in ("replace", "rename"):
            events.append(("rename", str(args[0]), str(args[1])))
        elif name == "unlink":
            events.append(("unlink", str(args[0]), ""))

    with file_operations(on_call):
        work()
    return events


def assert_durable(events: list[tuple[str, str, str]], final: Path) -> None:
    """``final`` was written to a temp file that was fsynced before the rename, and its directory was
    fsynced after the rename (else a power loss can undo the rename or leave an empty file)."""
    renames = [i for i, (op, _, target) in enumerate(events) if op == "rename" and target == str(final)]
    assert renames, f"{final} was not renamed into place: {events}"
    at = renames[-1]
    temp = events[at][1]
    assert ("fsync", temp, "") in events[:at], f"{temp} was not fsynced before it became {final}"
    assert ("fsync", str(final.parent), "") in events[at + 1:], f"{final.parent} was not fsynced after the rename"


def test_every_file_and_directory_is_fsynced_on_the_real_write_path(tmp_path: Path) -> None:
    from certkeeper.core.files import write_atomic

    path = tmp_path / "d" / "state.json"
    assert_durable(fsync_trace(lambda: write_atomic(path, b"{}\n", 0o600)), path)

    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    store.install(cfg, make_set())
    events = fsync_trace(lambda: store.install(cfg, make_set()))
    for role in ("key", "cert", "chain", "fullchain"):
        assert_durable(events, getattr(cfg, role))
    journal = tmp_path / "state" / "journal" / "mail.example.com.json"
    assert_durable(events, journal)  # the commit point itself is durable before any rename
    first_rename = min(i for i, (op, _, target) in enumerate(events) if op == "rename" and target == str(cfg.key))
    assert ("fsync", str(journal.parent), "") in events[:first_rename]
    removed = events.index(("unlink", str(journal), ""))
    assert ("fsync", str(journal.parent), "") in events[removed + 1:]  # its removal too
