"""The daemon's HTTP and HTTPS listeners: HTTP-01 answers, redirects, mta-sts.txt.

This module owns what certkeeper answers on ports 80 and 443 and the TLS
contexts it answers with. It is read-only: no file is ever read from a request
path; answers come from the ``ChallengeTable`` and the policies in memory.

HTTP (``[http] listen``):
- ``GET /.well-known/acme-challenge/TOKEN`` answers a pending token (RFC 8555
  8.3), whatever the Host (tokens are unguessable); 404 for any other token.
- any other request whose Host is a name the listener serves over HTTPS
  (``config.redirect_names()``: the [[mta_sts]] hosts' certificates; the mail
  host's certificate and key never reach the listener) gets
  ``302 https://HOST/PATH?QUERY`` (the guide's httpd.conf ``block return
  302``); the port is dropped, HTTPS is on 443.
- a Host that is missing, malformed or not configured gets 404, never a
  redirect (no open redirect).

HTTPS (``[http] tls_listen``):
- ``GET /.well-known/mta-sts.txt`` on ``mta-sts.DOMAIN`` of an ``[[mta_sts]]``
  table answers the rendered policy: 200, ``text/plain``, CRLF line ends, never
  a redirect (RFC 8461 3.3). Every other request gets 404.
- SNI picks the certificate: one ``ssl.SSLContext`` per ``[[certificate]]``,
  loaded from its fullchain and key; the ``sni_callback`` of the listening
  context switches each connection to the context of the requested name.
- **No SNI** (an IP-literal client; also an IP address sent as SNI, which RFC
  6066 3 forbids but some tools do): the first configured certificate whose
  files loaded. **An SNI name that is not configured**: the handshake is
  aborted (the SNI callback answers ``unrecognized_name``, RFC 6066 3; the
  event loop closes the connection without flushing that alert, so a client
  sees the connection end), so a scanner learns nothing from a certificate
  chosen by default.
- After a renewal, ``TlsContexts.reload_certificate`` builds a new context and
  swaps it in: the next handshake gets the new certificate; connections already
  open keep theirs. Nothing restarts.

Limits against malformed or slow clients (``Limits``): request line and header
field sizes, header count, a TLS handshake timeout and a deadline for the
first request (and between keep-alive requests): a client that trickles its
headers is closed then. Each connection is its own task, so a slow client never
holds up another.

Bounded connections (``ConnectionPool``): the listeners accept connections
themselves rather than through ``loop.create_server``, so that every
connection is counted from the moment it is accepted, TLS handshakes
included. ``[http] max_connections`` caps them in total (lowered to what
``RLIMIT_NOFILE`` leaves after ``RESERVED_FDS`` for the control socket, workers
and file reads; ``raise_nofile_limit`` first lifts the soft limit to the hard
one), ``max_connections_per_address`` per source address (per /64 for IPv6) and
``max_handshakes`` the TLS connections still shaking hands (each holds a read
buffer: about 52 KiB on uvloop, 256 KiB on asyncio's own loop). A new
connection over a cap closes the one of that cap that has been idle longest
(least recently received bytes), so a flood of idle connections never locks
out a real client; an accept that fails for lack of descriptors closes the
longest idle one too, and never stops the listener. Once a burst of
connections has drained, the memory their buffers held is handed back
(``release_memory``). A malformed request is one short log line
(``RequestErrorLog``), at most ``ERROR_LINES_PER_MINUTE`` a minute over all
listeners plus one line counting the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import logging
import os
import re
import resource
import socket
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from certkeeper.core import mtasts_state
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import CertificateConfig, Config, HttpConfig
from certkeeper.core.errors import LocalError
from certkeeper.core.mtasts import MEDIA_TYPE, WELL_KNOWN_PATH

log = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"  # RFC 8555 8.3
# RFC 8555 8.3: the token is base64url without padding.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
# RFC 9110 7.2: Host = uri-host [ ":" port ]; we answer only for DNS names.
_HOST = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)\.?(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client may cost the listeners."""

    max_line_size: int = 4096  # request line
    max_field_size: int = 4096  # one header field
    max_headers: int = 32
    request_timeout: float = 10.0  # seconds for a whole request head, and idle keep-alive
    handshake_timeout: float = 10.0  # seconds for the TLS handshake
    shutdown_timeout: float = 1.0  # seconds open requests get to finish at stop
    max_connections: int = HttpConfig.max_connections
    max_connections_per_address: int = HttpConfig.max_connections_per_address
    max_handshakes: int = HttpConfig.max_handshakes

    @classmethod
    def from_config(cls, http: HttpConfig) -> Limits:
        return cls(max_connections=http.max_connections,
                   max_connections_per_address=http.max_connections_per_address,
                   max_handshakes=http.max_handshakes)

    def server_kwargs(self) -> dict[str, Any]:
        return {
            "max_line_size": self.max_line_size, "max_field_size": self.max_field_size,
            "max_headers": self.max_headers, "keepalive_timeout": self.request_timeout,
            "access_log": None, "logger": request_error_log(),
        }


