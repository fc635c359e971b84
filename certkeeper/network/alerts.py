"""Alerts: tell the operator once when something breaks, once when it heals.

This module owns the ``[alerts]`` section's behaviour: failure *episodes*
(the first failure of a run of failures sends one mail; retries send nothing;
the first success after it sends one recovery mail), expiry warnings (a
certificate on disk within ``expiry_warning_days`` of its end, for any
reason, once per certificate serial), and delivery: SMTP to ``[alerts] smtp``
(the local MTA), or ``[alerts] sendmail`` (e.g. ``sendmail -t``), and the
``[alerts] command`` program with the same text on stdin. When SMTP fails (the
MTA is what broke), the mail goes to ``sendmail -t``, run by the keeper.
Whatever fails is logged at LOG_CRIT with the alert's text, and the text is
kept in ``STATE/alerts/undelivered-*.txt`` until an alert of its kind gets out.
A failure alert says what the services serve as measured by the last
verification, not what is assumed.

Episode state lives in ``STATE/alerts/alerts.json`` so that a restart neither
re-sends an alert nor forgets to send the recovery. An alert that could not
be delivered (the MTA is down) stays pending and is tried again at the next
event of its episode and hourly with the expiry check.

The daemon and the runner call :class:`Alerter`::

    alerter = Alerter(config)
    alerter.renewal_failed(name, error, serving_not_after)   # every failed attempt
    alerter.renewal_succeeded(name)                          # every success
    alerter.check_expiry(now)                                # e.g. hourly
    alerter.failed(key, what, error) / alerter.recovered(key, what)   # DKIM, hooks, ...
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certkeeper.core import certs, layout, state
from certkeeper.core.config import AlertsConfig, Config
from certkeeper.core.errors import CertkeeperError, LocalError
from certkeeper.core.files import set_aside, write_atomic, write_json_atomic
from certkeeper.core.times import parse_iso
from certkeeper.keeper.hooks import run_command
from certkeeper.keeper.service import fallback_sendmail
from certkeeper.keeper.store import CertificateStore
from certkeeper.network.keeper_client import Keeper

if TYPE_CHECKING:
    from email.message import EmailMessage

log = logging.getLogger(__name__)

STATE_FILE = "alerts.json"
SPOOL_PREFIX = "undelivered-"  # STATE/alerts/undelivered-KEY.txt: the text of an alert not delivered yet
SEND_TIMEOUT = 30.0  # seconds for one SMTP session or one program run


@dataclass(frozen=True)
class Alert:
    """One message: a subject line and a plain-text body."""

    subject: str
    body: str

    def text(self) -> str:
        """What ``[alerts] command`` reads on stdin: the subject, a blank line, the body."""
        return f"{self.subject}\n\n{self.body}"


# ---------------------------------------------------------------------------
# Delivery.


def render_mail(alert: Alert, alerts: AlertsConfig, now: datetime) -> EmailMessage:
    from email.message import EmailMessage  # the mail modules only when there is mail to send
    from email.utils import format_datetime, make_msgid

    msg = EmailMessage()
    msg["From"] = alerts.mail_from or f"certkeeper@{socket.getfqdn()}"
    msg["To"] = ", ".join(alerts.mail_to)
    msg["Subject"] = alert.subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=socket.getfqdn())
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 5: no auto-replies to this
    msg.set_content(alert.body)
    return msg


def deliver(alert: Alert, alerts: AlertsConfig, now: datetime, keeper: Keeper | None = None) -> bool:
    """Send through every configured channel; True when at least one took it.

    Mail goes to ``[alerts] smtp``; when that fails (the MTA is what broke), to ``sendmail -t``
    (``fallback_sendmail``). ``[alerts] command`` runs for every alert. Programs are run by the
    keeper when there is one (the worker's pipe): the network worker runs under no_new_privs, where
    a setgid sendmail (OpenSMTPD's) cannot work. Each channel that fails is logged at LOG_CRIT with
    the alert's text."""
    delivered = False
    if alerts.mail_to:
        delivered |= _mail(alert, alerts, now, keeper)
    if alerts.command:
        delivered |= _run(alerts.command, alert.text().encode(), "[alerts] command", keeper, "command", alert)
    return delivered


def _one_line(alert: Alert | None) -> str:
    return " | ".join(line for line in alert.text().splitlines() if line.strip()) if alert else ""


def _mail(alert: Alert, alerts: AlertsConfig, now: datetime, keeper: Keeper | None) -> bool:
    import smtplib

    msg = render_mail(alert, alerts, now)
    if alerts.sendmail:
        return _run(alerts.sendmail, msg.as_bytes(), "[alerts] sendmail", keeper, "sendmail", alert)
    host, _, port = alerts.smtp.rpartition(":")
    try:
        with smtplib.SMTP(host.strip("[]"), int(port), timeout=SEND_TIMEOUT) as smtp:
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        log.critical("alert mail to %s via %s failed: %s; falling back to sendmail -t; the alert: %s",
                     ", ".join(alerts.mail_to), alerts.smtp, " ".join(str(exc).split()), _one_line(alert))
        return _run(fallback_sendmail(alerts), msg.as_bytes(), "sendmail -t (fallback)", keeper,
                    "sendmail-fallback", alert)
    return True


def _run(argv: tuple[str, ...], data: bytes, what: str, keeper: Keeper | None = None, program: str = "command",
         alert: Alert | None = None) -> bool:
    """Run the program with ``data`` on stdin (certkeeper.keeper.hooks.run_command: no shell, no pipes, a timeout);
    with a keeper, the keeper runs ``program`` ("command", "sendmail" or "sendmail-fallback")."""
    if keeper is not None:
        try:
            return keeper.run_alert(program, data)
        except CertkeeperError as exc:
            log.critical("%s failed: %s; the alert: %s", what, exc, _one_line(alert))
            return False
    result = run_command(argv, SEND_TIMEOUT, stdin=data, what=what)
    if not result.ok:
        log.critical("%s failed: %s; the alert: %s", what, result.describe(), _one_line(alert))
    return result.ok


# ---------------------------------------------------------------------------
# Episodes.


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat() if when else None


def _show(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "unknown"
    days = (when - now).total_seconds() / 86400
    rel = f"in {days:.1f} days" if days >= 0 else f"{-days:.1f} days ago"
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC ({rel})"


class Alerter:
    """Decides when to alert and remembers it in ``STATE/alerts/alerts.json``. Thread-safe.

    ``send`` defaults to :func:`deliver`; it returns True once an alert is handed over.
    An alert whose delivery failed is tried again at the next event of its episode.
    """

    def __init__(self, config: Config, send: Callable[[Alert], bool] | None = None,
                 keeper: Keeper | None = None) -> None:
        """``keeper``: the worker's pipe (it runs the programs and reads the certificates on disk);
        by default everything is done in this process."""
        self.config = config
        self.path = state_path(config.state_dir)
        self.keeper = keeper
        self._send = send or (lambda alert: deliver(alert, config.alerts, datetime.now(UTC), keeper))
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.config.alerts.mail_to or self.config.alerts.command)

    # -- state ---------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        """The episodes. A file that cannot be read, or holds entries of another shape, is moved aside
        (``files.set_aside``, one log line); the entries that were sound are kept, so only the bad
        ones start over (an alert may then be sent once more)."""
        try:
            raw: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            set_aside(self.path, f"alert state: {getattr(exc, 'strerror', None) or exc}")
            raw = {}
        data, problem = _sound_alert_state(raw)
        if problem:
            set_aside(self.path, f"alert state: {problem}")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path, data)

    def _notify(self, alert: Alert, key: str = "") -> bool:
        """Deliver ``alert``; one that no channel took is logged at LOG_CRIT with its text and kept in
        ``STATE/alerts/undelivered-KEY.txt`` until an alert for ``key`` gets out (tried again at the
        next run: the next event of its episode, the next renewal run, the hourly check)."""
        if not self.enabled:
            return False
        try:
            sent = bool(self._send(alert))
        except Exception as exc:  # noqa: BLE001 - an alert must never break a renewal
            log.critical("alert %r not sent: %s", alert.subject, exc)
            sent = False
        if key:
            if sent:
                self._unspool(key)
            else:
                self._spool(key, alert)
        return sent

    def spool_path(self, key: str) -> Path:
        return layout.path(self.config.state_dir, "alerts", f"{SPOOL_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.txt")

    def _spool(self, key: str, alert: Alert) -> None:
        path = self.spool_path(key)
        try:
            write_atomic(path, alert.text().encode(), 0o600)
        except (OSError, LocalError) as exc:  # write_atomic says LocalError; making the directory, OSError
            log.critical("cannot keep the undelivered alert in %s: %s", path, getattr(exc, "strerror", None) or exc)
        log.critical("alert not delivered, kept in %s until it is: %s", path, _one_line(alert))

    def _unspool(self, *keys: str) -> None:
        for key in keys:
            try:
                self.spool_path(key).unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot remove %s: %s", self.spool_path(key), exc.strerror or exc)

    def undelivered(self) -> list[Path]:
        """The alerts kept because no channel took them yet."""
        directory = layout.path(self.config.state_dir, "alerts")
        try:
            return sorted(p for p in directory.iterdir() if p.name.startswith(SPOOL_PREFIX))
        except OSError:
            return []

    # -- generic episodes ------------------------------------------------------

    def failed(self, key: str, what: str, error: str, detail: str = "", now: datetime | None = None) -> bool:
        """A failed attempt of ``key``; alerts at the first of an episode. True when an alert went out."""
        now = now or datetime.now(UTC)
        with self._lock:
            data = self._load()
            episode = data["failures"].get(key)
            if episode is None:
                episode = {"what": what, "since": _iso(now), "attempts": 0, "notified": False}
                data["failures"][key] = episode
            # It failed again before its recovery mail got out: the same episode goes on.
            episode.pop("recovered_at", None)
            episode["attempts"] += 1
            episode["error"] = error
            episode["detail"] = detail
            sent = False
            if not episode["notified"]:
                sent = self._notify(self._failure_alert(episode, detail, now), f"failure-{key}")
                episode["notified"] = sent
            self._save(data)
            return sent

    def recovered(self, key: str, what: str, detail: str = "", now: datetime | None = None) -> bool:
        """A success of ``key``; ends its episode with one recovery alert (if the failure was reported).

        When the recovery alert cannot be delivered (the MTA is down), the episode stays open as
        recovered and the alert is tried again at the next success of ``key``.
        """
        now = now or datetime.now(UTC)
        with self._lock:
            data = self._load()
            episode = data["failures"].get(key)
            if episode is None:
                return False
            episode.setdefault("recovered_at", _iso(now))
            episode["recovery"] = {"what": what, "detail": detail}
            sent = bool(episode.get("notified")) and self._notify(self._recovery_alert(episode, what, detail, now),
                                                                  f"recovery-{key}")
            if sent or not episode.get("notified"):
                del data["failures"][key]
                self._unspool(f"failure-{key}", f"recovery-{key}")
            self._save(data)
            return sent

    def resend_undelivered(self, now: datetime | None = None) -> list[str]:
        """Try again the alerts that could not be delivered (the MTA was down); the keys sent.

        Called hourly with the expiry check, so an alert waits for the mail server, not for
        the next retry of what failed (a day apart in the backoff).
        """
        now = now or datetime.now(UTC)
        sent: list[str] = []
        with self._lock:
            data = self._load()
            for key, episode in list(data["failures"].items()):
                if "recovered_at" in episode and episode.get("notified"):
                    again = episode.get("recovery") or {"what": episode["what"], "detail": ""}
                    if self._notify(self._recovery_alert(episode, again["what"], again["detail"], now),
                                    f"recovery-{key}"):
                        del data["failures"][key]
                        self._unspool(f"failure-{key}")
                        sent.append(key)
                elif not episode.get("notified"):
                    episode["notified"] = self._notify(self._failure_alert(episode, episode.get("detail", ""), now),
                                                       f"failure-{key}")
                    sent += [key] if episode["notified"] else []
            self._save(data)
        return sent

    def _failure_alert(self, episode: dict[str, Any], detail: str, now: datetime) -> Alert:
        host = socket.getfqdn()
        body = [
            f"certkeeper on {host}: {episode['what']} failed.",
            "",
            f"What failed:   {episode['what']}",
            f"Error:         {episode['error']}",
            f"First failure: {_show(parse_iso(episode['since']), now)}",
        ]
        if detail:
            body.append(detail)
        body += [
            "",
            "certkeeper keeps retrying with backoff and sends no more mail about this",
            "until it works again; then you get one recovery mail.",
            "See `certkeeper status` for the current state.",
        ]
        return Alert(f"certkeeper: {episode['what']} failed on {host}", "\n".join(body) + "\n")

    def _recovery_alert(self, episode: dict[str, Any], what: str, detail: str, now: datetime) -> Alert:
        host = socket.getfqdn()
        body = [
            f"certkeeper on {host}: {what} works again.",
            "",
            f"Failing since: {_show(parse_iso(episode['since']), now)}",
            f"Working since: {_show(parse_iso(episode['recovered_at']), now)}",
            f"Attempts:      {episode['attempts']} failed",
            f"Last error:    {episode.get('error', '')}",
        ]
        if detail:
            body.append(detail)
        return Alert(f"certkeeper: {what} recovered on {host}", "\n".join(body) + "\n")

    # -- certificates ------------------------------------------------------------

    def renewal_failed(self, name: str, error: str, serving_not_after: datetime | None,
                       now: datetime | None = None) -> bool:
        """Call after every failed renewal attempt of certificate ``name``."""
        now = now or datetime.now(UTC)
        if serving_not_after is None:
            serving = "On disk:       nothing (no valid certificate is on disk)"
        else:
            serving = f"On disk:       the certificate valid until {_show(serving_not_after, now)}"
        serving += "\n" + self.served(name, now)
        domains = self._domains(name)
        what = f"renewal of certificate {name}" + (f" ({', '.join(domains)})" if domains else "")
        return self.failed(f"certificate:{name}", what, error, serving, now)

    def renewal_succeeded(self, name: str, not_after: datetime | None = None, now: datetime | None = None) -> bool:
        """Call after every successful renewal (or a check that found nothing due).

        A "not due" while ``STATE/certificates/NAME.json`` still counts failures is a
        backoff wait, not a recovery: the episode stays open.
        """
        now = now or datetime.now(UTC)
        if state.load_cert_state(self.config.state_dir, name).consecutive_failures:
            return False
        detail = f"Now serving:   a certificate valid until {_show(not_after, now)}" if not_after else ""
        return self.recovered(f"certificate:{name}", f"renewal of certificate {name}", detail, now)

    def served(self, name: str, now: datetime) -> str:
        """What the services serve, as measured by the last verification (never assumed)."""
        from certkeeper.network import verification

        results = verification.last_results(self.config, name)
        if not results:
            return ("Served now:    not measured (no verify endpoint has been checked; "
                    "`certkeeper verify` checks them)")
        lines = []
        for r in results:
            checked = parse_iso(r.get("checked_at"))
            where = f"{r.get('hook') or ''} {r.get('endpoint') or ''}".strip()
            if r.get("serial"):
                seen = f"serial {r['serial']}, valid until {_show(parse_iso(r.get('not_after')), now)}"
            else:
                seen = f"nothing ({r.get('error') or 'no answer'})"
            verdict = "the file on disk" if r.get("ok") else "NOT the file on disk"
            lines.append(f"Served now:    {where}: {seen}, {verdict} (measured {_show(checked, now)})")
        return "\n".join(lines)

    def after_renewal(self, outcomes: Iterable[Any]) -> None:
        """One renewal run's outcomes (``runner.Outcome``: name, status, detail, not_after), from
        the daemon's workers and from ``certkeeper renew`` alike. An alert that cannot be sent is
        logged; it never changes the run's result. Alerts kept from an earlier run go first."""
        if not self.enabled:
            return
        try:
            self.resend_undelivered()
        except (CertkeeperError, OSError) as exc:
            log.error("alerts kept from an earlier run: %s", exc)
        for outcome in outcomes:
            try:
                if outcome.status == "failed":
                    info = _parse(self._on_disk(outcome.name))
                    self.renewal_failed(outcome.name, outcome.detail, info.not_after if info else None)
                else:
                    self.renewal_succeeded(outcome.name, outcome.not_after)
            except (CertkeeperError, OSError) as exc:
                log.error("alert for %s failed: %s", outcome.name, exc)

    def check_expiry(self, now: datetime | None = None) -> list[str]:
        """Warn once per certificate (serial) that ends within ``expiry_warning_days``; the names warned.

        Hourly in the daemon, so it also sends what could not be delivered before.
        """
        now = now or datetime.now(UTC)
        self.resend_undelivered(now)
        window = timedelta(days=self.config.alerts.expiry_warning_days)
        warned: list[str] = []
        with self._lock:
            data = self._load()
            for cert in self.config.certificates:
                info = _parse(self._on_disk(cert.name))
                if info is None or info.not_after - now > window:
                    data["expiry"].pop(cert.name, None)
                    self._unspool(f"expiry-{cert.name}")  # renewed meanwhile: nothing left to say
                    continue
                serial = str(info.serial)
                if data["expiry"].get(cert.name) == serial:
                    continue
                if self._notify(self._expiry_alert(cert.name, info, now), f"expiry-{cert.name}"):
                    data["expiry"][cert.name] = serial
                    warned.append(cert.name)
            self._save(data)
        return warned

    def _expiry_alert(self, name: str, info: certs.CertInfo, now: datetime) -> Alert:
        host = socket.getfqdn()
        left = info.not_after - now
        state = "HAS EXPIRED" if left.total_seconds() <= 0 else f"expires in {left.total_seconds() / 86400:.1f} days"
        body = [
            f"certkeeper on {host}: certificate {name} {state}.",
            "",
            f"Domains:   {', '.join(info.domains)}",
            f"Serial:    {info.serial:x}",
            f"Not after: {_show(info.not_after, now)}",
            "",
            "It should have been renewed long before this. Run `certkeeper status`",
            f"and `certkeeper renew {name}` to see why it was not.",
        ]
        return Alert(f"certkeeper: certificate {name} {state} on {host}", "\n".join(body) + "\n")

    def _on_disk(self, name: str) -> bytes:
        """The leaf on disk (what is still being served), b"" when none."""
        if name not in self.config.certificate_names():
            return b""
        if self.keeper is not None:
            return self.keeper.inspect(name).cert
        found = CertificateStore(self.config.state_dir).read(self.config.certificate(name))
        return found.cert if found else b""

    def _domains(self, name: str) -> tuple[str, ...]:
        try:
            return self.config.certificate(name).domains
        except KeyError:
            return ()


def _parse(pem: bytes) -> certs.CertInfo | None:
    try:
        return certs.parse_cert(pem) if pem else None
    except ValueError:
        return None


def _sound_alert_state(raw: Any) -> tuple[dict[str, Any], str]:
    """(the entries of the right shape, what was wrong with the others or "")."""
    if not isinstance(raw, dict):
        return {"failures": {}, "expiry": {}}, f"a JSON {type(raw).__name__}, not an object"
    problems: list[str] = []
    failures = raw.get("failures", {})
    expiry = raw.get("expiry", {})
    if not isinstance(failures, dict):
        problems.append("failures is not an object")
        failures = {}
    if not isinstance(expiry, dict):
        problems.append("expiry is not an object")
        expiry = {}
    sound: dict[str, Any] = {}
    for key, episode in failures.items():
        if isinstance(episode, dict) and isinstance(episode.get("what"), str) \
                and isinstance(episode.get("since"), str) and isinstance(episode.get("attempts"), int) \
                and isinstance(episode.get("notified"), bool) and isinstance(episode.get("recovery", {}), dict):
            sound[key] = episode
        else:
            problems.append(f"failure episode {key!r} is of another shape")
    kept = {k: v for k, v in expiry.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}
    if len(kept) != len(expiry):
        problems.append("an expiry entry is of another shape")
    return {**raw, "failures": sound, "expiry": kept}, "; ".join(problems)


def state_path(state_dir: Path) -> Path:
    return layout.path(state_dir, "alerts", STATE_FILE)
