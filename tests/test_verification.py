"""TLS probes: protocol steps against plain-data fakes, then real smtpd, dovecot and a TLS server."""

from __future__ import annotations

import argparse
import io
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certkeeper.commands import verify as verify_command
from certkeeper.core import certs
from certkeeper.core.config import Config, parse
from certkeeper.core.errors import ConfigError
from certkeeper.keeper.store import CertificateSet, CertificateStore
from certkeeper.network import verification
from certkeeper.network.verification import (
    Check,
    Endpoint,
    Observation,
    ProbeError,
    format_serial,
    imap_starttls,
    last_results,
    probe,
    save_results,
    served_text,
    smtp_reply,
    smtp_starttls,
)
from tests.certfactory import make_set
from tests.fixtures.peers import free_port

NAME = "mail.example.test"


@dataclass
class FakeChat:
    """A scripted server: the lines it says, and what the client sent."""

    lines: list[str]
    sent: list[str] = field(default_factory=list)

    def send(self, line: str) -> None:
        self.sent.append(line)

    def line(self) -> str:
        if not self.lines:
            raise ProbeError("the server closed the connection")
        return self.lines.pop(0)


# ---------------------------------------------------------------------------
# Protocol steps.


def test_endpoint_parse_and_url_round_trip():
    assert Endpoint.parse("smtp+starttls://127.0.0.1:587") == Endpoint("smtp+starttls", "127.0.0.1", 587)
    v6 = Endpoint.parse("imaps://[::1]:993/")
    assert (v6.host, v6.port, v6.url) == ("::1", 993, "imaps://[::1]:993")


def test_smtp_reply_reads_continuation_lines():
    chat = FakeChat(["250-mail.example.test hello", "250-PIPELINING", "250 STARTTLS", "extra"])
    assert smtp_reply(chat) == (250, ["mail.example.test hello", "PIPELINING", "STARTTLS"])
    assert chat.lines == ["extra"]
    assert smtp_reply(FakeChat(["354"])) == (354, [""])
    with pytest.raises(ProbeError, match="not an SMTP reply"):
        smtp_reply(FakeChat(["* OK IMAP4rev1 ready"]))


def test_smtp_starttls_says_ehlo_then_starttls():
    chat = FakeChat(["220 mail.example.test ESMTP OpenSMTPD", "250-mail.example.test Hello", "250-8BITMIME",
                     "250-STARTTLS", "250 HELP", "220 Ready to start TLS"])
    smtp_starttls(chat)
    assert chat.sent == ["EHLO certkeeper.invalid", "STARTTLS"] and chat.lines == []


@pytest.mark.parametrize(("lines", "message"), [
    (["554 go away"], "SMTP greeting 554 go away"),
    (["220 hi", "250-mail Hello", "250 SIZE 1000"], "does not offer STARTTLS"),
    (["220 hi", "250 STARTTLS-NOT"], "does not offer STARTTLS"),  # line 1 of EHLO is the domain, not a keyword
    (["220 hi", "250-mail", "250 STARTTLS", "454 4.7.0 TLS not available"], "STARTTLS answered 454"),
    (["220 hi", "500 what"], "EHLO answered 500"),
])
def test_smtp_starttls_refusals(lines, message):
    with pytest.raises(ProbeError, match=message):
        smtp_starttls(FakeChat(lines))


def test_imap_starttls_skips_untagged_lines_until_the_tagged_ok():
    chat = FakeChat(["* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.", "* CAPABILITY IMAP4rev1",
                     "ck1 OK Begin TLS negotiation now."])
    imap_starttls(chat)
    assert chat.sent == ["ck1 STARTTLS"]


@pytest.mark.parametrize(("lines", "message"), [
    (["* PREAUTH logged in"], "IMAP greeting"),
    (["* BYE too busy"], "IMAP greeting"),
    (["* OK ready", "ck1 BAD unknown command"], "STARTTLS answered 'BAD unknown command'"),
    (["* OK ready", "xx OK what"], "unexpected IMAP line"),
])
def test_imap_starttls_refusals(lines, message):
    with pytest.raises(ProbeError, match=message):
        imap_starttls(FakeChat(lines))


def test_served_text_names_the_serial_and_whether_it_is_the_previous_one():
    old, new = certs.parse_cert(make_set((NAME,)).cert), certs.parse_cert(make_set((NAME,)).cert)
    now = datetime.now(UTC)
    assert served_text(Observation("u", old, "", now), new, old) == \
        f"served serial {format_serial(old.serial)} (the previous certificate)"
    assert served_text(Observation("u", old, "", now), new) == \
        f"served serial {format_serial(old.serial)} instead of serial {format_serial(new.serial)}"
    assert served_text(Observation("u", None, "connection refused", now), new) == \
        "served no certificate (connection refused)"


