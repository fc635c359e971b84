"""Hooks, reload and rollback: units with plain-data fakes, then real OpenSMTPD 7.4 and Dovecot.

The real-service tests check what is served with their OWN TLS clients (smtplib,
imaplib, ssl), not only through certkeeper's probes.
"""

from __future__ import annotations

import dataclasses
import imaplib
import io
import json
import os
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from certkeeper.core import certs
from certkeeper.core.config import HOOK_DEFAULT_COMMANDS, CertificateConfig, Config, HookConfig, parse
from certkeeper.core.config import load as config_load
from certkeeper.core.state import load_cert_state
from certkeeper.keeper.hooks import KINDS, hook_for, one_line, run_command
from certkeeper.keeper.service import LocalKeeper
from certkeeper.keeper.store import CertificateSet, CertificateStore
from certkeeper.network import reload, verification
from certkeeper.network.verification import Observation, format_serial
from tests.certfactory import make_set
from tests.fixtures.mailservices import MailServices
from tests.fixtures.peers import free_port

NAME = "mail.example.test"


# ---------------------------------------------------------------------------
# The hook contract and the one subprocess helper.


def test_every_known_kind_has_a_command_per_service_manager_and_command_has_none():
    assert {k: v.default_commands for k, v in KINDS.items() if k != "command"} == HOOK_DEFAULT_COMMANDS
    smtpd, dovecot = KINDS["smtpd"], KINDS["dovecot"]
    assert smtpd.default_command("rcctl") == ("rcctl", "restart", "smtpd")  # smtpd has no reload
    assert smtpd.default_command("systemd") == ("systemctl", "restart", "opensmtpd")  # Debian's unit name
    assert smtpd.default_command("direct") == (sys.executable, "-m", "certkeeper.keeper.hooks.direct",
                                               "restart", "smtpd")
    assert dovecot.default_command("rcctl") == dovecot.default_command("direct") == ("doveadm", "reload")
    assert dovecot.default_command("systemd") == ("systemctl", "reload", "dovecot")
    assert KINDS["httpd"].default_command("systemd") == ("systemctl", "reload", "nginx")  # httpd on Linux: nginx
    assert KINDS["relayd"].default_command("systemd") == ()  # OpenBSD only
    assert KINDS["command"].default_commands == {}


def test_hook_for_uses_the_table_or_the_default_of_the_kind():
    config = parse("""
[[certificate]]
name = "mail.example.com"
hooks = ["smtpd", "dovecot", "postfix"]
[hooks.dovecot]
command = ["/usr/local/bin/doveadm", "reload"]
verify = ["imaps://127.0.0.1:993"]
timeout = 5
[hooks.postfix]
command = ["postfix", "reload"]
""", "t.toml")
    smtpd = hook_for(config, "smtpd", "rcctl")
    # A built-in hook without verify checks where the guide's smtpd listens.
    assert (smtpd.kind.name, smtpd.command, smtpd.verify) == (
        "smtpd", ("rcctl", "restart", "smtpd"), ("smtp+starttls://127.0.0.1:25",))
    dovecot = hook_for(config, "dovecot")
    assert (dovecot.command, dovecot.verify, dovecot.timeout) == (
        ("/usr/local/bin/doveadm", "reload"), ("imaps://127.0.0.1:993",), 5.0)
    assert hook_for(config, "postfix").kind.name == "command"
    assert hook_for(config, "postfix").verify == ()
    off = parse('[hooks.dovecot]\nverify = []\n', "t.toml")  # an explicit empty list turns the check off
    assert hook_for(off, "dovecot").verify == () and hook_for(off, "smtpd").verify == ("smtp+starttls://127.0.0.1:25",)


# ---------------------------------------------------------------------------
# Which service manager: rcctl, systemd (a stand-in systemctl), or the services' own commands.


