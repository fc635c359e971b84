"""Alerts delivered to a real local SMTP receiver (aiosmtpd on 127.0.0.1:free port)."""

from __future__ import annotations

import email
import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from certkeeper.core import config, state
from certkeeper.keeper.store import CertificateStore
from certkeeper.network.alerts import Alert, Alerter
from tests.fixtures.peers import free_port
from tests.fixtures.throwaway_ca import ThrowawayCA

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class Inbox:
    """aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.Message]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        msg = email.message_from_bytes(envelope.content)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


def stand_in_sendmail(directory: Path, code: int = 0) -> Path:
    """A ``sendmail`` that records its arguments, its user and stdin in ``directory/sendmail.N``, and exits ``code``."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)
    script = directory / "sendmail"
    script.write_text(f'#!/bin/sh\nn=$(( $(ls {directory} | grep -c "^sendmail\\.") + 1 ))\n'
                      f'{{ id -u; echo "$@"; cat; }} > {directory}/sendmail.$n\nexit {code}\n')
    script.chmod(0o755)
    return script


@pytest.fixture(autouse=True)
def sendmail_down(tmp_path_factory, monkeypatch):
    """Nothing takes mail unless a test says so: the fallback ``sendmail -t`` on PATH fails (the real one
    would queue to this machine's spool)."""
    directory = tmp_path_factory.mktemp("down")
    stand_in_sendmail(directory, code=75)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory


@pytest.fixture
def smtp():
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def make_config(tmp_path: Path, alerts: str) -> config.Config:
    text = f"""
state_dir = "{tmp_path}/state"
[[certificate]]
name = "mail.example.com"
key = "{tmp_path}/ssl/mail.key"
cert = "{tmp_path}/ssl/mail.crt"
chain = "{tmp_path}/ssl/mail.chain.pem"
fullchain = "{tmp_path}/ssl/mail.fullchain.pem"
[alerts]
{alerts}
"""
    return config.parse(text, tmp_path / "certkeeper.toml")


def test_three_failed_retries_send_one_mail_and_recovery_one_more(tmp_path, smtp):
    inbox, port = smtp
    cfg = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nmail_from = "ck@example.com"\n'
                                f'smtp = "127.0.0.1:{port}"')
    serving = NOW + timedelta(days=12)
    alerter = Alerter(cfg)
    sent = [alerter.renewal_failed("mail.example.com", f"urn:ietf:params:acme:error:connection: try {i}", serving,
                                   now=NOW + timedelta(hours=i)) for i in range(3)]
    assert sent == [True, False, False]
    assert len(inbox.messages) == 1
    mail_from, rcpts, msg = inbox.messages[0]
    assert mail_from == "ck@example.com" and rcpts == ["postmaster@example.com"]
    assert "renewal of certificate mail.example.com" in msg["Subject"] and "failed" in msg["Subject"]
    assert msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_payload()
    assert "urn:ietf:params:acme:error:connection: try 0" in body  # the error
    assert "valid until 2026-12-07 12:00 UTC" in body  # what is still served, until when

    # a restart (a new Alerter reading STATE/alerts.json) does not re-send
    assert Alerter(cfg).renewal_failed("mail.example.com", "again", serving, now=NOW + timedelta(hours=5)) is False
    assert len(inbox.messages) == 1

    # "not due" during the backoff wait (the runner still counts failures) is no recovery
    state.save_cert_state(cfg.state_dir, state.CertState(name="mail.example.com", consecutive_failures=4))
    assert Alerter(cfg).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=5)) is False
    assert len(inbox.messages) == 1
    state.save_cert_state(cfg.state_dir, state.CertState(name="mail.example.com", consecutive_failures=0))
    assert Alerter(cfg).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=6)) is True
    assert len(inbox.messages) == 2
    recovery = inbox.messages[1][2]
    assert "recovered" in recovery["Subject"]
    assert "Attempts:      4 failed" in recovery.get_payload()
    # a later success without a failure sends nothing; a new failure starts a new episode
    assert alerter.renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=7)) is False
    assert alerter.renewal_failed("mail.example.com", "new", None, now=NOW + timedelta(days=1)) is True
    assert "On disk:       nothing" in inbox.messages[2][2].get_payload(decode=True).decode()
    assert len(inbox.messages) == 3


