"""``certkeeper run [-d]``: the long-running service (rc.d ``certkeeper``).

This module is composition only: it binds the listeners (``web``) and the
control socket (``control``), detaches, schedules, and hands every piece of
heavy work (ACME, crypto, DNS, mail) to a short-lived worker process
(``certkeeper.worker``, which runs the same ``Renewer`` the CLI uses). The
long-running process thus never loads acme, josepy, requests or dnspython,
stays small, and a job that crashes cannot take the listeners with it. It owns
the process behaviour:

- **Start**: sockets are bound before detaching, so "address in use" or a
  daemon already running (``control`` holds an ``flock`` on ``SOCKET.lock``)
  reaches the terminal (exit 1). Without ``-d`` the
  process detaches (double fork, setsid, stdio to /dev/null) and logs to syslog
  (facility daemon); with ``-d`` it stays in the foreground and logs to stderr.
  The pid file is written once the final pid is known and removed at exit.
  The event loop is uvloop's when it is installed (less CPU per HTTPS request),
  else asyncio's.
- **Schedule** (APScheduler ``AsyncIOScheduler``): a renewal check at start-up
  (missing or due certificates are obtained at once), then twice a day at a
  random second, plus one extra check at the soonest time an outcome names (a
  planned renewal, an ARI window, or the end of a failure backoff: 1 min,
  10 min, 100 min, then daily, never before Retry-After; the runner keeps that
  state on disk, so it survives a restart). Checks never overlap. Certificates
  due together are ordered concurrently, at most ``[acme] concurrency`` at a
  time (the Renewer bounds it inside the worker).
- **HTTP-01**: the worker relays each challenge to the daemon's table and waits
  for the daemon's acknowledgement before the ACME server validates; after an
  install the daemon swaps that certificate's TLS context.
- **Workers that misbehave**: a line that is not a protocol message is logged
  and skipped; a worker that exits without a result, or stays silent longer
  than ``idle_timeout`` (one order + one DNS propagation wait + the slowest
  hook, plus a minute), is an error for that job (a check is retried in
  10 minutes); whatever the end, the process is killed if still running and
  its challenges leave the table.
- **Control socket**: ``renew [--force] [NAME...]`` and ``status`` from the CLI
  run here, with progress lines streamed back. The daemon holds one lock per
  certificate name around each renew worker, so two renewals of one
  certificate never run at once.
- **SIGHUP** re-reads the configuration (one reload at a time): a bad one (or
  an unreadable MTA-STS state file) is logged as one line and the running one
  kept (workers get the text the daemon runs with, never the broken file); a
  good one updates host names, policies and TLS contexts
  (certificates added or removed), then runs a check so new certificates are
  obtained at once, then publishes MTA-STS ids. Listen addresses need a restart.
- **SIGTERM/SIGINT** stop within 5 s: the scheduler and the control socket
  stop taking work; workers in progress get ``STOP_GRACE`` seconds to finish
  (the listeners still answer their challenges) and are killed after that;
  then the listeners close, giving open requests ``Limits.shutdown_timeout``.
  The store makes installs crash-safe (temp files + journal, finished or
  discarded by ``recover`` at the next start), so no half-written certificate
  set is ever left behind.

The optional parts (MTA-STS publishing at start and SIGHUP, DKIM rotation and
expiry alerts hourly, alerts after renewals) are composed in
``certkeeper.worker``. Metrics (``[metrics] listen``, off by default) are the
one part served from this process: ``certkeeper.listener.metrics.serve`` in a thread,
restarted on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from certkeeper import control, worker
from certkeeper.core import config as config_module
from certkeeper.core import files
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config
from certkeeper.core.errors import CertkeeperError, ConfigError, LocalError
from certkeeper.listener.web import Site, WebServer

log = logging.getLogger(__name__)

CHECK_INTERVAL = timedelta(hours=12)  # twice a day
MIN_DELAY = timedelta(seconds=30)  # an extra check is never sooner than this
STOP_GRACE = 2.5  # seconds workers in progress get at SIGTERM (the whole stop stays under 5 s)
EXIT_GRACE = 5.0  # seconds a worker that sent its result gets to exit before it is killed
MAX_MESSAGE = 1 << 20  # bytes of one worker message line
HOURLY = timedelta(hours=1)


def _log_line(line: str) -> None:
    log.info("%s", line)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon on uvloop when it is installed, else on asyncio's own loop.

    uvloop (libuv, with TLS done in C) serves mta-sts.txt over HTTPS with about a
    third less CPU per request (bench/daemon_bench.py); nothing else changes.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# ---------------------------------------------------------------------------
# Process set-up.


def detach() -> None:
    """Become a daemon: double fork, new session, cwd /, stdio on /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def write_pid_file(path: Path) -> None:
    """Write our pid atomically (``files.write_atomic``: temp file, fsync, rename)."""
    files.write_atomic(path, f"{os.getpid()}\n".encode(), mode=0o644)


