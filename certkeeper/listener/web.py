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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from certkeeper.core import mtasts_state
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import CertificateConfig, Config
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

    def server_kwargs(self) -> dict[str, Any]:
        return {
            "max_line_size": self.max_line_size, "max_field_size": self.max_field_size,
            "max_headers": self.max_headers, "keepalive_timeout": self.request_timeout,
            "access_log": None,
        }


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
        self._certificates: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, domains), first = default
        self._snapshot = _Contexts(by_host={}, default=None)
        self.front = _new_context()
        self.front.sni_callback = self._choose

    def load_all(self, certificates: Iterable[CertificateConfig]) -> list[str]:
        """(Re)load every certificate; return one line per certificate that could not be loaded.

        A certificate already served whose files cannot be loaded now (say, read
        half-way through an install by another process) keeps being served.
        """
        certificates = tuple(certificates)
        problems: list[str] = []
        loaded: dict[str, ssl.SSLContext] = {}
        for cert in certificates:
            try:
                loaded[cert.name] = certificate_context(cert)
            except LocalError as exc:
                previous = self._by_cert.get(cert.name)
                if previous is not None:
                    loaded[cert.name] = previous
                problems.append(f"{exc}{'; still serving the certificate loaded before' if previous else ''}")
        with self._lock:
            self._certificates = tuple((c.name, c.domains) for c in certificates)
            self._by_cert = loaded
            self._publish()
        return problems

    def load_pem(self, sets: Iterable[tuple[str, tuple[str, ...], bytes, bytes]], scratch: Path) -> list[str]:
        """Serve exactly these (name, domains, full chain, key) sets, handed over by the keeper.

        The listener cannot read the key files; ``ssl`` loads keys only from a file, so each
        one passes through a private 0600 file in ``scratch`` that is removed at once."""
        sets = tuple(sets)
        problems: list[str] = []
        loaded: dict[str, ssl.SSLContext] = {}
        for name, _, fullchain, key in sets:
            try:
                loaded[name] = pem_context(name, fullchain, key, scratch)
            except LocalError as exc:
                previous = self._by_cert.get(name)
                if previous is not None:
                    loaded[name] = previous
                problems.append(f"{exc}{'; still serving the certificate loaded before' if previous else ''}")
        with self._lock:
            self._certificates = tuple((name, domains) for name, domains, _, _ in sets)
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
        self.limits = limits or Limits()
        self.tls_from_files = tls_from_files
        self.handlers = Handlers(Site.from_config(config), challenges)
        self.tls = TlsContexts()
        self.listen = config.http.listen
        self.tls_listen = config.http.tls_listen
        self._certificates = config.certificates
        self._sockets: list[tuple[str, socket.socket, bool]] = []  # (address, socket, tls)
        self._servers: list[asyncio.Server] = []
        self._protocols: list[web.Server] = []
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
        if self.tls_listen and self.tls_from_files:
            for problem in await asyncio.to_thread(self.tls.load_all, self._certificates):
                log.info("%s", problem)
        http = web.Server(self.handlers.http, **self.limits.server_kwargs())
        https = web.Server(self.handlers.https, **self.limits.server_kwargs())
        self._protocols = [http, https]
        loop = asyncio.get_running_loop()
        for address, sock, tls in self._sockets:
            server = await loop.create_server(
                https if tls else http, sock=sock, ssl=self.tls.front if tls else None,
                ssl_handshake_timeout=self.limits.handshake_timeout if tls else None)
            self._servers.append(server)
            scheme = "https" if tls else "http"
            self.bound.append((scheme, sock.getsockname()[1]))
            log.info("listening on %s (%s)", address, scheme)

    def reload(self, config: Config) -> None:
        """SIGHUP: new host names, policies and certificates; listen addresses need a restart.

        Raises ``LocalError`` before changing anything when the new site cannot be built."""
        self.handlers.site = Site.from_config(config)
        self._certificates = config.certificates
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
        for server in self._servers:
            server.close()
        await asyncio.gather(*(protocol.shutdown(self.limits.shutdown_timeout) for protocol in self._protocols))
        self._servers.clear()
        self._protocols.clear()
        self._close_sockets()

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