# ---------------------------------------------------------------------------
# Descriptors, connection caps and error lines.

RESERVED_FDS = 128  # descriptors kept free for the control socket, workers, hooks and file reads
ERROR_LINES_PER_MINUTE = 10


def raise_nofile_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit (systemd's soft default is 1024); return the soft
    limit now in force. Unprivileged processes may do this; nothing is lowered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # Linux refuses more than fs.nr_open even with an infinite hard limit; stay below it then.
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def connection_budget(limits: Limits, soft_limit: int) -> int:
    """The total cap in force: ``max_connections``, or fewer when the descriptors would not suffice."""
    return max(1, min(limits.max_connections, soft_limit - RESERVED_FDS))


class RateLimitedLines:
    """At most ``per_minute`` lines a minute; then one line saying how many were left out."""

    def __init__(self, logger: logging.Logger, per_minute: int = ERROR_LINES_PER_MINUTE) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self._window = 0.0
        self._count = 0
        self._dropped = 0

    def __call__(self, level: int, message: str) -> None:
        now = time.monotonic()
        if now - self._window >= 60:
            if self._dropped:
                self.logger.log(level, "... and %d more like it in the last minute", self._dropped)
            self._window, self._count, self._dropped = now, 0, 0
        if self._count >= self.per_minute:
            self._dropped += 1
            return
        self._count += 1
        self.logger.log(level, "%s", message)


class RequestErrorLog(logging.Logger):
    """What aiohttp logs about a request it could not handle, as one short line each, rate-limited:
    ``malformed request from ADDR: 400, message: ...``. Never a traceback (a bad request is the
    client's fault, and a flood of them must not fill the disk)."""

    def __init__(self) -> None:
        super().__init__(f"{__name__}.requests")
        self.parent = log
        self.lines = RateLimitedLines(log)

    def _one_line(self, level: int, msg: object, args: tuple[object, ...], exc_info: Any) -> None:
        text = str(msg) % args if args else str(msg)
        text = text.replace("Error handling request", "malformed request")
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if exc is not None:
            detail = " ".join(str(exc).split())[:160]
            text = f"{text}: {detail or type(exc).__name__}"
        self.lines(level, text[:300])

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        self._one_line(logging.INFO, msg, args, exc_info)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._one_line(logging.INFO, msg, args, kwargs.get("exc_info"))

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._one_line(logging.INFO, msg, args, kwargs.get("exc_info"))

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            self._one_line(logging.DEBUG, msg, args, kwargs.get("exc_info"))


_request_errors: list[RequestErrorLog] = []


def request_error_log() -> RequestErrorLog:
    """The one ``RequestErrorLog`` of the process: every listener shares its rate limit."""
    if not _request_errors:
        _request_errors.append(RequestErrorLog())
    return _request_errors[0]


def address_key(peer: str) -> str:
    """What ``max_connections_per_address`` counts by: the address, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(getattr(address, "ipv4_mapped", None) or address)


class Connection:
    """One accepted connection: its peer, and how to close it (its task while the handshake runs,
    then its transport)."""

    __slots__ = ("key", "sock", "task", "transport", "closed")

    def __init__(self, key: str, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        elif self.task is not None:
            self.task.cancel()
        else:
            self.sock.close()


def release_memory() -> None:
    """Hand freed heap memory back to the system, which glibc otherwise keeps (TLS read buffers
    of a burst of handshakes: tens of MB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class ConnectionPool:
    """Open connections in least-recently-active order: in total, per address, and still shaking hands.

    ``admit`` makes room for one more from ``key`` (closing the longest idle of each cap that is
    full); ``touch`` marks one active; ``forget`` drops one that closed. All on the event loop.
    Once ``BURST`` connections or more have come and the pool has drained to a few, the memory
    they used is given back (``release_memory``)."""

    BURST = 256

    def __init__(self, total: int, per_address: int, handshakes: int) -> None:
        self.total, self.per_address, self.handshakes = total, per_address, handshakes
        self.all: OrderedDict[Connection, None] = OrderedDict()
        self.by_key: dict[str, OrderedDict[Connection, None]] = {}
        self.shaking: OrderedDict[Connection, None] = OrderedDict()
        self.evicted = 0
        self._since_release = 0  # connections admitted since memory was last given back

    def __len__(self) -> int:
        return len(self.all)

    def admit(self, conn: Connection, tls: bool) -> None:
        mine = self.by_key.get(conn.key)
        if mine is not None and len(mine) >= self.per_address:
            self.evict(next(iter(mine)))
        if len(self.all) >= self.total:
            self.evict(next(iter(self.all)))
        if tls and len(self.shaking) >= self.handshakes:
            self.evict(next(iter(self.shaking)))
        self.all[conn] = None
        self._since_release += 1
        self.by_key.setdefault(conn.key, OrderedDict())[conn] = None
        if tls:
            self.shaking[conn] = None

    def evict_idlest(self) -> bool:
        if not self.all:
            return False
        self.evict(next(iter(self.all)))
        return True

    def evict(self, conn: Connection) -> None:
        self.forget(conn)
        self.evicted += 1
        conn.close()

    def touch(self, conn: Connection) -> None:
        if conn in self.all:
            self.all.move_to_end(conn)
            self.by_key[conn.key].move_to_end(conn)

    def shaken(self, conn: Connection) -> None:
        self.shaking.pop(conn, None)

    def forget(self, conn: Connection) -> None:
        if conn not in self.all:
            return
        del self.all[conn]
        self.shaking.pop(conn, None)
        mine = self.by_key.get(conn.key)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.by_key[conn.key]
        if self._since_release >= self.BURST and len(self.all) <= 8:
            self._since_release = 0
            try:
                asyncio.get_running_loop().call_later(1.0, release_memory)  # once the transports are gone
            except RuntimeError:
                release_memory()

    def close_all(self) -> None:
        for conn in list(self.all):
            self.evict(conn)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the pool told of its bytes and its end."""

    __slots__ = ("inner", "conn", "pool")

    def __init__(self, inner: asyncio.Protocol, conn: Connection, pool: ConnectionPool) -> None:
        self.inner, self.conn, self.pool = inner, conn, pool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.transport = transport
        self.pool.shaken(self.conn)
        self.pool.touch(self.conn)
        if self.conn.closed:  # evicted while its handshake finished
            transport.abort()  # type: ignore[attr-defined]
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.pool.touch(self.conn)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self.conn)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


@dataclass(frozen=True)
class Site:
    """What the handlers answer from: configured host names and rendered policies."""

    hosts: frozenset[str]
    # "mta-sts.DOMAIN" -> the rendered policy, encoded once here rather than on every request.
    policies: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> Site:
        """Raises ``LocalError`` when an MTA-STS state file is unreadable (nothing is changed then)."""
        # RFC 8461 8.3: a domain being withdrawn keeps serving its "mode: none" policy until
        # its _mta-sts record is gone (the history says which); it needs its certificate until then.
        hosts = config.redirect_names()
        serve = mtasts_state.domains_to_serve(config)
        policies = {f"mta-sts.{d}": p.render().encode("ascii") for d, p in serve.items() if f"mta-sts.{d}" in hosts}
        return cls(hosts=hosts, policies=policies)


def request_host(request: BaseRequest) -> str | None:
    """The Host header's name in lower case without port or root dot; None when absent or malformed."""
    raw = request.headers.get("Host", "")
    match = _HOST.fullmatch(raw)
    if not match or ".." in match.group(1):
        return None
    return match.group(1).lower()


# ---------------------------------------------------------------------------
# Handlers. Each is a plain coroutine of (request) -> response over in-memory data.


class Handlers:
    """The HTTP and HTTPS request handlers; ``site`` is swapped whole on reload."""

    def __init__(self, site: Site, challenges: ChallengeTable) -> None:
        self.site = site
        self.challenges = challenges

    async def http(self, request: BaseRequest) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if path.startswith(CHALLENGE_PREFIX):
            return self._challenge(request.method, path[len(CHALLENGE_PREFIX):])
        host = request_host(request)
        if host is None or host not in self.site.hosts:
            return _not_found()
        # The guide's httpd.conf: block return 302 "https://$HTTP_HOST$REQUEST_URI".
        return web.Response(status=302, headers={"Location": f"https://{host}{_path_and_query(request)}"})

    def _challenge(self, method: str, token: str) -> web.StreamResponse:
        answer = self.challenges.get(token) if method in ("GET", "HEAD") and _TOKEN.fullmatch(token) else None
        if answer is None:
            return _not_found()
        # RFC 8555 8.3: the body is the key authorization; shown as application/octet-stream.
        return web.Response(body=answer.encode("ascii"), content_type="application/octet-stream")

    async def https(self, request: BaseRequest) -> web.StreamResponse:
        policies = self.site.policies
        # Fast path: a Host header that is exactly a configured name (what senders send) needs
        # no parsing; anything else (a port, upper case, a root dot) is normalised first.
        policy = policies.get(request.headers.get("Host", "")) or policies.get(request_host(request) or "")
        if policy is None or request.method not in ("GET", "HEAD") or request.rel_url.raw_path != WELL_KNOWN_PATH:
            return _not_found()
        # RFC 8461 3.3: 200, media type text/plain, never a redirect.
        return web.Response(body=policy, headers=_POLICY_HEADERS)


_POLICY_HEADERS = {"Content-Type": MEDIA_TYPE, "Cache-Control": "no-cache"}


def _path_and_query(request: BaseRequest) -> str:
    raw = request.rel_url.raw_path_qs
    return raw if raw.startswith("/") else "/" + raw


def _not_found() -> web.Response:
    return web.Response(status=404, text="not found\n")


# ---------------------------------------------------------------------------
# TLS: one context per certificate, chosen by SNI.


@dataclass(frozen=True)
class _Contexts:
    by_host: dict[str, ssl.SSLContext]
    default: ssl.SSLContext | None


class TlsContexts:
    """Per-certificate ``SSLContext``s behind one listening context (see the module comment).

    ``load_all`` and ``reload_certificate`` may run in any thread; the SNI
    callback (event loop) reads one immutable snapshot, replaced whole.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_cert: dict[str, ssl.SSLContext] = {}
        self._pem: dict[str, bytes] = {}  # name -> digest of the set load_pem made its context from
        self._certificates: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, domains), first = default
        self._snapshot = _Contexts(by_host={}, default=None)
        self.front = _new_context()
        self.front.sni_callback = self._choose

    def load_all(self, certificates: Iterable[CertificateConfig]) -> list[str]:
        """(Re)load every certificate; return one line per certificate that could not be loaded.

        A certificate already served whose files cannot be loaded now (say, read
        half-way through an install by another process) keeps being served.
        """
        return self._replace([(c.name, c.domains, partial(certificate_context, c)) for c in certificates])

    def load_pem(self, sets: Iterable[tuple[str, tuple[str, ...], bytes, bytes]], scratch: Path) -> list[str]:
        """Serve exactly these (name, domains, full chain, key) sets, handed over by the keeper.

        The listener cannot read the key files; ``ssl`` loads keys only from a file, so each
        one passes through a private 0600 file in ``scratch`` that is removed at once. A set
        handed over again unchanged (the keeper's reconcile, every minute) keeps its context."""
        sets = tuple(sets)
        digests = {name: hashlib.sha256(fullchain + b"\0" + key).digest() for name, _, fullchain, key in sets}

        def context(name: str, fullchain: bytes, key: bytes) -> ssl.SSLContext:
            previous = self._by_cert.get(name)
            if previous is not None and self._pem.get(name) == digests[name]:
                return previous
            return pem_context(name, fullchain, key, scratch)

        problems = self._replace([(name, domains, partial(context, name, fullchain, key))
                                  for name, domains, fullchain, key in sets])
        self._pem = {name: digest for name, digest in digests.items()
                     if not any(p.startswith(f"{name}:") for p in problems)}
        return problems

    def _replace(self, entries: list[tuple[str, tuple[str, ...], Callable[[], ssl.SSLContext]]]) -> list[str]:
        """Serve exactly these certificates, each context made by its function; one that cannot be made
        keeps the context served before, if any. One line per certificate that could not be loaded."""
        problems: list[str] = []
        loaded: dict[str, ssl.SSLContext] = {}
        for name, _, make in entries:
            try:
                loaded[name] = make()
            except LocalError as exc:
                previous = self._by_cert.get(name)
                if previous is not None:
                    loaded[name] = previous
                problems.append(f"{exc}{'; still serving the certificate loaded before' if previous else ''}")
        with self._lock:
            self._certificates = tuple((name, domains) for name, domains, _ in entries)
            self._by_cert = loaded
            self._publish()
        return problems

    def reload_certificate(self, cert: CertificateConfig) -> None:
        """Load ``cert``'s files again (after a renewal); the next handshake uses them."""
        context = certificate_context(cert)
        with self._lock:
            self._by_cert = {**self._by_cert, cert.name: context}
            self._publish()
        log.info("%s: serving the new certificate to new connections", cert.name)

    def names_loaded(self) -> tuple[str, ...]:
        return tuple(self._by_cert)

    def _publish(self) -> None:
        by_host: dict[str, ssl.SSLContext] = {}
        default = None
        for name, domains in self._certificates:
            context = self._by_cert.get(name)
            if context is None:
                continue
            default = default or context
            for domain in domains:
                by_host.setdefault(domain, context)
        self._snapshot = _Contexts(by_host=by_host, default=default)

    def _choose(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _front: ssl.SSLContext) -> int | None:
        snapshot = self._snapshot
        if server_name is None or _is_ip_literal(server_name):
            context = snapshot.default
        else:
            context = snapshot.by_host.get(server_name.lower().rstrip("."))
        if context is None:
            # RFC 6066 3: a server that does not recognise the name may abort with unrecognized_name.
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = context
        return None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _new_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def certificate_context(cert: CertificateConfig) -> ssl.SSLContext:
    """A server context holding ``cert``'s fullchain and key as on disk now."""
    context = _new_context()
    try:
        context.load_cert_chain(certfile=str(cert.fullchain), keyfile=str(cert.key))
    except FileNotFoundError:
        raise LocalError(f"{cert.name}: {cert.fullchain} or {cert.key} does not exist yet") from None
    except (OSError, ssl.SSLError) as exc:
        raise LocalError(f"{cert.name}: cannot load {cert.fullchain} with {cert.key}: {exc}") from None
    return context


def pem_context(name: str, fullchain: bytes, key: bytes, scratch: Path) -> ssl.SSLContext:
    """A server context for PEM bytes (through a private file in ``scratch``, removed at once)."""
    context = _new_context()
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=scratch, prefix=".tls-")  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(fullchain + b"\n" + key)
        context.load_cert_chain(certfile=path)
    except (OSError, ssl.SSLError) as exc:
        raise LocalError(f"{name}: cannot load the certificate and key handed over: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return context


# ---------------------------------------------------------------------------
# Listeners.


def split_address(value: str) -> tuple[str, int]:
    """``"0.0.0.0:80"`` / ``"[::]:443"`` → (host, port); validated by config already."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class WebServer:
    """The HTTP and HTTPS listeners of one daemon; ``start`` binds, ``stop`` closes."""

    def __init__(self, config: Config, challenges: ChallengeTable, limits: Limits | None = None,
                 tls_from_files: bool = True) -> None:
        """``tls_from_files``: load each certificate's files (in one process, tests); the listener
        process passes False and is handed its certificates by the keeper (``tls.load_pem``)."""
        self.limits = limits or Limits.from_config(config.http)
        self.tls_from_files = tls_from_files
        self.handlers = Handlers(Site.from_config(config), challenges)
        self.tls = TlsContexts()
        self.listen = config.http.listen
        self.tls_listen = config.http.tls_listen
        self._certificates = config.certificates
        self._sockets: list[tuple[str, socket.socket, bool]] = []  # (address, socket, tls)
        self._protocols: list[web.Server] = []
        self._readers: list[int] = []  # listening descriptors the event loop watches
        self._paused: asyncio.TimerHandle | None = None
        self.pool = ConnectionPool(self.limits.max_connections, self.limits.max_connections_per_address,
                                   self.limits.max_handshakes)
        self._accept_errors = RateLimitedLines(log)
        self.bound: list[tuple[str, int]] = []  # (scheme, port) actually bound, for logs and tests

    def bind(self) -> None:
        """Create the listening sockets now; the daemon calls this before it detaches so
        that "address in use" reaches the terminal. ``start`` binds them itself otherwise."""
        try:
            for address in self.listen:
                self._sockets.append((address, listen_socket(address), False))
            for address in self.tls_listen:
                self._sockets.append((address, listen_socket(address), True))
        except LocalError:
            self._close_sockets()
            raise

    async def start(self) -> None:
        if not self._sockets:
            self.bind()
        soft = raise_nofile_limit()
        self.pool.total = connection_budget(self.limits, soft)
        if self.pool.total < self.limits.max_connections:
            log.warning("at most %d connections: RLIMIT_NOFILE is %d (%d kept for other files); "
                        "raise it to allow [http] max_connections = %d", self.pool.total, soft, RESERVED_FDS,
                        self.limits.max_connections)
        if self.tls_listen and self.tls_from_files:
            for problem in await asyncio.to_thread(self.tls.load_all, self._certificates):
                log.info("%s", problem)
        http = web.Server(self.handlers.http, **self.limits.server_kwargs())
        https = web.Server(self.handlers.https, **self.limits.server_kwargs())
        self._protocols = [http, https]
        loop = asyncio.get_running_loop()
        for address, sock, tls in self._sockets:
            self.bound.append(("https" if tls else "http", sock.getsockname()[1]))
            log.info("listening on %s (%s)", address, "https" if tls else "http")
        self._watch(loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._paused = None
        for _, sock, tls in self._sockets:
            server = self._protocols[1] if tls else self._protocols[0]
            loop.add_reader(sock.fileno(), self._accept, loop, sock, server, tls)
            self._readers.append(sock.fileno())

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        for fd in self._readers:
            loop.remove_reader(fd)
        self._readers.clear()

    def _accept(self, loop: asyncio.AbstractEventLoop, listener: socket.socket, server: web.Server,
                tls: bool) -> None:
        """The listening socket is readable: take what is waiting (a bounded batch), each under the caps."""
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: give back the longest idle connection and go on;
                    # with none to give, wait a moment rather than spin on a readable socket.
                    self._accept_errors(logging.WARNING, f"cannot accept a connection: {exc.strerror}; "
                                                         "closing the longest idle one")
                    if not self.pool.evict_idlest():
                        self._unwatch(loop)
                        self._paused = loop.call_later(0.1, self._watch, loop)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up between SYN and accept
                self._accept_errors(logging.WARNING, f"cannot accept a connection: {exc.strerror or exc}")
                return
            sock.setblocking(False)
            conn = Connection(address_key(peer[0] if isinstance(peer, tuple) else str(peer)), sock)
            self.pool.admit(conn, tls)
            conn.task = loop.create_task(self._connect(loop, conn, server, tls))

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: Connection, server: web.Server,
                       tls: bool) -> None:
        pool = self.pool

        def protocol() -> asyncio.Protocol:
            return _Counted(server(), conn, pool)

        try:
            await loop.connect_accepted_socket(
                protocol, conn.sock, ssl=self.tls.front if tls else None,
                ssl_handshake_timeout=self.limits.handshake_timeout if tls else None)
        except asyncio.CancelledError:
            pool.forget(conn)
            conn.sock.close()
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            pool.forget(conn)
            conn.sock.close()
            log.debug("connection from %s closed in the handshake: %s", conn.key, exc)
        else:
            if conn.transport is None:  # asyncio: the client left mid-handshake without an error
                pool.forget(conn)
                conn.sock.close()
        finally:
            conn.task = None

    def reload(self, config: Config) -> None:
        """SIGHUP: new host names, policies, certificates and connection caps (applied to the next
        connection; none is closed for it); listen addresses need a restart.

        Raises ``LocalError`` before changing anything when the new site cannot be built."""
        self.handlers.site = Site.from_config(config)
        self._certificates = config.certificates
        caps = Limits.from_config(config.http)
        self.pool.total = connection_budget(caps, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.pool.per_address, self.pool.handshakes = caps.max_connections_per_address, caps.max_handshakes
        if self.tls_from_files:
            for problem in self.tls.load_all(config.certificates):
                log.info("%s", problem)
        if (config.http.listen, config.http.tls_listen) != (self.listen, self.tls_listen):
            log.warning("[http] listen addresses changed; restart certkeeper to listen on the new ones")

    def on_installed(self, cert: CertificateConfig) -> None:
        """Renewer callback (worker thread): swap in the new certificate."""
        try:
            self.tls.reload_certificate(cert)
        except LocalError as exc:
            log.error("%s", exc)

    async def stop(self) -> None:
        """Close the listening sockets; open requests get ``shutdown_timeout`` in all (not per listener)."""
        loop = asyncio.get_running_loop()
        self._unwatch(loop)
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        for conn in list(self.pool.shaking):  # nothing to finish in a handshake
            self.pool.evict(conn)
        await asyncio.gather(*(protocol.shutdown(self.limits.shutdown_timeout) for protocol in self._protocols))
        self.pool.close_all()
        self._protocols.clear()
        self._close_sockets()
        await asyncio.sleep(0)  # let cancelled handshakes close their sockets

    def close(self) -> None:
        """Close sockets bound but never started (a listener that could not finish starting)."""
        self._close_sockets()

    def _close_sockets(self) -> None:
        for _, sock, _ in self._sockets:
            sock.close()
        self._sockets.clear()


def listen_socket(address: str) -> socket.socket:
    """A listening, non-blocking TCP socket on ``address`` (IPv6 sockets are v6-only)."""
    host, port = split_address(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise LocalError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "0.0.0.0:80" is bound separately
        sock.bind(sockaddr)
        sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LocalError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock
