"""``certkeeper run``: the control socket in-process, then the daemon as a subprocess
on loopback high ports against a real Pebble (obtain at start, serve mta-sts.txt
over HTTPS, renew through the control socket while serving, SIGHUP, SIGTERM)."""

from __future__ import annotations

import asyncio
import io
import os
import pwd
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certkeeper import control
from certkeeper.core import certs
from certkeeper.core.config import parse
from certkeeper.core.errors import LocalError
from tests.fixtures.bind import new_bind
from tests.fixtures.peers import Process, free_port, process_tree, wait_for_port
from tests.fixtures.site import MTA_STS, NAMES, POLICY, TLSRPT

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


@pytest.mark.parametrize("raw", [b"not json\n", b'["renew"]\n', b'{"command": 1}\n'])
def test_bad_requests_are_refused(raw):
    with pytest.raises(ValueError):
        control.parse_request(raw)


async def test_control_socket_survives_bad_slow_and_vanishing_clients(tmp_path):
    config = minimal_config(tmp_path)
    release = asyncio.Event()
    finished: list[str] = []

    async def renew(payload, emit):
        emit("started")
        if payload.get("wait"):
            await release.wait()  # a long renewal: its client goes away meanwhile
            emit("more lines after the client left")
        finished.append(str(payload.get("wait", False)))
        return 0

    async def status(payload, emit):
        raise RuntimeError("a bug\nover two lines")

    server = control.ControlServer(control.bind_socket(config.control_socket), config.control_socket,
                                   {"renew": renew, "status": status})
    await server.start()
    try:
        # A client that asks for a long renewal and disconnects mid-stream: the work goes on.
        reader, writer = await asyncio.open_unix_connection(str(config.control_socket))
        writer.write(control.render_request("renew", {"wait": True}))
        assert control.parse_answer(await reader.readline()) == ("started", None)
        writer.close()
        # An oversized request, a silent client and garbage do not stop others.
        big_reader, big_writer = await asyncio.open_unix_connection(str(config.control_socket))
        big_writer.write(b"x" * (control.MAX_REQUEST + 10) + b"\n")
        assert await asyncio.wait_for(big_reader.read(), 5) == b""  # dropped
        big_writer.close()
        _, silent = await asyncio.open_unix_connection(str(config.control_socket))
        # Concurrent requests: all answered while the first renewal still runs.
        outs = [io.StringIO() for _ in range(3)]
        codes = await asyncio.gather(*(asyncio.to_thread(control.forward, config, "renew", {}, out) for out in outs))
        assert codes == [0, 0, 0] and all(out.getvalue() == "started\n" for out in outs)
        out = io.StringIO()
        assert await asyncio.to_thread(control.forward, config, "status", {}, out) == 1
        assert out.getvalue() == "certkeeper: internal error: RuntimeError: a bug over two lines\n"
        silent.close()
        release.set()
        for _ in range(100):
            if "True" in finished:
                break
            await asyncio.sleep(0.02)
        assert sorted(finished) == ["False", "False", "False", "True"]
    finally:
        await server.stop()


