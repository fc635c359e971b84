"""The control socket: how ``certkeeper renew`` and ``status`` reach a running daemon.

This module owns both ends of one small protocol over a unix stream socket
(``control_socket``, mode 0600, so only root talks to the daemon):

- the client sends one line, a JSON object ``{"command": "renew", "payload": {...}}``;
- the daemon answers with JSON lines: ``{"line": "..."}`` for each progress or
  output line, then exactly one ``{"exit": N}`` (the command's exit code) and
  closes the connection.

``forward`` is the client side: it returns None when no daemon listens (no
socket file, or a stale one nobody accepts on): the CLI then does the work
itself. ``ControlServer`` is the daemon side; the daemon gives it one async
function per command. One daemon per socket: ``ControlServer.bind`` holds an
``flock`` on ``SOCKET.lock`` for the daemon's life, and replaces a stale socket
file left by a crash. A client that goes away does not stop the work it asked
for (a renewal runs to its end); its lines are dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from certkeeper.core.config import Config
from certkeeper.core.errors import CertkeeperError, LocalError

if TYPE_CHECKING:  # asyncio is the daemon's: the CLI's client side (forward) never loads it
    import asyncio

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes of the one request line
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request
CONNECT_TIMEOUT = 5.0
STATUS_TIMEOUT = 60.0  # seconds the CLI waits for the daemon's next line of a status
SLACK = 120.0  # seconds on top of the longest a renewal may be silent, before the CLI gives up

Emit = Callable[[str], None]
Command = Callable[[dict[str, Any], Emit], Awaitable[int]]


# ---------------------------------------------------------------------------
# The wire format: render + parse side by side.


def render_request(command: str, payload: dict[str, Any]) -> bytes:
    return json.dumps({"command": command, "payload": payload}).encode() + b"\n"


def parse_request(raw: bytes) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ValueError("the request is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("command"), str) \
            or not isinstance(data.get("payload", {}), dict):
        raise ValueError('the request is not {"command": STRING, "payload": OBJECT}')
    return data["command"], data.get("payload", {})


def render_line(text: str) -> bytes:
    return json.dumps({"line": text}).encode() + b"\n"


def render_exit(code: int) -> bytes:
    return json.dumps({"exit": code}).encode() + b"\n"


def parse_answer(raw: bytes) -> tuple[str | None, int | None]:
    """(line, None) for an output line, (None, code) for the end."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise LocalError(f"the daemon sent a malformed answer: {raw[:80]!r}") from None
    if isinstance(data, dict) and isinstance(data.get("line"), str):
        return data["line"], None
    if isinstance(data, dict) and isinstance(data.get("exit"), int) and not isinstance(data["exit"], bool):
        return None, data["exit"]
    raise LocalError(f"the daemon sent a malformed answer: {raw[:80]!r}")


# ---------------------------------------------------------------------------
# Client side.


def answer_timeout(config: Config, command: str) -> float:
    """Seconds the CLI waits for the daemon's next line before calling it wedged: a status is quick; a
    renewal may be silent for a whole order, then for each hook and its verification (twice, with a
    rollback), plus ``SLACK``."""
    if command == "status":
        return STATUS_TIMEOUT
    hooks = sum(h.timeout + h.verify_timeout for h in config.hooks.values())
    return config.acme.order_timeout + 2 * hooks + SLACK


def forward(config: Config, command: str, payload: dict[str, Any], out: TextIO,
            timeout: float | None = None) -> int | None:
    """Have the daemon run ``command``; stream its lines to ``out``; its exit code, or None without a daemon.

    A daemon that sends nothing for ``timeout`` seconds (default ``answer_timeout``), or that drops the
    connection, is one ``LocalError`` line; the CLI never hangs on it nor shows a traceback."""
    path = config.control_socket
    wait = answer_timeout(config, command) if timeout is None else timeout
    sock = _connect(path)
    if sock is None:
        return None
    with sock:
        try:
            sock.settimeout(wait)
            sock.sendall(render_request(command, payload))
            answers = sock.makefile("rb")
        except TimeoutError:
            raise LocalError(f"{path}: the daemon did not take the request in {wait:g} s; it may be wedged "
                             "(see its log)") from None
        except OSError as exc:
            raise LocalError(f"{path}: cannot talk to the daemon: {exc.strerror or exc}") from None
        with answers:
            while True:
                try:
                    raw = answers.readline()
                except TimeoutError:
                    raise LocalError(f"{path}: the daemon sent nothing for {wait:g} s; it may be wedged "
                                     "(see its log)") from None
                except OSError as exc:
                    raise LocalError(f"{path}: lost the daemon: {exc.strerror or exc}") from None
                if not raw:
                    break
                line, code = parse_answer(raw)
                if code is not None:
                    return code
                print(line, file=out, flush=True)
    raise LocalError(f"{path}: the daemon closed the connection before finishing {command!r}")


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None  # no daemon (or a stale socket file): the CLI does the work itself
    except OSError as exc:
        sock.close()
        raise LocalError(f"{path}: cannot talk to the daemon: {exc.strerror or exc}") from None
    return sock


