"""``certkeeper run [-d]``: the long-running service (rc.d ``certkeeper``).

This module is composition only: it binds the listeners (``web``) and the
control socket (``control``), detaches, and drives the same ``Renewer`` the CLI
uses from an APScheduler ``AsyncIOScheduler``. It owns the process behaviour:

- **Start**: sockets are bound before detaching, so "address in use" or a
  daemon already running reaches the terminal (exit 1). Without ``-d`` the
  process detaches (double fork, setsid, stdio to /dev/null) and logs to syslog
  (facility daemon); with ``-d`` it stays in the foreground and logs to stderr.
  The pid file is written once the final pid is known and removed at exit.
- **Schedule**: a renewal check at start-up (missing or due certificates are
  obtained at once), then twice a day at a random second, plus one extra check
  at the soonest time an outcome names (an ARI window, a planned renewal, or
  the end of a failure backoff: 1 min, 10 min, 100 min, then daily, never
  before Retry-After; the runner keeps that state on disk, so it survives a
  restart). Checks never overlap; ACME and crypto work runs in threads, so the
  listeners never stall. Certificates due together are ordered concurrently,
  at most ``[acme] concurrency`` at a time (the Renewer bounds it).
- **Control socket**: ``renew [--force] [NAME...]`` and ``status`` from the CLI
  run here, with progress lines streamed back. The Renewer's per-name locks
  (kept across reloads) mean two renewals of one certificate never overlap.
- **SIGHUP** re-reads the configuration: a bad one is logged as one line and
  the running one kept; a good one updates host names, policies and TLS
  contexts (certificates added or removed), then runs a check so new
  certificates are obtained at once. Listen addresses need a restart.
- **SIGTERM/SIGINT** stop within 5 s: listeners and the control socket close,
  renewals in progress get ``STOP_GRACE`` seconds to finish and are abandoned
  after that. The store makes installs crash-safe (temp files + journal,
  finished or discarded by ``recover`` at the next start), so no half-written
  certificate set is ever left behind.

The optional parts (MTA-STS publishing, DKIM rotation, alerts, metrics) are
wired in ``Extensions`` below, each only when its module is present.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from certkeeper import config as config_module
from certkeeper import control, logs
from certkeeper.challenges import ChallengeTable
from certkeeper.config import CertificateConfig, Config
from certkeeper.errors import ConfigError, LocalError
from certkeeper.runner import Renewer, RenewReport, format_outcome
from certkeeper.web import WebServer

log = logging.getLogger(__name__)

CHECK_INTERVAL = timedelta(hours=12)  # twice a day
MIN_DELAY = timedelta(seconds=30)  # an extra check is never sooner than this
STOP_GRACE = 3.0  # seconds renewals in progress get at SIGTERM (the whole stop stays under 5 s)
ROTATION_INTERVAL = timedelta(hours=1)


def command_run(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``certkeeper run [-d]``."""
    foreground = bool(getattr(args, "foreground", False))
    daemon = Daemon(config)
    daemon.bind()
    if not foreground:
        detach()
    logs.setup_daemon(foreground, max(int(getattr(args, "verbose", 0) or 0), 1))
    write_pid_file(config.pid_file)
    try:
        code = asyncio.run(daemon.run())
    finally:
        remove_pid_file(config.pid_file)
    logging.shutdown()
    if daemon.abandoned:
        os._exit(code)  # worker threads still in an order: do not wait for them (see the module comment)
    return code


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
    """Write our pid atomically (temp file, fsync, rename)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        raise LocalError(f"{path}: cannot write the pid file: {exc.strerror or exc}") from None


def remove_pid_file(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def _optional(name: str) -> ModuleType | None:
    """A certkeeper module written by another part of the project, if present."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


# ---------------------------------------------------------------------------
# Optional parts: the one place where they are composed.