def _stand_in(bin_dir: Path, name: str, record: Path) -> None:
    """A program ``name`` in ``bin_dir`` that appends its argv to ``record`` and succeeds."""
    bin_dir.mkdir(exist_ok=True)
    program = bin_dir / name
    program.write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\n')
    program.chmod(0o755)


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A fake root for /run/systemd/system and a PATH of /usr/bin:/bin plus a dir for stand-ins."""
    from certkeeper.keeper import hooks as hooks_pkg

    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    root.mkdir()
    bin_dir.mkdir()
    monkeypatch.setattr(hooks_pkg, "ROOT", root)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin")
    assert not any(Path(d, "rcctl").exists() for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"))
    return root, bin_dir


def test_service_manager_is_rcctl_then_systemd_then_direct(host, tmp_path):
    from certkeeper.keeper.hooks import service_manager

    root, bin_dir = host
    assert service_manager() == "direct"  # this machine: neither systemd running nor rcctl
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    assert service_manager() == "systemd"
    _stand_in(bin_dir, "rcctl", tmp_path / "calls")
    assert service_manager() == "rcctl"


def test_under_systemd_the_built_in_hooks_call_systemctl_with_debians_unit_names(host, tmp_path):
    root, bin_dir = host
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    calls = tmp_path / "calls"
    _stand_in(bin_dir, "systemctl", calls)
    config = parse("", "t.toml")
    for name in ("smtpd", "dovecot", "rspamd", "httpd"):
        result = hook_for(config, name).reload(["mail.example.com"])
        assert result.ok, result.describe()
    assert calls.read_text().splitlines() == [
        "systemctl restart opensmtpd", "systemctl reload dovecot", "systemctl reload rspamd",
        "systemctl reload nginx"]


def test_check_reports_a_missing_hook_command_and_warns_for_a_hook_without_verify(host, tmp_path, capsys,
                                                                                  monkeypatch):
    from certkeeper import cli

    root, bin_dir = host
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(f"""state_dir = "{tmp_path}/state"
[[certificate]]
name = "mail.example.com"
hooks = ["smtpd", "dovecot", "relayd", "custom"]
[hooks.dovecot]
verify = []
[hooks.custom]
command = ["{tmp_path}/not-there", "reload"]
verify = ["https://127.0.0.1:443"]
[hooks.script]
command = ["{conf}"]
""")
    assert cli.main(["--config", str(conf), "check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"certkeeper: warning: {conf}: hooks.dovecot: no verify endpoints: a reload is not checked to serve the new "
        "certificate (add verify = [\"smtps://127.0.0.1:465\", ...])",
        f"certkeeper: warning: {conf}: hooks.relayd: no verify endpoints: a reload is not checked to serve the new "
        "certificate (add verify = [\"smtps://127.0.0.1:465\", ...])",
        f"certkeeper: {conf}: hooks.relayd.command: 'rcctl' is not found on PATH (the built-in relayd command "
        "where the service manager is direct)",
        f"certkeeper: {conf}: hooks.custom.command: '{tmp_path}/not-there' does not exist",
        f"certkeeper: {conf}: hooks.script.command: '{conf}' is not executable",
    ]
    # Under systemd without systemctl, the built-in smtpd hook is reported too.
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(bin_dir))  # this machine has a systemctl (not running systemd)
    conf.write_text(f'state_dir = "{tmp_path}/state"\n[[certificate]]\nname = "mail.example.com"\n'
                    'hooks = ["smtpd"]\n')
    assert cli.main(["--config", str(conf), "check"]) == 1
    assert capsys.readouterr().err == (f"certkeeper: {conf}: hooks.smtpd.command: 'systemctl' is not found on PATH "
                                       "(the built-in smtpd command where the service manager is systemd)\n")
    _stand_in(bin_dir, "systemctl", tmp_path / "calls")
    out = io.StringIO()
    assert cli.main(["--config", str(conf), "check"], out=out) == 0
    assert capsys.readouterr().err == "" and out.getvalue() == f"{conf}: configuration OK\n"
    assert not (tmp_path / "calls").exists()  # check runs nothing


def test_run_command_reports_exit_status_and_output_as_one_line():
    result = run_command(["sh", "-c", "echo first line; echo 'second  line' >&2; exit 3"], timeout=10)
    assert (result.ok, result.returncode, result.output) == (False, 3, "first line second line")
    assert result.describe().endswith("exit 3: first line second line")
    assert "\n" not in result.describe()


def test_run_command_passes_argv_without_a_shell(tmp_path):
    target = tmp_path / "x; touch pwned"
    result = run_command(["touch", str(target)], timeout=10)
    assert result.ok and target.exists() and not (tmp_path / "pwned").exists()


def test_run_command_names_the_hook_and_certificates_in_the_environment():
    config = Config(path=Path("t.toml"), hooks={"echo": HookConfig("echo", ("sh", "-c", "echo $CERTKEEPER_HOOK:"
                                                                                      "$CERTKEEPER_CERTIFICATES"))})
    assert hook_for(config, "echo").reload(["a.example", "b.example"]).output == "echo:a.example b.example"


def test_run_command_kills_a_command_that_outlives_its_timeout():
    result = run_command(["sh", "-c", "echo started; sleep 30"], timeout=0.3)
    assert result.returncode is None and not result.ok
    assert result.output.startswith("killed after 0.3s timeout") and "started" in result.output


def test_run_command_kills_the_children_of_a_hung_command_too(tmp_path):
    pidfile = tmp_path / "child.pid"
    result = run_command(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert result.returncode is None and result.output.startswith("killed after 0.5s timeout")
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.02)
    assert not _alive(child), "the hook's child outlived the hook's timeout"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_run_command_does_not_wait_for_a_daemon_that_keeps_its_output_open(tmp_path):
    pidfile = tmp_path / "daemon.pid"
    try:  # with a pipe, this would wait an hour (the suite's timeout fails it); with a temp file it does not
        result = run_command(["sh", "-c", f"sleep 3600 & echo $! > {pidfile}; echo forked"], timeout=3600)
        assert result.ok and result.output == "forked"
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_run_command_reports_a_missing_program():
    result = run_command(["/nonexistent/rcctl", "restart", "smtpd"], timeout=5)
    assert result.returncode is None and "No such file" in result.output


def test_run_command_reads_back_only_the_tail_of_a_flood_of_output():
    result = run_command(["sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo the real error"], 10)
    assert result.ok and result.output.endswith("the real error") and len(result.output) <= 400


def test_one_line_keeps_the_tail_of_long_output():
    text = one_line("noise " * 200 + "\nsmtpd: load_pki_keys: failed", limit=60)
    assert len(text) == 60 and text.endswith("load_pki_keys: failed") and text.startswith("...")


# ---------------------------------------------------------------------------
# reload_and_verify with a plain-data fake of the services (no processes but `true`/`false`).


@dataclass
class FakeServices:
    """What each URL serves: 'disk' (always the file on disk), a fixed leaf, or None (down)."""

    store: CertificateStore
    certificate: CertificateConfig
    serving: dict[str, object] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)

    def probe(self, url: str, server_name: str, timeout: float) -> Observation:
        self.probes.append(url)
        what = self.serving.get(url)
        now = datetime.now(UTC)
        if what is None:
            return Observation(url, None, "connection refused", now)
        if what == "disk":
            what = certs.parse_cert(self.store.read(self.certificate).cert)  # type: ignore[union-attr]
        return Observation(url, what, "", now)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _unit_setup(tmp_path, hooks: dict[str, HookConfig], cert_hooks: tuple[str, ...]):
    cert = CertificateConfig(name=NAME, domains=(NAME,), key_type="ecdsa-p256", key=tmp_path / "k.pem",
                             cert=tmp_path / "c.pem", chain=tmp_path / "ch.pem", fullchain=tmp_path / "f.pem",
                             hooks=cert_hooks)
    store = CertificateStore(tmp_path / "state")
    old, new = make_set((NAME,)), make_set((NAME,))
    store.install(cert, old)
    store.install(cert, new)
    config = Config(path=tmp_path / "t.toml", state_dir=tmp_path / "state", certificates=(cert,), hooks=hooks)
    return config, store, cert, certs.parse_cert(old.cert), certs.parse_cert(new.cert)


def test_plan_runs_a_shared_hook_once_for_all_its_certificates(tmp_path):
    a = CertificateConfig("a", ("a.example",), "ecdsa-p256", tmp_path / "a", tmp_path / "b", tmp_path / "c",
                          tmp_path / "d", hooks=("smtpd", "dovecot"))
    b = CertificateConfig("b", ("b.example",), "ecdsa-p256", tmp_path / "e", tmp_path / "f", tmp_path / "g",
                          tmp_path / "h", hooks=("dovecot", "httpd"))
    steps = reload.plan(Config(path=tmp_path / "t.toml", certificates=(a, b)), [a, b])
    assert [(s.hook.name, s.names()) for s in steps] == [
        ("smtpd", ["a"]), ("dovecot", ["a", "b"]), ("httpd", ["b"])]


def test_stale_service_is_rolled_back_and_reported_with_the_serial_it_served(tmp_path):
    url = "imaps://127.0.0.1:993"
    config, store, cert, old, new = _unit_setup(
        tmp_path, {"dovecot": HookConfig("dovecot", ("true",), (url,), 10, 2.0)}, ("dovecot",))
    fake, clock = FakeServices(store, cert, {url: old}), FakeClock()
    keeper = LocalKeeper(config, store=store)
    result = reload.reload_and_verify(config, keeper, [cert], lambda line: None, prober=fake.probe,
                                      sleep=clock.sleep, clock=lambda: clock.now)
    assert not result.ok and len(result.failures) == 1
    assert result.rolled_back == (NAME,) and result.by_certificate == {NAME: result.failures}
    line = result.failures[0]
    assert line.startswith("dovecot: ") and url in line
    assert f"served serial {format_serial(old.serial)} (the previous certificate) for {NAME}" in line
    assert f"rolled back {NAME} to serial {format_serial(old.serial)}" in line
    assert certs.parse_cert(store.read(cert).cert).fingerprint == old.fingerprint  # type: ignore[union-attr]
    assert sum(clock.slept) <= 2.0 and len(clock.slept) > 1  # retried with backoff, within verify_timeout
    saved = verification.last_results(config, NAME)
    assert [(r["endpoint"], r["ok"], r["serial"]) for r in saved] == [(url, True, format_serial(old.serial))]


def test_a_service_down_before_the_run_is_reported_not_rolled_back(tmp_path):
    url = "smtps://127.0.0.1:465"
    config, store, cert, old, new = _unit_setup(
        tmp_path, {"smtpd": HookConfig("smtpd", ("false",), (url,), 10, 1.0)}, ("smtpd",))
    fake, clock = FakeServices(store, cert, {}), FakeClock()
    keeper = LocalKeeper(config, store=store)
    result = reload.reload_and_verify(config, keeper, [cert], lambda line: None, prober=fake.probe,
                                      sleep=clock.sleep, clock=lambda: clock.now)
    assert not result.ok
    assert "was already down before the reload" in result.failures[0] and "nothing rolled back" in result.failures[0]
    assert result.rolled_back == () and result.by_certificate == {NAME: result.failures}
    assert certs.parse_cert(store.read(cert).cert).fingerprint == new.fingerprint  # type: ignore[union-attr]


def test_a_hook_without_endpoints_is_judged_by_its_exit_status(tmp_path):
    config, store, cert, old, new = _unit_setup(
        tmp_path, {"rspamd": HookConfig("rspamd", ("true",)), "other": HookConfig("other", ("false",))},
        ("rspamd", "other"))
    keeper = LocalKeeper(config, store=store)
    result = reload.reload_and_verify(config, keeper, [cert], lambda line: None, prober=FakeServices(store, cert).probe)
    assert [line.split(":")[0] for line in result.failures] == ["other"]
    assert "reload failed (false: exit 1)" in result.failures[0]
    assert certs.parse_cert(store.read(cert).cert).fingerprint == old.fingerprint  # type: ignore[union-attr]


def test_a_first_certificate_has_nothing_to_roll_back_to(tmp_path):
    config, store, cert, old, new = _unit_setup(tmp_path, {"other": HookConfig("other", ("false",))}, ("other",))
    for prev in tmp_path.glob("*.prev"):
        prev.unlink()  # as after the very first issuance
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lambda line: None)
    assert result.failures == ["other: reload failed (false: exit 1)",
                               f"cannot roll back: {NAME}: no previous certificate set to restore"]
    assert certs.parse_cert(store.read(cert).cert).fingerprint == new.fingerprint  # type: ignore[union-attr]


def test_failures_are_told_per_certificate_even_when_one_name_contains_another(tmp_path):
    config, store, mail, _, _ = _unit_setup(tmp_path, {"good": HookConfig("good", ("true",)),
                                                      "bad": HookConfig("bad", ("false",))}, ("bad",))
    short = CertificateConfig("example.test", ("example.test",), "ecdsa-p256", tmp_path / "k2", tmp_path / "c2",
                              tmp_path / "ch2", tmp_path / "f2", hooks=("good",))
    store.install(short, make_set(("example.test",)))
    store.install(short, make_set(("example.test",)))
    config = dataclasses.replace(config, certificates=(*config.certificates, short))
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [mail, short], lambda line: None)
    assert len(result.failures) == 1 and "mail.example.test" in result.failures[0]
    assert result.by_certificate == {"mail.example.test": result.failures}  # not example.test: its hook worked
    assert result.rolled_back == ("mail.example.test",)


def test_nothing_to_do_without_hooks(tmp_path):
    config, store, cert, old, new = _unit_setup(tmp_path, {}, ())
    keeper = LocalKeeper(config, store=store)
    assert reload.reload_and_verify(config, keeper, [cert], lambda line: None) == reload.ReloadResult(ok=True)


# ---------------------------------------------------------------------------
# Real OpenSMTPD and Dovecot.


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _serial(der: bytes | None) -> int:
    assert der, "no certificate served"
    return x509.load_der_x509_certificate(der).serial_number


def smtp_serial(port: int, starttls: bool) -> int:
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="test.invalid", timeout=10) as smtp:
            smtp.starttls(context=_insecure())
            return _serial(smtp.sock.getpeercert(binary_form=True))
    with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="test.invalid", context=_insecure(), timeout=10) as smtp:
        return _serial(smtp.sock.getpeercert(binary_form=True))


def imap_serial(port: int, starttls: bool) -> int:
    if starttls:
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        imap.starttls(_insecure())
    else:
        imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=_insecure(), timeout=10)
    try:
        return _serial(imap.sock.getpeercert(binary_form=True))
    finally:
        imap.shutdown()


def sni_serial(port: int, server_name: str) -> int:
    """A bare TLS client with SNI, for the implicit-TLS ports."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            _insecure().wrap_socket(sock, server_hostname=server_name) as tls:
        return _serial(tls.getpeercert(binary_form=True))


