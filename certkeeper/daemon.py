"""``certkeeper run [-d]``: the long-running service (rc.d ``certkeeper``).

This process is the **keeper** (certkeeper(8), PRIVILEGE SEPARATION): it runs
as root, holds every key and file, runs the hooks, and never opens an INET
socket nor imports aiohttp, acme, requests or dnspython's resolver. What talks
to the Internet runs in two unprivileged kinds of process it starts
(``certkeeper.privsep``): the **listener** (ports 80/443 and metrics, bound as
root, then dropped to ``user``) and a **network worker** per job (ACME, DNS,
probes, mail), which asks this process for anything that needs root and is
answered by ``certkeeper.keeper.service``. This module is composition only. It
owns the process behaviour:

- **Start**: the control socket and the listener's sockets are bound before the
  parent returns, so "address in use" or a daemon already running (``control``
  holds an ``flock`` on ``SOCKET.lock``) reaches the terminal (exit 1): without
  ``-d`` the process detaches (double fork, setsid, stdio to /dev/null) and the
  original process exits only once the daemon says it is ready (or why not);
  it then logs to syslog (facility daemon); with ``-d`` it stays in the
  foreground and logs to stderr. The pid file is written once the final pid is
  known and removed at exit. The state directory's owners and modes are set for
  the roles (``core.layout``), converting a directory of an older version.
- **Schedule** (APScheduler ``AsyncIOScheduler``): a renewal check at start-up
  (missing or due certificates are obtained at once), then twice a day at a
  random second, plus one extra check at the soonest time an outcome names (a
  planned renewal, an ARI window, or the end of a failure backoff: 1 min,
  10 min, 100 min, then daily, never before Retry-After; the state is on disk,
  so it survives a restart). Checks never overlap. Certificates due together
  are ordered concurrently, at most ``[acme] concurrency`` at a time.
- **HTTP-01**: the worker sends each challenge here; the keeper has the
  listener answer it and acknowledges only then, before the ACME server is
  told to validate. After an install of an [[mta_sts]] host's certificate, the
  listener is handed the new set; it never gets the mail host's.
- **Workers that misbehave**: a refused request (a path, certificate, hook or
  selector the configuration does not name), a malformed frame, a worker that
  exits without a result or stays silent longer than ``idle_timeout`` (one
  order + one DNS propagation wait + the slowest hook, plus a minute) ends the
  job as an error (a check is retried in 10 minutes); the process is killed if
  still running and its challenges leave the listener. Whatever way a worker
  ended, the listener is handed the sets on disk again; when it ended without a
  result, the certificates whose hooks an install still owes (the store's reload
  markers: the dead worker would have run them) get a renew worker of their own
  at once, which runs and verifies those hooks as after a renewal (one such
  follow-up per death; if it dies too, the next check tries again).
- **DKIM steps** run at their exact time: each DKIM run (start-up, hourly,
  a date job) returns when the next step is due, and a date job is planned
  then; ``rotate-dkim`` asks the daemon (``schedule-dkim`` on the control
  socket) to plan from the state it just wrote.
- **[fleet]**: one long-running fleet-watch worker (``Daemon.fleet_watch``):
  other hosts' HTTP-01 tokens for this host's names go to the listener, and a
  rotator that died (its lease expired) makes the DKIM job run here at once.
- **Control socket**: ``renew [--force] [NAME...]`` runs a worker, with progress
  lines streamed back; ``status`` is read here (no worker, no network). The
  keeper holds one lock per certificate name around each renew worker.
- **Metrics** (``[metrics] listen``): rendered here from the state on disk and
  handed to the listener, which serves them (every ``METRICS_EVERY`` and after
  each job).
- **SIGHUP** re-reads the configuration (one reload at a time), all or nothing:
  it must parse and everything it names must be usable here
  (``keeper.preflight``: the listener's certificate and key files, account
  keys, EAB, TSIG and fleet files, CA bundles, hook and alert commands, the
  user); otherwise one line says why (naming the file) and the running one is
  kept, unchanged (workers get the text the keeper runs with, never the broken
  file). A good one is sent to the listener (host names, policies), then its
  certificates (should that fail, the listener is put back as it was); then a
  check runs so new certificates are obtained at once, then MTA-STS ids are
  published. Listen addresses and ``user`` need a restart.
- **SIGTERM/SIGINT** stop within 5 s (one that comes after the pid file is
  written but before the loop runs is held, then handled): the scheduler and the control socket
  stop taking work; workers in progress get ``STOP_GRACE`` seconds to finish
  (the listener still answers their challenges) and are killed after that;
  then the listener stops. The store makes installs crash-safe (temp files +
  journal, finished or discarded by ``recover`` at the next start), so no
  half-written certificate set is ever left behind.
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

from certkeeper import control, privsep, protocol
from certkeeper.core import config as config_module
from certkeeper.core import files, layout
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import CertkeeperError, ConfigError, LocalError
from certkeeper.keeper.service import LocalKeeper
from certkeeper.keeper.store import CertificateStore

log = logging.getLogger(__name__)

CHECK_INTERVAL = timedelta(hours=12)  # twice a day
MIN_DELAY = timedelta(seconds=30)  # an extra check is never sooner than this
DKIM_MIN_DELAY = timedelta(seconds=1)  # a DKIM step runs at its time (a failed one is retried by rotation)
STOP_GRACE = 2.5  # seconds workers in progress get at SIGTERM (the whole stop stays under 5 s)
HOURLY = timedelta(hours=1)
METRICS_EVERY = timedelta(seconds=15)  # how stale /metrics may be at most
RECONCILE_EVERY = timedelta(minutes=1)  # how soon a dead listener is started again
FLEET_WATCH_RETRY = 10.0  # seconds before a fleet-watch worker that ended is started again

_HELD: list[int] = []  # signals that came between hold_signals() and the loop's handlers


def hold_signals() -> None:
    """Until ``Daemon.run`` handles them, SIGTERM, SIGINT and SIGHUP are remembered, not fatal."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: _HELD.append(number))


