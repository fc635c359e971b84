"""Atomic file writes: the one implementation every module uses.

acme-client's way: a temp file in the same directory, created with its final
owner and mode before any data goes in, fsynced, renamed over the target, and
the directory fsynced. A reader sees the old file or the new one, never a
half-written one, and a crash leaves at most a ``.NAME.certkeeper-new`` temp
file that the next write replaces.

``store`` builds certificate *sets* on top of ``write_temp`` (four files, one
journal); everything else calls ``write_atomic`` or ``write_json_atomic``.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from certkeeper.core.errors import LocalError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".certkeeper-new"
PRIVATE_UMASK = 0o077  # set at process start (cli.main): nothing certkeeper creates is open to others by accident
_inherited_umask: int | None = None


def restrict_umask() -> None:
    """Set the umask to 077 for this process, remembering the one it was started with."""
    global _inherited_umask
    previous = os.umask(PRIVATE_UMASK)
    if _inherited_umask is None:
        _inherited_umask = previous


def inherited_umask() -> int:
    """The umask the process was started with: what hook and reload commands (which may start
    services) get, rather than certkeeper's own 077."""
    if _inherited_umask is not None:
        return _inherited_umask
    current = os.umask(0o022)
    os.umask(current)
    return current


def make_dirs(directory: Path, mode: int) -> None:
    """Create ``directory`` with exactly ``mode`` and its missing parents 0755 (the umask narrows
    neither: /etc/ssl must stay readable when /etc/ssl/private is made 0700); existing ones are kept."""
    missing: list[Path] = []
    path = directory
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        wanted = mode if path == directory else 0o755
        try:
            os.mkdir(path, wanted)
        except FileExistsError:
            continue
        os.chmod(path, wanted)


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMP_SUFFIX}")


def write_temp(final: Path, data: bytes, uid: int = -1, gid: int = -1, mode: int = 0o600) -> Path:
    """Write ``data`` to the temp name beside ``final`` (owner and mode set first, fsynced); return it.

    A missing directory is created 0755, or 0700 when the file itself is private
    (nobody but its owner may read it): /etc/ssl/private is 0700 on OpenBSD. The temp
    file is created with O_EXCL and O_NOFOLLOW: a link planted under its name is never followed.
    """
    temp = temp_path(final)
    try:
        make_dirs(final.parent, 0o700 if mode & 0o077 == 0 else 0o755)
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalError(f"{final}: cannot write: {exc.strerror}") from None
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise LocalError(f"{final}: cannot write: {exc.strerror}") from None
    finally:
        os.close(fd)
    return temp


def write_atomic(path: Path, data: bytes, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
    """Replace ``path`` with ``data`` atomically, with the given mode and owner."""
    temp = write_temp(path, data, uid, gid, mode)
    try:
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise LocalError(f"{path}: cannot write: {exc.strerror}") from None
    fsync_dir(path.parent)


CORRUPT_SUFFIX = ".corrupt-"


def set_aside(path: Path, why: str) -> Path | None:
    """Move an unreadable state or journal file out of the way as ``NAME.corrupt-TIMESTAMP`` (kept for
    the operator to read), saying so in one log line; the caller then goes on as if it were absent,
    so one bad file affects only its own certificate or domain. None when it could not be moved."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}")
    for n in range(2, 100):
        if not target.exists():
            break
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}-{n}")
    why = " ".join(why.split())[:200]
    try:
        os.replace(path, target)
        fsync_dir(path.parent)
    except OSError as exc:
        log.error("%s: unreadable (%s), and cannot be moved aside: %s", path, why, exc.strerror or exc)
        return None
    log.warning("%s: unreadable (%s); moved aside to %s", path, why, target.name)
    return target


def set_aside_copies(path: Path) -> list[Path]:
    """The copies of ``path`` that ``set_aside`` made, oldest first (the operator removes them)."""
    try:
        return sorted(path.parent.glob(f"{path.name}{CORRUPT_SUFFIX}*"))
    except OSError:
        return []


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """State files: JSON, private to certkeeper by default; the directory is created 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n", mode)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