def served_serials(ms: MailServices) -> dict[str, int]:
    return {
        "smtp+starttls": smtp_serial(ms.smtp_port, starttls=True), "smtps": smtp_serial(ms.smtps_port, starttls=False),
        "imap+starttls": imap_serial(ms.imap_port, starttls=True), "imaps": imap_serial(ms.imaps_port, starttls=False),
    }


def serial_of(cs: CertificateSet) -> int:
    return certs.parse_cert(cs.cert).serial


def _config(ms: MailServices, tmp_path: Path, certificates: tuple[CertificateConfig, ...],
            smtpd: tuple[str, ...] | None = None, dovecot: tuple[str, ...] | None = None,
            verify_timeout: float = 15.0) -> Config:
    return Config(path=tmp_path / "certkeeper.toml", state_dir=tmp_path / "state", certificates=certificates, hooks={
        "smtpd": HookConfig("smtpd", smtpd or ms.smtpd_restart(), ms.smtpd_urls, 30.0, verify_timeout),
        "dovecot": HookConfig("dovecot", dovecot or ms.dovecot_reload(), ms.dovecot_urls, 30.0, verify_timeout),
    })


@pytest.fixture
def running(mail_services, tmp_path):
    """smtpd + dovecot serving OLD for mail.example.test; NEW is installed but not yet loaded."""
    cert = mail_services.certificate_config(NAME)
    store = CertificateStore(tmp_path / "state")
    old, new = make_set((NAME,)), make_set((NAME,))
    store.install(cert, old)
    mail_services.start()
    assert set(served_serials(mail_services).values()) == {serial_of(old)}
    store.install(cert, new)
    return mail_services, store, cert, old, new