def _log_line(line: str) -> None:
    log.info("%s", line.removeprefix("certkeeper: "))  # the log's own prefix says it already


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


def detach() -> Callable[[str], None]:
    """Become a daemon: double fork, new session, cwd /, stdio on /dev/null.

    The original process waits until the daemon calls the returned function:
    with "" it exits 0; with an error it prints it and exits 1 (so "address in
    use" still reaches the terminal, though the listener binds after the fork).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    readfd, writefd = os.pipe()
    if os.fork() > 0:
        os.close(writefd)
        with os.fdopen(readfd, "rb") as pipe:
            word = pipe.read().decode("utf-8", errors="replace")
        if word == "ok":
            os._exit(0)
        print(word.strip() or "certkeeper: the daemon ended before it was ready", file=sys.stderr)
        os._exit(1)
    os.close(readfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)

    def ready(error: str) -> None:
        with contextlib.suppress(OSError):
            os.write(writefd, (error or "ok").encode())
            os.close(writefd)

    return ready


def write_pid_file(path: Path) -> None:
    """Write our pid atomically (``files.write_atomic``: temp file, fsync, rename)."""
    files.write_atomic(path, f"{os.getpid()}\n".encode(), mode=0o644)


def remove_pid_file(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


# ---------------------------------------------------------------------------
# The daemon.


class Daemon:
    def __init__(self, config: Config, config_text: str, foreground: bool = True, verbosity: int = 1) -> None:
        self.config = config
        self.config_text = config_text
        self.foreground = foreground
        self.verbosity = verbosity
        self.listener = privsep.ListenerLink(config, config_text, foreground, verbosity)
        self.store = CertificateStore(config.state_dir)
        self.started = datetime.now(UTC)
        self.workers: set[privsep.WorkerProcess] = set()
        self.name_locks: dict[str, asyncio.Lock] = {}
        self.job_locks: dict[str, asyncio.Lock] = {}  # one run of each background job at a time
        self.control: control.ControlServer | None = None
        self.watcher: privsep.WorkerProcess | None = None  # [fleet]: the long-running fleet-watch worker
        self.watch_again = asyncio.Event()  # SIGHUP: the fleet-watch worker starts again with the new config
        self.watching = False  # the fleet-watch loop runs
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life cycle ----------------------------------------------------------------

    def bind(self) -> None:
        """Control socket and listener (errors reach the terminal), the state directory set for the roles."""
        layout.prepare(self.config, privsep.identity(self.config))
        for cert in self.config.certificates:  # installs a crash interrupted: finished or discarded first
            try:
                self.store.recover(cert)
            except (CertkeeperError, OSError) as exc:
                log.error("%s: %s", cert.name, exc)
        path = self.config.control_socket
        self.control = control.ControlServer.bind(path, {"renew": self.command_renew, "status": self.command_status,
                                                     "schedule-dkim": self.command_schedule_dkim})
        try:
            for address in self.listener.start():
                log.info("listening on %s", address)
            self.listener.serve_certificates(self.config, self.store)
        except (LocalError, OSError) as exc:
            self.listener.stop()
            self.control.close()  # removes the socket file only if it is still ours
            raise LocalError(str(exc)) from None

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.check_lock = asyncio.Lock()
        self.reload_lock = asyncio.Lock()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        for held in _HELD:  # came before the handlers above
            if held == signal.SIGHUP:
                self._spawn(self.reload())
            else:
                self.stopping.set()
        _HELD.clear()
        write_pid_file(self.config.pid_file)  # once a SIGTERM is sure to stop it cleanly
        if self.control is None:
            self.bind()
        assert self.control is not None
        await self.control.start()
        self.scheduler = self._start_scheduler()
        log.info("started (pid %d): %d certificate(s), control socket %s", os.getpid(),
                 len(self.config.certificates), self.config.control_socket)
        self._spawn(self.startup())
        self._spawn(self.fleet_watch())
        await self.stopping.wait()
        await self.stop()
        return 0

    async def startup(self) -> None:
        await self.push_metrics()
        await self.check("start-up")
        await self.background("publish")
        await self.background("hourly")  # DKIM steps and expiry warnings due now wait for no hour

    async def stop(self) -> None:
        """No new work; workers get ``STOP_GRACE`` with the listener still up (HTTP-01), then go."""
        log.info("stopping")
        self.scheduler.shutdown(wait=False)
        self._end_watcher()
        if self.control is not None:
            await self.control.stop()
        running = [w for w in self.workers if w.proc is not None]
        if running:
            deadline = self.loop.time() + STOP_GRACE
            while any(w.proc is not None and w.proc.poll() is None for w in running) and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
            still = [w for w in running if w.proc is not None and w.proc.poll() is None]
            if still:
                log.warning("stopping %d worker(s) in progress; an interrupted install is finished or discarded "
                            "at the next start", len(still))
                for w in still:
                    w.cancelled = True
                    w.kill()
        await asyncio.to_thread(self.listener.stop)
        log.info("stopped")

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
        if self.config.metrics.listen:
            scheduler.add_job(self.push_metrics, IntervalTrigger(seconds=METRICS_EVERY.total_seconds()),
                              id="metrics", coalesce=True, max_instances=1)
        scheduler.add_job(self.reconcile, IntervalTrigger(seconds=RECONCILE_EVERY.total_seconds()), id="reconcile",
                          coalesce=True, max_instances=1)
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
                _, soonest = await self.run_worker(job, {}, _log_line)
                if job == "publish":
                    # The history may have changed what is served (a withdrawal finished): rebuild it.
                    await asyncio.to_thread(self._reconfigure_listener, self.config_text)
            except Exception as exc:  # noqa: BLE001 - logged; the next run tries again
                log.error("%s failed: %s", job, " ".join(str(exc).split()))
                return
        if job == "publish":
            if soonest is not None and not self.stopping.is_set():
                when = max(soonest, datetime.now(UTC) + MIN_DELAY)
                self.scheduler.add_job(self.background, DateTrigger(when), args=["publish"], id="publish-soon",
                                       replace_existing=True)
        if job == "hourly" and soonest is not None:
            self.schedule_dkim(soonest)

    def schedule_dkim(self, when: datetime) -> datetime | None:
        """The next DKIM step runs at its time (an APScheduler date job), not at the next hourly sweep.

        Returns the time planned, None when the hourly sweep comes first (or the daemon stops)."""
        if self.stopping.is_set():
            return None
        when = max(when, datetime.now(UTC) + DKIM_MIN_DELAY)
        hourly = self.scheduler.get_job("hourly")
        if hourly is not None and hourly.next_run_time is not None and hourly.next_run_time <= when:
            if self.scheduler.get_job("dkim-step") is not None:
                self.scheduler.remove_job("dkim-step")
            return None
        self.scheduler.add_job(self.background, DateTrigger(when), args=["hourly"], id="dkim-step",
                               replace_existing=True)
        log.info("next DKIM step at %s", when.strftime("%Y-%m-%d %H:%M:%S UTC"))
        return when

    async def command_schedule_dkim(self, payload: dict[str, Any], emit: Callable[[str], None]) -> int:
        """``rotate-dkim`` tells the daemon that the DKIM state changed: a DKIM run (a worker, as every
        hour) does what is due and names the next step's time, which a date job is planned for."""
        if not self.config.dkim:
            emit("daemon: no [[dkim]] table is configured")
            return 0
        await self.background("hourly")
        step = self.scheduler.get_job("dkim-step")
        hourly = self.scheduler.get_job("hourly")
        when = step.next_run_time if step is not None else hourly.next_run_time if hourly is not None else None
        emit(f"daemon: next DKIM run at {when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if when is not None
             else "daemon: no DKIM run is planned")
        return 0

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

    # -- [fleet] -----------------------------------------------------------------------

    async def fleet_watch(self) -> None:
        """[fleet]: one long-running fleet-watch worker (``network.fleet.watch``, unprivileged like every
        worker): it hands the other hosts' HTTP-01 tokens for this host's names to this keeper, whose listener
        answers them, and asks for the DKIM job at once when a rotator's lease expires without it resigning,
        so a rotation a dead host left is taken over within the lease TTL. Started again if it ends."""
        self.watching = True
        try:
            await self._fleet_watch()
        finally:
            self.watching = False

    async def _fleet_watch(self) -> None:
        while not self.stopping.is_set() and self.config.fleet.enabled:
            config, text = self.config, self.config_text
            worker = privsep.WorkerProcess(config, text, "fleet-watch", {}, self.foreground, self.verbosity)
            challenges = privsep.ListenerChallenges(self.listener)
            keeper = LocalKeeper(config, challenges, self.installed, self.store, on_takeover=self._takeover)
            self.watcher = worker
            self.watch_again.clear()
            try:
                await asyncio.to_thread(worker.start)
                await asyncio.to_thread(worker.serve, keeper, _log_line, privsep.idle_timeout(config))
            except Exception as exc:  # noqa: BLE001 - logged; started again
                if not worker.cancelled:
                    log.error("fleet watch: %s", " ".join(str(exc).split()))
            finally:
                worker.cancelled = True
                worker.kill()
                self.watcher = None
                await asyncio.to_thread(challenges.clear)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping_or_reloaded(), FLEET_WATCH_RETRY)

    async def _stopping_or_reloaded(self) -> None:
        done, pending = await asyncio.wait([asyncio.ensure_future(self.stopping.wait()),
                                            asyncio.ensure_future(self.watch_again.wait())],
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    def _end_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.cancelled = True
            self.watcher.kill()

    def _takeover(self, leader: str) -> None:
        """In the fleet-watch worker's thread: a rotator died; this host's DKIM job runs now (after one in
        progress: runs of a job never overlap) and, if it wins the election, finishes the rotation."""
        log.info("fleet: %s stopped without resigning; running the DKIM job now", leader)
        asyncio.run_coroutine_threadsafe(self.background("hourly"), self.loop)

    # -- work -----------------------------------------------------------------------

    async def run_worker(self, job: str, args: dict[str, Any], emit: Callable[[str], None],
                         follow_up: bool = True) -> tuple[int, datetime | None]:
        """One network worker for ``job``, answered by a keeper of this configuration, in a thread.

        ``follow_up``: if it ends without a result, reload the services an install left behind
        (``reload_services``)."""
        if self.stopping.is_set():
            raise LocalError(f"not starting a {job} worker: the daemon is stopping")
        if not self.listener.alive():
            await self.reconcile()  # HTTP-01 needs it
        config, text = self.config, self.config_text
        worker = privsep.WorkerProcess(config, text, job, args, self.foreground, self.verbosity)
        challenges = privsep.ListenerChallenges(self.listener)
        keeper = LocalKeeper(config, challenges, self.installed, self.store,
                             dry_run=job == "renew" and bool(args.get("dry_run")), on_policies=self._rebuild_policies)
        self.workers.add(worker)
        ended = False
        try:
            await asyncio.to_thread(worker.start)
            result = await asyncio.to_thread(worker.serve, keeper, emit, privsep.idle_timeout(config))
            ended = True
            return result.code, result.soonest
        finally:
            worker.kill()
            self.workers.discard(worker)
            await asyncio.to_thread(challenges.clear)
            self._spawn(self.reconcile())  # whatever way the worker ended, serve what is on disk
            self._spawn(self.push_metrics())
            if not ended and follow_up and not worker.cancelled and not keeper.dry_run:
                self._spawn(self.reload_services())

    async def renew(self, args: dict[str, Any], emit: Callable[[str], None],
                    follow_up: bool = True) -> tuple[int, datetime | None]:
        """A renew worker, holding the daemon's lock of every certificate it may touch.

        Two renewals of one certificate never run at once: a request for some names
        waits only for work on those names; a check of all names waits for all.
        """
        names = args.get("names") or list(self.config.certificate_names())
        locks = [self.name_locks.setdefault(name, asyncio.Lock()) for name in sorted(set(names))]
        async with contextlib.AsyncExitStack() as held:
            for lock in locks:  # always in name order, so two requests cannot deadlock
                await held.enter_async_context(lock)
            return await self.run_worker("renew", args, emit, follow_up)

    async def reload_services(self) -> None:
        """A worker died: certificates an install left with hooks still owed (``CertificateStore.pending_reload``)
        get a renew worker for just those names now, which finds them owed (``LocalKeeper.inspect``) and runs
        and verifies their hooks as after a renewal; nothing is ordered unless it is due anyway."""
        if self.stopping.is_set():
            return
        config, store = self.config, self.store
        names = await asyncio.to_thread(lambda: [c.name for c in config.certificates if store.pending_reload(c)])
        if not names:
            return
        log.warning("%s: a worker died before the services loaded the certificate on disk; reloading them",
                    ", ".join(names))
        try:
            await self.renew({"names": names, "force": False}, _log_line, follow_up=False)
        except Exception as exc:  # noqa: BLE001 - the next check finds them owed again
            log.error("reloading the services of %s failed: %s; the next check tries again", ", ".join(names),
                      " ".join(str(exc).split()))

    def installed(self, cert: CertificateConfig) -> None:
        """The keeper installed (or restored) a set, in a worker's thread: the listener serves it if it is its."""
        if cert.name not in {c.name for c in self.config.listener_certificates()}:
            return
        try:
            self.listener.serve_certificates(self.config, self.store)
            log.info("%s: serving the new certificate to new connections", cert.name)
        except (LocalError, OSError) as exc:
            log.error("%s: the listener did not take the new certificate: %s", cert.name, exc)

    async def reconcile(self) -> None:
        """The listener runs and serves the sets on disk: restarted if it died, handed the sets again
        (an install a worker's death interrupted is finished first, by the store)."""
        if self.stopping.is_set():
            return
        async with self.job_locks.setdefault("reconcile", asyncio.Lock()):
            try:
                if not self.listener.alive():
                    log.error("the listener is gone; starting it again")
                    await asyncio.to_thread(self.listener.stop)
                    await asyncio.to_thread(self.listener.start)
                    self._spawn(self.push_metrics())
                before = self.listener.serving
                served = await asyncio.to_thread(self.listener.serve_certificates, self.config, self.store)
                if served != before:
                    log.info("serving %s over HTTPS", ", ".join(served) or "no certificate")
            except (CertkeeperError, OSError) as exc:
                log.error("listener: %s", exc)

    async def push_metrics(self) -> None:
        """Render /metrics from the state on disk and hand it to the listener."""
        if not self.config.metrics.listen:
            return
        from certkeeper.keeper import metrics

        try:
            text = await asyncio.to_thread(metrics.render, self.config, self.started)
            await asyncio.to_thread(self.listener.request, protocol.Metrics(text.decode()))
        except (CertkeeperError, OSError) as exc:
            log.error("metrics: %s", exc)

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

        args: dict[str, Any] = {"names": names, "force": bool(payload.get("force")), "roll": bool(payload.get("roll"))}
        if payload.get("dry_run"):  # the staging directory; the keeper installs nothing, runs no hook
            directory = payload.get("directory")
            if not isinstance(directory, str) or not directory.startswith("https://"):
                emit("certkeeper: renew --dry-run needs an https:// directory")
                return 1
            args.update(dry_run=True, directory=directory)
        if payload.get("revoke"):  # `certkeeper revoke NAME`: one certificate, a known reason
            if len(names) != 1 or payload["revoke"] not in config_module.REVOCATION_REASONS:
                emit("certkeeper: revoke takes one certificate name and a known reason")
                return 1
            args["revoke"] = payload["revoke"]
        code, soonest = await self.renew(args, both)
        if soonest is not None and not args.get("dry_run"):
            self._schedule_extra(soonest, "the soonest planned renewal or retry")
        return code

    async def command_status(self, payload: dict[str, Any], emit: Callable[[str], None]) -> int:
        """Read here, by the keeper: the files, the state and the last verification; no worker, no network."""
        from certkeeper.keeper import status

        names = [n for n in payload.get("names") or [] if isinstance(n, str)]
        try:
            doc = await asyncio.to_thread(status.collect, self.config, names or None)
        except CertkeeperError as exc:
            emit(f"certkeeper: {exc}")
            return 1
        if payload.get("json"):
            doc["daemon"] = self.daemon_facts()
            text = json.dumps(doc, indent=2)
        else:
            text = status.render_text(doc) + "\n" + "\n".join(self.daemon_lines())
        for line in text.splitlines():
            emit(line)
        return 0

    def daemon_facts(self) -> dict[str, Any]:
        jobs = {job.id: job.next_run_time for job in self.scheduler.get_jobs()}
        upcoming = [t for k, t in jobs.items() if k in ("check", "soonest") and t is not None]
        return {
            "pid": os.getpid(),
            "started": _iso(self.started),
            "next_check": _iso(min(upcoming)) if upcoming else None,
            "serving": list(self.listener.serving),
            "workers": sorted(w.job for w in self.workers),
        }

    def daemon_lines(self) -> list[str]:
        facts = self.daemon_facts()
        return [f"daemon: pid {facts['pid']}, running since {facts['started']}",
                f"daemon: next renewal check {facts['next_check'] or 'not planned'}",
                f"daemon: serving {', '.join(facts['serving']) or 'no certificate yet'} over HTTPS"]

    # -- SIGHUP ---------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP. Reloads run one at a time; a bad file (or one the listener refuses) changes nothing."""
        async with self.reload_lock:
            if self.stopping.is_set():
                return
            try:
                text, new = await asyncio.to_thread(read_config, self.config.path)
                from certkeeper.keeper import preflight

                problems = await asyncio.to_thread(preflight.problems, new, self.config)
                if problems:
                    raise ConfigError(problems)
                await asyncio.to_thread(self._reconfigure_listener, text)
            except ConfigError as exc:
                log.error("configuration not reloaded, keeping the running one: %s", "; ".join(exc.lines))
                return
            except (CertkeeperError, OSError) as exc:
                log.error("configuration not reloaded, keeping the running one: %s", exc)
                return
            if (new.control_socket, new.state_dir, new.user, new.group) != (
                    self.config.control_socket, self.config.state_dir, self.config.user, self.config.group):
                log.warning("control_socket, state_dir, user or group changed; restart certkeeper to apply")
            if (new.http, new.metrics) != (self.config.http, self.config.metrics):
                log.warning("[http] or [metrics] listen addresses changed; restart certkeeper to listen on them")
            old, old_text, old_store = self.config, self.config_text, self.store
            store = CertificateStore(new.state_dir)
            try:
                await asyncio.to_thread(self.listener.serve_certificates, new, store)
            except (CertkeeperError, OSError) as exc:  # back as it was: nothing switched
                with contextlib.suppress(CertkeeperError, OSError):
                    await asyncio.to_thread(self._reconfigure_listener, old_text)
                    await asyncio.to_thread(self.listener.serve_certificates, old, old_store)
                log.error("configuration not reloaded, keeping the running one: the listener: %s", exc)
                return
            self.config, self.config_text, self.store = new, text, store
            # A listener started again later (it died) starts from this configuration.
            self.listener.config, self.listener.config_text = new, text
            if new.fleet.enabled or self.watcher is not None:  # the watcher follows the new [fleet]
                self._end_watcher()
                self.watch_again.set()
                if not self.watching:
                    self._spawn(self.fleet_watch())
            log.info("configuration reloaded: %d certificate(s)", len(new.certificates))
        await self.push_metrics()
        await self.check("configuration reloaded")
        await self.background("publish")

    def _rebuild_policies(self) -> None:
        """[fleet], in a publish worker's thread, once it saved the fleet's MX names: the listener serves the
        policies they make before the worker checks them (the running configuration, the state files as now)."""
        self._reconfigure_listener(self.config_text)

    def _reconfigure_listener(self, text: str) -> None:
        protocol.expect(self.listener.request(protocol.Reconfigure(text)), protocol.Ok)


def read_config(path: Path) -> tuple[str, Config]:
    """The text and the parsed configuration (workers get the text the daemon runs with)."""
    text = config_module.read_text(path)
    return text, config_module.parse(text, path)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("internal error: %s: %s", type(exc).__name__, " ".join(str(exc).split()))


def _iso(when: datetime) -> str:
    """UTC, whole seconds, "Z": the time format of ``status --json``."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
