"""Issue 12, item 5 (client side): the CLI gives up on a wedged daemon with one line, and neither
``status`` nor ``renew`` dies with a BrokenPipeError traceback (a daemon that drops the connection,
a reader of the output that goes away)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from certkeeper import cli, control
from certkeeper.core.config import parse
from certkeeper.core.errors import LocalError
from tests.fixtures.peers import free_port

ROOT = Path(__file__).resolve().parent.parent


class FakeDaemon:
    """A real unix socket that accepts, then does what ``behaviour`` says: "wedged" (reads the request,
    never answers), "slam" (closes before reading anything) or "half" (one line, then closes)."""

    def __init__(self, path: Path, behaviour: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.behaviour = behaviour
        self.done = threading.Event()
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            if self.behaviour == "slam":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            client.settimeout(5)
            try:
                client.recv(65536)
                if self.behaviour == "half":
                    client.sendall(control.render_line("mail.example.com: renewing"))
                    client.close()
                    continue
            except OSError:
                pass
            self.clients.append(client)  # wedged: held open, never answered

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)
        for client in self.clients:
            client.close()
        self.sock.close()


@pytest.fixture
def config(tmp_path):
    text = f'control_socket = "{tmp_path}/ck.sock"\nstate_dir = "{tmp_path}/state"\n'
    (tmp_path / "ck.toml").write_text(text)
    return parse(text, tmp_path / "ck.toml")


def test_a_wedged_daemon_is_one_line_after_the_timeout(config, monkeypatch, capsys):
    daemon = FakeDaemon(config.control_socket, "wedged")
    try:
        started = time.monotonic()
        with pytest.raises(LocalError, match=r"the daemon sent nothing for 0\.5 s; it may be wedged"):
            control.forward(config, "status", {}, io.StringIO(), timeout=0.5)
        assert time.monotonic() - started < 5
        monkeypatch.setattr(control, "STATUS_TIMEOUT", 0.5)
        assert cli.main(["-c", str(config.path), "status"]) == 1
    finally:
        daemon.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"certkeeper: {config.control_socket}: the daemon sent nothing for 0.5 s; it may be wedged "
                   "(see its log)"]


def test_the_renew_timeout_covers_an_order_and_the_hooks():
    config = parse('[acme]\norder_timeout = 100\n[hooks.x]\ncommand = ["true"]\ntimeout = 10\nverify_timeout = 5\n')
    assert control.answer_timeout(config, "status") == control.STATUS_TIMEOUT
    assert control.answer_timeout(config, "renew") == 100 + 2 * 15 + control.SLACK


@pytest.mark.parametrize("behaviour, message", [
    ("slam", "certkeeper: {sock}: "),  # reset before the request was read: lost / cannot talk / closed
    ("half", "certkeeper: {sock}: the daemon closed the connection before finishing 'renew'"),
])
def test_a_daemon_that_drops_the_connection_is_one_line_not_a_traceback(config, behaviour, message):
    daemon = FakeDaemon(config.control_socket, behaviour)
    try:
        for command in ("renew", "status"):
            done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config.path), command],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert done.returncode == 1, done.stdout + done.stderr
            assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1, lines
            expected = message.format(sock=config.control_socket).replace("'renew'", repr(command))
            assert lines[0].startswith(expected), lines
    finally:
        daemon.stop()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["renew"]])
def test_a_reader_that_went_away_is_no_traceback(tmp_path, command):
    """`certkeeper status | head -c 10`, the reader gone before the output: no traceback; `status` exits 0
    (the reader had what it wanted). ``renew`` against an unreachable CA prints its failure line into
    the same closed pipe and exits 1."""
    config = tmp_path / "ck.toml"
    config.write_text(f"""state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/ck.sock"
[acme]
directory = "https://127.0.0.1:9/dir"
account_key = "{tmp_path}/acme/account.pem"
[http]
listen = ["127.0.0.1:{free_port()}"]
tls_listen = []
[[certificate]]
name = "a.example.com"
key = "{tmp_path}/k"
cert = "{tmp_path}/c"
chain = "{tmp_path}/ch"
fullchain = "{tmp_path}/f"
""")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: every write gets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config), *command], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
    finally:
        os.close(write_end)
    assert done.returncode == (0 if command[0] == "status" else 1)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert "is not ADDRESS:PORT" not in done.stderr  # the command ran