def test_renewal_makes_smtpd_and_dovecot_serve_the_new_certificate(running, tmp_path):
    ms, store, cert, old, new = running
    config = _config(ms, tmp_path, (cert,))
    lines: list[str] = []
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lines.append)
    assert result == reload.ReloadResult(ok=True)
    assert served_serials(ms) == dict.fromkeys(("smtp+starttls", "smtps", "imap+starttls", "imaps"), serial_of(new))
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (1, 1)
    saved = verification.last_results(config, NAME)
    assert sorted(r["endpoint"] for r in saved) == sorted(ms.smtpd_urls + ms.dovecot_urls)
    assert all(r["ok"] and r["serial"] == format_serial(serial_of(new)) for r in saved)
    assert any("ok, served serial" in line for line in lines)


def test_without_rcctl_or_systemd_the_built_in_hooks_restart_smtpd_and_reload_dovecot_themselves(
        running, host, tmp_path, monkeypatch):
    ms, store, cert, old, new = running
    monkeypatch.setenv("CONFIG_FILE", str(ms.dovecot_conf))  # doveadm's default config, as /etc/dovecot is
    config = Config(path=tmp_path / "certkeeper.toml", state_dir=tmp_path / "state", certificates=(cert,), hooks={
        "smtpd": HookConfig("smtpd", (), ms.smtpd_urls, 30.0, 15.0),  # no command: the built-in one
        "dovecot": HookConfig("dovecot", (), ms.dovecot_urls, 30.0, 15.0),
    })
    assert hook_for(config, "smtpd").command[-2:] == ("restart", "smtpd")
    assert hook_for(config, "dovecot").command == ("doveadm", "reload")
    before = _smtpd_parents()
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lambda line: None)
    assert result == reload.ReloadResult(ok=True)
    assert served_serials(ms) == dict.fromkeys(("smtp+starttls", "smtps", "imap+starttls", "imaps"), serial_of(new))
    after = _smtpd_parents()
    assert len(before) == len(after) == 1 and before[0][0] != after[0][0]  # a new smtpd ...
    assert after[0][1] == [before[0][1][0], "-f", str(ms.smtpd_conf)]  # ... with the same config, detached
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (0, 0)  # not the fixture's mailctl