def test_undelivered_alert_is_retried_at_the_next_failure(tmp_path, smtp):
    inbox, port = smtp
    dead = free_port()  # nothing listens here
    cfg = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{dead}"')
    assert Alerter(cfg).renewal_failed("mail.example.com", "e1", None, now=NOW) is False
    cfg = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"')
    assert Alerter(cfg).renewal_failed("mail.example.com", "e2", None, now=NOW) is True
    assert len(inbox.messages) == 1 and "e2" in inbox.messages[0][2].get_payload()


def test_recovery_mail_is_kept_while_the_mta_is_down(tmp_path, smtp):
    inbox, port = smtp
    up = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"')
    down = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{free_port()}"')
    assert Alerter(up).renewal_failed("mail.example.com", "e1", None, now=NOW) is True
    assert Alerter(down).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=1)) is False
    assert len(inbox.messages) == 1  # the recovery mail could not go out ...
    assert Alerter(up).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=12)) is True
    assert len(inbox.messages) == 2  # ... and goes out at the next success, saying since when it works
    body = inbox.messages[1][2].get_payload()
    assert "recovered" in inbox.messages[1][2]["Subject"] and "Working since: 2026-11-25 13:00 UTC" in body
    assert Alerter(up).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=13)) is False
    assert len(inbox.messages) == 2


def test_undelivered_alerts_go_out_with_the_hourly_check_once_the_mta_is_back(tmp_path, smtp):
    inbox, port = smtp
    up = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"')
    down = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{free_port()}"')
    serving = NOW + timedelta(days=12)
    assert Alerter(down).renewal_failed("mail.example.com", "e1", serving, now=NOW) is False
    assert Alerter(down).check_expiry(now=NOW + timedelta(hours=1)) == []  # still down: still pending
    Alerter(up).check_expiry(now=NOW + timedelta(hours=2))
    assert len(inbox.messages) == 1  # the failure mail, with its detail, without waiting for a retry
    body = inbox.messages[0][2].get_payload()
    assert "e1" in body and "valid until 2026-12-07 12:00 UTC" in body
    assert Alerter(down).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=3)) is False
    Alerter(up).check_expiry(now=NOW + timedelta(hours=4))
    assert len(inbox.messages) == 2 and "recovered" in inbox.messages[1][2]["Subject"]
    Alerter(up).check_expiry(now=NOW + timedelta(hours=5))
    assert len(inbox.messages) == 2  # each once


def test_a_failure_before_the_recovery_mail_got_out_continues_the_episode(tmp_path, smtp):
    inbox, port = smtp
    up = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"')
    down = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{free_port()}"')
    assert Alerter(up).renewal_failed("mail.example.com", "e1", None, now=NOW) is True
    assert Alerter(down).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=1)) is False
    assert Alerter(up).renewal_failed("mail.example.com", "e2", None, now=NOW + timedelta(hours=2)) is False
    assert len(inbox.messages) == 1  # no second failure mail: the operator was told and not told otherwise
    assert Alerter(up).renewal_succeeded("mail.example.com", now=NOW + timedelta(hours=3)) is True
    assert "Attempts:      2 failed" in inbox.messages[1][2].get_payload()