def remove_pid_file(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


# ---------------------------------------------------------------------------
# Worker processes (certkeeper.worker): the heavy work, one job per process.


class Worker:
    """One ``python -m certkeeper.worker`` job, relayed to the daemon's challenge table and TLS contexts.

    Whatever way the job ends (a result, a crash, garbage on the pipe, silence for
    longer than ``idle_timeout``, cancellation at SIGTERM), the process is killed if
    still running and its pending challenges leave the table.
    """

    command: tuple[str, ...] = (sys.executable, "-m", "certkeeper.worker")

    def __init__(self, daemon: Daemon, job: str, args: dict[str, Any], emit: Callable[[str], None]) -> None:
        self.daemon = daemon
        self.job = job
        self.args = args
        self.emit = emit
        self.tokens: set[str] = set()
        self.proc: asyncio.subprocess.Process | None = None
        self.idle_timeout = idle_timeout(daemon.config)

    async def run(self) -> tuple[int, datetime | None]:
        if self.daemon.stopping.is_set():
            raise LocalError(f"not starting a {self.job} worker: the daemon is stopping")
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=MAX_MESSAGE, env=_worker_env())
        self.daemon.workers.add(self)
        try:
            self._send(json.dumps({
                "config_path": str(self.daemon.config.path), "config_text": self.daemon.config_text,
                "job": self.job, "args": self.args, "foreground": self.daemon.foreground,
                "verbosity": self.daemon.verbosity}).encode() + b"\n")
            result = await self._relay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), EXIT_GRACE)  # else killed below; the result stands
            return result
        finally:
            self.kill()
            for token in self.tokens:
                self.daemon.challenges.remove(token)
            self.daemon.workers.discard(self)

    async def _relay(self) -> tuple[int, datetime | None]:
        while True:
            kind, value = await self._next_message()
            if kind == "exit":
                return value
            await self._handle(kind, value)

    async def _next_message(self) -> tuple[str, Any]:
        """The next well-formed message; an unreadable line is logged and skipped."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), self.idle_timeout)
            except TimeoutError:
                raise LocalError(f"the {self.job} worker sent nothing for {self.idle_timeout:g} s; "
                                 "stopped it") from None
            except ValueError:  # longer than MAX_MESSAGE
                raise LocalError(f"the {self.job} worker sent a line over {MAX_MESSAGE} bytes; stopped it") from None
            if not raw:
                code = await self.proc.wait()
                raise LocalError(f"the {self.job} worker ended without a result (exit status {code})")
            try:
                return worker.parse_message(raw)
            except ValueError as exc:
                log.warning("%s worker: %s", self.job, exc)

    async def _handle(self, kind: str, value: Any) -> None:
        if kind == "challenge":
            token, key_authorization = value
            try:
                self.daemon.challenges.add(token, key_authorization)
            except ValueError as exc:
                log.warning("%s worker: %s", self.job, exc)
                self._send(b"no\n")
                return
            self.tokens.add(token)
            self._send(b"ok\n")
        elif kind == "unchallenge":
            self.daemon.challenges.remove(value)
            self.tokens.discard(value)
        elif kind == "installed":
            await asyncio.to_thread(self.daemon.installed, value)
        elif kind == "line":
            self.emit(value)

    def _send(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.write(data)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def idle_timeout(config: Config) -> float:
    """How long a healthy worker may stay silent: one whole order, one DNS propagation wait
    and the slowest hook with its verification, plus a minute. Longer means it hangs."""
    hooks = max((h.timeout + h.verify_timeout for h in config.hooks.values()), default=0.0)
    return config.acme.order_timeout + config.dns.propagation_timeout + hooks + 60.0


def _worker_env() -> dict[str, str]:
    """The daemon's environment, with this certkeeper package first on the path (cwd is / once detached)."""
    here = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{path}" if path else here}


