"""Starting the unprivileged roles, the same way for the daemon and the CLI.

certkeeper runs as three roles (certkeeper(8), PRIVILEGE SEPARATION):

- the **keeper** is the process that calls this module (the daemon, or the
  CLI run as root): it holds the keys and files, runs hooks, and never opens
  an INET socket nor imports network code;
- a **network worker** (``python -m certkeeper.worker``) is started for each
  job as the configured ``user``/``group`` (the kernel drops the ids between
  fork and exec, with no supplementary group); it sets no_new_privs and
  Landlock itself before it reads its ``Start`` message, gets the secrets it
  needs in that message, and asks the keeper for everything else. The CLI,
  which has one thread and has read no key yet when it starts its worker,
  forks it without exec, as OpenBSD's acme-client does: the child drops its
  ids at once, and the run is spared an interpreter start;
- the **listener** (``python -m certkeeper.listener``) is started as root,
  binds ports 80/443 and the metrics port, then drops to ``user``/``group``
  before it reads a byte from the network (see ``certkeeper.listener.process``).

Run by an ordinary user (the demo, a laptop), every role runs as that user:
the processes are the same, only the ids do not change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from certkeeper import protocol, sandbox
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config
from certkeeper.core.errors import LocalError
from certkeeper.core.files import write_atomic

if TYPE_CHECKING:  # loaded when a worker is served: the CLI starts its worker first (see run_cli_job)
    from certkeeper.keeper.service import LocalKeeper, WorkerResult
    from certkeeper.keeper.store import CertificateStore

log = logging.getLogger(__name__)

EXIT_GRACE = 5.0  # seconds a worker that sent its result gets to exit before it is killed
LISTENER_TIMEOUT = 30.0  # seconds the listener gets to answer one request (bind, serve, a challenge)


def identity(config: Config) -> sandbox.Identity | None:
    """The ids the unprivileged roles run as: ``user``/``group`` when we are root, else None (our own)."""
    return sandbox.role_identity(config.user, config.group or None)


def child_env() -> dict[str, str]:
    """This environment, with this certkeeper package first on the path (cwd is / for children)."""
    here = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{path}" if path else here}


def reachable(ident: sandbox.Identity | None) -> str:
    """Why ``ident`` cannot run this interpreter and this package, or "" (checked before a start)."""
    if ident is None:
        return ""
    for path in (Path(sys.executable).resolve(), Path(__file__).resolve()):
        for parent in [*reversed(path.parents), path]:
            try:
                st = parent.stat()
            except OSError:
                continue
            want = 0o1 if parent != path else 0o4
            if st.st_uid == ident.uid:
                ok = st.st_mode & (want << 6)
            elif st.st_gid == ident.gid:
                ok = st.st_mode & (want << 3)
            else:
                ok = st.st_mode & want
            if not ok:
                return (f"user {ident.name} cannot reach {parent} (mode {st.st_mode & 0o777:04o}), on the way to "
                        f"{path}: install certkeeper where every user can read it (README, Installing)")
    return ""


class WorkerProcess:
    """One network worker: started unprivileged, served by a keeper until its ``Exit``, then gone."""

    command: tuple[str, ...] = (sys.executable, "-m", "certkeeper.worker")  # then the socket's fd

    def __init__(self, config: Config, config_text: str, job: str, args: dict[str, Any],
                 foreground: bool = True, verbosity: int = 1, fork: bool = False) -> None:
        self.config = config
        self.config_text = config_text
        self.job = job
        self.args = args
        self.foreground = foreground
        self.verbosity = verbosity
        self.fork = fork  # without exec (the CLI): only while this process has one thread and no key read
        self.proc: subprocess.Popen[bytes] | Forked | None = None
        self.sock: socket.socket | None = None
        self.cancelled = False  # stopped on purpose (SIGTERM): what it had in flight is no failure

    def start(self) -> None:
        self.proc, parent = _launch("worker", self.command, self.fork, identity(self.config), drop=True)
        self.sock = parent
        protocol.send(parent, protocol.Start(
            job=self.job, args=json.dumps(self.args, sort_keys=True), config_path=str(self.config.path),
            config_text=self.config_text,
            secrets=tuple(protocol.Secret(path, data.decode()) for path, data in handed_secrets(self.config).items()),
            foreground=self.foreground, verbosity=self.verbosity))

    def serve(self, keeper: LocalKeeper, emit: Callable[[str], None], timeout: float) -> WorkerResult:
        from certkeeper.keeper.service import serve

        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            return serve(self.sock, keeper, emit, lambda: datetime.now(UTC), f"{self.job} worker")
        except LocalError as exc:
            if "ended without a result" in str(exc) and self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    exc = LocalError(f"{exc} (exit status {self.proc.wait(EXIT_GRACE)})")
            if not self.cancelled:  # an order the worker took with it counts as a failed attempt (not at a stop)
                keeper.orders_lost(str(exc))
            raise exc from None
        finally:
            self.finish()

    def finish(self) -> None:
        """Give a worker that sent its result a moment to exit; kill it otherwise (or at once on failure)."""
        if self.sock is not None:
            self.sock.close()
        if self.proc is None:
            return
        try:
            self.proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()


def _launch(role: str, command: Sequence[str], fork: bool, ident: sandbox.Identity | None,
            drop: bool) -> tuple[subprocess.Popen[bytes] | Forked, socket.socket]:
    """Start ``role`` ("worker" or "listener") with one end of a socketpair; return it and the other end.

    Forked without exec when ``fork`` is asked and this process has one thread, else ``command`` with
    the socket's descriptor. ``drop``: the child runs as ``ident`` from the start (the worker); else
    as this process (the listener, which drops once it has bound)."""
    problem = reachable(ident)
    if problem:
        raise LocalError(problem)
    parent, child = socket.socketpair()
    ids: dict[str, Any] = {}
    if drop and ident is not None:
        ids = {"user": ident.uid, "group": ident.gid, "extra_groups": []}
    try:
        if fork and threading.active_count() == 1:
            proc: subprocess.Popen[bytes] | Forked = Forked.start(role, child, ident if drop else None)
        else:
            proc = subprocess.Popen([*command, str(child.fileno())], pass_fds=[child.fileno()],
                                    stdin=subprocess.DEVNULL, cwd="/", env=child_env(), **ids)
    except OSError as exc:
        parent.close()
        what = "network worker" if role == "worker" else role
        raise LocalError(f"cannot start the {what}: {exc.strerror or exc}") from None
    finally:
        child.close()
    return proc, parent


class Forked:
    """A role forked without exec (the CLI's worker and listener), with what the callers use of a Popen.

    The child keeps only its end of the socketpair and the standard streams, goes to ``/``, drops to
    ``ident`` if given (the worker: ``sandbox.drop_privileges``, no supplementary group, no way back;
    the listener drops itself once it has bound) and runs the role's ``main`` as an exec'd one
    would, which sets no_new_privs and Landlock. It never returns into the caller's code: it ends
    with ``os._exit``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, role: str, child: socket.socket, ident: sandbox.Identity | None) -> Forked:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()  # nothing buffered here is written twice
        pid = os.fork()
        if pid:
            return cls(pid)
        code = 1
        try:
            import gc

            gc.freeze()  # the parent's objects are never collected here: none closes an fd reused by now
            fd = child.fileno()
            _keep_only_fds((0, 1, 2, fd))
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            os.chdir("/")
            if ident is not None:
                sandbox.drop_privileges(ident)
            if role == "worker":
                from certkeeper import worker

                code = worker.main([str(fd)])
            else:
                from certkeeper.listener import process

                code = process.main([str(fd)])
        except BaseException as exc:  # noqa: BLE001 - the child never returns into the caller's code
            with contextlib.suppress(OSError, ValueError):
                print(f"certkeeper {role}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(["certkeeper worker"], timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return code

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def _keep_only_fds(keep: tuple[int, ...]) -> None:
    """Close every descriptor but ``keep`` (the forked worker holds nothing else of the keeper's)."""
    top = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024
    low = 0
    for fd in sorted(keep):
        if low < fd:  # closerange(n, n) would close everything from n on
            os.closerange(low, fd)
        low = fd + 1
    if low < top:
        os.closerange(low, top)


def account_key(config: Config, authority: str = "") -> bytes:
    """An authority's ACME account key (the default one's without ``authority``), created (root's,
    0600) at its first use."""
    acme = config.authority(authority or config.default_authority)
    path = acme.account_key
    with _ACCOUNT_KEY_LOCK:  # two workers starting at once (a job and the fleet-watch worker) make one key
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalError(f"{path}: cannot read the ACME account key: {exc.strerror}") from None
        from certkeeper.core import certs

        pem = certs.generate_key(acme.account_key_type)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, pem, 0o600)
    log.info("created ACME account key %s (%s)", path, acme.account_key_type)
    return pem


