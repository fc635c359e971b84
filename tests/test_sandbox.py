"""certkeeper.sandbox: real privilege drops, no_new_privs and Landlock in forked children; pledge and unveil
against a fake libc.

Anything that changes the process (ids, no_new_privs, Landlock) runs in a
child made with os.fork(), which reports through a pipe and exits with
os._exit(): the pytest process itself is never confined. OpenBSD has no
machine here, so pledge and unveil are checked against a fake libc.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from certkeeper import sandbox
from certkeeper.core.errors import ConfigError, LocalError

TEST_USER = "certkeeper-sbx-test"

# pledge(2), OpenBSD 7.x: every promise name the kernel knows.
PLEDGE_PROMISES = set(
    "stdio rpath wpath cpath dpath tmppath inet mcast fattr chown flock unix dns getpw sendfd recvfd tape tty "
    "proc exec prot_exec settime ps vminfo id pf route wroute audio video bpf unveil error".split())

ABI1 = (1 << 13) - 1
TRUNCATE = sandbox.LANDLOCK_ACCESS_FS_TRUNCATE


# --- helpers -----------------------------------------------------------------


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child; return the dict it returns (its exception fails the test)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_fd)
            try:
                result = body()
            except BaseException as exc:  # noqa: B036 - reported to the parent
                result = {"error": f"{type(exc).__name__}: {exc}"}
            view = memoryview(json.dumps(result).encode())
            while view:
                view = view[os.write(write_fd, view):]
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"child died without a report (wait status {status})"
    result: dict[str, Any] = json.loads(data)
    assert "error" not in result, result["error"]
    return result


def attempt(action: Callable[[], object]) -> str:
    """"ok", or the errno name the action failed with."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def read_file(path: Path) -> Callable[[], object]:
    return lambda: path.read_bytes()


def write_file(path: Path) -> Callable[[], object]:
    return lambda: path.write_bytes(b"x")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


def proc_status(field: str) -> str:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return line.split()[1]
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.fixture
def clean_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests may pass through landlock()'s bookkeeping; restore it afterwards."""
    monkeypatch.setattr(sandbox, "_landlocked", False)
    monkeypatch.setattr(sandbox, "_pledged", None)


def requires_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("these tests must run as root in CI (they create a user and drop privileges)")
        pytest.skip("needs root (creates a user and drops privileges)")