def test_expiry_warning_once_per_certificate(tmp_path, smtp):
    inbox, port = smtp
    cfg = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"\n'
                                'expiry_warning_days = 7')
    store = CertificateStore(cfg.state_dir)
    ca = ThrowawayCA()
    cert = cfg.certificate("mail.example.com")
    store.install(cert, ca.issue(["mail.example.com"], NOW - timedelta(days=80), NOW + timedelta(days=10)))
    alerter = Alerter(cfg)
    assert alerter.check_expiry(NOW) == []  # 10 days left: fine
    assert alerter.check_expiry(NOW + timedelta(days=4)) == ["mail.example.com"]  # 6 days left
    assert alerter.check_expiry(NOW + timedelta(days=5)) == []  # same certificate: already warned
    assert len(inbox.messages) == 1
    msg = inbox.messages[0][2]
    assert "mail.example.com expires in 6.0 days" in msg["Subject"]
    assert "mail.example.com" in msg.get_payload()
    # a renewed certificate that again nears its end is warned about again
    store.install(cert, ca.issue(["mail.example.com"], NOW, NOW + timedelta(days=8)))
    assert alerter.check_expiry(NOW + timedelta(days=2)) == ["mail.example.com"]
    assert "expires in 6.0 days" in inbox.messages[1][2]["Subject"]
    state = json.loads((cfg.state_dir / "alerts" / "alerts.json").read_text())
    assert list(state["expiry"]) == ["mail.example.com"]


def test_command_gets_the_same_text_on_stdin(tmp_path):
    out = tmp_path / "alert.txt"
    cfg = make_config(tmp_path, f'command = ["/bin/sh", "-c", "cat > {out}"]')
    alerter = Alerter(cfg)
    assert alerter.renewal_failed("mail.example.com", "urn:ietf:params:acme:error:dns: NXDOMAIN", None, now=NOW)
    text = out.read_text()
    subject, _, body = text.partition("\n\n")
    assert subject.startswith("certkeeper: renewal of certificate mail.example.com (mail.example.com) failed")
    assert "urn:ietf:params:acme:error:dns: NXDOMAIN" in body
    out.unlink()
    assert alerter.renewal_failed("mail.example.com", "again", None, now=NOW) is False
    assert not out.exists()


def test_sendmail_gets_a_whole_message(tmp_path):
    out = tmp_path / "sendmail.txt"
    script = tmp_path / "sendmail"
    script.write_text(f'#!/bin/sh\necho "$@" > {out}.args\ncat > {out}\n')
    script.chmod(0o755)
    cfg = make_config(tmp_path, f'mail_to = ["a@example.com", "b@example.com"]\nsendmail = ["{script}", "-t"]')
    assert Alerter(cfg).failed("dkim:example.com", "DKIM rotation for example.com", "TSIG refused", now=NOW)
    assert Path(f"{out}.args").read_text().strip() == "-t"
    msg = email.message_from_bytes(out.read_bytes())
    assert msg["To"] == "a@example.com, b@example.com"
    assert "TSIG refused" in msg.get_payload()


def test_a_command_that_leaves_a_child_running_does_not_hold_the_alert(tmp_path):
    out, pidfile = tmp_path / "alert.txt", tmp_path / "child.pid"
    # e.g. a notifier that hands the text to a background job and returns at once; with pipes to
    # the child, the alert (and the daemon's worker) would wait an hour (the suite's timeout fails it)
    cfg = make_config(tmp_path, f'command = ["/bin/sh", "-c", "cat > {out}; sleep 3600 & echo $! > {pidfile}"]')
    try:
        assert Alerter(cfg).renewal_failed("mail.example.com", "boom", None, now=NOW) is True
        assert "boom" in out.read_text()
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_failing_command_and_disabled_alerts(tmp_path):
    cfg = make_config(tmp_path, 'command = ["/bin/false"]')
    assert Alerter(cfg).renewal_failed("mail.example.com", "x", None, now=NOW) is False
    seen: list[Alert] = []
    cfg = make_config(tmp_path / "b", "")
    alerter = Alerter(cfg, send=lambda a: seen.append(a) or True)
    assert alerter.enabled is False
    assert alerter.renewal_failed("mail.example.com", "x", None, now=NOW) is False and seen == []