class Extensions:
    """MTA-STS publishing, DKIM rotation, alerts and metrics, each when its module exists.

    Every method is blocking and runs in a worker thread; a failure is logged
    as one line and never stops the daemon.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mtasts_publish = _optional("certkeeper.mtasts_publish")
        self.rotation = _optional("certkeeper.rotation")
        alerts = _optional("certkeeper.alerts")
        self.alerter = alerts.Alerter(config) if alerts is not None and hasattr(alerts, "Alerter") else None
        self.metrics = _optional("certkeeper.metrics")

    def publish_mta_sts(self) -> None:
        """Start and SIGHUP: publish each policy's id (the policy is served by then)."""
        if self.mtasts_publish is not None and self.config.mta_sts:
            self._guard("MTA-STS publishing", lambda: self.mtasts_publish.publish_all(self.config, _log_line))

    def rotate_dkim(self) -> None:
        if self.rotation is not None and self.config.dkim:
            self._guard("DKIM rotation", lambda: self.rotation.run_due(self.config, datetime.now(UTC), _log_line))

    def renewal_report(self, report: RenewReport) -> None:
        if self.alerter is None:
            return
        for outcome in report.outcomes:
            if outcome.status == "failed":
                serving = _serving_not_after(self.config, outcome.name)
                self._guard("alert", lambda o=outcome, s=serving: self.alerter.renewal_failed(o.name, o.detail, s))
            else:
                self._guard("alert", lambda o=outcome: self.alerter.renewal_succeeded(o.name, o.not_after))

    def check_expiry(self) -> None:
        if self.alerter is not None:
            self._guard("expiry check", self.alerter.check_expiry)

    def start_metrics(self, daemon: Daemon) -> None:
        # The metrics module's API is not settled yet; the lead wires it here, e.g.
        # ``self.metrics.serve(self.config, daemon)`` when ``[metrics] listen`` is set.
        if self.metrics is not None and self.config.metrics.listen and hasattr(self.metrics, "serve"):
            self._guard("metrics", lambda: self.metrics.serve(self.config))

    @staticmethod
    def _guard(what: str, work: Callable[[], object]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - one optional part must never stop the daemon
            log.error("%s failed: %s", what, " ".join(str(exc).split()) or type(exc).__name__)


def _log_line(line: str) -> None:
    log.info("%s", line)


def _serving_not_after(config: Config, name: str) -> datetime | None:
    from certkeeper import certs
    from certkeeper.store import CertificateStore

    try:
        on_disk = CertificateStore(config.state_dir).read(config.certificate(name))
        return certs.parse_cert(on_disk.cert).not_after if on_disk else None
    except (KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------
# The daemon.


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.challenges = ChallengeTable()
        self.web = WebServer(config, self.challenges)
        self.renewer = Renewer(config, self.challenges, on_installed=self._installed)
        self.extensions = Extensions(config)
        self.workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="daemon")
        self.started = datetime.now(UTC)
        self.abandoned = False
        self._control_socket: Any = None
        self._inflight: set[Future[Any]] = set()

    # -- life cycle ----------------------------------------------------------------

    def bind(self) -> None:
        """Listeners and control socket, before detaching (errors reach the terminal)."""
        self._control_socket = control.bind_socket(self.config.control_socket)
        try:
            self.web.bind()
        except LocalError:
            self._control_socket.close()
            self.config.control_socket.unlink(missing_ok=True)
            raise

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.check_lock = asyncio.Lock()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if self._control_socket is None:
            self.bind()
        self.control = control.ControlServer(self._control_socket, self.config.control_socket,
                                             {"renew": self.command_renew, "status": self.command_status})
        await self.web.start()
        await self.control.start()
        self.scheduler = self._start_scheduler()
        log.info("started (pid %d): %d certificate(s), control socket %s", os.getpid(),
                 len(self.config.certificates), self.config.control_socket)
        self._spawn(self.startup())
        await self.stopping.wait()
        await self.stop()
        return 0

    async def startup(self) -> None:
        await self.check("start-up")
        await self._in_thread(self.extensions.publish_mta_sts)
        await self._in_thread(lambda: self.extensions.start_metrics(self))

    async def stop(self) -> None:
        log.info("stopping")
        self.scheduler.shutdown(wait=False)
        await self.control.stop()
        await self.web.stop()
        pending = [asyncio.wrap_future(f) for f in self._inflight if not f.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=STOP_GRACE)
            if still:
                self.abandoned = True
                log.warning("abandoning %d task(s) in progress; an interrupted install is finished or discarded "
                            "at the next start", len(still))
        self.workers.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        task.add_done_callback(_log_task_failure)

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        future = self.workers.submit(work)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return await asyncio.wrap_future(future)

    # -- scheduling -------------------------------------------------------------------

    def _start_scheduler(self) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(timezone=UTC, event_loop=self.loop)
        first = datetime.now(UTC) + timedelta(seconds=random.uniform(0, CHECK_INTERVAL.total_seconds()))
        scheduler.add_job(self.check, IntervalTrigger(seconds=CHECK_INTERVAL.total_seconds(), start_date=first),
                          args=["twice-daily check"], id="check", coalesce=True, max_instances=1)
        scheduler.add_job(self.hourly, IntervalTrigger(seconds=ROTATION_INTERVAL.total_seconds()), id="hourly",
                          coalesce=True, max_instances=1)
        scheduler.start()
        return scheduler

    async def check(self, why: str) -> RenewReport | None:
        """Renew whatever is due; then schedule the soonest next time an outcome names."""
        async with self.check_lock:
            log.info("renewal check (%s)", why)
            try:
                report = await self._renew(None, False, _log_line)
            except Exception as exc:  # noqa: BLE001 - a failed check is retried at the next one
                log.error("renewal check failed: %s", " ".join(str(exc).split()))
                self._schedule_extra(datetime.now(UTC) + timedelta(minutes=10), "retry of a failed check")
                return None
            self._schedule_from(report)
            return report

    async def hourly(self) -> None:
        await self._in_thread(self.extensions.rotate_dkim)
        await self._in_thread(self.extensions.check_expiry)

    def _schedule_from(self, report: RenewReport) -> None:
        times = [o.next_renewal for o in report.outcomes if o.next_renewal is not None]
        if times:
            self._schedule_extra(min(times), "the soonest planned renewal or retry")

    def _schedule_extra(self, when: datetime, why: str) -> None:
        """One extra check at ``when`` if that is before every check already planned."""
        when = max(when, datetime.now(UTC) + MIN_DELAY)
        planned = [job.next_run_time for job in self.scheduler.get_jobs() if job.id in ("check", "soonest")]
        if any(t is not None and t <= when for t in planned):
            return
        self.scheduler.add_job(self.check, DateTrigger(when), args=[why], id="soonest", replace_existing=True)
        log.info("next renewal check at %s (%s)", when.strftime("%Y-%m-%d %H:%M:%S UTC"), why)

    # -- work -----------------------------------------------------------------------

    async def _renew(self, names: Sequence[str] | None, force: bool, progress: Callable[[str], None]) -> RenewReport:
        renewer = self.renewer
        report: RenewReport = await self._in_thread(lambda: renewer.renew(names, force=force, progress=progress))
        await self._in_thread(lambda: self.extensions.renewal_report(report))
        return report

    def _installed(self, cert: CertificateConfig) -> None:
        """Renewer callback, in its worker thread: serve the new certificate from the next handshake."""
        self.web.on_installed(cert)

    async def command_renew(self, payload: dict[str, Any], emit: Callable[[str], None]) -> int:
        names = payload.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            emit("certkeeper: names must be a list of certificate names")
            return 1

        def progress(line: str) -> None:  # called from order threads
            log.info("%s", line)
            self.loop.call_soon_threadsafe(emit, line)

        report = await self._renew(names or None, bool(payload.get("force")), progress)
        for outcome in report.outcomes:
            emit(format_outcome(outcome))
        self._schedule_from(report)
        return report.exit_code

    async def command_status(self, payload: dict[str, Any], emit: Callable[[str], None]) -> int:
        names = [n for n in payload.get("names") or [] if isinstance(n, str)]
        text = await self._in_thread(lambda: self._status_text(names, bool(payload.get("json"))))
        for line in text.splitlines():
            emit(line)
        return 0

    def _status_text(self, names: list[str], as_json: bool) -> str:
        status = _optional("certkeeper.status")
        if status is None:
            return "\n".join(self.daemon_lines()) + "\n"
        doc = status.collect(self.config, names or None)
        if as_json:
            doc["daemon"] = self.daemon_facts()
            return json.dumps(doc, indent=2) + "\n"
        text = io.StringIO()
        text.write(status.render_text(doc))
        text.write("\n" + "\n".join(self.daemon_lines()) + "\n")
        return text.getvalue()

    def daemon_facts(self) -> dict[str, Any]:
        jobs = {job.id: job.next_run_time for job in self.scheduler.get_jobs()}
        upcoming = [t for k, t in jobs.items() if k in ("check", "soonest") and t is not None]
        return {
            "pid": os.getpid(),
            "started": self.started.isoformat(),
            "next_check": min(upcoming).astimezone(UTC).isoformat() if upcoming else None,
            "serving": list(self.web.tls.names_loaded()),
        }

    def daemon_lines(self) -> list[str]:
        facts = self.daemon_facts()
        return [f"daemon: pid {facts['pid']}, running since {facts['started']}",
                f"daemon: next renewal check {facts['next_check'] or 'not planned'}",
                f"daemon: serving {', '.join(facts['serving']) or 'no certificate yet'} over HTTPS"]

    # -- SIGHUP ---------------------------------------------------------------------

    async def reload(self) -> None:
        try:
            new = await asyncio.to_thread(config_module.load, self.config.path)
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the running one: %s", "; ".join(exc.lines))
            return
        if (new.control_socket, new.state_dir) != (self.config.control_socket, self.config.state_dir):
            log.warning("control_socket or state_dir changed; restart certkeeper to apply")
        self.config = new
        self.web.reload(new)
        self.renewer = self._renewer_for(new)
        self.extensions = Extensions(new)
        log.info("configuration reloaded: %d certificate(s)", len(new.certificates))
        await self.check("configuration reloaded")
        await self._in_thread(self.extensions.publish_mta_sts)

    def _renewer_for(self, config: Config) -> Renewer:
        renewer = Renewer(config, self.challenges, on_installed=self._installed)
        # Keep the per-certificate locks, so a renewal started before the reload and one started
        # after it never run at once for the same certificate.
        renewer._locks, renewer._locks_guard = self.renewer._locks, self.renewer._locks_guard  # noqa: SLF001
        return renewer


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("internal error: %s: %s", type(exc).__name__, " ".join(str(exc).split()))

