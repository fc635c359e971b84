"""The only module that writes certificate and key files.

A certificate's four files (key, cert, chain, fullchain) are one *set*: they
are installed together or not at all, and the set they replace is kept beside
them (``FILE.prev``) so that a later step (a failed reload) can roll back.

How a set is installed, crash-safe at every step:

1. each new file is written to ``.FILE.certkeeper-new`` in the same directory:
   created with its final owner and mode before any data goes in, fsynced;
2. the current files are hard-linked to ``FILE.prev`` (the previous set);
3. the certificate's hooks are marked as owed (``STATE/journal/NAME.reload-pending``,
   see below), then a journal naming the four files is written to
   ``STATE/journal/NAME.json`` and fsynced: from here on the install counts as done;
4. each temp file is renamed over its final name, the directories fsynced;
5. the journal is removed.

``recover()`` runs before any other store work: with a journal, it finishes
step 4 (every temp file is complete, so rolling forward is always possible);
without one, leftover temp files are removed and the current set is untouched.
A journal that cannot be read, or names other files than this certificate's
four and their temp files, is moved aside (``files.set_aside``) and treated as
absent: only this certificate is affected (the planner renews a set whose key
and certificate no longer match), and no file it names is touched.

Services load what is on disk only when their hooks run, which happens after
the install, in another process (the network worker asks for it) that may die
first. So every install (a renewal, a recovery, a repair, a rollback) leaves a
*reload marker* naming the certificate's hooks, written before the journal, and
each hook that then runs successfully for the certificate is struck off
(``reloaded``); the marker goes when none is left. ``pending_reload`` says which
hooks are still owed: the keeper reports the set as one whose services must
load it (``LocalKeeper.inspect``), and the next run reloads them. A marker left
by an install that a crash discarded only costs one reload of the same set.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from certkeeper.core import certs
from certkeeper.core.config import CertificateConfig
from certkeeper.core.errors import LocalError
from certkeeper.core.files import fsync_dir, set_aside, set_aside_copies, temp_path, write_json_atomic, write_temp

log = logging.getLogger(__name__)

PREV_SUFFIX = ".prev"
RELOAD_SUFFIX = ".reload-pending"  # STATE/journal/NAME.reload-pending: hooks owed for the set on disk
ROLES = ("key", "cert", "chain", "fullchain")


@dataclass(frozen=True)
class CertificateSet:
    """PEM bytes of one certificate's files."""

    key: bytes
    cert: bytes  # the leaf only
    chain: bytes  # intermediates, leaf excluded

    @property
    def fullchain(self) -> bytes:
        return self.cert + self.chain

    def info(self) -> certs.CertInfo | None:
        """What the leaf says (serial, validity, names), or None when it does not parse."""
        try:
            return certs.parse_cert(self.cert)
        except ValueError:
            return None

    def content(self, role: str) -> bytes:
        return self.fullchain if role == "fullchain" else getattr(self, role)

    @classmethod
    def from_fullchain(cls, key: bytes, fullchain: bytes) -> CertificateSet:
        leaf, chain = certs.split_pem_chain(fullchain)
        return cls(key=key, cert=leaf, chain=chain)