def daemon_listening(path: Path) -> bool:
    sock = _connect(path)
    if sock is None:
        return False
    sock.close()
    return True


# ---------------------------------------------------------------------------
# Daemon side.


def lock_instance(path: Path) -> int:
    """Hold an ``flock`` on ``PATH.lock`` for the daemon's lifetime; return its descriptor.

    A second daemon is refused even when both start at the same moment (a check
    for a listener alone has a window). The kernel drops the lock with the
    process, also after a crash, so a stale lock never blocks a start; the file
    itself stays (removing a lock file races with the next taker).
    """
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalError(f"{lock}: cannot create the lock file: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LocalError(f"{path}: another certkeeper daemon is running") from None
    return fd


def bind_socket(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 from the start.

    It is bound under a temporary name, chmod-ed, then renamed into place, so
    it is never reachable with a wider mode. A live daemon already there is an
    error; a stale socket file is replaced.
    """
    if daemon_listening(path):
        raise LocalError(f"{path}: another certkeeper daemon is running")
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temp))
        os.chmod(temp, 0o600)
        os.replace(temp, path)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        temp.unlink(missing_ok=True)
        raise LocalError(f"{path}: cannot create the control socket: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class ControlServer:
    """Serves ``commands`` on an already bound socket; ``ControlServer.bind`` locks and binds one."""

    def __init__(self, sock: socket.socket, path: Path, commands: dict[str, Command], lock_fd: int = -1) -> None:
        self.sock = sock
        self.path = path
        self.commands = commands
        self.lock_fd = lock_fd
        self._server: asyncio.Server | None = None
        self._inode = os.stat(path).st_ino

    @classmethod
    def bind(cls, path: Path, commands: dict[str, Command]) -> ControlServer:
        """The instance lock, then the socket (what the daemon does before it detaches)."""
        lock_fd = lock_instance(path)
        try:
            return cls(bind_socket(path), path, commands, lock_fd)
        except LocalError:
            os.close(lock_fd)
            raise

    async def start(self) -> None:
        import asyncio  # the daemon's side only: the CLI's client never loads it

        self._server = await asyncio.start_unix_server(self._serve, sock=self.sock, limit=MAX_REQUEST)

    async def stop(self) -> None:
        """Take no new clients; commands in progress finish (or are cancelled at exit)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.close()

    def close(self) -> None:
        """Close the socket and remove its file, only if it is still ours (another daemon may have replaced it)."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self.sock.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # last: the next daemon finds no socket, or a stale one
            self.lock_fd = -1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            import asyncio

            raw = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            code = await self._run(raw, writer)
            writer.write(render_exit(code))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError) as exc:
            log.info("control socket: dropped a client: %s", exc or type(exc).__name__)
        finally:
            writer.close()

    async def _run(self, raw: bytes, writer: asyncio.StreamWriter) -> int:
        def emit(text: str) -> None:
            if not writer.is_closing():
                writer.write(render_line(text))

        try:
            command, payload = parse_request(raw)
        except ValueError as exc:
            emit(f"certkeeper: {exc}")
            return 1
        handler = self.commands.get(command)
        if handler is None:
            emit(f"certkeeper: the daemon does not run {command!r} (it runs {', '.join(sorted(self.commands))})")
            return 1
        log.info("control socket: %s %s", command, json.dumps(payload, sort_keys=True))
        try:
            return await handler(payload, emit)
        except CertkeeperError as exc:
            emit(f"certkeeper: {exc}")
            return 1
        except Exception as exc:  # noqa: BLE001 - a bug: the client still gets one line and an exit code
            message = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
            log.error("control socket: %s: %s", command, message)
            emit(f"certkeeper: {message}")
            return 1