def test_one_daemon_per_socket_and_a_stale_socket_is_replaced(tmp_path):
    config = minimal_config(tmp_path)
    path = config.control_socket
    first = control.ControlServer.bind(path, {})
    try:
        # A second daemon is refused by the lock, even before the first one listens.
        first.sock.close()
        with pytest.raises(LocalError, match="another certkeeper daemon is running"):
            control.ControlServer.bind(path, {})
    finally:
        os.close(first.lock_fd)  # as if it crashed: the kernel drops the lock, the socket file stays
    assert path.exists() and not control.daemon_listening(path)
    second = control.ControlServer.bind(path, {})
    first.lock_fd = -1
    first.close()  # the crashed one's clean-up must not remove the live daemon's socket
    try:
        assert control.daemon_listening(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        second.close()
    assert not path.exists()
    control.ControlServer.bind(path, {}).close()  # and the lock is free again


# ---------------------------------------------------------------------------
# Worker processes that crash, hang, send garbage or hostile requests (a stand-in script, real
# processes started as the unprivileged user, a real listener).

FAKE_WORKER = r"""
import json, socket, sys, time
from certkeeper import protocol as p
sock = socket.socket(fileno=int(sys.argv[1]))
start = p.receive(sock)
args = json.loads(start.args)
mode = args["mode"]
if mode == "crash":
    p.send(sock, p.Challenge("tok-crash", "tok-crash.thumb")); p.receive(sock); sys.exit(3)
if mode == "csr-crash":
    p.send(sock, p.MakeCsr("a.example.com")); p.receive(sock); sys.exit(3)
if mode == "garbage":
    p.send(sock, p.Line("still talking")); sock.sendall(b"\0\0\0\5hello"); time.sleep(60)
if mode == "hang":
    p.send(sock, p.Challenge("tok-hang", "tok-hang.thumb")); p.receive(sock); time.sleep(60)
if mode == "refused":
    p.send(sock, p.Challenge("../etc", "x")); p.receive(sock); time.sleep(60)
if mode == "lingers":
    p.send(sock, p.Exit(0, "2030-01-01T00:00:00+00:00")); time.sleep(60)
if mode == "log":
    with open(args["log"], "a") as f: f.write("start\n")
    time.sleep(0.2)
    with open(args["log"], "a") as f: f.write("end\n")
    p.send(sock, p.Exit(0, ""))
"""


@pytest.fixture
async def fake_daemon(tmp_path, monkeypatch):
    from certkeeper import daemon as daemon_module
    from certkeeper import privsep

    monkeypatch.setattr(privsep.WorkerProcess, "command", (sys.executable, "-c", FAKE_WORKER))
    monkeypatch.setattr(privsep, "EXIT_GRACE", 0.2)
    text = f'control_socket = "{tmp_path}/ck.sock"\nstate_dir = "{tmp_path}/state"\n' + f"""
[http]
listen = ["127.0.0.1:{free_port()}"]
tls_listen = []

[[certificate]]
name = "a.example.com"
domains = ["a.example.com"]
key = "/nonexistent/a.key"
cert = "/nonexistent/a.crt"
chain = "/nonexistent/a.chain"
fullchain = "/nonexistent/a.fullchain"
"""
    (tmp_path / "ck.toml").write_text(text)
    d = daemon_module.Daemon(parse(text, tmp_path / "ck.toml"), text)
    d.stopping = asyncio.Event()
    d.loop = asyncio.get_running_loop()
    d.bind()
    yield d
    d.listener.stop()
    assert d.control is not None
    d.control.close()


async def run_fake(d, mode: str, idle: float | None = None, monkeypatch=None, **args):
    from certkeeper import privsep

    lines: list[str] = []
    if idle is not None:
        monkeypatch.setattr(privsep, "idle_timeout", lambda config: idle)
    try:
        return await d.run_worker("renew", {"mode": mode, **args}, lines.append), lines
    finally:
        assert d.workers == set()  # never left running


def served_token(d, token: str) -> int:
    """What the real listener answers for an HTTP-01 token now."""
    import urllib.error
    import urllib.request

    url = f"http://{d.config.http.listen[0]}/.well-known/acme-challenge/{token}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_crashing_worker_is_an_error_and_its_challenge_is_withdrawn(fake_daemon):
    with pytest.raises(LocalError, match=r"the renew worker ended without a result \(exit status 3\)"):
        await run_fake(fake_daemon, "crash")
    assert await asyncio.to_thread(served_token, fake_daemon, "tok-crash") == 404


async def test_a_hanging_worker_is_killed_after_the_idle_timeout(fake_daemon, monkeypatch):
    with pytest.raises(LocalError, match="the renew worker sent nothing for 0.5 s; stopped it"):
        await run_fake(fake_daemon, "hang", idle=0.5, monkeypatch=monkeypatch)
    assert await asyncio.to_thread(served_token, fake_daemon, "tok-hang") == 404


async def test_garbage_from_a_worker_ends_its_job(fake_daemon):
    with pytest.raises(LocalError, match="an unknown message type|not JSON"):
        await run_fake(fake_daemon, "garbage")


async def test_a_bad_challenge_is_refused_and_a_lingering_worker_killed(fake_daemon):
    from datetime import UTC, datetime

    with pytest.raises(LocalError, match="not an ACME token"):
        await run_fake(fake_daemon, "refused")
    result, _ = await run_fake(fake_daemon, "lingers")
    assert result == (0, datetime(2030, 1, 1, tzinfo=UTC))


async def test_two_renewals_of_one_certificate_never_overlap(fake_daemon, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # the fake worker is the unprivileged user when the suite runs as root
    log = shared / "runs.log"
    args = {"names": ["a.example.com"], "force": True, "mode": "log", "log": str(log)}
    def quiet(line: str) -> None:
        pass

    await asyncio.gather(fake_daemon.renew(dict(args), quiet), fake_daemon.renew(dict(args), quiet),
                         fake_daemon.renew({**args, "names": []}, quiet))  # a check of all names
    assert log.read_text() == "start\nend\n" * 3


async def test_sighup_with_unreadable_mta_sts_state_sets_it_aside_and_reloads(fake_daemon, caplog):
    """Issue 12: a corrupt state file of a withdrawn domain no longer stops a reload (nor a start); the
    first reader that may write there (the keeper's status, the network worker) moves it aside, named."""
    from certkeeper.keeper import status

    d = fake_daemon
    d.reload_lock = asyncio.Lock()
    jobs: list[str] = []

    async def job(why: str) -> None:
        jobs.append(why)

    d.check, d.background = job, job  # what follows a reload: a check and a publication
    d.config.path.write_text(d.config_text.replace("a.example.com", "b.example.com"))
    corrupt = d.config.state_dir / "mta-sts" / "gone.example.json"
    corrupt.write_text("{not json")
    await d.reload()  # the listener rebuilds its site from the new configuration despite the bad file
    assert d.config.certificate_names() == ("b.example.com",)
    assert jobs == ["configuration reloaded", "publish"]
    assert not [r for r in caplog.records if "not reloaded" in r.getMessage()]
    await asyncio.to_thread(status.collect, d.config)
    assert not corrupt.exists()
    [moved] = corrupt.parent.glob("gone.example.json.corrupt-*")
    assert moved.read_text() == "{not json"
    [line] = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert line.startswith(f"{corrupt}: unreadable (MTA-STS state of gone.example: ") and moved.name in line


async def test_late_scheduled_runs_are_never_dropped(fake_daemon):
    fake_daemon.loop = asyncio.get_running_loop()
    scheduler = fake_daemon._start_scheduler()
    try:
        jobs = scheduler.get_jobs()
        assert {j.id for j in jobs} == {"check", "hourly", "reconcile"}
        assert all(j.misfire_grace_time is None and j.coalesce for j in jobs)
        first = next(j for j in jobs if j.id == "check").next_run_time
        assert timedelta(0) < first - datetime.now(UTC) <= timedelta(hours=12)  # a random second in 12 h
    finally:
        scheduler.shutdown(wait=False)


# ---------------------------------------------------------------------------
# The daemon as a subprocess against Pebble.


class Daemon:
    """A running ``certkeeper run -d`` and what a test needs to talk to it."""

    def __init__(self, tmp_path: Path, pebble, bind) -> None:
        self.tmp_path = tmp_path
        self.https_port = free_port()
        self.metrics_port = free_port()
        self.http_port = pebble.http01_port
        self.bind = bind
        self.roots = pebble.issuer_roots()
        roots_file = tmp_path / "pebble-roots.pem"
        roots_file.write_bytes(b"".join(self.roots))
        # The daemon publishes _mta-sts and _smtp._tls to a real BIND, after fetching its own policy at
        # 127.0.0.1 (SNI mta-sts.example.com): nothing leaves loopback.
        dns = bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{self.https_port}", mta_sts_fetch_ca=str(roots_file))
        self.config_path = tmp_path / "certkeeper.toml"
        self.config_text = pebble.config_text(
            tmp_path, NAMES, tls_listen=[f"127.0.0.1:{self.https_port}"],
            extra=MTA_STS + TLSRPT + dns + f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n')
        self.config_path.write_text(self.config_text)
        self.config = parse(self.config_text, self.config_path)
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
    bind = new_bind(tmp_path_factory.mktemp("bind"), zone="example.com")
    try:
        d = Daemon(tmp_path_factory.mktemp("daemon"), pebble, bind)
        try:
            wait_for_port(d.https_port, proc=d.proc)
            yield d
        finally:
            d.proc.stop()
    finally:
        bind.stop()


def test_obtains_both_certificates_at_start(daemon):
    for name in NAMES:
        daemon.wait_for_log(f"{name}: renewed", timeout=60)
        info = certs.parse_cert(daemon.config.certificate(name).cert.read_bytes())
        assert list(info.domains) == [name]
    assert int(daemon.config.pid_file.read_text()) == daemon.proc.popen.pid


def test_the_listener_never_holds_the_mail_hosts_certificate(daemon):
    """Only the [[mta_sts]] hosts' sets are handed to the listener: SNI mail.example.com is refused."""
    daemon.wait_for_log("mta-sts.example.com: serving the new certificate", timeout=60)
    daemon.wait_for_log("mail.example.com: renewed", timeout=60)
    assert "mail.example.com: serving the new certificate" not in daemon.proc.output()
    raw = socket.create_connection(("127.0.0.1", daemon.https_port), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError)), \
            daemon.client_context().wrap_socket(raw, server_hostname="mail.example.com"):
        pass


def test_serves_the_policy_over_https_with_pebbles_certificate(daemon):
    daemon.wait_for_log("mta-sts.example.com: serving the new certificate", timeout=60)
    status, content_type, body, serial = daemon.fetch_policy()
    assert (status, content_type, body) == (200, "text/plain", POLICY)
    assert serial == daemon.serial_on_disk("mta-sts.example.com")


def test_publishes_the_mta_sts_id_and_tlsrpt_after_serving_the_policy(daemon):
    """Issue 5 at start-up: the daemon serves the policy, fetches it back, then publishes its id (RFC 8461 8.1)."""
    from certkeeper.core.mtasts import Policy, render_txt

    daemon.wait_for_log("mta-sts.example.com: serving the new certificate", timeout=60)
    expected = render_txt(Policy.from_config(daemon.config.mta_sts[0]).policy_id())
    tlsrpt = "v=TLSRPTv1; rua=mailto:tlsrpt@example.com"
    deadline = time.monotonic() + 30
    while (daemon.bind.query("_mta-sts.example.com", "TXT"), daemon.bind.query("_smtp._tls.example.com", "TXT")) \
            != ([expected], [tlsrpt]):  # TLSRPT is published right after the id
        assert time.monotonic() < deadline, daemon.proc.output()[-3000:]
        time.sleep(0.1)
    log = daemon.proc.output()
    assert log.index("mta-sts.example.com: serving the new certificate") < log.index("_mta-sts.example.com")


def test_http_redirects_configured_hosts_only(daemon):
    def get(host: str) -> tuple[int, str]:
        raw = socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10)
        with raw:
            raw.sendall(f"GET /a?b=c HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = raw.makefile("rb").read()
        head = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
        location = next((h.split(": ", 1)[1] for h in head if h.lower().startswith("location:")), "")
        return int(head[0].split()[1]), location

    assert get("mta-sts.example.com") == (302, "https://mta-sts.example.com/a?b=c")
    assert get("mail.example.com") == (404, "")  # served elsewhere (smtpd, dovecot): no redirect here
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


def test_renew_dry_run_through_the_daemon_changes_nothing(daemon, pebble):
    """The daemon holds port 80, so it runs the dry run: its listener answers the staging order's
    challenge; its keeper installs nothing; no state file changes; no renewal check is planned from it."""
    daemon.wait_for_log("mail.example.com: renewed", timeout=60)
    state_dir = daemon.config.state_dir
    before = {p: p.read_bytes() for p in state_dir.rglob("*.json") if p.is_file()}
    serial = daemon.serial_on_disk("mail.example.com")
    result = daemon.cli("renew", "--dry-run", "--directory", pebble.directory, "mail.example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"mail.example.com: renewed, dry run: {pebble.directory} issued serial" in result.stdout
    assert "control socket: renew" in daemon.proc.output()
    assert daemon.serial_on_disk("mail.example.com") == serial
    after = {p: p.read_bytes() for p in state_dir.rglob("*.json") if p.is_file()}
    assert {p for p in after if p.parent.name in ("certificates", "verify", "alerts")} == \
        {p for p in before if p.parent.name in ("certificates", "verify", "alerts")}
    assert all(after[p] == before[p] for p in before if p.parent.name in ("certificates", "verify", "alerts"))
    assert daemon.cli("renew", "--dry-run").returncode == 1  # no [acme] staging and no --directory
    assert "renew --dry-run needs [acme] staging or --directory URL" in daemon.cli("renew", "--dry-run").stderr


def test_revoke_through_the_control_socket(daemon):
    """The daemon's worker revokes at the issuing authority and renews with a new key."""
    daemon.wait_for_log("mail.example.com: renewed", timeout=60)
    cert = daemon.config.certificate("mail.example.com")
    old_key, old_serial = cert.key.read_bytes(), daemon.serial_on_disk("mail.example.com")
    result = daemon.cli("revoke", "--reason", "keyCompromise", "mail.example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"mail.example.com: serial {old_serial:x} revoked at acme (keyCompromise)" in result.stdout
    assert "mail.example.com: renewed" in result.stdout
    assert "control socket: renew" in daemon.proc.output()
    assert daemon.serial_on_disk("mail.example.com") != old_serial
    assert cert.key.read_bytes() != old_key


def test_metrics_are_served_by_the_daemon(daemon):
    daemon.wait_for_log("mail.example.com: renewed", timeout=60)
    deadline = time.monotonic() + 20
    while True:  # the keeper hands /metrics to the listener after each job
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        if 'certkeeper_certificate_not_after_seconds{name="mail.example.com"}' in text or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 'certkeeper_certificate_not_after_seconds{name="mail.example.com"}' in text


def test_status_through_the_control_socket(daemon):
    result = daemon.cli("status")
    assert result.returncode == 0, result.stderr
    assert "daemon: pid" in result.stdout


def test_a_second_daemon_is_refused_and_the_first_keeps_its_socket(daemon):
    result = daemon.cli("run", "-d")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == \
        [f"certkeeper: {daemon.config.control_socket}: another certkeeper daemon is running"]
    assert control.daemon_listening(daemon.config.control_socket)
    assert daemon.cli("status").returncode == 0


def test_sighup_with_a_broken_config_keeps_serving(daemon):
    daemon.config_path.write_text(daemon.config_text + "\n[acme]\nbroken = \n")
    try:
        os.kill(daemon.proc.popen.pid, signal.SIGHUP)
        daemon.wait_for_log("configuration not reloaded, keeping the running one")
        [line] = [x for x in daemon.proc.output().splitlines() if "configuration not reloaded" in x]
        assert str(daemon.config_path) in line  # one line, naming the file at fault
        assert daemon.fetch_policy()[0] == 200
    finally:
        daemon.config_path.write_text(daemon.config_text)
    os.kill(daemon.proc.popen.pid, signal.SIGHUP)
    daemon.wait_for_log("configuration reloaded")
    assert daemon.fetch_policy()[0] == 200


def test_sighup_adds_a_certificate_and_serves_it(daemon):
    new = "mta-sts.new.example.com"  # an MTA-STS host's: the listener serves it
    text = daemon.config_text.replace("[[certificate]]", f"""[[certificate]]
name = "{new}"
domains = ["{new}"]
key = "{daemon.tmp_path}/ssl/private/{new}.key"
cert = "{daemon.tmp_path}/ssl/{new}.crt"
chain = "{daemon.tmp_path}/ssl/{new}.chain.pem"
fullchain = "{daemon.tmp_path}/ssl/{new}.fullchain.pem"

[[certificate]]""", 1)
    daemon.config_path.write_text(text)
    try:
        os.kill(daemon.proc.popen.pid, signal.SIGHUP)
        daemon.wait_for_log(f"{new}: serving the new certificate", timeout=60)
        raw = socket.create_connection(("127.0.0.1", daemon.https_port), timeout=10)
        with daemon.client_context().wrap_socket(raw, server_hostname=new) as tls:
            served = certs.parse_der(tls.getpeercert(binary_form=True))
        assert list(served.domains) == [new]
    finally:
        daemon.config_path.write_text(daemon.config_text)


# ---------------------------------------------------------------------------
# Privilege separation, seen from /proc (never from the daemon's own report).


def _inet_inodes() -> set[str]:
    """Socket inodes of every INET socket on this host (TCP and UDP, v4 and v6)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{table}") as f:
            next(f)
            inodes.update(line.split()[9] for line in f if line.strip())
    return inodes


def _sample(root: int) -> list[tuple[int, int, str, bool]]:
    """(pid, uid, NoNewPrivs, holds an INET socket) for the daemon and every process below it."""
    inet = _inet_inodes()
    seen = []
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # it ended meanwhile
        holds = any(link.startswith("socket:[") and link[8:-1] in inet for link in fds)
        seen.append((pid, int(status["Uid"].split()[0]), status.get("NoNewPrivs", "?").strip(), holds))
    return seen


def test_only_unprivileged_processes_hold_inet_sockets_during_a_forced_renewal(daemon):
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the privilege split must be tested for real")
        pytest.skip("needs root")
    daemon.wait_for_log("mail.example.com: renewed", timeout=60)
    root = daemon.proc.popen.pid
    samples: list[tuple[int, int, str, bool]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.extend(_sample(root))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = daemon.cli("renew", "--force")
    finally:
        done.set()
        watcher.join(30)
    assert result.returncode == 0, result.stdout + result.stderr
    holders = [s for s in samples if s[3]]
    assert {uid for _, uid, _, _ in holders} - {0} == {pwd.getpwnam("_certkeeper").pw_uid}
    assert all(uid != 0 and nnp == "1" for _, uid, nnp, _ in holders), holders[:5]
    assert not any(pid == root for pid, _, _, holds in samples if holds)  # the keeper: never, at any sample
    assert len({pid for pid, _, _, _ in holders}) >= 2  # the listener and at least one network worker seen


def test_a_killed_listener_is_started_again_before_the_next_job(daemon):
    daemon.wait_for_log("mta-sts.example.com: serving the new certificate", timeout=60)
    [listener] = [pid for pid in process_tree(daemon.proc.popen.pid)
                  if b"certkeeper.listener" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(listener, signal.SIGKILL)
    result = daemon.cli("renew", "--force", "mta-sts.example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the listener is gone; starting it again" in daemon.proc.output()
    status, _, body, serial = daemon.fetch_policy()
    assert (status, body, serial) == (200, POLICY, daemon.serial_on_disk("mta-sts.example.com"))


def test_sigterm_during_a_renewal_stops_within_five_seconds_and_leaves_whole_sets(daemon):
    before = daemon.proc.output().count("renewing (forced)")
    renew = subprocess.Popen([sys.executable, "-m", "certkeeper", "-c", str(daemon.config_path), "renew", "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 30
        while daemon.proc.output().count("renewing (forced)") == before:
            assert time.monotonic() < deadline, daemon.proc.output()[-3000:]
            time.sleep(0.01)
        # Open connections do not hold the stop up: an idle keep-alive TLS one, one that never shook hands.
        idle_tls = daemon.client_context().wrap_socket(
            socket.create_connection(("127.0.0.1", daemon.https_port), timeout=10), server_hostname=NAMES[1])
        no_handshake = socket.create_connection(("127.0.0.1", daemon.https_port), timeout=10)
        os.kill(daemon.proc.popen.pid, signal.SIGTERM)
        assert daemon.proc.popen.wait(timeout=5) == 0
        idle_tls.close()
        no_handshake.close()
    finally:
        renew.wait(30)
    answer = renew.stdout.read().decode()
    assert "Traceback" not in answer  # finished in the grace time, or one "certkeeper: ..." line and exit 1
    assert renew.returncode == 0 or answer.splitlines()[-1].startswith("certkeeper: "), answer
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
    from certkeeper.core.state import load_cert_state

    def run_until_planned(log_name: str) -> str:
        proc = Process("certkeeper", [sys.executable, "-m", "certkeeper", "-c", str(config_path), "run", "-d"],
                       tmp_path / log_name, cwd=Path(__file__).parent.parent)
        try:
            deadline = time.monotonic() + 30
            while "next renewal check at" not in proc.output():
                assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
                time.sleep(0.1)
        finally:
            proc.stop()
        return proc.output()

    output = run_until_planned("daemon.log")
    state = load_cert_state(config.state_dir, "down.example.com")
    assert state.consecutive_failures == 1 and state.retry_not_before is not None
    assert "down.example.com: failed" in output
    # The extra check is planned for the end of the backoff that the runner saved.
    retry = state.retry_not_before.strftime("%Y-%m-%d %H:%M:%S")
    assert output.split("next renewal check at ")[1][:19] == retry
    # A restart inside the backoff does not try again at start-up: it plans the same retry.
    output = run_until_planned("daemon-restarted.log")
    assert "down.example.com: renewing" not in output
    assert load_cert_state(config.state_dir, "down.example.com").consecutive_failures == 1
    assert output.split("next renewal check at ")[1][:19] == retry


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


def test_a_sigterm_while_starting_stops_it_cleanly(pebble, tmp_path):
    """A SIGTERM that comes before the event loop handles signals is kept, not fatal: the daemon stops
    cleanly (no pid file, no socket, no listener left) as soon as it can."""
    config_path = tmp_path / "certkeeper.toml"
    text = pebble.config_text(tmp_path, ["early.example.com"], http_listen=[f"127.0.0.1:{free_port()}"])
    config_path.write_text(text)
    config = parse(text, config_path)
    for delay in (0.3, 0.6, 0.9):  # somewhere in interpreter start-up, binding and starting the listener
        proc = subprocess.Popen([sys.executable, "-m", "certkeeper", "-c", str(config_path), "run", "-d"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=15)
        # -SIGTERM: it came before certkeeper's own code ran (nothing was started); else a clean exit 0.
        assert code in (0, -signal.SIGTERM), proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        assert not config.pid_file.exists() and not control.daemon_listening(config.control_socket)
        assert not [pid for pid in process_tree(os.getpid())
                    if b"certkeeper.listener" in Path(f"/proc/{pid}/cmdline").read_bytes()]


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


async def test_a_worker_that_dies_during_an_order_counts_as_a_failed_attempt(fake_daemon):
    """Issue 12: a worker killed between its CSR and the install (an order in flight) is a failed attempt
    of that certificate, with backoff, kept where the runner keeps it and readable by the next worker."""
    from certkeeper.core.state import load_cert_state, state_path

    with pytest.raises(LocalError, match=r"ended without a result \(exit status 3\)"):
        await run_fake(fake_daemon, "csr-crash")
    state = load_cert_state(fake_daemon.config.state_dir, "a.example.com")
    assert state.consecutive_failures == 1 and "the order was lost" in state.last_error
    assert state.retry_not_before is not None and state.retry_not_before > datetime.now(UTC)
    path = state_path(fake_daemon.config.state_dir, "a.example.com")
    assert path.stat().st_uid == path.parent.stat().st_uid  # the worker's file, as the runner writes it
