"""The listener process: ports 80/443 and the metrics port, unprivileged after bind.

``python -m certkeeper.listener FD`` is started as root by the keeper
(``ListenerLink.start``). ``FD`` is its end of a socketpair. It reads
``ListenerStart``, binds every listening socket of the configuration (so
"address in use" reaches the keeper at once), drops to ``user``/``group``,
confines itself (no_new_privs, Landlock to the interpreter and the MTA-STS
state it serves; pledge "stdio rpath inet" on OpenBSD) and only then answers
``Bound`` and starts accepting connections: not a byte from the network is
read as root.

It holds no key of its own: the keeper hands it the certificates and keys of
the [[mta_sts]] hosts (``Serve``), the HTTP-01 tokens of running orders
(``Challenge``/``Unchallenge``), and the text of /metrics (``Metrics``). A
``Reconfigure`` (SIGHUP) rebuilds what is served; ``Stop`` or the keeper's end
closing ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import sys
import threading
from pathlib import Path

from aiohttp import web
from aiohttp.web_request import BaseRequest

from certkeeper import protocol, sandbox
from certkeeper.core import logs
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config, parse
from certkeeper.core.errors import CertkeeperError, ConfigError, LocalError
from certkeeper.listener.web import WebServer, listen_socket

log = logging.getLogger(__name__)

METRICS_TYPE = "text/plain; version=1.0.0; charset=utf-8"  # Prometheus exposition format
SCRATCH = "listener"  # under state_dir: where a handed-over key passes on its way into ssl (0700)


class Listener:
    """The web server, the metrics endpoint and the keeper's socket of one listener process."""

    def __init__(self, config: Config, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.challenges = ChallengeTable()
        self.web = WebServer(config, self.challenges, tls_from_files=False)
        self.metrics_socket: socket.socket | None = None
        self.metrics_text = b""
        self.scratch = config.state_dir / SCRATCH
        self.stopped = threading.Event()

    def bind(self) -> list[str]:
        self.web.bind()
        if self.config.metrics.listen:
            try:
                self.metrics_socket = listen_socket(self.config.metrics.listen)
            except LocalError as exc:
                self.web.close()
                raise LocalError(f"[metrics] listen: {exc}") from None
        addresses = [f"http {a}" for a in self.config.http.listen] + [f"https {a}" for a in self.config.http.tls_listen]
        return addresses + ([f"metrics {self.config.metrics.listen}"] if self.metrics_socket else [])

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self.web.start()
        runner = None
        if self.metrics_socket is not None:
            server = web.Server(self._metrics)
            runner = await loop.create_server(server, sock=self.metrics_socket)
        keeper = threading.Thread(target=self._keeper_loop, args=(loop,), name="keeper", daemon=True)
        keeper.start()
        await loop.run_in_executor(None, self.stopped.wait)
        if runner is not None:
            runner.close()
        await self.web.stop()

    async def _metrics(self, request: BaseRequest) -> web.StreamResponse:
        if request.rel_url.raw_path != "/metrics" or request.method not in ("GET", "HEAD"):
            return web.Response(status=404, text="not found\n")
        return web.Response(body=self.metrics_text, headers={"Content-Type": METRICS_TYPE})

    def _keeper_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer the keeper until it says Stop or goes away."""
        try:
            while True:
                try:
                    request = protocol.receive(self.sock)
                except EOFError:
                    log.info("the keeper went away; stopping")
                    return
                if isinstance(request, protocol.Stop):
                    protocol.send(self.sock, protocol.Ok())
                    return
                protocol.send(self.sock, self.answer(request))
        except (OSError, CertkeeperError) as exc:
            log.error("listener: %s; stopping", exc)
        finally:
            loop.call_soon_threadsafe(self.stopped.set)

    def answer(self, request: object) -> object:
        p = protocol
        match request:
            case p.Challenge(token=token, key_authorization=key_authorization):
                try:
                    self.challenges.add(token, key_authorization)
                except ValueError as exc:
                    return p.Refused(str(exc))
                return p.Ok()
            case p.Unchallenge(token=token):
                self.challenges.remove(token)
                return p.Ok()
            case p.Serve(sets=sets):
                for problem in self.web.tls.load_pem(
                        ((s.name, s.domains, s.fullchain.encode(), s.key.encode()) for s in sets), self.scratch):
                    log.warning("%s", problem)
                return p.Served(self.web.tls.names_loaded())
            case p.Reconfigure(config_text=text):
                try:
                    new = parse(text, self.config.path)
                    self.web.reload(new)
                except ConfigError as exc:
                    return p.Refused("; ".join(exc.lines))
                except CertkeeperError as exc:
                    return p.Refused(str(exc))
                self.config = new
                return p.Ok()
            case p.Metrics(text=text):
                self.metrics_text = text.encode()
                return p.Ok()
        return p.Refused(f"{type(request).__name__} is not a listener request")


def confine(config: Config) -> None:
    read = [str(config.state_dir / "mta-sts"), *(p for p in sandbox.SYSTEM_READ if p not in sandbox.RESOLVER_FILES)]
    sandbox.confine("listener", read, [str(config.state_dir / SCRATCH)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    try:
        start = protocol.receive(sock)
    except EOFError:  # spawned ahead of need (the CLI's renew), and nothing needed it
        return 0
    if not isinstance(start, protocol.ListenerStart):
        raise SystemExit("certkeeper listener: the first message is not a ListenerStart")
    logs.setup_daemon(start.foreground, start.verbosity)
    try:
        config = parse(start.config_text, start.config_path)
        if start.http_only:
            config = dataclasses.replace(config, http=dataclasses.replace(config.http, tls_listen=()),
                                         metrics=dataclasses.replace(config.metrics, listen=""))
        listener = Listener(config, sock)
        addresses = listener.bind()  # as root: ports below 1024
        identity = sandbox.role_identity(config.user, config.group or None)
        _scratch(config.state_dir / SCRATCH, identity)
        if identity is not None:
            sandbox.drop_privileges(identity)
        confine(config)
    except ConfigError as exc:
        protocol.send(sock, protocol.Refused("; ".join(exc.lines)))
        return 1
    except CertkeeperError as exc:
        protocol.send(sock, protocol.Refused(str(exc)))
        return 1
    protocol.send(sock, protocol.Bound(tuple(addresses)))
    try:
        import uvloop  # less CPU per HTTPS request when installed (bench/daemon_bench.py)
    except ImportError:
        asyncio.run(listener.run())
    else:
        uvloop.run(listener.run())
    return 0


def _scratch(path: Path, identity: sandbox.Identity | None) -> None:
    """The listener's private directory (its user's, 0700), made before the ids are dropped."""
    import os

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if identity is not None:
        os.chown(path, identity.uid, identity.gid)
    os.chmod(path, 0o700)


if __name__ == "__main__":
    sys.exit(main())