def test_the_direct_smtpd_restart_leaves_smtpd_running_when_its_config_is_broken(running, host, tmp_path):
    ms, store, cert, old, new = running
    good = ms.smtpd_conf.read_text()
    ms.smtpd_conf.write_text(good + "listen on nowhere-at-all bogus\n")
    config = Config(path=tmp_path / "certkeeper.toml", hooks={"smtpd": HookConfig("smtpd", (), ms.smtpd_urls)})
    result = hook_for(config, "smtpd").reload()
    assert result.returncode == 1 and "smtpd left running with its old configuration" in result.output
    assert f"-f {ms.smtpd_conf} -n: exit 1" in result.output
    assert smtp_serial(ms.smtps_port, starttls=False) == serial_of(old)  # still up, never stopped


def test_the_direct_restart_keeps_smtpds_arguments_but_not_its_foreground_flags():
    from certkeeper.keeper.hooks import direct

    assert direct.detached(["/usr/sbin/smtpd", "-d", "-f", "/etc/smtpd.conf"]) == ["/usr/sbin/smtpd", "-f",
                                                                                  "/etc/smtpd.conf"]
    assert direct.detached(["smtpd", "-dv", "-Dx=1", "-F", "-P", "mda"]) == ["smtpd", "-v", "-Dx=1", "-P", "mda"]
    assert direct.detached(["smtpd", "-df/etc/d.conf"]) == ["smtpd", "-f/etc/d.conf"]
    assert direct.main(["reload", "smtpd"]) == 1  # not an action: usage, exit 1