class CertificateStore:
    """Reads and atomically replaces certificate sets; see the module comment."""

    def __init__(self, state_dir: Path) -> None:
        self.journal_dir = state_dir / "journal"

    # -- reading ---------------------------------------------------------------

    def read(self, cert: CertificateConfig) -> CertificateSet | None:
        """The installed set, or None when a file is missing or unreadable."""
        return _read_set(cert, suffix="")

    def read_previous(self, cert: CertificateConfig) -> CertificateSet | None:
        return _read_set(cert, suffix=PREV_SUFFIX)

    def check(self, cert: CertificateConfig) -> str:
        """Why the chain and full-chain files do not complete the key and certificate on disk, or "".

        Read-only. A missing key or certificate is not reported here (``read`` returns None).
        """
        current = self.read(cert)
        if current is None:
            return ""
        chain = _best_chain(cert, current.cert)
        if chain is None:
            return f"neither {cert.chain} nor {cert.fullchain} holds a chain for {cert.cert}"
        for role in ("chain", "fullchain"):
            path = getattr(cert, role)
            try:
                data = path.read_bytes()
            except OSError as exc:
                return f"{path}: {exc.strerror or exc}"
            if data != CertificateSet(current.key, current.cert, chain).content(role):
                return f"{path} does not match {cert.cert}"
        return ""

    def repairable(self, cert: CertificateConfig) -> bool:
        """Whether ``repair`` can rebuild what ``check`` finds wrong (read-only)."""
        current = self.read(cert)
        return current is not None and _best_chain(cert, current.cert) is not None

    def repair(self, cert: CertificateConfig) -> str:
        """Rebuild a missing or damaged chain or full-chain file from the other one (no CA needed).

        Returns what was done, or "" when nothing could or needed to be. Like any install, it
        leaves the certificate's hooks owed (``pending_reload``): the run that repaired reloads them.
        """
        problem = self.check(cert)
        current = self.read(cert)
        chain = _best_chain(cert, current.cert) if current is not None else None
        if not problem or current is None or chain is None:
            return ""
        self.install(cert, CertificateSet(current.key, current.cert, chain), keep_previous=False)
        log.warning("%s: %s; rebuilt the chain and full-chain files", cert.name, problem)
        return f"rebuilt {cert.chain} and {cert.fullchain} ({problem})"

    # -- writing ---------------------------------------------------------------

    def install(self, cert: CertificateConfig, new: CertificateSet, keep_previous: bool = True) -> None:
        """Replace the set on disk with ``new``; the old one becomes ``.prev``."""
        self.recover(cert)
        paths = _paths(cert)
        temps: dict[str, Path] = {}
        try:
            for role in ROLES:
                owner, group, mode = _ownership(cert, role)
                temps[role] = write_temp(paths[role], new.content(role), owner, group, mode)
        except BaseException:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
            raise
        if keep_previous:
            for role in ROLES:
                _link_previous(paths[role])
        self._mark_reload(cert)
        journal = self._journal(cert)
        write_json_atomic(journal, {role: [str(temps[role]), str(paths[role])] for role in ROLES})
        self._finish(journal)

    def restore_previous(self, cert: CertificateConfig) -> CertificateSet:
        """Put the ``.prev`` set back in place (after a failed reload). A ``.prev`` that is a symbolic
        link is refused, never followed: certkeeper makes them as hard links or copies only."""
        for path in _paths(cert).values():
            prev = Path(f"{path}{PREV_SUFFIX}")
            if prev.is_symlink():
                raise LocalError(f"{cert.name}: {prev} is a symbolic link; not restoring from it")
        previous = self.read_previous(cert)
        if previous is None:
            raise LocalError(f"{cert.name}: no previous certificate set to restore")
        self.install(cert, previous, keep_previous=False)
        return previous

    def recover(self, cert: CertificateConfig) -> bool:
        """Finish an install interrupted after its journal was written (True: the set on disk changed,
        its services must load it), or clean up."""
        journal = self._journal(cert)
        if journal.exists() or journal.is_symlink():
            problem = _journal_problem(cert, journal)
            if not problem:
                log.warning("%s: finishing an interrupted certificate install", cert.name)
                self._finish(journal)
                return True
            set_aside(journal, f"{cert.name}: install journal {problem}")
        for path in _paths(cert).values():
            temp_path(path).unlink(missing_ok=True)
            temp_path(Path(f"{path}{PREV_SUFFIX}")).unlink(missing_ok=True)
        return False

    def pending_reload(self, cert: CertificateConfig) -> tuple[str, ...]:
        """The hooks of ``cert`` that have not run since a set was installed (see the module comment).

        A marker naming none of the certificate's hooks now (they were removed from the configuration)
        is removed; one that cannot be read counts as owing every hook."""
        marker = self._reload_marker(cert)
        try:
            owed = json.loads(_read_nofollow(marker, 65536))
            if not isinstance(owed, list):
                raise ValueError("not a list")
        except FileNotFoundError:
            return ()
        except (OSError, ValueError):
            owed = list(cert.hooks)
        pending = tuple(h for h in cert.hooks if h in owed)
        if not pending:
            self._clear_reload(cert)
        return pending

    def reloaded(self, cert: CertificateConfig, hook: str) -> None:
        """``hook`` ran successfully for ``cert``: it is no longer owed for the set on disk."""
        pending = self.pending_reload(cert)
        if hook not in pending:
            return
        left = [h for h in pending if h != hook]
        if left:
            write_json_atomic(self._reload_marker(cert), left)
        else:
            self._clear_reload(cert)

    def set_aside_journals(self, cert: CertificateConfig) -> list[Path]:
        """Install journals of ``cert`` that were set aside as unreadable."""
        return set_aside_copies(self._journal(cert))

    # -- internals -------------------------------------------------------------

    def _journal(self, cert: CertificateConfig) -> Path:
        return self.journal_dir / f"{cert.name}.json"

    def _reload_marker(self, cert: CertificateConfig) -> Path:
        return self.journal_dir / f"{cert.name}{RELOAD_SUFFIX}"

    def _mark_reload(self, cert: CertificateConfig) -> None:
        if cert.hooks:
            write_json_atomic(self._reload_marker(cert), list(cert.hooks))

    def _clear_reload(self, cert: CertificateConfig) -> None:
        marker = self._reload_marker(cert)
        try:
            marker.unlink()
        except FileNotFoundError:
            return
        fsync_dir(marker.parent)

    def _finish(self, journal: Path) -> None:
        try:
            entries: dict[str, list[str]] = json.loads(journal.read_text())
        except (OSError, ValueError) as exc:
            raise LocalError(f"{journal}: unreadable install journal ({exc}); remove it after checking the files") \
                from None
        dirs = set()
        for temp, final in entries.values():
            if os.path.exists(temp):
                os.replace(temp, final)
            dirs.add(os.path.dirname(final))
        for directory in dirs:
            fsync_dir(Path(directory))
        journal.unlink()
        fsync_dir(journal.parent)


