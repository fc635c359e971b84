"""The daemon's worker process: one job with the heavy libraries, then exit.

The daemon itself holds only the listeners, the scheduler and the control
socket. Every job that needs ACME, cryptography, DNS or mail (renewals, status,
MTA-STS publishing, DKIM rotation, alerts) runs here, in a child process
(``python -m certkeeper.worker``), so the long-running process stays small and
a job that crashes or leaks cannot take the listeners with it.

The protocol, JSON lines (render + parse side by side below):

- daemon → worker, stdin: first ``{"config_path", "config_text", "job",
  "args", "foreground", "verbosity"}`` (the configuration the daemon runs
  with, so a broken file on disk after a refused SIGHUP does not matter); then
  one ``ok`` line for each ``challenge`` message it serves (``no`` if it refuses one).
- worker → daemon, stdout: ``{"challenge": [TOKEN, KEY_AUTHORIZATION]}`` (the
  worker waits for the daemon's ``ok`` before the ACME server is told to
  validate), ``{"unchallenge": TOKEN}``, ``{"installed": NAME}`` (the daemon
  swaps its TLS context), ``{"line": TEXT}`` (progress and output), and last
  ``{"exit": CODE, "next": ISO-TIME | null}`` (the soonest time an outcome
  names: planned renewal, ARI window or end of backoff).

Logs go to syslog or stderr exactly as the daemon's do. This is also the one
place where the daemon's other work (``mtasts_publish``, ``rotation``,
``alerts``) is composed; a failure of one part is logged and never stops another.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from certkeeper.core import logs
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config, parse
from certkeeper.core.errors import CertkeeperError, ConfigError

log = logging.getLogger(__name__)

PUBLISH_RETRY = timedelta(minutes=10)  # after a failed MTA-STS/TLSRPT publication

JOBS = ("renew", "status", "publish", "hourly")


# ---------------------------------------------------------------------------
# Messages.


def render(**message: Any) -> bytes:
    return json.dumps(message).encode() + b"\n"


def parse_message(raw: bytes) -> tuple[str, Any]:
    """One worker → daemon message as (kind, value), checked against the protocol above.

    ``challenge`` → (token, key authorization); ``unchallenge``, ``installed``, ``line`` → str;
    ``exit`` → (code, soonest datetime or None). Anything else raises ``ValueError``.
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        data = None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"not a worker message: {raw[:80]!r}")
    kind = next(iter(data))
    value = data[kind]
    if kind == "challenge" and isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return kind, (value[0], value[1])
    if kind in ("unchallenge", "installed", "line") and isinstance(value, str):
        return kind, value
    if kind == "exit" and isinstance(value, int) and not isinstance(value, bool):
        return kind, (value, _soonest(data.get("next"), raw))
    raise ValueError(f"not a worker message: {raw[:80]!r}")


def _soonest(value: object, raw: bytes) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ValueError(f"not a worker message (bad time): {raw[:80]!r}")
    return when


class Channel:
    """The worker's end of the pipes; safe to use from the Renewer's order threads."""

    def __init__(self, out: IO[bytes], acks: IO[bytes]) -> None:
        self._out = out
        self._acks = acks
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        with self._lock:
            self._out.write(render(**message))
            self._out.flush()

    def ask(self, **message: Any) -> None:
        """Send and wait for the daemon's ``ok`` (it answers ``no`` to a message it refuses)."""
        with self._lock:
            self._out.write(render(**message))
            self._out.flush()
            if self._acks.readline().strip() != b"ok":
                raise CertkeeperError("the daemon did not accept the HTTP-01 challenge")

    def line(self, text: str) -> None:
        self.send(line=text)


class RelayedChallenges(ChallengeTable):
    """A ChallengeTable whose entries are also put in the daemon's table (it holds port 80)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def add(self, token: str, key_authorization: str) -> None:
        super().add(token, key_authorization)  # validates the token
        self._channel.ask(challenge=[token, key_authorization])

    def remove(self, token: str) -> None:
        super().remove(token)
        self._channel.send(unchallenge=token)


def _guard(what: str, work: Callable[[], object]) -> None:
    """Run one part of a job; a failure is logged as one line and never stops the other parts."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - one part must never stop another
        log.error("%s failed: %s", what, " ".join(str(exc).split()) or type(exc).__name__)