def _smtpd_parents() -> list[tuple[int, list[str]]]:
    from certkeeper.keeper.hooks import direct

    return direct.smtpd_parents()


def test_a_hook_that_exits_non_zero_rolls_back_and_the_old_certificate_is_served(running, tmp_path):
    ms, store, cert, old, new = running
    marker = tmp_path / "fail-once"
    marker.touch()
    config = _config(ms, tmp_path, (cert,), smtpd=ms.smtpd_restart(fail_once=marker))
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lambda line: None)
    assert not result.ok and len(result.failures) == 1
    line = result.failures[0]
    assert line.startswith("smtpd: reload failed (") and "exit 1: simulated hook failure" in line
    assert f"rolled back {NAME} to serial {format_serial(serial_of(old))}" in line
    assert set(served_serials(ms).values()) == {serial_of(old)}  # dovecot was reloaded back too
    assert store.read(cert) == old
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (2, 2)


def test_smtpd_refusing_the_new_key_rolls_back_and_serves_the_old_certificate(running, tmp_path):
    ms, store, cert, old, new = running
    cert.key.chmod(0o644)  # smtpd: "insecure permissions: must be at most rwxr-----"
    config = _config(ms, tmp_path, (cert,))
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lambda line: None)
    assert not result.ok and len(result.failures) == 1
    line = result.failures[0]
    assert line.startswith("smtpd: reload failed") and "smtpd(failed)" in line
    assert f"{ms.smtpd_urls[1]} served no certificate (connection refused) for {NAME}" in line
    assert f"rolled back {NAME} to serial {format_serial(serial_of(old))}; served again on 2 endpoint(s)" in line
    assert set(served_serials(ms).values()) == {serial_of(old)}
    assert cert.key.stat().st_mode & 0o777 == 0o600 and store.read(cert) == old


def test_a_service_that_keeps_the_old_certificate_is_caught_and_rolled_back(running, tmp_path):
    ms, store, cert, old, new = running
    config = _config(ms, tmp_path, (cert,), dovecot=("true",), verify_timeout=1.0)  # a reload that does nothing
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lambda line: None)
    assert not result.ok and len(result.failures) == 1
    line = result.failures[0]
    old_hex = format_serial(serial_of(old))
    assert line.startswith("dovecot: ") and f"{ms.dovecot_urls[1]} served serial {old_hex} (the previous " \
                                                 f"certificate) for {NAME}" in line
    assert set(served_serials(ms).values()) == {serial_of(old)}  # smtpd restarted again with the old files
    assert store.read(cert) == old