_ACCOUNT_KEY_LOCK = threading.Lock()


def handed_secrets(config: Config) -> dict[str, bytes]:
    """What the worker's user must not read from disk but needs: path → content.

    Every authority's ACME account key (made here if missing) and EAB HMAC key, the
    TSIG secret when configured, and [fleet]'s etcd client files and password (never
    its secret_file, which only the keeper reads). A file that cannot be read is left out: the worker
    then reports it as it would have (one line naming the file)."""
    files: dict[str, bytes] = {}
    for name in config.authorities:
        files.setdefault(str(config.authority(name).account_key), account_key(config, name))
    eab = [config.authority(name).eab_hmac_key_file for name in config.authorities]
    fleet = config.fleet  # [fleet]: the etcd client's TLS files and password (never secret_file: keeper only)
    for path in (*eab, config.dns.tsig_secret_file, fleet.ca, fleet.cert, fleet.key, fleet.password_file):
        if path is None:
            continue
        try:
            files[str(path)] = path.read_bytes()
            if path.stat().st_mode & 0o077 and path not in (fleet.ca, fleet.cert):  # those two are public
                log.warning("%s: readable by others (mode %04o); use 0600", path, path.stat().st_mode & 0o777)
        except OSError as exc:
            log.debug("%s: not handed over: %s", path, exc)
    return files