@pytest.fixture(scope="module")
def test_user() -> Iterator[str]:
    requires_root()
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "-d", "/var/empty", TEST_USER],
                       check=True, capture_output=True, timeout=60)
        created = True
    yield TEST_USER
    if created:
        subprocess.run(["userdel", TEST_USER], check=False, capture_output=True, timeout=60)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory everyone may enter (tmp_path's parents are 0700 for root)."""
    path = Path(tempfile.mkdtemp(prefix="certkeeper-sbx-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- users -------------------------------------------------------------------


def test_lookup_user_root_and_primary_group():
    entry = pwd.getpwnam("root")
    identity = sandbox.lookup_user("root", None)
    assert identity == sandbox.Identity(uid=0, gid=entry.pw_gid, name="root", home=entry.pw_dir)


def test_lookup_user_with_group():
    try:
        nogroup = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no group 'nogroup' here")
    assert sandbox.lookup_user("root", "nogroup").gid == nogroup


def test_lookup_user_missing_user_is_one_config_line():
    with pytest.raises(ConfigError) as caught:
        sandbox.lookup_user("certkeeper-no-such-user", None)
    assert len(caught.value.lines) == 1
    line = caught.value.lines[0]
    assert line.startswith("user: no such user 'certkeeper-no-such-user' (create it: useradd -s ")
    assert line.endswith("-d /var/empty certkeeper-no-such-user)")


def test_lookup_user_missing_group_is_one_config_line():
    with pytest.raises(ConfigError) as caught:
        sandbox.lookup_user("root", "certkeeper-no-such-group")
    assert caught.value.lines == [
        "group: no such group 'certkeeper-no-such-group' (create it: groupadd certkeeper-no-such-group)"]


@pytest.mark.parametrize("group", [None, "nogroup"])
def test_drop_privileges_for_real(test_user, world_dir, group):
    try:
        identity = sandbox.lookup_user(test_user, group)
    except ConfigError:
        pytest.skip(f"no group {group!r} here")
    secret = world_dir / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    public = world_dir / "public"
    public.write_bytes(b"anyone")
    public.chmod(0o644)

    def body() -> dict[str, Any]:
        os.setgroups([0, 4, 42])  # supplementary groups a root process may hold: all must go
        sandbox.drop_privileges(identity)
        return {
            "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
            "resuid": list(os.getresuid()), "resgid": list(os.getresgid()),
            "groups": os.getgroups(),
            "secret": attempt(read_file(secret)),
            "public": attempt(read_file(public)),
            "setuid0": attempt(lambda: os.setuid(0)),
            "seteuid0": attempt(lambda: os.seteuid(0)),
            "setgid0": attempt(lambda: os.setgid(0)),
            "privileged": sandbox.privileged(),
            "describe": sandbox.describe(),
        }

    got = in_child(body)
    uid, gid = identity.uid, identity.gid
    assert got["ids"] == [uid, uid, gid, gid]
    assert got["resuid"] == [uid] * 3 and got["resgid"] == [gid] * 3
    assert set(got["groups"]) <= {gid}  # root's 0, 4 and 42 are gone
    assert got["secret"] == "EACCES"
    assert got["public"] == "ok"  # the refusal above is the file's mode, not the path
    assert got["setuid0"] == got["seteuid0"] == got["setgid0"] == "EPERM"
    assert got["privileged"] is False
    assert got["describe"].startswith(f"uid={uid} gid={gid} ")


def test_drop_privileges_refuses_root_before_changing_anything(monkeypatch):
    def forbidden(*args: object) -> None:
        raise AssertionError("must not change ids")

    for name in ("setgroups", "setresgid", "setresuid", "setgid", "setuid"):
        monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(sandbox, "privileged", lambda: True)
    with pytest.raises(LocalError, match="unprivileged user"):
        sandbox.drop_privileges(sandbox.Identity(uid=0, gid=0, name="root", home="/root"))
    with pytest.raises(LocalError, match="unprivileged user"):
        sandbox.drop_privileges(sandbox.Identity(uid=1000, gid=0, name="wheelish", home="/"))


def test_drop_privileges_without_root_does_nothing(monkeypatch, caplog):
    def forbidden(*args: object) -> None:
        raise AssertionError("must not change ids")

    for name in ("setgroups", "setresgid", "setresuid", "setgid", "setuid"):
        monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(sandbox, "privileged", lambda: False)
    caplog.set_level(logging.DEBUG, logger="certkeeper.sandbox")
    me = os.getuid()
    assert sandbox.drop_privileges(sandbox.Identity(uid=me, gid=os.getgid(), name="me", home="/")) is None
    assert caplog.records == []
    sandbox.drop_privileges(sandbox.Identity(uid=me + 4242, gid=4242, name="other", home="/"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", f"not root: running as uid {me}, not as other (uid {me + 4242})")]


# --- no_new_privs -----------------------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@linux_only
def test_set_no_new_privs_in_child():
    def body() -> dict[str, Any]:
        before = sandbox.no_new_privs()
        sandbox.set_no_new_privs()
        return {"before": before, "after": sandbox.no_new_privs(), "proc": proc_status("NoNewPrivs")}

    got = in_child(body)
    assert got == {"before": proc_status("NoNewPrivs") == "1", "after": True, "proc": "1"}


def test_no_new_privs_off_linux_touches_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "openbsd7")
    monkeypatch.setattr(sandbox, "_load_libc", lambda: pytest.fail("libc loaded"))
    sandbox.set_no_new_privs()
    assert sandbox.no_new_privs() is False


# --- Landlock, for real ------------------------------------------------------


def landlock_dirs(base: Path) -> tuple[Path, Path, Path]:
    a, b, outside = base / "a", base / "b", base / "outside"
    for directory in (a, b, outside):
        directory.mkdir()
    (a / "kept").write_bytes(b"read me")
    (b / "old").write_bytes(b"old")
    (outside / "secret").write_bytes(b"not for you")
    return a, b, outside


def probe(a: Path, b: Path, outside: Path) -> dict[str, str]:
    """What a process may do with the three directories of landlock_dirs()."""
    hostname = Path("/etc/hostname")
    return {
        "read A": attempt(read_file(a / "kept")),
        "list A": attempt(lambda: os.listdir(a)),
        "write A": attempt(lambda: (a / "kept").open("r+b").close()),
        "create in A": attempt(write_file(a / "new")),
        "truncate in A": attempt(lambda: os.truncate(a / "kept", 0)),
        "create in B": attempt(write_file(b / "new")),
        "rename in B": attempt(lambda: os.replace(b / "new", b / "renamed")),
        "mkdir in B": attempt(lambda: (b / "sub").mkdir()),
        "remove in B": attempt(lambda: (b / "old").unlink()),
        "fifo in B": attempt(lambda: os.mkfifo(b / "fifo")),
        "read outside": attempt(read_file(outside / "secret")),
        "read /etc/hostname": attempt(read_file(hostname)) if hostname.exists() else "EACCES",
    }


CONFINED = {
    "read A": "ok", "list A": "ok", "write A": "EACCES", "create in A": "EACCES",
    "create in B": "ok", "rename in B": "ok", "mkdir in B": "ok", "remove in B": "ok",
    "fifo in B": "EACCES",  # MAKE_FIFO is handled and granted nowhere
    "read outside": "EACCES", "read /etc/hostname": "EACCES",
}


@linux_only
def test_landlock_for_real(tmp_path):
    """Confines where the kernel has Landlock; where it has none: False, one warning line, nothing confined."""
    a, b, outside = landlock_dirs(tmp_path)

    def body() -> dict[str, Any]:
        records = Records()
        sandbox.log.addHandler(records)
        abi = sandbox.landlock_abi()
        confined = sandbox.landlock(read=[a, tmp_path / "missing"], write=[b])
        warnings = [line for level, line in records.lines if level == "WARNING"]
        return {"abi": abi, "confined": confined, "warnings": warnings, "nnp": sandbox.no_new_privs(),
                "probe": probe(a, b, outside), "describe": sandbox.describe()}

    got = in_child(body)
    if got["abi"] == 0:
        assert got["confined"] is False
        assert len(got["warnings"]) == 1
        assert got["warnings"][0].startswith("landlock: not available on this kernel (")
        assert got["warnings"][0].endswith("); continuing without file restrictions")
        assert got["probe"]["read outside"] == got["probe"]["write A"] == "ok"
        return
    assert got["confined"] is True and got["warnings"] == [] and got["nnp"] is True
    expected = dict(CONFINED, **{"truncate in A": "EACCES" if got["abi"] >= 3 else "ok"})
    assert got["probe"] == expected
    assert got["describe"].endswith(f"no_new_privs=1 landlock=abi{got['abi']},enforced")


@linux_only
def test_landlock_abi1_on_a_newer_kernel(tmp_path):
    """A kernel that says ABI 1: only ABI-1 rights are asked for, and they still confine."""
    if sandbox.landlock_abi() == 0:
        pytest.skip("no Landlock in this kernel (test_landlock_for_real covers that case)")
    a, b, outside = landlock_dirs(tmp_path)

    def body() -> dict[str, Any]:
        handled: list[int] = []
        real = sandbox._syscall

        def kernel(number: int, *args: Any) -> int:
            if number == sandbox.SYS_landlock_create_ruleset and args[0] is None:
                return 1
            if number == sandbox.SYS_landlock_create_ruleset:
                handled.append(args[0].handled_access_fs)
            return real(number, *args)

        sandbox._syscall = kernel
        confined = sandbox.landlock(read=[a], write=[b])
        return {"confined": confined, "handled": handled, "probe": probe(a, b, outside)}

    got = in_child(body)
    assert got["confined"] is True
    assert got["handled"] == [ABI1]
    assert got["probe"] == dict(CONFINED, **{"truncate in A": "ok"})  # ABI 1 cannot refuse truncate(2)


@linux_only
def test_confine_network_for_real(tmp_path):
    """confine("network"): no_new_privs, Landlock, and late imports still work (python_paths)."""
    a, b, outside = landlock_dirs(tmp_path)

    def body() -> dict[str, Any]:
        late = "colorsys"
        assert late not in sys.modules
        sandbox.confine("network", read=[a], write=[b])
        try:
            __import__(late)
            imported = "ok"
        except ImportError as exc:
            imported = str(exc)
        return {"abi": sandbox.landlock_abi(), "nnp": proc_status_or_prctl(), "import": imported,
                "probe": probe(a, b, outside)}

    got = in_child(body)
    assert got["nnp"] is True and got["import"] == "ok"
    if got["abi"]:
        assert got["probe"]["read outside"] == got["probe"]["create in A"] == "EACCES"
        assert got["probe"]["create in B"] == "ok"


def proc_status_or_prctl() -> bool:
    """Under Landlock /proc is out of reach: prctl answers instead."""
    try:
        return proc_status("NoNewPrivs") == "1"
    except OSError:
        return sandbox.no_new_privs()


@linux_only
def test_confine_keeper_on_linux_changes_nothing(monkeypatch):
    monkeypatch.setattr(sandbox, "set_no_new_privs", lambda: pytest.fail("no_new_privs for the keeper"))
    monkeypatch.setattr(sandbox, "landlock", lambda *a: pytest.fail("landlock for the keeper"))
    monkeypatch.setattr(sandbox, "_load_libc", lambda: pytest.fail("libc loaded"))
    sandbox.confine("keeper", read=["/etc"], write=["/var"])


def test_confine_unknown_role():
    with pytest.raises(ValueError, match="unknown role 'web'"):
        sandbox.confine("web", read=[], write=[])


# --- Landlock against a played kernel (in process, nothing is restricted) ----------------


class FakeKernel:
    def __init__(self, abi: int | None, error: int = errno.ENOSYS) -> None:
        self.abi, self.error = abi, error
        self.calls: list[tuple[str, Any]] = []
        self.rules: dict[str, int] = {}

    def __call__(self, number: int, *args: Any) -> int:
        if self.abi is None:
            self.calls.append(("unavailable", number))
            raise OSError(self.error, os.strerror(self.error))
        if number == sandbox.SYS_landlock_create_ruleset and args[0] is None:
            assert args[1:] == (0, sandbox.LANDLOCK_CREATE_RULESET_VERSION)
            return self.abi
        if number == sandbox.SYS_landlock_create_ruleset:
            attr = args[0]
            assert args[1] == ctypes.sizeof(attr) == 8 and args[2] == 0
            self.calls.append(("create", attr.handled_access_fs))
            return os.open(os.devnull, os.O_RDONLY)
        if number == sandbox.SYS_landlock_add_rule:
            fd, kind, rule, flags = args
            assert kind == sandbox.LANDLOCK_RULE_PATH_BENEATH and flags == 0 and rule.parent_fd >= 0
            self.rules[os.readlink(f"/proc/self/fd/{rule.parent_fd}")] = rule.allowed_access  # the real path
            return 0
        if number == sandbox.SYS_landlock_restrict_self:
            self.calls.append(("restrict", args[1]))
            return 0
        raise AssertionError(f"unexpected system call {number}")


@pytest.fixture
def played(monkeypatch, clean_state) -> Callable[..., FakeKernel]:
    nnp: list[bool] = []
    monkeypatch.setattr(sandbox, "set_no_new_privs", lambda: nnp.append(True))
    monkeypatch.setattr(sandbox, "no_new_privs", lambda: bool(nnp))
    monkeypatch.setattr(sandbox, "_thread_count", lambda: 1)

    def install(abi: int | None, error: int = errno.ENOSYS) -> FakeKernel:
        kernel = FakeKernel(abi, error)
        kernel.nnp = nnp  # type: ignore[attr-defined]
        monkeypatch.setattr(sandbox, "_syscall", kernel)
        return kernel

    return install


def test_path_beneath_attr_is_packed():
    assert ctypes.sizeof(sandbox._PathBeneathAttr) == 12
    assert ctypes.sizeof(sandbox._RulesetAttr) == 8


@linux_only
@pytest.mark.parametrize(("error", "why"), [(errno.ENOSYS, "kernel built without it"),
                                            (errno.EOPNOTSUPP, "disabled at boot, see lsm=")])
def test_landlock_absent_kernel_logs_one_line_and_goes_on(played, caplog, tmp_path, error, why):
    kernel = played(None, error)
    caplog.set_level(logging.DEBUG, logger="certkeeper.sandbox")
    assert sandbox.landlock(read=[tmp_path], write=[tmp_path]) is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"landlock: not available on this kernel ({_name(error)}: {os.strerror(error)}; {why}); "
                    "continuing without file restrictions")]
    assert kernel.calls == [("unavailable", sandbox.SYS_landlock_create_ruleset)]  # the version query only
    assert kernel.nnp == []  # type: ignore[attr-defined]
    assert sandbox.landlock_abi() == 0
    assert "landlock=none" in sandbox.describe()


def _name(number: int) -> str:
    return errno.errorcode[number]


def test_landlock_off_linux_logs_one_line(monkeypatch, caplog, clean_state):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(sandbox, "_syscall", lambda *a: pytest.fail("system call off Linux"))
    monkeypatch.setattr(sandbox, "_load_libc", lambda: pytest.fail("libc loaded"))
    assert sandbox.landlock(read=["/"], write=[]) is False
    assert [r.getMessage() for r in caplog.records] == [
        "landlock: not available on this platform (darwin); continuing without file restrictions"]


@linux_only
@pytest.mark.parametrize(("abi", "handled"), [(1, ABI1), (2, ABI1), (3, ABI1 | TRUNCATE), (7, ABI1 | TRUNCATE)])
def test_landlock_asks_only_for_rights_the_abi_knows(played, tmp_path, abi, handled):
    kernel = played(abi)
    read_dir, write_dir, read_file_ = tmp_path / "r", tmp_path / "w", tmp_path / "f"
    read_dir.mkdir()
    write_dir.mkdir()
    read_file_.write_bytes(b"")
    known = (1 << {1: 13, 2: 14, 3: 15, 4: 15, 5: 16, 6: 16, 7: 16}[abi]) - 1
    assert sandbox.landlock(read=[read_dir, read_file_, tmp_path / "missing"], write=[write_dir]) is True
    assert kernel.calls == [("create", handled), ("restrict", 0)]
    assert handled & ~known == 0
    read_rights = (sandbox.LANDLOCK_ACCESS_FS_EXECUTE | sandbox.LANDLOCK_ACCESS_FS_READ_FILE
                   | sandbox.LANDLOCK_ACCESS_FS_READ_DIR)
    assert kernel.rules == {
        os.path.realpath(read_dir): read_rights,
        os.path.realpath(read_file_): read_rights & ~sandbox.LANDLOCK_ACCESS_FS_READ_DIR,  # file rights only
        os.path.realpath(write_dir): sandbox.ACCESS_WRITE & handled,
    }  # the missing path was skipped
    for allowed in kernel.rules.values():
        assert allowed & ~handled == 0
    special = (sandbox.LANDLOCK_ACCESS_FS_MAKE_SOCK | sandbox.LANDLOCK_ACCESS_FS_MAKE_FIFO
               | sandbox.LANDLOCK_ACCESS_FS_MAKE_CHAR | sandbox.LANDLOCK_ACCESS_FS_MAKE_BLOCK)
    assert not kernel.rules[os.path.realpath(write_dir)] & special  # no devices, fifos or sockets anywhere
    assert kernel.nnp == [True]  # type: ignore[attr-defined]


@linux_only
def test_landlock_refuses_when_other_threads_run(played, monkeypatch, tmp_path):
    kernel = played(7)
    monkeypatch.setattr(sandbox, "_thread_count", lambda: 3)
    with pytest.raises(LocalError, match="3 threads run in this process"):
        sandbox.landlock(read=[tmp_path], write=[])
    assert kernel.calls == []


@linux_only
def test_landlock_rule_refused_is_a_local_error(played, monkeypatch, tmp_path):
    kernel = played(1)

    def refuse(number: int, *args: Any) -> int:
        if number == sandbox.SYS_landlock_add_rule:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return kernel(number, *args)

    monkeypatch.setattr(sandbox, "_syscall", refuse)
    with pytest.raises(LocalError, match=r"landlock_add_rule: EINVAL"):
        sandbox.landlock(read=[tmp_path], write=[])
    assert ("restrict", 0) not in kernel.calls


# --- pledge and unveil -------------------------------------------------------


def test_promises_are_pledge_promises():
    assert set(sandbox.ROLE_PROMISES) == {"keeper", "network", "listener"}
    for promises in sandbox.ROLE_PROMISES.values():
        names = promises.split()
        assert set(names) <= PLEDGE_PROMISES and len(names) == len(set(names)) and "stdio" in names
    keeper = set(sandbox.KEEPER_PROMISES.split())
    network = set(sandbox.NETWORK_PROMISES.split())
    listener = set(sandbox.LISTENER_PROMISES.split())
    assert not keeper & {"inet", "dns"}
    assert {"chown", "fattr", "proc", "exec", "unix", "getpw"} <= keeper
    assert not network & {"exec", "proc", "chown", "unix", "getpw"}
    assert {"inet", "dns"} <= network
    assert not listener & {"wpath", "cpath", "exec", "proc", "chown", "fattr", "dns", "unix"}
    assert "inet" in listener


def test_pledge_and_unveil_do_not_touch_libc_elsewhere(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("libc loaded")

    monkeypatch.setattr(sandbox, "_load_libc", refuse)
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert sandbox.pledge("stdio") is None
    assert sandbox.pledge("stdio", "stdio") is None
    assert sandbox.unveil("/etc", "r") is None
    assert sandbox.unveil(None, None) is None


class FakeLibc:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[str, tuple[bytes | None, ...]]] = []
        self.fail = fail

    def _call(self, name: str, args: tuple[bytes | None, ...]) -> int:
        self.calls.append((name, args))
        if name == self.fail:
            ctypes.set_errno(errno.EPERM)
            return -1
        return 0

    def pledge(self, *args: bytes | None) -> int:
        return self._call("pledge", args)

    def unveil(self, *args: bytes | None) -> int:
        return self._call("unveil", args)


@pytest.fixture
def openbsd(monkeypatch, clean_state) -> FakeLibc:
    libc = FakeLibc()
    monkeypatch.setattr(sys, "platform", "openbsd7")
    monkeypatch.setattr(sandbox, "_load_libc", lambda: libc)
    monkeypatch.setattr(sandbox, "landlock", lambda *a: pytest.fail("landlock on OpenBSD"))
    return libc


def test_pledge_and_unveil_on_openbsd_call_libc_with_bytes(openbsd):
    sandbox.pledge("stdio rpath inet")
    sandbox.pledge("stdio proc exec", "stdio rpath")
    sandbox.unveil("/etc/ssl", "r")
    sandbox.unveil(None, None)
    assert openbsd.calls == [
        ("pledge", (b"stdio rpath inet", None)),
        ("pledge", (b"stdio proc exec", b"stdio rpath")),
        ("unveil", (b"/etc/ssl", b"r")),
        ("unveil", (None, None)),
    ]


@pytest.mark.parametrize("which", ["pledge", "unveil"])
def test_pledge_and_unveil_failures_are_local_errors(openbsd, which):
    openbsd.fail = which
    with pytest.raises(LocalError, match=r"EPERM: Operation not permitted"):
        if which == "pledge":
            sandbox.pledge("stdio bogus")
        else:
            sandbox.unveil("/nonexistent", "r")


@pytest.mark.parametrize("role", ["keeper", "network", "listener"])
def test_confine_on_openbsd_unveils_then_pledges(openbsd, tmp_path, role, monkeypatch):
    monkeypatch.setattr(sandbox, "set_no_new_privs", lambda: pytest.fail("no_new_privs on OpenBSD"))
    read, write = tmp_path / "read", tmp_path / "write"
    read.mkdir()
    write.mkdir()
    sandbox.confine(role, read=[read, tmp_path / "missing"], write=[str(write)], python=False)
    r = b"rx" if role == "keeper" else b"r"
    assert openbsd.calls == [
        ("unveil", (str(read).encode(), r)),
        ("unveil", (str(write).encode(), b"rwc")),
        ("unveil", (None, None)),
        ("pledge", (sandbox.ROLE_PROMISES[role].encode(), None)),
    ]
    assert sandbox.describe().endswith("pledge=" + sandbox.ROLE_PROMISES[role].replace(" ", ","))


def test_confine_on_openbsd_unveils_the_interpreter(openbsd):
    sandbox.confine("listener", read=[], write=[])
    unveiled = [args for name, args in openbsd.calls if name == "unveil"]
    paths = {path.decode() for path, _ in unveiled if path is not None}
    assert paths == set(sandbox.python_paths()) and paths
    assert all(perms == b"r" for path, perms in unveiled if path is not None)
    assert "/" not in paths
    assert str(Path(sandbox.__file__).resolve().parent) in paths
    assert openbsd.calls[-1] == ("pledge", (b"stdio rpath inet", None))


def test_python_paths_never_open_the_root(monkeypatch):
    monkeypatch.setattr(sys, "path", ["", "/", "relative", "/nonexistent", sys.path[1] if len(sys.path) > 1 else "/"])
    paths = sandbox.python_paths()
    assert "/" not in paths and "" not in paths and "relative" not in paths and "/nonexistent" not in paths
    assert sys.executable not in paths
    assert sys.executable in sandbox.python_paths(executable=True)


# --- describe -----------------------------------------------------------------


@linux_only
def test_describe_is_one_line():
    line = sandbox.describe()
    assert "\n" not in line
    assert line.startswith(f"uid={os.getuid()} gid={os.getgid()} groups=")
    abi = sandbox.landlock_abi()
    assert f"no_new_privs={int(sandbox.no_new_privs())}" in line
    assert line.endswith(f"landlock=abi{abi}" if abi else "landlock=none")