def test_a_service_down_before_the_run_is_reported_not_blamed(running, tmp_path):
    ms, store, cert, old, new = running
    ms.stop_dovecot()
    config = _config(ms, tmp_path, (cert,))
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], lambda line: None)
    assert not result.ok and len(result.failures) == 1
    assert result.failures[0].startswith("dovecot: was already down before the reload (")
    assert "connection refused" in result.failures[0] and "nothing rolled back" in result.failures[0]
    assert store.read(cert) == new
    assert smtp_serial(ms.smtp_port, True) == smtp_serial(ms.smtps_port, False) == serial_of(new)


def test_two_certificates_sharing_hooks_reload_each_service_once(mail_services_factory, tmp_path):
    names = ("mail.example.test", "mx2.example.test")
    ms = mail_services_factory(names)
    store = CertificateStore(tmp_path / "state")
    configs = tuple(ms.certificate_config(name) for name in names)
    for cert in configs:
        store.install(cert, make_set((cert.name,)))
    ms.start()
    new = {cert.name: make_set((cert.name,)) for cert in configs}
    for cert in configs:
        store.install(cert, new[cert.name])
    config = _config(ms, tmp_path, configs)
    result = reload.reload_and_verify(config, LocalKeeper(config, store=store), list(configs), lambda line: None)
    assert result.ok, result.failures
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (1, 1)
    for name in names:  # each name's own certificate, chosen by SNI
        assert sni_serial(ms.smtps_port, name) == sni_serial(ms.imaps_port, name) == serial_of(new[name])
        assert {r["serial"] for r in verification.last_results(config, name)} == {format_serial(serial_of(new[name]))}


# ---------------------------------------------------------------------------
# End to end: a real ACME renewal (Pebble) through the CLI, hooks to the real smtpd and dovecot.


def _cli(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "certkeeper", "-v", "--config", str(conf), *args], cwd=root,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def _e2e_config(pebble, ms: MailServices, tmp_path: Path, cert: CertificateConfig,
                dovecot: tuple[str, ...] | None = None) -> Path:
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(pebble.config_text(tmp_path, []) + f"""
[[certificate]]
name = "{NAME}"
domains = ["{NAME}"]
key_type = "ecdsa-p256"
key = "{cert.key}"
cert = "{cert.cert}"
chain = "{cert.chain}"
fullchain = "{cert.fullchain}"
hooks = ["smtpd", "dovecot"]
[hooks.smtpd]
command = {json.dumps(list(ms.smtpd_restart()))}
verify = {json.dumps(list(ms.smtpd_urls))}
[hooks.dovecot]
command = {json.dumps(list(dovecot or ms.dovecot_reload()))}
verify = {json.dumps(list(ms.dovecot_urls))}
""")
    return conf


@pytest.fixture
def serving_old(mail_services, tmp_path):
    """smtpd + dovecot serving an OLD certificate (as acme-client left it) for mail.example.test."""
    cert = mail_services.certificate_config(NAME)
    old = make_set((NAME,))
    CertificateStore(tmp_path / "state").install(cert, old)
    mail_services.start()
    assert set(served_serials(mail_services).values()) == {serial_of(old)}
    return mail_services, cert, old


def test_renew_force_against_pebble_makes_smtpd_and_dovecot_serve_the_new_serial(pebble, serving_old, tmp_path):
    ms, cert, old = serving_old
    conf = _e2e_config(pebble, ms, tmp_path, cert)
    result = _cli(conf, "renew", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"{NAME}: renewed, valid until ")
    new_serial = certs.parse_cert(cert.cert.read_bytes()).serial
    assert new_serial != serial_of(old)
    issued = x509.load_pem_x509_certificate(cert.cert.read_bytes())
    assert issued.issuer != x509.load_pem_x509_certificate(old.cert).issuer  # Pebble's, not the test factory's
    # The test's own TLS clients (smtplib STARTTLS, SMTPS, imaplib STARTTLS, IMAPS), not certkeeper's probes:
    assert served_serials(ms) == dict.fromkeys(("smtp+starttls", "smtps", "imap+starttls", "imaps"), new_serial)
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (1, 1)
    saved = verification.last_results(config_load(conf), NAME)
    assert sorted(r["endpoint"] for r in saved) == sorted(ms.smtpd_urls + ms.dovecot_urls)
    assert {(r["ok"], r["serial"]) for r in saved} == {(True, format_serial(new_serial))}


