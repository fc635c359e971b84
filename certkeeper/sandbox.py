"""Privilege separation: which user a process runs as, and what it may still do.

This module owns the operating-system mechanisms behind certkeeper's split into
processes with one power each (OpenBSD acme-client's design): looking up and
dropping to an unprivileged user, ``no_new_privs`` and Landlock on Linux,
pledge(2) and unveil(2) on OpenBSD, and the promises of each role
(``confine``). It decides nothing about which paths a role needs: the caller
passes them.

Everything here is per process and one-way; confine a process before it starts
any thread (Landlock and no_new_privs apply to the calling thread and the
children it creates afterwards) and after it has imported what it needs.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import platform
import pwd
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certkeeper.core.errors import ConfigError, LocalError

log = logging.getLogger(__name__)

PathArg = str | Path


# --- users -----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The user a process runs as; ``gid`` is the configured group, else the user's primary one."""

    uid: int
    gid: int
    name: str
    home: str


def _nologin() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin"):
        if os.path.exists(shell):
            return shell
    return "/sbin/nologin"


def lookup_user(user: str, group: str | None) -> Identity:
    """The passwd entry of ``user`` (and ``group``'s gid when given); ConfigError when missing."""
    try:
        entry = pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise ConfigError(
            [f"user: no such user {user!r} (create it: useradd -s {_nologin()} -d /var/empty {user})"]) from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            raise ConfigError([f"group: no such group {group!r} (create it: groupadd {group})"]) from None
    return Identity(uid=entry.pw_uid, gid=gid, name=entry.pw_name, home=entry.pw_dir)


def role_identity(user: str, group: str | None) -> Identity | None:
    """The ids the unprivileged roles run as: ``user``/``group`` when we are root, else None (our own)."""
    return lookup_user(user, group) if privileged() else None