def test_certkeeper_renew_without_a_daemon_alerts_once_per_episode(tmp_path, smtp, pebble):
    """The CLI alone (cron-style use): three failed runs, one mail; the first success, one more."""
    import subprocess
    import sys

    inbox, port = smtp
    alerts = f'[alerts]\nmail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"\n'
    broken = tmp_path / "broken.toml"  # the ACME server is unreachable
    broken.write_text(pebble.config_text(tmp_path, ["mail.example.com"], directory=f"https://127.0.0.1:{free_port()}/dir",
                                         extra=alerts))
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(pebble.config_text(tmp_path, ["mail.example.com"], extra=alerts))
    root = Path(__file__).resolve().parent.parent

    def renew(conf: Path) -> int:
        return subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(conf), "renew", "--force"], cwd=root,
                              capture_output=True, text=True, timeout=60).returncode

    assert [renew(broken) for _ in range(3)] == [1, 1, 1]
    assert len(inbox.messages) == 1 and "failed" in inbox.messages[0][2]["Subject"]
    assert renew(fixed) == 0
    assert len(inbox.messages) == 2 and "recovered" in inbox.messages[1][2]["Subject"]


# ---------------------------------------------------------------------------
# When the MTA is what broke (issue 11): the fallback, the spool, the measured text.


def test_with_the_relay_down_mail_falls_back_to_sendmail_and_the_command_still_runs(tmp_path, monkeypatch):
    fallback = tmp_path / "fallback"
    stand_in_sendmail(fallback)
    monkeypatch.setenv("PATH", f"{fallback}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "command.txt"
    cfg = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{free_port()}"\n'
                                f'command = ["/bin/sh", "-c", "cat > {out}"]')
    assert Alerter(cfg).renewal_failed("mail.example.com", "TLS handshake refused", None, now=NOW) is True
    recorded = (fallback / "sendmail.1").read_text().split("\n", 2)
    assert recorded[1] == "-t"
    msg = email.message_from_string(recorded[2])
    assert msg["To"] == "postmaster@example.com" and "TLS handshake refused" in msg.get_payload(decode=True).decode()
    assert "TLS handshake refused" in out.read_text()  # [alerts] command ran too
    assert Alerter(cfg).undelivered() == []


def test_the_keeper_refuses_a_fallback_message_for_anyone_else(tmp_path):
    from certkeeper.keeper.service import LocalKeeper, Refusal

    cfg = make_config(tmp_path, 'mail_to = ["postmaster@example.com"]')
    with pytest.raises(Refusal, match="mail_to only"):
        LocalKeeper(cfg).run_alert("sendmail-fallback", b"To: someone@example.net\nSubject: x\n\nhi\n")
    with pytest.raises(Refusal, match="not configured"):
        LocalKeeper(make_config(tmp_path / "b", 'command = ["/bin/true"]')).run_alert("sendmail-fallback", b"")


def test_an_undelivered_alert_is_logged_critical_kept_and_sent_by_the_next_run(tmp_path, smtp, caplog):
    inbox, port = smtp
    dead = free_port()
    down = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{dead}"')
    alerter = Alerter(down)
    with caplog.at_level("CRITICAL"):
        assert alerter.renewal_failed("mail.example.com", "connection refused by the CA", None, now=NOW) is False
    assert any(r.levelname == "CRITICAL" and "connection refused by the CA" in r.getMessage() for r in caplog.records)
    (kept,) = alerter.undelivered()
    assert kept.parent == down.state_dir / "alerts" and oct(kept.stat().st_mode & 0o777) == "0o600"
    assert "connection refused by the CA" in kept.read_text()
    # The next run (the relay is back) sends what was kept before its own outcomes; the file goes.
    from certkeeper.network.runner import Outcome

    up = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"')
    Alerter(up).after_renewal([Outcome("mail.example.com", "failed", "still failing")])
    assert len(inbox.messages) == 1 and "connection refused by the CA" in inbox.messages[0][2].get_payload()
    assert Alerter(up).undelivered() == []


