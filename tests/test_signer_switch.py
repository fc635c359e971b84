"""DKIM signer switches through a real OpenSMTPD 7.4 + filter-dkimsign: checked before, probed after,
rolled back on failure (issue 11 item 1).

One BIND, one smtpd and one mail sink serve the whole module. smtpd includes certkeeper's fragment,
signs on its listener and relays the probe recipient to the probe sink the worker opens
(``[[dkim]] probe``), everything else to the test's own sink, where the test reads what smtpd
delivered and verifies it with dkimpy against the BIND. The hook restarts smtpd (``mailctl``, rcctl's
role: it exits non-zero when smtpd does not come up). Each test starts a fresh state: its first
key is switched to and verified, then the next switch is made to fail (an unreadable key, a broken
smtpd.conf, a hook that does not make smtpd load the new fragment): smtpd stays up and signs with
the old selector, the run fails (exit 1 from ``rotate-dkim``), the alert command got the alert.
"""

from __future__ import annotations

import io
import os
import shutil
import smtplib
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim as dkimpy
import pytest

from certkeeper import cli
from certkeeper.core.config import Config
from certkeeper.keeper import signers
from certkeeper.network import rotation
from tests.fixtures.bind import BindServer, new_bind
from tests.fixtures.mailservices import MAILCTL, SMTPD_LOCK, require_smtpd_74, stop_detached_smtpd
from tests.fixtures.peers import free_port, require_binary

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
FILTER_DKIMSIGN = Path("/usr/libexec/opensmtpd/filter-dkimsign")


class Site:
    """The module's smtpd, its config and sinks; ``mail()`` sends a message and returns smtpd's copy."""

    def __init__(self, root: Path, bind: BindServer) -> None:
        from aiosmtpd.controller import Controller

        self.root, self.bind = root, bind
        self.port, self.probe_port = free_port(), free_port()
        self.fragment = root / "dkimsign.conf"
        self.smtpd_conf = root / "smtpd.conf"
        self.smtpd_conf.write_text(
            f'include "{self.fragment}"\n'
            f'listen on 127.0.0.1 port {self.port} filter "{signers.FILTER_NAME}"\n'
            f'action "certkeeper-probe" relay host smtp://127.0.0.1:{self.probe_port}\n'
            'action "out" relay host smtp://127.0.0.1:{sink}\n'
            'match from local for rcpt-to "dkim-probe@certkeeper.invalid" action "certkeeper-probe"\n'
            'match from local for any action "out"\n')
        self.received: list[bytes] = []
        received = self.received

        class Sink:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
                received.append(envelope.original_content or envelope.content)
                return "250 OK"

        self.sink = Controller(Sink(), hostname="127.0.0.1", port=free_port())
        self.smtpd_conf.write_text(self.smtpd_conf.read_text().replace("{sink}", str(self.sink.port)))
        self.mailctl = root / "mailctl"
        self.mailctl.write_text(MAILCTL.format(
            python=sys.executable, smtpd=require_binary("smtpd"), smtpd_conf=str(self.smtpd_conf),
            pidfile=str(root / "smtpd.pid"), smtpd_log=str(root / "smtpd.log"), doveadm="/bin/false",
            dovecot_conf="", runs=str(root / "runs"), smtpd_ports=[self.port]))
        self.mailctl.chmod(0o755)

    def config(self, tmp: Path, hook: str = "restart", probe: bool = True) -> Config:
        return self.bind.config(f"""
[alerts]
command = ["sh", "-c", "cat >> {tmp / 'alerts.log'}"]
[hooks.restart]
command = ["{self.mailctl}", "smtpd", "restart"]
[hooks.noop]
command = ["true"]
[[dkim]]
domain = "example.test"
rotate_every = "90d"
publish_ahead = "2d"
key_dir = "{tmp / 'keys'}"
signer = "filter-dkimsign"
signer_config = "{self.fragment}"
signer_hook = "{hook}"
signer_service_config = "{self.smtpd_conf}"
probe = "{f'smtp://127.0.0.1:{self.port}' if probe else ''}"
probe_sink = "127.0.0.1:{self.probe_port}"
""", state_dir=tmp / "state")

    def mail(self) -> bytes:
        """A message through smtpd's signing listener, as the sink received it."""
        mine = f"<{os.urandom(8).hex()}@example.test>"
        message = (f"From: alice@example.test\r\nTo: bob@example.org\r\nSubject: switch\r\n"
                   f"Message-ID: {mine}\r\n\r\nhello\r\n").encode()
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.sendmail("alice@example.test", ["bob@example.org"], message)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = [m for m in self.received if mine.encode() in m]
            if found:
                return found[0].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            time.sleep(0.05)
        raise AssertionError("smtpd did not relay the message")

    def signed_by(self, message: bytes) -> list[str]:
        """The selectors of the DKIM-Signatures dkimpy verifies against the BIND."""
        def lookup(name: bytes, timeout: float = 5) -> bytes | None:
            values = self.bind.query(name.decode().rstrip("."), "TXT")
            return values[0].encode() if values else None

        checker = dkimpy.DKIM(message)
        headers = [v for k, v in checker.headers if k.lower() == b"dkim-signature"]
        out = []
        for idx, value in enumerate(headers):
            if checker.verify(idx=idx, dnsfunc=lookup):
                tags = dict(t.strip().split("=", 1) for t in value.decode().replace("\r\n", "").split(";") if "=" in t)
                out.append(tags["s"].strip())
        return out

    def smtpd_up(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.makefile("rb").readline().startswith(b"220")
        except OSError:
            return False


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import fcntl

    require_smtpd_74()
    if not FILTER_DKIMSIGN.exists():
        require_binary("filter-dkimsign")
    bind = new_bind(tmp_path_factory.mktemp("bind-switch"))
    root = Path(tempfile.mkdtemp(prefix="certkeeper-switch-", dir="/tmp"))
    root.chmod(0o755)  # the filter's user must reach the keys below it
    lock = os.open(SMTPD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # one smtpd per machine (compiled-in queue)
    fcntl.flock(lock, fcntl.LOCK_EX)
    site = Site(root, bind)
    site.sink.start()
    try:
        yield site
    finally:
        try:
            os.system(f"{site.mailctl} smtpd stop >/dev/null 2>&1")  # noqa: S605 - the test's own script
            stop_detached_smtpd()
            site.sink.stop()
            bind.stop()
        finally:
            os.close(lock)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmp(site: Site) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="t-", dir=site.root))
    path.chmod(0o755)
    yield path