def privileged() -> bool:
    """True when this process may change users (effective uid 0)."""
    return os.geteuid() == 0


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` for good: real, effective and saved ids, no supplementary groups.

    As root this is one-way and checked: afterwards setuid(0) must fail, or
    LocalError. Not as root (someone running the demo as themselves) it does
    nothing: every role then runs as the current user. Dropping "to" uid 0 or
    gid 0 is refused: a separated role must not keep root's files.
    """
    if not privileged():
        if identity.uid != os.getuid():
            log.debug("not root: running as uid %d, not as %s (uid %d)", os.getuid(), identity.name, identity.uid)
        return
    if identity.uid == 0 or identity.gid == 0:
        raise LocalError(f"user: {identity.name!r} (uid {identity.uid}, gid {identity.gid}) is privileged; "
                         "a separated process must run as an unprivileged user and group")
    uid, gid = identity.uid, identity.gid
    try:
        # setgroups(2) before the gid, the gid before the uid: each needs root.
        os.setgroups([])
        if hasattr(os, "setresgid"):
            # setresuid(2): real, effective and saved ids, so the saved id cannot bring root back.
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        else:  # macOS: setgid/setuid as root set all three
            os.setgid(gid)
            os.setuid(uid)
    except OSError as exc:
        raise LocalError(f"cannot drop privileges to {identity.name} (uid {uid}, gid {gid}): {exc.strerror}") from None
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise LocalError(f"dropped privileges to {identity.name} (uid {uid}) but setuid(0) still succeeds")
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, gid, gid) or set(os.getgroups()) - {gid}:
        raise LocalError(f"dropped privileges to {identity.name} but this process is {describe()}")
    log.debug("running as %s (uid %d, gid %d)", identity.name, uid, gid)


# --- libc --------------------------------------------------------------------

_libc: Any = None


def _load_libc() -> Any:
    """The C library (the one Python links with); loaded on first use, never on import."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _openbsd() -> bool:
    return sys.platform.startswith("openbsd")


def _errno_text(number: int) -> str:
    name = errno.errorcode.get(number, str(number))
    return f"{name}: {os.strerror(number)}"


# --- no_new_privs (Linux) ----------------------------------------------------

# prctl(2): PR_SET_NO_NEW_PRIVS; execve(2) can no longer grant privileges
# (setuid bits, file capabilities) to this thread or its children. One-way.
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def set_no_new_privs() -> None:
    """Set no_new_privs on the calling thread (inherited by its children); a no-op off Linux."""
    if not _linux():
        return
    libc = _load_libc()
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero) != 0:
        raise LocalError(f"prctl(PR_SET_NO_NEW_PRIVS): {_errno_text(ctypes.get_errno())}")


def no_new_privs() -> bool:
    """Whether no_new_privs is set for the calling thread (False off Linux).

    Asks prctl(PR_GET_NO_NEW_PRIVS), which works under Landlock where /proc
    may be out of reach; falls back to ``NoNewPrivs:`` in /proc/thread-self/status.
    """
    if not _linux():
        return False
    zero = ctypes.c_ulong(0)
    result = _load_libc().prctl(ctypes.c_int(PR_GET_NO_NEW_PRIVS), zero, zero, zero, zero)
    if result >= 0:
        return bool(result == 1)
    for status in ("/proc/thread-self/status", "/proc/self/status"):
        try:
            with open(status, encoding="ascii") as lines:
                for line in lines:
                    if line.startswith("NoNewPrivs:"):
                        return line.split()[1] == "1"
        except OSError:
            continue
    return False


# --- Landlock (Linux) -------------------------------------------------------

# landlock(7), Documentation/userspace-api/landlock.rst, include/uapi/linux/landlock.h.
# The three system calls have the same numbers on every architecture that uses
# asm-generic/unistd.h numbering for new calls (x86_64, aarch64, i386, arm,
# riscv, ppc, s390, loongarch); alpha and mips shift them.
SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0  # landlock_create_ruleset(NULL, 0, this) returns the ABI version
LANDLOCK_RULE_PATH_BENEATH = 1  # enum landlock_rule_type

# Filesystem access rights (landlock.h "Filesystem flags"); ABI 1 unless noted.
LANDLOCK_ACCESS_FS_EXECUTE = 1 << 0
LANDLOCK_ACCESS_FS_WRITE_FILE = 1 << 1
LANDLOCK_ACCESS_FS_READ_FILE = 1 << 2
LANDLOCK_ACCESS_FS_READ_DIR = 1 << 3
LANDLOCK_ACCESS_FS_REMOVE_DIR = 1 << 4
LANDLOCK_ACCESS_FS_REMOVE_FILE = 1 << 5
LANDLOCK_ACCESS_FS_MAKE_CHAR = 1 << 6
LANDLOCK_ACCESS_FS_MAKE_DIR = 1 << 7
LANDLOCK_ACCESS_FS_MAKE_REG = 1 << 8
LANDLOCK_ACCESS_FS_MAKE_SOCK = 1 << 9
LANDLOCK_ACCESS_FS_MAKE_FIFO = 1 << 10
LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
LANDLOCK_ACCESS_FS_MAKE_SYM = 1 << 12
LANDLOCK_ACCESS_FS_REFER = 1 << 13  # ABI 2: rename/link across directories (denied by every ruleset before)
LANDLOCK_ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3: truncate(2), O_TRUNC (not checked at all before)

# Every ABI-1 right is handled (denied unless a rule allows it), so creating
# devices, fifos or sockets is refused everywhere. REFER is left unhandled: the
# kernel then refuses cross-directory renames, and certkeeper's atomic writes
# rename within one directory (files.py). TRUNCATE is handled when the kernel
# knows it (ABI >= 3), which closes truncate(2) on read-only paths.
_ACCESS_FS_ABI1 = (1 << 13) - 1
# landlock(7): the rights that may be granted on a rule whose path is not a directory.
_ACCESS_FILE = (LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_READ_FILE
                | LANDLOCK_ACCESS_FS_TRUNCATE)
# Read paths: read files, list directories, and execute (an interpreter or a
# helper may need to exec what it can read).
ACCESS_READ = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR
# Write paths: everything of ACCESS_READ, plus write, create, remove, and truncate where handled.
ACCESS_WRITE = (ACCESS_READ | LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_REMOVE_DIR
                | LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG
                | LANDLOCK_ACCESS_FS_MAKE_SYM | LANDLOCK_ACCESS_FS_TRUNCATE)


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr, ABI-1 part only (the kernel accepts the shorter size).
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } __attribute__((packed))
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _real_syscall(number: int, *args: int | ctypes.Structure | None) -> int:
    """syscall(2): structures go by reference, None as NULL, ints as longs; OSError on -1."""
    libc = _load_libc()
    function = libc.syscall
    function.restype = ctypes.c_long
    converted: list[Any] = []
    for arg in args:
        if arg is None:
            converted.append(ctypes.c_void_p(None))
        elif isinstance(arg, ctypes.Structure):
            converted.append(ctypes.byref(arg))
        else:
            converted.append(ctypes.c_long(arg))
    result = int(function(ctypes.c_long(number), *converted))
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


# Tests replace this to play a kernel without Landlock or with an older ABI.
_syscall: Callable[..., int] = _real_syscall

_landlocked = False  # set once this process (or its parent before fork) restricted itself


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _landlock_abi() -> tuple[int, str]:
    """(ABI version, "") or (0, why Landlock cannot be used here)."""
    if not _linux():
        return 0, f"not available on this platform ({sys.platform})"
    machine = platform.machine()
    if machine.startswith(("alpha", "mips")):
        return 0, f"not available on this architecture ({machine}: other system call numbers)"
    try:
        abi = _syscall(SYS_landlock_create_ruleset, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as exc:
        why = {errno.ENOSYS: "kernel built without it", errno.EOPNOTSUPP: "disabled at boot, see lsm="}
        detail = why.get(exc.errno or 0, exc.strerror or "")
        return 0, f"not available on this kernel ({_errno_text(exc.errno or 0)}; {detail})"
    if abi < 1:
        return 0, f"not available on this kernel (ABI {abi})"
    return abi, ""


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when there is none (or not Linux)."""
    return _landlock_abi()[0]


def _handled_access(abi: int) -> int:
    handled = _ACCESS_FS_ABI1
    if abi >= 3:
        handled |= LANDLOCK_ACCESS_FS_TRUNCATE
    return handled


def _add_rule(ruleset_fd: int, path: PathArg, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        log.debug("landlock: %s does not exist; skipped", path)
        return
    except OSError as exc:
        raise LocalError(f"{path}: landlock: cannot open: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _ACCESS_FILE
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        _syscall(SYS_landlock_add_rule, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, rule, 0)
    except OSError as exc:
        raise LocalError(f"{path}: landlock_add_rule: {_errno_text(exc.errno or 0)}") from None
    finally:
        os.close(fd)


def landlock(read: Sequence[PathArg], write: Sequence[PathArg]) -> bool:
    """Restrict this process and its future children to ``read`` and ``write`` paths (and what lies beneath).

    Under ``read``: read files, list directories, execute. Under ``write``: the
    same plus write, create (files, directories, symlinks), remove and truncate.
    Anything else on any file system (/proc, /dev, /etc included) is refused
    with EACCES; files already open stay usable. Paths that do not exist are
    skipped. Sets no_new_privs first (landlock_restrict_self(2) requires it).

    True when the restriction is in force. Where the kernel or the platform has
    no Landlock: one warning line and False, never an exception. LocalError
    when Landlock exists but refuses, or when other threads run (they would
    stay unrestricted).
    """
    global _landlocked
    abi, why = _landlock_abi()
    if abi < 1:
        log.warning("landlock: %s; continuing without file restrictions", why)
        return False
    threads = _thread_count()
    if threads > 1:
        raise LocalError(f"landlock: {threads} threads run in this process; confine it before starting any "
                         "(landlock_restrict_self restricts the calling thread only)")
    handled = _handled_access(abi)
    attr = _RulesetAttr(handled_access_fs=handled)
    try:
        ruleset_fd = _syscall(SYS_landlock_create_ruleset, attr, ctypes.sizeof(attr), 0)
    except OSError as exc:
        raise LocalError(f"landlock_create_ruleset: {_errno_text(exc.errno or 0)}") from None
    try:
        for path in read:
            _add_rule(ruleset_fd, path, ACCESS_READ & handled)
        for path in write:
            _add_rule(ruleset_fd, path, ACCESS_WRITE & handled)
        if not no_new_privs():
            set_no_new_privs()
        try:
            _syscall(SYS_landlock_restrict_self, ruleset_fd, 0)
        except OSError as exc:
            raise LocalError(f"landlock_restrict_self: {_errno_text(exc.errno or 0)}") from None
    finally:
        os.close(ruleset_fd)
    _landlocked = True
    log.debug("landlock: in force (ABI %d; read %s; write %s)", abi,
              ", ".join(map(str, read)) or "-", ", ".join(map(str, write)) or "-")
    return True


# --- pledge and unveil (OpenBSD) ---------------------------------------------

_pledged: str | None = None


def pledge(promises: str, execpromises: str | None = None) -> None:
    """pledge(2) on OpenBSD (``execpromises`` None leaves exec'd programs unpledged); a no-op elsewhere."""
    global _pledged
    if not _openbsd():
        return
    libc = _load_libc()
    arguments = (promises.encode(), execpromises.encode() if execpromises is not None else None)
    if libc.pledge(*arguments) == -1:
        raise LocalError(f"pledge({promises!r}): {_errno_text(ctypes.get_errno())}")
    _pledged = promises


def unveil(path: str | None, permissions: str | None) -> None:
    """unveil(2) on OpenBSD; ``unveil(None, None)`` locks the list. A no-op elsewhere."""
    if not _openbsd():
        return
    libc = _load_libc()
    arguments = (path.encode() if path is not None else None,
                 permissions.encode() if permissions is not None else None)
    if libc.unveil(*arguments) == -1:
        raise LocalError(f"unveil({path!r}, {permissions!r}): {_errno_text(ctypes.get_errno())}")


# pledge(2) promises per role, next to the role as in acme-client. Python needs
# "rpath" in every role: lazy imports and traceback lines (linecache) open
# files, and without rpath the first such open aborts the process; unveil (and
# Landlock on Linux) limits rpath to the interpreter's files and the role's paths.

# keeper: root, no network. Writes keys, certificates and signer files (rpath
# wpath cpath), sets their mode and owner (fattr chown: files.write_temp does
# fchmod and fchown), takes the per-name locks (flock), runs reload hooks and
# the worker (proc exec), serves the control socket (unix), and looks up the
# configured users and groups again on reload (getpw). No inet, no dns.
KEEPER_PROMISES = "stdio rpath wpath cpath fattr chown flock proc exec unix getpw"

# network: the unprivileged process that speaks ACME, DNS and SMTP. inet for
# HTTPS, RFC 2136 updates and mail; dns for getaddrinfo (resolv.conf, hosts).
# rpath wpath cpath flock for its state files (backoff, ARI, account) and their
# locks; fattr because atomic writes fchmod the temp file (files.write_temp).
# No proc or exec (it starts nothing), no chown (its files stay its own).
NETWORK_PROMISES = "stdio rpath wpath cpath fattr flock inet dns"

# listener: serves HTTP-01 and MTA-STS on sockets bound before pledge; inet
# for accept and I/O on them. rpath only for the interpreter's own files and
# for the certificates its read paths name (ssl.SSLContext.load_cert_chain
# takes file names only); no wpath, cpath, proc or exec.
LISTENER_PROMISES = "stdio rpath inet"

ROLE_PROMISES: dict[str, str] = {
    "keeper": KEEPER_PROMISES,
    "network": NETWORK_PROMISES,
    "listener": LISTENER_PROMISES,
}


# What shared libraries, a resolver, TLS and the time zone read (besides the interpreter's own files):
# the network worker's read paths; the listener's are the same less the resolver's.
RESOLVER_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf")
SYSTEM_READ = ("/etc/ld.so.cache", "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
               *RESOLVER_FILES,
               "/etc/services", "/etc/protocols", "/etc/localtime", "/usr/share/zoneinfo", "/etc/ssl",
               "/usr/lib/ssl", "/usr/share/ca-certificates", "/etc/ca-certificates", "/etc/pki",
               "/etc/passwd", "/etc/group", "/dev/null", "/dev/urandom")


def python_paths(executable: bool = False) -> list[str]:
    """What the interpreter must still read after confinement: the existing directories of
    ``sys.path`` and certkeeper's package (plus ``sys.executable`` when ``executable``).

    Never "/" (a ``""`` entry when the current directory is / would open everything).
    Shared libraries are not included: import extension modules (ssl, ...) before confining.
    """
    found: list[str] = []
    entries = [*sys.path, str(Path(__file__).resolve().parent)]
    if executable and sys.executable:
        entries.append(sys.executable)
    for entry in entries:
        if not entry or not os.path.isabs(entry):
            continue
        if os.path.realpath(entry) == "/" or not os.path.exists(entry) or entry in found:
            continue
        if os.path.isdir(entry) or entry == sys.executable:
            found.append(entry)
    return found


def confine(role: str, read: Sequence[PathArg], write: Sequence[PathArg], *, python: bool = True) -> None:
    """Confine this process to what ``role`` ("keeper", "network", "listener") may do.

    OpenBSD: unveil(2) the read paths ("r", "rx" for a role that may exec), the
    write paths ("rwc"), lock unveil, then pledge(2) ``ROLE_PROMISES[role]``.
    Linux: for "network" and "listener", no_new_privs and ``landlock(read,
    write)``; the keeper gets neither, as it must write wherever the
    configuration says. Elsewhere: a warning for the unprivileged roles.

    With ``python`` (the default) ``python_paths()`` are added to the read paths
    so late imports keep working. Paths that do not exist are skipped. Drop
    privileges first (``drop_privileges``); this only takes powers away.
    """
    try:
        promises = ROLE_PROMISES[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLE_PROMISES)}") from None
    extra = python_paths(executable=role == "keeper") if python else []
    if _openbsd():
        may_exec = "exec" in promises.split()
        for path in [*extra, *map(str, read)]:
            if os.path.exists(path):
                unveil(path, "rx" if may_exec else "r")
        for path in map(str, write):
            if os.path.exists(path):
                unveil(path, "rwc")
        unveil(None, None)
        pledge(promises)
        return
    if role == "keeper":
        return
    set_no_new_privs()
    landlock([*extra, *read], write)


def describe() -> str:
    """One line for logs, e.g. ``uid=0 gid=0 groups=- no_new_privs=1 landlock=abi7,enforced``."""
    groups = ",".join(str(group) for group in os.getgroups()) or "-"
    parts = [f"uid={os.getuid()}", f"gid={os.getgid()}", f"groups={groups}"]
    if _linux():
        parts.append(f"no_new_privs={int(no_new_privs())}")
        abi = landlock_abi()
        parts.append(f"landlock=abi{abi}{',enforced' if _landlocked else ''}" if abi else "landlock=none")
    if _openbsd():
        parts.append(f"pledge={(_pledged or '-').replace(' ', ',')}")
    return " ".join(parts)