def test_results_round_trip_through_the_state_dir(tmp_path):
    config = Config(path=tmp_path / "t.toml", state_dir=tmp_path / "state")
    info = certs.parse_cert(make_set((NAME,)).cert)
    when = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    checks = [Check(NAME, "smtpd", info, Observation("smtps://127.0.0.1:465", info, "", when)),
              Check(NAME, "dovecot", info, Observation("imaps://127.0.0.1:993", None, "connection refused", when))]
    save_results(config, NAME, checks)
    saved = last_results(config, NAME)
    assert saved[0] == {"endpoint": "smtps://127.0.0.1:465", "hook": "smtpd", "serial": format_serial(info.serial),
                        "fingerprint": info.fingerprint, "not_after": info.not_after.isoformat().replace("+00:00", "Z"),
                        "ok": True, "error": None, "checked_at": "2026-11-25T12:00:00Z"}
    assert (saved[1]["ok"], saved[1]["serial"], saved[1]["error"]) == (False, None, "connection refused")
    assert tuple(saved[0]) == verification.RESULT_KEYS and tuple(saved[1]) == verification.RESULT_KEYS
    assert list(saved[0]) == list(checks[0].to_dict())  # what is written is what is read
    (tmp_path / "state" / "verify" / "old.json").write_text('{"results": [{"endpoint": "smtps://127.0.0.1:465"}]}')
    (old,) = last_results(config, "old")  # a file written before a key existed: same keys, None
    assert tuple(old) == verification.RESULT_KEYS and old["endpoint"] == "smtps://127.0.0.1:465" and old["ok"] is None
    assert last_results(config, "never-checked") == []
    (tmp_path / "state" / "verify" / "broken.json").write_text("{not json")
    assert last_results(config, "broken") == []


# ---------------------------------------------------------------------------
# Probes over real sockets.


def test_probe_reports_a_closed_port():
    seen = probe(f"smtps://127.0.0.1:{free_port()}", NAME, timeout=2)
    assert seen.cert is None and seen.error == "connection refused"


def test_probe_gives_up_on_a_silent_server_within_its_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        seen = probe(f"smtp+starttls://127.0.0.1:{server.getsockname()[1]}", NAME, timeout=0.3)
    assert seen.cert is None and seen.error == "timed out after 0.3s"


def _serve_once(server: socket.socket, reply: bytes) -> None:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"220 fake ESMTP\r\n")
        conn.recv(1024)
        conn.sendall(b"250-fake\r\n250 STARTTLS\r\n")
        conn.recv(1024)
        conn.sendall(reply)
        conn.recv(1024)