def test_the_failure_text_says_what_is_served_as_measured(tmp_path, smtp):
    from certkeeper.network import verification

    inbox, port = smtp
    cfg = make_config(tmp_path, f'mail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{port}"')
    cert = cfg.certificate("mail.example.com")
    store = CertificateStore(cfg.state_dir)
    assert Alerter(cfg).renewal_failed("mail.example.com", "e1", None, now=NOW)
    assert "Served now:    not measured" in inbox.messages[0][2].get_payload(decode=True).decode()
    store.install(cert, ThrowawayCA().issue(["mail.example.com"], NOW - timedelta(days=80), NOW + timedelta(days=10)))
    info = verification.on_disk(store, cert)
    seen = verification.Observation("smtp+starttls://127.0.0.1:25", None, "connection refused", NOW)
    verification.save_results(cfg, cert.name, [verification.Check(cert.name, "smtpd", info, seen)])
    Alerter(cfg).renewal_succeeded("mail.example.com", now=NOW)
    assert Alerter(cfg).renewal_failed("mail.example.com", "e2", info.not_after, now=NOW)
    body = inbox.messages[-1][2].get_payload(decode=True).decode()
    assert "smtpd smtp+starttls://127.0.0.1:25: nothing (connection refused), NOT the file on disk" in body
    assert "Still serving" not in body


def test_certkeeper_renew_with_smtpd_stopped_alerts_through_the_keepers_sendmail(tmp_path, pebble, mail_services):
    """The CLI as root, the relay a real OpenSMTPD that was stopped: the worker (unprivileged, no_new_privs)
    cannot reach it; the keeper runs the fallback; a failing fallback keeps the alert, and the next run
    delivers it once a relay is back (aiosmtpd on smtpd's port)."""
    import subprocess
    import sys

    from tests.certfactory import make_set
    from tests.fixtures.peers import wait_for_port

    fallback = tmp_path / "fallback"
    stand_in_sendmail(fallback)
    CertificateStore(tmp_path / "ms-state").install(mail_services.certificate_config("mail.example.test"),
                                                    make_set(("mail.example.test",)))
    mail_services.start_smtpd()
    relay = mail_services.smtp_port
    wait_for_port(relay)
    stopped = subprocess.run([str(mail_services.mailctl), "smtpd", "stop"], capture_output=True, timeout=30)
    assert stopped.returncode == 0
    alerts = f'[alerts]\nmail_to = ["postmaster@example.com"]\nsmtp = "127.0.0.1:{relay}"\n'
    broken = tmp_path / "broken.toml"  # the ACME server is unreachable
    broken.write_text(pebble.config_text(tmp_path, ["mail.example.com"], directory=f"https://127.0.0.1:{free_port()}/dir",
                                         extra=alerts))
    root = Path(__file__).resolve().parent.parent

    def renew(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(broken), "renew", "--force", "-v"],
                              cwd=root, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": path})

    assert renew(f"{fallback}{os.pathsep}{os.environ['PATH']}").returncode == 1
    uid, args, message = (fallback / "sendmail.1").read_text().split("\n", 2)
    assert (uid, args) == (str(os.getuid()), "-t")  # run by the keeper, not the worker's user
    assert "renewal of certificate mail.example.com" in email.message_from_string(message)["Subject"]
    # Another episode with everything down: kept; then the relay is back: the next run delivers it.
    state_dir = tmp_path / "state"
    (state_dir / "alerts" / "alerts.json").unlink()
    proc = renew(os.environ["PATH"])  # the autouse stand-in that fails is first on this PATH
    assert proc.returncode == 1 and "the alert:" in proc.stderr
    kept = list((state_dir / "alerts").glob("undelivered-*.txt"))
    assert len(kept) == 1
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=relay)
    controller.start()
    try:
        renew(os.environ["PATH"])
    finally:
        controller.stop()
    assert len(inbox.messages) == 1 and "failed" in inbox.messages[0][2]["Subject"]
    assert list((state_dir / "alerts").glob("undelivered-*.txt")) == []
