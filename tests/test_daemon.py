"""``certkeeper run``: the control socket in-process, then the daemon as a subprocess
on loopback high ports against a real Pebble (obtain at start, serve mta-sts.txt
over HTTPS, renew through the control socket while serving, SIGHUP, SIGTERM)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from certkeeper import certs, control
from certkeeper.config import parse
from certkeeper.errors import LocalError
from tests.fixtures.peers import Process, free_port, wait_for_port

NAMES = ("mail.example.com", "mta-sts.example.com")
MTA_STS = """
[[mta_sts]]
domain = "example.com"
mode = "enforce"
mx = ["mail.example.com"]
max_age = 604800
certificate = "mta-sts.example.com"
"""
POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmax_age: 604800\r\n"


# ---------------------------------------------------------------------------
# The control socket, both ends, in this process.


def minimal_config(tmp_path: Path):
    return parse(f'control_socket = "{tmp_path}/ck.sock"\nstate_dir = "{tmp_path}/state"\n', tmp_path / "ck.toml")


def test_forward_without_a_daemon_returns_none(tmp_path):
    config = minimal_config(tmp_path)
    assert control.forward(config, "renew", {}, io.StringIO()) is None
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(config.control_socket))  # a socket file nobody listens on
    stale.close()
    assert control.forward(config, "renew", {}, io.StringIO()) is None


async def test_control_socket_streams_lines_and_exit_code(tmp_path):
    config = minimal_config(tmp_path)
    seen: list[dict] = []

    async def renew(payload, emit):
        seen.append(payload)
        emit("a.example.com: renewing")
        emit("a.example.com: renewed")
        return 0

    server = control.ControlServer(control.bind_socket(config.control_socket), config.control_socket,
                                   {"renew": renew})
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(config.control_socket).st_mode) == 0o600
        with pytest.raises(LocalError, match="another certkeeper daemon"):
            control.bind_socket(config.control_socket)
        out = io.StringIO()
        code = await asyncio.to_thread(control.forward, config, "renew", {"force": True, "names": ["a"]}, out)
        assert code == 0
        assert out.getvalue() == "a.example.com: renewing\na.example.com: renewed\n"
        assert seen == [{"force": True, "names": ["a"]}]
        out = io.StringIO()
        assert await asyncio.to_thread(control.forward, config, "frobnicate", {}, out) == 1
        assert "does not run 'frobnicate'" in out.getvalue()
    finally:
        await server.stop()
    assert not config.control_socket.exists()


def test_worker_channel_waits_for_the_daemons_ok():
    from certkeeper.worker import Channel, RelayedChallenges, parse_message

    to_daemon_r, to_daemon_w = os.pipe()
    acks_r, acks_w = os.pipe()
    with os.fdopen(to_daemon_w, "wb") as out, os.fdopen(acks_r, "rb") as acks, \
            os.fdopen(to_daemon_r, "rb") as daemon_in, os.fdopen(acks_w, "wb") as daemon_out:
        table = RelayedChallenges(Channel(out, acks))
        added = threading.Event()
        adder = threading.Thread(target=lambda: (table.add("tok-1", "tok-1.thumb"), added.set()))
        adder.start()
        assert parse_message(daemon_in.readline()) == {"challenge": ["tok-1", "tok-1.thumb"]}
        assert not added.wait(0.2)  # still waiting for the daemon
        daemon_out.write(b"ok\n")
        daemon_out.flush()
        adder.join(5)
        assert added.is_set() and table.get("tok-1") == "tok-1.thumb"
        table.remove("tok-1")
        assert parse_message(daemon_in.readline()) == {"unchallenge": "tok-1"}


@pytest.mark.parametrize("raw", [b"not json\n", b'["renew"]\n', b'{"command": 1}\n'])
def test_bad_requests_are_refused(raw):
    with pytest.raises(ValueError):
        control.parse_request(raw)


# ---------------------------------------------------------------------------
# The daemon as a subprocess against Pebble.


class Daemon:
    """A running ``certkeeper run -d`` and what a test needs to talk to it."""

    def __init__(self, tmp_path: Path, pebble) -> None:
        self.tmp_path = tmp_path
        self.https_port = free_port()
        self.metrics_port = free_port()
        self.http_port = pebble.http01_port
        self.config_path = tmp_path / "certkeeper.toml"
        self.config_text = pebble.config_text(tmp_path, NAMES, tls_listen=[f"127.0.0.1:{self.https_port}"],
                                              extra=MTA_STS + f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n')
        self.config_path.write_text(self.config_text)
        self.config = parse(self.config_text, self.config_path)
        self.roots = pebble.issuer_roots()
        self.log = tmp_path / "daemon.log"
        self.proc = Process("certkeeper", [sys.executable, "-m", "certkeeper", "-c", str(self.config_path),
                                           "run", "-d"], self.log, cwd=Path(__file__).parent.parent)

    def client_context(self) -> ssl.SSLContext:
        """Trusts only Pebble's current root(s)."""
        context = ssl.create_default_context(cadata="".join(r.decode() for r in self.roots))
        return context

    def serial_on_disk(self, name: str) -> int:
        return certs.parse_cert(self.config.certificate(name).cert.read_bytes()).serial

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.proc.output():
            assert self.proc.popen.poll() is None, self.proc.output()[-3000:]
            assert time.monotonic() < deadline, f"{text!r} not logged: {self.proc.output()[-3000:]}"
            time.sleep(0.1)

    def fetch_policy(self, name: str = "mta-sts.example.com") -> tuple[int, str, bytes, int]:
        """GET mta-sts.txt with SNI and Host ``name`` at 127.0.0.1: (status, content type, body, serial)."""
        raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=10)
        with self.client_context().wrap_socket(raw, server_hostname=name) as tls:
            serial = certs.parse_der(tls.getpeercert(binary_form=True)).serial
            tls.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                        .encode())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers.get("Content-Type", ""), body, serial

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def daemon(pebble, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon"), pebble)
    try:
        wait_for_port(d.https_port, proc=d.proc)
        yield d
    finally:
        d.proc.stop()


def test_obtains_both_certificates_at_start(daemon):
    for name in NAMES:
        daemon.wait_for_log(f"{name}: serving the new certificate", timeout=60)
        info = certs.parse_cert(daemon.config.certificate(name).cert.read_bytes())
        assert list(info.domains) == [name]
    assert int(daemon.config.pid_file.read_text()) == daemon.proc.popen.pid


def test_serves_the_policy_over_https_with_pebbles_certificate(daemon):
    daemon.wait_for_log("mta-sts.example.com: serving the new certificate", timeout=60)
    status, content_type, body, serial = daemon.fetch_policy()
    assert (status, content_type, body) == (200, "text/plain", POLICY)
    assert serial == daemon.serial_on_disk("mta-sts.example.com")


def test_http_redirects_configured_hosts_only(daemon):
    def get(host: str) -> tuple[int, str]:
        raw = socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10)
        with raw:
            raw.sendall(f"GET /a?b=c HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = raw.makefile("rb").read()
        head = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
        location = next((h.split(": ", 1)[1] for h in head if h.lower().startswith("location:")), "")
        return int(head[0].split()[1]), location

    assert get("mail.example.com") == (302, "https://mail.example.com/a?b=c")
    assert get("evil.example.net") == (404, "")


def test_renew_through_the_control_socket_while_serving(daemon):
    daemon.wait_for_log("mta-sts.example.com: serving the new certificate", timeout=60)
    old = daemon.serial_on_disk("mta-sts.example.com")
    failures: list[str] = []
    fetched = [0]
    done = threading.Event()

    def keep_fetching() -> None:
        while not done.is_set():
            try:
                status, _, body, _ = daemon.fetch_policy()
                if status != 200 or body != POLICY:
                    failures.append(f"status {status}")
                fetched[0] += 1
            except OSError as exc:
                failures.append(repr(exc))

    fetcher = threading.Thread(target=keep_fetching)
    fetcher.start()
    try:
        result = daemon.cli("renew", "--force", "mta-sts.example.com")
    finally:
        done.set()
        fetcher.join(30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mta-sts.example.com: renewed" in result.stdout
    assert "control socket: renew" in daemon.proc.output()  # the daemon did it, not the CLI
    assert failures == [] and fetched[0] > 0
    new = daemon.serial_on_disk("mta-sts.example.com")
    assert new != old
    assert daemon.fetch_policy()[3] == new


def test_metrics_are_served_by_the_daemon(daemon):
    daemon.wait_for_log("mail.example.com: serving the new certificate", timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'certkeeper_certificate_not_after_seconds{name="mail.example.com"}' in text


def test_status_through_the_control_socket(daemon):
    result = daemon.cli("status")
    assert result.returncode == 0, result.stderr
    assert "daemon: pid" in result.stdout


def test_sighup_with_a_broken_config_keeps_serving(daemon):
    daemon.config_path.write_text(daemon.config_text + "\n[acme]\nbroken = \n")
    try:
        os.kill(daemon.proc.popen.pid, signal.SIGHUP)
        daemon.wait_for_log("configuration not reloaded, keeping the running one")
        assert daemon.fetch_policy()[0] == 200
    finally:
        daemon.config_path.write_text(daemon.config_text)
    os.kill(daemon.proc.popen.pid, signal.SIGHUP)
    daemon.wait_for_log("configuration reloaded")
    assert daemon.fetch_policy()[0] == 200


def test_sighup_adds_a_certificate_and_serves_it(daemon):
    text = daemon.config_text.replace("[[certificate]]", f"""[[certificate]]
name = "new.example.com"
domains = ["new.example.com"]
key = "{daemon.tmp_path}/ssl/private/new.example.com.key"
cert = "{daemon.tmp_path}/ssl/new.example.com.crt"
chain = "{daemon.tmp_path}/ssl/new.example.com.chain.pem"
fullchain = "{daemon.tmp_path}/ssl/new.example.com.fullchain.pem"

[[certificate]]""", 1)
    daemon.config_path.write_text(text)
    try:
        os.kill(daemon.proc.popen.pid, signal.SIGHUP)
        daemon.wait_for_log("new.example.com: serving the new certificate", timeout=60)
        raw = socket.create_connection(("127.0.0.1", daemon.https_port), timeout=10)
        with daemon.client_context().wrap_socket(raw, server_hostname="new.example.com") as tls:
            served = certs.parse_der(tls.getpeercert(binary_form=True))
        assert list(served.domains) == ["new.example.com"]
    finally:
        daemon.config_path.write_text(daemon.config_text)


def test_sigterm_during_a_renewal_stops_within_five_seconds_and_leaves_whole_sets(daemon):
    before = daemon.proc.output().count("renewing (forced)")
    renew = subprocess.Popen([sys.executable, "-m", "certkeeper", "-c", str(daemon.config_path), "renew", "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 30
        while daemon.proc.output().count("renewing (forced)") == before:
            assert time.monotonic() < deadline, daemon.proc.output()[-3000:]
            time.sleep(0.01)
        os.kill(daemon.proc.popen.pid, signal.SIGTERM)
        assert daemon.proc.popen.wait(timeout=5) == 0
    finally:
        renew.wait(30)
    assert not daemon.config.pid_file.exists()
    assert not daemon.config.control_socket.exists()
    # Each set on disk is whole: the key matches the certificate (old or new), and no temp file is left
    # unless a journal says how to finish it at the next start.
    for name in NAMES:
        cert_cfg = daemon.config.certificate(name)
        assert certs.key_matches_cert(cert_cfg.key.read_bytes(), cert_cfg.cert.read_bytes())
        assert cert_cfg.fullchain.read_bytes().startswith(cert_cfg.cert.read_bytes())
    journals = list((daemon.config.state_dir / "journal").glob("*.json"))
    leftovers = [p for p in daemon.tmp_path.rglob("*") if "certkeeper-new" in p.name]
    assert leftovers == [] or journals


def test_failure_backs_off_and_the_state_survives(pebble, tmp_path):
    dead = free_port()  # nothing listens here: every order fails at once
    text = pebble.config_text(tmp_path, ["down.example.com"], http_listen=[f"127.0.0.1:{free_port()}"],
                              directory=f"https://127.0.0.1:{dead}/dir")
    config_path = tmp_path / "certkeeper.toml"
    config_path.write_text(text)
    config = parse(text, config_path)
    proc = Process("certkeeper", [sys.executable, "-m", "certkeeper", "-c", str(config_path), "run", "-d"],
                   tmp_path / "daemon.log", cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 30
        while "next renewal check at" not in proc.output():
            assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
    finally:
        proc.stop()
    from certkeeper.state import load_cert_state

    state = load_cert_state(config.state_dir, "down.example.com")
    assert state.consecutive_failures == 1 and state.retry_not_before is not None
    assert "down.example.com: failed" in proc.output()
    # The extra check is planned for the end of the backoff that the runner saved.
    planned = proc.output().split("next renewal check at ")[1][:19]
    assert planned == state.retry_not_before.strftime("%Y-%m-%d %H:%M:%S")


def test_detaches_without_d(pebble, tmp_path):
    config_path = tmp_path / "certkeeper.toml"
    text = pebble.config_text(tmp_path, ["solo.example.com"], http_listen=[f"127.0.0.1:{free_port()}"])
    config_path.write_text(text)
    config = parse(text, config_path)
    result = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config_path), "run"],
                            capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while not config.pid_file.exists():
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.05)
    pid = int(config.pid_file.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0)  # detached into a session of its own
        assert control.daemon_listening(config.control_socket)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while control.daemon_listening(config.control_socket) or config.pid_file.exists():
        assert time.monotonic() < deadline, "daemon did not stop"
        time.sleep(0.05)


def test_address_in_use_is_reported_before_detaching(pebble, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        config_path = tmp_path / "certkeeper.toml"
        port = busy.getsockname()[1]
        config_path.write_text(pebble.config_text(tmp_path, ["solo.example.com"], http_listen=[f"127.0.0.1:{port}"]))
        result = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config_path), "run"],
                                capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    finally:
        busy.close()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