# ---------------------------------------------------------------------------
# The listener, from the keeper's side.


class ListenerLink:
    """The keeper's end of the listener process (``certkeeper.listener.process``); thread-safe."""

    def __init__(self, config: Config, config_text: str, foreground: bool = True, verbosity: int = 1,
                 http_only: bool = False, fork: bool = False) -> None:
        self.fork = fork  # without exec (the CLI), as its worker
        self.config = config
        self.config_text = config_text
        self.foreground = foreground
        self.verbosity = verbosity
        self.http_only = http_only
        self.proc: subprocess.Popen[bytes] | Forked | None = None
        self.sock: socket.socket | None = None
        self.addresses: tuple[str, ...] = ()
        self.serving: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._begun = False  # ListenerStart sent, Bound not read yet

    def spawn(self) -> None:
        """Start the process (as root) without telling it to listen yet: it loads its libraries
        meanwhile, and ``start`` then binds at once. A spawned listener never started just exits."""
        if self.proc is not None:
            return
        # As root: the listener drops its ids itself, once it has bound.
        self.proc, parent = _launch("listener", (sys.executable, "-m", "certkeeper.listener"), self.fork,
                                    identity(self.config), drop=False)
        parent.settimeout(LISTENER_TIMEOUT)  # a hung listener must not hang the keeper's threads
        self.sock = parent

    def start(self) -> tuple[str, ...]:
        """Start it (``spawn``) and have it bind, drop its ids, then say ``Bound`` (or why it could not)."""
        self.begin()
        parent = self.sock
        assert parent is not None
        self._begun = False  # its answer is read here, whatever it is
        try:
            bound = protocol.expect(protocol.receive(parent), protocol.Bound)
        except (EOFError, LocalError) as exc:
            self.stop()
            raise LocalError(str(exc) or "the listener ended before it listened") from None
        self.addresses = bound.addresses
        return self.addresses

    def begin(self) -> None:
        """The first half of ``start``: tell it to bind and drop its ids, without waiting for its answer
        (``start`` then reads it). Once begun, nothing else may be sent before ``start``."""
        if self._begun:
            return
        self.spawn()
        assert self.sock is not None
        try:
            protocol.send(self.sock, protocol.ListenerStart(str(self.config.path), self.config_text, self.foreground,
                                                            self.verbosity, self.http_only))
        except OSError as exc:
            self.stop()
            raise LocalError(f"the listener ended before it listened: {exc.strerror or exc}") from None
        self._begun = True

    def request(self, message: object) -> object:
        with self._lock:
            if self.sock is None:
                raise LocalError("the listener is not running")
            protocol.send(self.sock, message)
            return protocol.receive(self.sock)

    def serve_certificates(self, config: Config, store: CertificateStore) -> tuple[str, ...]:
        """Hand over every certificate the listener serves (the [[mta_sts]] hosts'), as on disk now."""
        sets = []
        for cert in config.listener_certificates():
            store.recover(cert)
            found = store.read(cert)
            if found is not None:
                sets.append(protocol.ServedSet(cert.name, cert.domains, found.fullchain.decode(), found.key.decode()))
        served = protocol.expect(self.request(protocol.Serve(tuple(sets))), protocol.Served)
        self.serving = served.names
        return served.names

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self._begun:  # told to bind, never asked for a challenge: read its answer, then stop it
            with contextlib.suppress(OSError, EOFError, LocalError):
                self.start()
        if self.sock is not None and self.alive() and self.addresses:
            with contextlib.suppress(OSError, EOFError, LocalError):
                self.request(protocol.Stop())
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(EXIT_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc, self.addresses = None, ()  # ``start`` may start another one


class ListenerChallenges(ChallengeTable):
    """The keeper's challenge table for one job: each token also goes to the listener, which answers it.

    ``start`` is called before the first token (the CLI starts its listener only when an order needs
    it); ``clear`` takes every token of the job away again, whatever way the job ended."""

    def __init__(self, link: ListenerLink, start: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.link = link
        self._start = start

    def add(self, token: str, key_authorization: str, name: str = "") -> None:
        super().add(token, key_authorization)
        if self._start is not None:
            self._start()
            self._start = None
        protocol.expect(self.link.request(protocol.Challenge(token, key_authorization)), protocol.Ok)

    def expect(self) -> None:
        """The listener binds while the order is placed (``begin``); ``add`` then waits for it."""
        if self._start is not None:
            self.link.begin()

    def remove(self, token: str) -> None:
        super().remove(token)
        with contextlib.suppress(OSError, EOFError, LocalError):
            self.link.request(protocol.Unchallenge(token))

    def clear(self) -> None:
        for token in list(self.tokens()):
            self.remove(token)


# ---------------------------------------------------------------------------
# The CLI as keeper.


def run_cli_job(config: Config, job: str, args: dict[str, Any], emit: Callable[[str], None],
                verbosity: int = 0) -> int:
    """One job without a daemon: this process is the keeper, a worker does the network work, and
    a listener answers HTTP-01 on ``[http] listen`` from the first challenge to the end of the job."""
    from certkeeper.core import layout
    from certkeeper.core.config import read_text

    text = read_text(config.path)  # as the CLI read it: the worker parses the same text
    layout.prepare(config, identity(config))
    link = ListenerLink(config, text, foreground=True, verbosity=verbosity, http_only=True, fork=True)
    challenges = ListenerChallenges(link, start=lambda: _start_http01(link))
    worker = WorkerProcess(config, text, job, args, True, verbosity, fork=True)
    try:
        if job == "renew" and config.http.listen:
            link.spawn()  # it loads its libraries meanwhile; it binds only if an order needs HTTP-01 (make_csr)
        worker.start()
        from certkeeper.keeper.service import LocalKeeper

        keeper = LocalKeeper(config, challenges, dry_run=job == "renew" and bool(args.get("dry_run")))
        return worker.serve(keeper, emit, idle_timeout(config)).code
    except BaseException:
        worker.kill()
        raise
    finally:
        challenges.clear()
        link.stop()


def printer(out: TextIO) -> Callable[[str], None]:
    """Where a CLI job's lines go: errors ("certkeeper: ...") to stderr, the rest to ``out``."""
    def emit(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("certkeeper: ") else out, flush=True)

    return emit


def _start_http01(link: ListenerLink) -> None:
    for address in link.start():
        log.info("HTTP-01: listening on %s", address)


def idle_timeout(config: Config) -> float:
    """How long a healthy worker may stay silent: one whole order at each authority, one DNS propagation wait
    and the slowest hook with its verification, plus a minute. Longer means it hangs."""
    hooks = max((h.timeout + h.verify_timeout for h in config.hooks.values()), default=0.0)
    orders = max(sum(config.authority(n).order_timeout for n in c.authorities) for c in config.certificates) \
        if config.certificates else config.acme.order_timeout
    return orders + config.dns.propagation_timeout + hooks + 60.0