def states(config: Config) -> dict[str, str]:
    return {k.selector: k.state for k in rotation.load_state(config, "example.test").keys}


def first_key(site: Site, tmp: Path) -> str:
    """The first key, switched to at once (not probed: each probe waits about 10 s for smtpd to end
    its session with the sink; the switch with a probe has its own test). smtpd signs with it."""
    config = site.config(tmp, probe=False)
    lines: list[str] = []
    assert rotation.run_due(config, T0, lines.append).errors == ()
    (a,) = [s for s, st in states(config).items() if st == "active"]
    assert any("no [[dkim]] probe is configured: the switch is not verified" in line for line in lines), lines
    assert site.signed_by(site.mail()) == [a]
    return a


def assert_rolled_back(site: Site, config: Config, tmp: Path, old: str, new: str, why: str) -> None:
    """smtpd is up and signs with the old selector; the new key is still pending, the alert went out."""
    assert site.smtpd_up()
    assert site.signed_by(site.mail()) == [old]
    assert states(config)[old] == "active" and states(config)[new] == "pending"
    assert signers.keys_named(config.dkim[0]).keys() == {old}
    alert = (tmp / "alerts.log").read_text()
    assert "DKIM signer switch for example.test failed" in alert and why in alert, alert
    assert f"keeps its previous configuration ({old})" in alert
    (row,) = [r for r in rotation.status_rows(config) if r["selector"] == new]
    assert row["next_action"] == "activate" and why in row["switch_error"]
    assert not list((config.state_dir / "journal").glob("signer-*.json"))  # nothing left to roll back