def test_renew_force_against_pebble_rolls_back_when_a_hook_fails(pebble, serving_old, tmp_path):
    ms, cert, old = serving_old
    marker = tmp_path / "fail-once"
    marker.touch()
    conf = _e2e_config(pebble, ms, tmp_path, cert, dovecot=ms.dovecot_reload(fail_once=marker))
    result = _cli(conf, "renew", "--force")
    assert result.returncode == 1, result.stdout + result.stderr
    line = result.stdout.splitlines()[-1]  # the outcome line comes after the -v progress lines
    assert line.startswith(f"{NAME}: failed: dovecot: reload failed (") and "simulated hook failure" in line
    assert f"rolled back {NAME} to serial {format_serial(serial_of(old))}" in line
    assert CertificateStore(tmp_path / "state").read(cert) == old
    assert served_serials(ms) == dict.fromkeys(("smtp+starttls", "smtps", "imap+starttls", "imaps"), serial_of(old))
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (2, 2)
    # The rolled-back renewal counts as a failed attempt: backoff, no success recorded, so the
    # next check does not order (and restart smtpd) again at once.
    state = load_cert_state(tmp_path / "state", NAME)
    assert state.consecutive_failures == 1 and state.last_success is None
    assert state.retry_not_before is not None and "simulated hook failure" in state.last_error
    shown = json.loads(_cli(conf, "status", "--json").stdout)["certificates"][0]  # the same decision
    assert shown["status"] == "failing" and shown["next_action"].startswith("retry ")
    assert shown["backoff_until"] == shown["next_action_at"] > shown["last_attempt"]
    again = _cli(conf, "renew")
    assert again.returncode == 2 and "retrying after 1 failure(s)" in again.stdout
    assert f"not due until {shown['next_action_at'][:16].replace('T', ' ')} UTC" in again.stdout
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (2, 2)
    # The certificate issued before the rollback was kept (root's journal directory, 0600) and the next
    # attempt installs and reloads it again before it places a new order.
    kept = tmp_path / "state" / "journal" / f"{NAME}.rolled-back.pem"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    kept_serial = certs.parse_cert(kept.read_bytes().split(b"-----END", 1)[1].split(b"\n", 1)[1]).serial
    assert kept_serial != serial_of(old)
    retried = _cli(conf, "renew", "--force")  # the hook works now
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert f"installing again serial {kept_serial:x}, issued before the rollback (no new order)" in retried.stdout
    assert certs.parse_cert(cert.cert.read_bytes()).serial == kept_serial and not kept.exists()
    assert served_serials(ms) == dict.fromkeys(("smtp+starttls", "smtps", "imap+starttls", "imaps"), kept_serial)


def test_renew_dry_run_orders_from_staging_installs_nothing_and_probes_the_endpoints(pebble, serving_old, tmp_path):
    ms, cert, old = serving_old
    conf = _e2e_config(pebble, ms, tmp_path, cert)
    text = conf.read_text()  # the live directory is unreachable: only [acme] staging can issue
    conf.write_text(text.replace(f'directory = "{pebble.directory}"',
                                 f'directory = "https://127.0.0.1:{free_port()}/dir"\nstaging = "{pebble.directory}"'))
    state_dir = tmp_path / "state"
    before = {p: p.read_bytes() for p in state_dir.rglob("*") if p.is_file()}
    files = {p: p.read_bytes() for p in (cert.key, cert.cert, cert.chain, cert.fullchain)}
    result = _cli(conf, "renew", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NAME}: renewed, dry run: {pebble.directory} issued serial" in result.stdout
    assert "nothing installed, no hook run" in result.stdout
    for url in ms.smtpd_urls + ms.dovecot_urls:  # each verify endpoint probed, serving the old set
        assert f"{url}: ok, serial {format_serial(serial_of(old))}" in result.stdout
    assert {p: p.read_bytes() for p in files} == files
    assert (ms.run_count("smtpd restart"), ms.run_count("dovecot reload")) == (0, 0)
    after = {p: p.read_bytes() for p in state_dir.rglob("*") if p.is_file()}
    assert {p for p in after if p not in before} <= {state_dir / "acme" / "ca-bundle.pem"}  # a CA cache, no state
    assert all(after[p] == before[p] for p in before)
    assert served_serials(ms) == dict.fromkeys(("smtp+starttls", "smtps", "imap+starttls", "imaps"), serial_of(old))
    nothing = _cli(conf, "renew", "--dry-run", "--directory", f"https://127.0.0.1:{free_port()}/dir")
    assert nothing.returncode == 1 and f"{NAME}: failed: dry run:" in nothing.stdout