# ---------------------------------------------------------------------------
# Jobs. Each returns (exit code, soonest next time or None).


def job_renew(config: Config, args: dict[str, Any], channel: Channel) -> tuple[int, datetime | None]:
    from certkeeper.network.runner import Renewer, format_outcome

    renewer = Renewer(config, RelayedChallenges(channel),
                      on_installed=lambda cert: channel.send(installed=cert.name))
    report = renewer.renew(args.get("names") or None, force=bool(args.get("force")), progress=channel.line)
    for outcome in report.outcomes:
        channel.line(format_outcome(outcome))
    from certkeeper.network.alerts import Alerter

    Alerter(config).after_renewal(report.outcomes)
    times = [o.next_renewal for o in report.outcomes if o.next_renewal is not None]
    return report.exit_code, min(times) if times else None


def job_status(config: Config, args: dict[str, Any], channel: Channel) -> tuple[int, datetime | None]:
    from certkeeper.keeper import status

    doc = status.collect(config, args.get("names") or None)
    if args.get("json"):
        doc["daemon"] = args.get("daemon", {})
        text = json.dumps(doc, indent=2)
    else:
        text = status.render_text(doc)
    for line in text.splitlines():
        channel.line(line)
    return 0, None


def job_publish(config: Config, args: dict[str, Any], channel: Channel) -> tuple[int, datetime | None]:
    """Start-up and SIGHUP: publish each MTA-STS policy's id (the daemon serves the policy by then),
    and withdraw removed domains (RFC 8461 8.3); returns when a withdrawal can next progress."""
    from certkeeper.core import mtasts_state
    from certkeeper.network import mtasts_publish

    outcomes: list[mtasts_publish.Outcome] = []
    _guard("MTA-STS publishing", lambda: outcomes.extend(mtasts_publish.publish_all(config, channel.line)))
    times = [t for t in (mtasts_state.next_due(config),) if t is not None]
    if not outcomes and (config.mta_sts or config.tlsrpt.rua) or any(o.status == "failed" for o in outcomes):
        times.append(datetime.now(UTC) + PUBLISH_RETRY)  # a DNS server or the policy fetch failed: try again
    return 0, min(times, default=None)


def job_hourly(config: Config, args: dict[str, Any], channel: Channel) -> tuple[int, datetime | None]:
    """DKIM rotation steps that are due, and expiry warnings."""
    from certkeeper.network import rotation
    from certkeeper.network.alerts import Alerter

    if config.dkim:
        _guard("DKIM rotation", lambda: rotation.run_due(config, datetime.now(UTC), channel.line))
    _guard("expiry check", lambda: Alerter(config).check_expiry())
    return 0, None


# ---------------------------------------------------------------------------
# Entry point.


def main(stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> int:
    stdin = stdin or sys.stdin.buffer
    if stdout is None:
        # The channel gets a private copy of fd 1; fd 1 itself goes to stderr, so that
        # nothing a library prints can corrupt the messages.
        stdout = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    channel = Channel(stdout, stdin)
    request = json.loads(stdin.readline())
    logs.setup_daemon(bool(request.get("foreground")), int(request.get("verbosity", 1)))
    job = {"renew": job_renew, "status": job_status, "publish": job_publish, "hourly": job_hourly}[request["job"]]
    try:
        config = parse(request["config_text"], request["config_path"])
        code, soonest = job(config, request.get("args") or {}, channel)
    except ConfigError as exc:
        channel.line(f"certkeeper: {'; '.join(exc.lines)}")
        code, soonest = 1, None
    except CertkeeperError as exc:
        channel.line(f"certkeeper: {exc}")
        code, soonest = 1, None
    except Exception as exc:  # noqa: BLE001 - a bug: one line to the log (stderr is /dev/null when detached)
        message = " ".join(str(exc).split())
        log.error("%s job: internal error: %s: %s", request["job"], type(exc).__name__, message)
        channel.line(f"certkeeper: internal error: {type(exc).__name__}: {message}")
        code, soonest = 1, None
    channel.send(exit=code, next=soonest.isoformat() if soonest else None)
    return code


if __name__ == "__main__":
    sys.exit(main())