def _journal_problem(cert: CertificateConfig, journal: Path) -> str:
    """Why ``journal`` is not this certificate's install journal (unreadable, not JSON, another shape,
    other files), or "". Only a journal naming exactly the four files and their temp files is followed."""
    try:
        entries = json.loads(_read_nofollow(journal, 65536))
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    except ValueError as exc:
        return f"is not JSON: {exc}"
    expected = {role: [str(temp_path(path)), str(path)] for role, path in _paths(cert).items()}
    if entries != expected:
        return "does not name this certificate's files"
    return ""


def _paths(cert: CertificateConfig) -> dict[str, Path]:
    return {role: getattr(cert, role) for role in ROLES}


def _read_set(cert: CertificateConfig, suffix: str) -> CertificateSet | None:
    paths = {role: Path(f"{p}{suffix}") for role, p in _paths(cert).items()}
    # The previous set is certkeeper's own (hard links or copies): never read through a symbolic link.
    read = _read_nofollow if suffix else Path.read_bytes
    try:
        key = read(paths["key"])
        leaf_file = read(paths["cert"])
        chain = read(paths["chain"]) if paths["chain"].exists() else b""
    except OSError:
        return None
    try:
        leaf, rest = certs.split_pem_chain(leaf_file)
    except ValueError:
        return None
    return CertificateSet(key=key, cert=leaf, chain=chain or rest)


def _read_nofollow(path: Path, limit: int = -1) -> bytes:
    """The file's bytes (at most ``limit``), never through a symbolic link (ELOOP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        return file.read(limit)


def _best_chain(cert: CertificateConfig, leaf: bytes) -> bytes | None:
    """The intermediates for ``leaf``: from the full chain if it starts with the leaf, else the chain
    file, else what follows the leaf in the certificate file; None when no file holds any."""
    def blocks(path: Path) -> list[bytes]:
        try:
            data = path.read_bytes()
        except OSError:
            return []
        return [b.strip() + b"\n" for b in certs.PEM_CERT.findall(data)]

    full = blocks(cert.fullchain)
    if len(full) > 1 and full[0] == leaf:
        return b"".join(full[1:])
    for candidate in (blocks(cert.chain), blocks(cert.cert)[1:]):
        if candidate:
            return b"".join(candidate)
    return None


def _ownership(cert: CertificateConfig, role: str) -> tuple[int, int, int]:
    if role == "key":
        names = (cert.key_owner, cert.key_group, cert.key_mode)
    else:
        names = (cert.cert_owner, cert.cert_group, cert.cert_mode)
    owner, group, mode = names
    uid = _uid(owner, cert.name) if owner else -1
    gid = _gid(group, cert.name) if group else -1
    return uid, gid, mode


def _uid(name: str, where: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise LocalError(f"{where}: no such user {name!r}") from None


def _gid(name: str, where: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LocalError(f"{where}: no such group {name!r}") from None


def _link_previous(path: Path) -> None:
    """Hard-link the current file to FILE.prev (atomically replacing an older .prev)."""
    if not path.exists():
        return
    prev = Path(f"{path}{PREV_SUFFIX}")
    staging = temp_path(prev)
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)
    except OSError:  # a file system without hard links: copy, same owner and mode
        st = path.stat()
        staging = write_temp(prev, path.read_bytes(), st.st_uid, st.st_gid, st.st_mode & 0o7777)
    os.replace(staging, prev)