# ---------------------------------------------------------------------------
# The daemon.


class Daemon:
    def __init__(self, config: Config, config_text: str, foreground: bool = True, verbosity: int = 1) -> None:
        self.config = config
        self.config_text = config_text
        self.foreground = foreground
        self.verbosity = verbosity
        self.challenges = ChallengeTable()
        self.web = WebServer(config, self.challenges)
        self.started = datetime.now(UTC)
        self.workers: set[Worker] = set()
        self.name_locks: dict[str, asyncio.Lock] = {}
        self.job_locks: dict[str, asyncio.Lock] = {}  # one run of each background job at a time
        self.control: control.ControlServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life cycle ----------------------------------------------------------------

    def bind(self) -> None:
        """Listeners and control socket, before detaching (errors reach the terminal)."""
        path = self.config.control_socket
        self.control = control.ControlServer.bind(path, {"renew": self.command_renew, "status": self.command_status})
        try:
            self.web.bind()
        except LocalError:
            self.control.close()  # removes the socket file only if it is still ours
            raise

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.check_lock = asyncio.Lock()
        self.reload_lock = asyncio.Lock()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if self.control is None:
            self.bind()
        assert self.control is not None
        await self.web.start()
        await self.control.start()
        await self._start_metrics()
        self.scheduler = self._start_scheduler()
        log.info("started (pid %d): %d certificate(s), control socket %s", os.getpid(),
                 len(self.config.certificates), self.config.control_socket)
        self._spawn(self.startup())
        await self.stopping.wait()
        await self.stop()
        return 0

    async def startup(self) -> None:
        await self.check("start-up")
        await self.background("publish")
        await self.background("hourly")  # DKIM steps and expiry warnings due now wait for no hour

    async def stop(self) -> None:
        """No new work; workers get ``STOP_GRACE`` with the listeners still up (HTTP-01), then go."""
        log.info("stopping")
        self.scheduler.shutdown(wait=False)
        if self.control is not None:
            await self.control.stop()
        running = [w.proc for w in self.workers if w.proc is not None]
        if running:
            _, still = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=STOP_GRACE)
            if still:
                log.warning("stopping %d worker(s) in progress; an interrupted install is finished or discarded "
                            "at the next start", len(still))
                for w in list(self.workers):
                    w.kill()
                await asyncio.wait(still, timeout=0.5)
        await asyncio.gather(self.web.stop(), asyncio.to_thread(self._stop_metrics))
        log.info("stopped")

    async def _start_metrics(self) -> None:
        """``[metrics] listen`` (off by default): certkeeper.listener.metrics serves /metrics from a thread here."""
        self._stop_metrics: Callable[[], None] = lambda: None
        if not self.config.metrics.listen:
            return
        from certkeeper.listener import metrics

        try:
            self._stop_metrics = await asyncio.to_thread(metrics.serve, self.config, self.started)
        except LocalError as exc:
            log.error("%s", exc)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)  # the loop holds tasks weakly: keep each until it is done
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_failure)

    # -- scheduling -------------------------------------------------------------------

    def _start_scheduler(self) -> AsyncIOScheduler:
        # A run that is late (a suspended VM, a clock step, a busy loop) still happens, once:
        # APScheduler's default would drop any run more than 1 s late, a planned retry with it.
        scheduler = AsyncIOScheduler(timezone=UTC, event_loop=self.loop,
                                     job_defaults={"misfire_grace_time": None, "coalesce": True})
        first = datetime.now(UTC) + timedelta(seconds=random.uniform(0, CHECK_INTERVAL.total_seconds()))
        scheduler.add_job(self.check, IntervalTrigger(seconds=CHECK_INTERVAL.total_seconds(), start_date=first),
                          args=["twice-daily check"], id="check", coalesce=True, max_instances=1)
        scheduler.add_job(self.background, IntervalTrigger(seconds=HOURLY.total_seconds()), args=["hourly"],
                          id="hourly", coalesce=True, max_instances=1)
        scheduler.start()
        return scheduler

    async def check(self, why: str) -> None:
        """Renew whatever is due; then schedule the soonest next time an outcome names."""
        async with self.check_lock:
            if self.stopping.is_set():
                return
            log.info("renewal check (%s)", why)
            try:
                _, soonest = await self.renew({"names": [], "force": False}, _log_line)
            except Exception as exc:  # noqa: BLE001 - a failed check is retried soon
                log.error("renewal check failed: %s", " ".join(str(exc).split()))
                soonest = datetime.now(UTC) + timedelta(minutes=10)
            if soonest is not None:
                self._schedule_extra(soonest, "the soonest planned renewal or retry")

    async def background(self, job: str) -> None:
        """A job whose lines only go to the log (MTA-STS publishing, the hourly DKIM/expiry work).

        Runs of one job never overlap (start-up, SIGHUP and the scheduler may ask at once)."""
        if job == "hourly" and not (self.config.dkim or self.config.alerts.mail_to or self.config.alerts.command):
            return  # nothing to rotate and nobody to warn: no worker process
        async with self.job_locks.setdefault(job, asyncio.Lock()):
            if self.stopping.is_set():
                return
            try:
                _, soonest = await Worker(self, job, {}, _log_line).run()
                if job == "publish":
                    # The history may have changed what is served (a withdrawal finished): rebuild it.
                    self.web.handlers.site = await asyncio.to_thread(Site.from_config, self.config)
            except Exception as exc:  # noqa: BLE001 - logged; the next run tries again
                log.error("%s failed: %s", job, " ".join(str(exc).split()))
                return
        if job == "publish":
            if soonest is not None and not self.stopping.is_set():
                when = max(soonest, datetime.now(UTC) + MIN_DELAY)
                self.scheduler.add_job(self.background, DateTrigger(when), args=["publish"], id="publish-soon",
                                       replace_existing=True)

    def _schedule_extra(self, when: datetime, why: str) -> None:
        """One extra check at ``when`` if that is before every check already planned."""
        if self.stopping.is_set():
            return
        when = max(when, datetime.now(UTC) + MIN_DELAY)
        planned = [job.next_run_time for job in self.scheduler.get_jobs() if job.id in ("check", "soonest")]
        if any(t is not None and t <= when for t in planned):
            return
        self.scheduler.add_job(self.check, DateTrigger(when), args=[why], id="soonest", replace_existing=True)
        log.info("next renewal check at %s (%s)", when.strftime("%Y-%m-%d %H:%M:%S UTC"), why)

    # -- work -----------------------------------------------------------------------

    async def renew(self, args: dict[str, Any], emit: Callable[[str], None]) -> tuple[int, datetime | None]:
        """A renew worker, holding the daemon's lock of every certificate it may touch.

        Two renewals of one certificate never run at once: a request for some names
        waits only for work on those names; a check of all names waits for all.
        """
        names = args.get("names") or list(self.config.certificate_names())
        locks = [self.name_locks.setdefault(name, asyncio.Lock()) for name in sorted(set(names))]
        async with contextlib.AsyncExitStack() as held:
            for lock in locks:  # always in name order, so two requests cannot deadlock
                await held.enter_async_context(lock)
            return await Worker(self, "renew", args, emit).run()

    def installed(self, name: str) -> None:
        """A worker installed a new set (called in a thread): serve it from the next handshake."""
        try:
            self.web.on_installed(self.config.certificate(name))
        except KeyError:
            log.warning("%s: installed, but no longer configured", name)

    async def command_renew(self, payload: dict[str, Any], emit: Callable[[str], None]) -> int:
        names = payload.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            emit("certkeeper: names must be a list of certificate names")
            return 1
        unknown = [n for n in names if n not in self.config.certificate_names()]
        if unknown:
            emit(f"certkeeper: no [[certificate]] named {', '.join(map(repr, unknown))} in {self.config.path}")
            return 1

        def both(line: str) -> None:
            log.info("%s", line)
            emit(line)

        code, soonest = await self.renew({"names": names, "force": bool(payload.get("force"))}, both)
        if soonest is not None:
            self._schedule_extra(soonest, "the soonest planned renewal or retry")
        return code

    async def command_status(self, payload: dict[str, Any], emit: Callable[[str], None]) -> int:
        as_json = bool(payload.get("json"))
        args = {"names": [n for n in payload.get("names") or [] if isinstance(n, str)], "json": as_json,
                "daemon": self.daemon_facts()}
        code, _ = await Worker(self, "status", args, emit).run()
        if not as_json:
            emit("")
            for line in self.daemon_lines():
                emit(line)
        return code

    def daemon_facts(self) -> dict[str, Any]:
        jobs = {job.id: job.next_run_time for job in self.scheduler.get_jobs()}
        upcoming = [t for k, t in jobs.items() if k in ("check", "soonest") and t is not None]
        return {
            "pid": os.getpid(),
            "started": _iso(self.started),
            "next_check": _iso(min(upcoming)) if upcoming else None,
            "serving": list(self.web.tls.names_loaded()),
            "workers": sorted(w.job for w in self.workers),
        }

    def daemon_lines(self) -> list[str]:
        facts = self.daemon_facts()
        return [f"daemon: pid {facts['pid']}, running since {facts['started']}",
                f"daemon: next renewal check {facts['next_check'] or 'not planned'}",
                f"daemon: serving {', '.join(facts['serving']) or 'no certificate yet'} over HTTPS"]

    # -- SIGHUP ---------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP. Reloads run one at a time; a bad file (or unreadable MTA-STS state) changes nothing."""
        async with self.reload_lock:
            if self.stopping.is_set():
                return
            try:
                text, new = await asyncio.to_thread(read_config, self.config.path)
                await asyncio.to_thread(self.web.reload, new)  # builds the new site first, then swaps
            except ConfigError as exc:
                log.error("configuration not reloaded, keeping the running one: %s", "; ".join(exc.lines))
                return
            except CertkeeperError as exc:
                log.error("configuration not reloaded, keeping the running one: %s", exc)
                return
            if (new.control_socket, new.state_dir) != (self.config.control_socket, self.config.state_dir):
                log.warning("control_socket or state_dir changed; restart certkeeper to apply")
            self.config, self.config_text = new, text
            await self._restart_metrics()
            log.info("configuration reloaded: %d certificate(s)", len(new.certificates))
        await self.check("configuration reloaded")
        await self.background("publish")

    async def _restart_metrics(self) -> None:
        await asyncio.to_thread(self._stop_metrics)
        await self._start_metrics()


def read_config(path: Path) -> tuple[str, Config]:
    """The text and the parsed configuration (workers get the text the daemon runs with)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return text, config_module.parse(text, path)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("internal error: %s: %s", type(exc).__name__, " ".join(str(exc).split()))


def _iso(when: datetime) -> str:
    """UTC, whole seconds, "Z": the time format of ``status --json``."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