def test_probe_refuses_data_injected_after_starttls():
    # RFC 3207 6 / CVE-2011-0411: bytes before the handshake must not be taken as TLS-protected.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        thread = threading.Thread(target=_serve_once, args=(server, b"220 go ahead\r\n250 injected\r\n"))
        thread.start()
        seen = probe(f"smtp+starttls://127.0.0.1:{server.getsockname()[1]}", NAME, timeout=3)
        thread.join(5)
    assert seen.cert is None and seen.error == "the server sent data after agreeing to STARTTLS"


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[int, dict[str, CertificateSet]]]:
    """A TLS server (stdlib ssl) choosing its certificate by SNI, like httpd with two server blocks."""
    sets = {name: make_set((name,)) for name in ("www.example.test", "mta-sts.example.test")}
    contexts = {}
    for name, cs in sets.items():
        (tmp_path / f"{name}.pem").write_bytes(cs.fullchain)
        (tmp_path / f"{name}.key").write_bytes(cs.key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        contexts[name] = context
    default = contexts["www.example.test"]

    def pick(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        if server_name in contexts:
            sock.context = contexts[server_name]

    default.sni_callback = pick  # type: ignore[assignment]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with default.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], sets
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_https_probe_sends_the_certificate_name_as_sni(tls_server):
    port, sets = tls_server
    for name, cs in sets.items():
        seen = probe(f"https://127.0.0.1:{port}", name, timeout=5)
        assert seen.error == "" and seen.cert is not None
        assert seen.cert.fingerprint == certs.parse_cert(cs.cert).fingerprint


def test_starttls_url_on_an_implicit_tls_port_fails_cleanly(tls_server):
    port, _ = tls_server
    seen = probe(f"imap+starttls://127.0.0.1:{port}", NAME, timeout=0.5)
    assert seen.cert is None and seen.error == "timed out after 0.5s"


# ---------------------------------------------------------------------------
# Real smtpd and dovecot: every scheme, and `certkeeper verify`.


@pytest.fixture
def verified(mail_services, tmp_path):
    cert = mail_services.certificate_config(NAME)
    store = CertificateStore(tmp_path / "state")
    first = make_set((NAME,))
    store.install(cert, first)
    mail_services.start()
    # A file, as an operator has: `certkeeper verify` hands its text to the unprivileged worker.
    text = f"""state_dir = "{tmp_path}/state"
[[certificate]]
name = "{cert.name}"
domains = {json.dumps(list(cert.domains))}
key_type = "{cert.key_type}"
key = "{cert.key}"
cert = "{cert.cert}"
chain = "{cert.chain}"
fullchain = "{cert.fullchain}"
hooks = ["smtpd", "dovecot"]
[hooks.smtpd]
command = {json.dumps(list(mail_services.smtpd_restart()))}
verify = {json.dumps(list(mail_services.smtpd_urls))}
[hooks.dovecot]
command = {json.dumps(list(mail_services.dovecot_reload()))}
verify = {json.dumps(list(mail_services.dovecot_urls))}
"""
    (tmp_path / "certkeeper.toml").write_text(text)
    config = parse(text, tmp_path / "certkeeper.toml")
    return mail_services, config, store, config.certificate(cert.name), first


def test_probes_see_what_smtpd_and_dovecot_serve(verified):
    ms, config, store, cert, first = verified
    fingerprint = certs.parse_cert(first.cert).fingerprint
    for url in ms.smtpd_urls + ms.dovecot_urls:
        seen = probe(url, NAME)
        assert seen.error == "" and seen.cert is not None and seen.cert.fingerprint == fingerprint, url


def test_command_verify_exit_0_when_served_matches_disk_then_1_when_not(verified):
    ms, config, store, cert, first = verified
    args = argparse.Namespace(names=[])
    out = io.StringIO()
    assert verify_command.main(config, args, out) == 0
    assert out.getvalue().count(": ok, serial ") == 4
    assert all(r["ok"] for r in last_results(config, NAME))

    second = make_set((NAME,))
    store.install(cert, second)  # on disk, not reloaded: the bug certkeeper exists to catch
    out = io.StringIO()
    assert verify_command.main(config, argparse.Namespace(names=[NAME]), out) == 1
    old_hex = format_serial(certs.parse_cert(first.cert).serial)
    assert out.getvalue().count(f"FAILED, served serial {old_hex} instead of serial") == 4
    assert {r["serial"] for r in last_results(config, NAME)} == {old_hex}
    assert not any(r["ok"] for r in last_results(config, NAME))
    assert {r["error"] for r in last_results(config, NAME)} == {
        f"expected serial {format_serial(certs.parse_cert(second.cert).serial)}"}


def test_command_verify_rejects_an_unknown_name(tmp_path):
    config = Config(path=Path("/etc/certkeeper.toml"), state_dir=tmp_path)
    with pytest.raises(ConfigError, match="no \\[\\[certificate\\]\\] named 'nope'"):
        verify_command.main(config, argparse.Namespace(names=["nope"]), io.StringIO())


def test_command_verify_suggests_endpoints_for_hooks_without_any(tmp_path):
    text = f"""
state_dir = "{tmp_path}/state"
[[certificate]]
name = "mail.example.com"
hooks = ["smtpd", "rspamd"]
key = "{tmp_path}/k"
cert = "{tmp_path}/c"
chain = "{tmp_path}/ch"
fullchain = "{tmp_path}/f"
[[certificate]]
name = "bare.example.com"
key = "{tmp_path}/k2"
cert = "{tmp_path}/c2"
chain = "{tmp_path}/ch2"
fullchain = "{tmp_path}/f2"
[hooks.smtpd]
verify = []  # smtpd's default endpoint turned off
"""
    (tmp_path / "t.toml").write_text(text)
    config = parse(text, tmp_path / "t.toml")
    out = io.StringIO()
    assert verify_command.main(config, argparse.Namespace(names=[]), out) == 0  # nothing to check is no failure
    mail, bare = out.getvalue().splitlines()
    assert mail == ('mail.example.com: no verify endpoints; add e.g. [hooks.smtpd] verify = '
                    '["smtp+starttls://127.0.0.1:25", "smtp+starttls://127.0.0.1:587", "smtps://127.0.0.1:465"]')
    assert bare.startswith("bare.example.com: no verify endpoints; it has no hooks")