def test_a_verified_switch_signs_with_the_new_selector(site, tmp):
    config = site.config(tmp)
    lines: list[str] = []
    assert rotation.run_due(config, T0, lines.append).errors == ()
    (a,) = [s for s, st in states(config).items() if st == "active"]
    assert any(f"is signed with {a} and verifies against the authoritative DNS" in line for line in lines), lines
    assert site.signed_by(site.mail()) == [a]
    for when in (T0 + 88 * DAY, T0 + 90 * DAY):
        lines: list[str] = []
        assert rotation.run_due(config, when, lines.append).errors == ()
    b = next(s for s, st in states(config).items() if st == "active")
    assert b != a and states(config)[a] == "retiring"
    assert any(f"is signed with {b} and verifies" in line for line in lines)
    assert site.signed_by(site.mail()) == [b]
    assert not (tmp / "alerts.log").exists()
    assert not list((config.state_dir / "journal").glob("signer-*.json"))  # confirmed: nothing kept


def test_a_key_the_signer_cannot_read_is_never_switched_to(site, tmp):
    a = first_key(site, tmp)
    config = site.config(tmp)
    restarts = (site.root / "runs").read_text().count("smtpd restart")
    (tmp / "keys").chmod(0o700)  # key_dir made root's alone: _dkimsign cannot reach the new key
    try:
        assert rotation.run_due(config, T0 + 88 * DAY, print).errors == ()
        b = next(s for s, st in states(config).items() if st == "pending")
        report = rotation.run_due(config, T0 + 90 * DAY, print)
        (error,) = report.errors
        assert "_dkimsign:_dkimsign cannot read it: Permission denied" in error
        assert (site.root / "runs").read_text().count("smtpd restart") == restarts  # nothing written, no restart
        assert_rolled_back(site, config, tmp, a, b, "Permission denied")
        # The retry waits for the backoff: the daemon is woken then, not at once.
        assert report.next_due == T0 + 90 * DAY + timedelta(minutes=15)
        assert rotation.run_due(config, T0 + 90 * DAY + timedelta(minutes=5), print).errors == ()
        assert states(config)[b] == "pending"
    finally:
        (tmp / "keys").chmod(0o755)
    # Fixed: the retry after the backoff switches, verified, and the recovery alert goes out.
    assert rotation.run_due(config, T0 + 90 * DAY + timedelta(minutes=16), print).errors == ()
    assert states(config)[b] == "active" and site.signed_by(site.mail()) == [b]
    assert "DKIM signer switch for example.test recovered" in (tmp / "alerts.log").read_text()


def test_a_broken_smtpd_conf_fails_smtpd_n_and_rotate_dkim_exits_1(site, tmp):
    config = site.config(tmp)
    out = io.StringIO()
    assert cli.main(["rotate-dkim", "-c", str(config.path)], out=out) == 0, out.getvalue()  # the first key
    (a,) = [s for s, st in states(config).items() if st == "active"]
    assert "verifies against the authoritative DNS" in out.getvalue()
    assert site.signed_by(site.mail()) == [a]
    good = site.smtpd_conf.read_text()
    site.smtpd_conf.write_text(good + "listen on 127.0.0.1 port 1 filter \"no-such-filter\"\n")  # an edit since
    try:
        out = io.StringIO()
        assert cli.main(["rotate-dkim", "--now", "-c", str(config.path)], out=out) == 1
        b = next(s for s, st in states(config).items() if st == "pending")
        assert "smtpd -n with the new dkimsign.conf: exit 1" in out.getvalue()
        assert_rolled_back(site, config, tmp, a, b, "smtpd -n with the new dkimsign.conf")
    finally:
        site.smtpd_conf.write_text(good)


def test_a_signer_that_does_not_load_the_new_key_is_rolled_back(site, tmp):
    a = first_key(site, tmp)
    config = site.config(tmp, hook="noop")  # the hook does not restart smtpd: the filter keeps its old key
    assert rotation.run_due(config, T0 + 88 * DAY, print).errors == ()
    b = next(s for s, st in states(config).items() if st == "pending")
    lines: list[str] = []
    (error,) = rotation.run_due(config, T0 + 90 * DAY, lines.append).errors
    assert f"wanted {b}, signed with s={a}" in error
    assert "the previous signer files are back and hook noop ran again" in error
    assert "the service is up" in error
    assert f"-s {a} -k" in site.fragment.read_text()  # the fragment on disk names the old key again
    assert_rolled_back(site, config, tmp, a, b, f"wanted {b}, signed with s={a}")
