"""What a service actually serves: TLS probes of its endpoints, and their last results.

This module owns the probes (``smtp+starttls://``, ``smtps://``, ``imap+starttls://``,
``imaps://``, ``https://`` HOST:PORT), the comparison of the served leaf with
the certificate on disk, the record of the last check per certificate
(``STATE/verify/NAME.json``) and ``certkeeper verify``.

A probe never validates the chain: certkeeper compares SHA-256 fingerprints of
the served leaf with the file it installed, which is a stronger statement than
"some trusted certificate is served". SNI is the certificate's first domain.
A probe never raises: every failure becomes the ``error`` of an ``Observation``.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from certkeeper.core import certs
from certkeeper.core.certs import CertInfo
from certkeeper.core.config import CertificateConfig, Config, hook_config
from certkeeper.core.files import write_atomic
from certkeeper.keeper.store import CertificateStore
from certkeeper.network.keeper_client import Keeper

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # seconds for one whole probe (connect, banner, STARTTLS, handshake)
MAX_LINE = 4096  # bytes in one SMTP/IMAP line before we call the peer broken
MAX_LINES = 200  # lines in one reply (an EHLO answer has a dozen)
RESULT_KEYS = ("endpoint", "hook", "serial", "fingerprint", "not_after", "ok", "error", "checked_at")
CLIENT_NAME = "certkeeper.invalid"  # EHLO argument (RFC 5321 4.1.1.1 wants a domain; RFC 6761 .invalid)


class ProbeError(Exception):
    """The peer did not speak the protocol as expected; the message is one line."""


# ---------------------------------------------------------------------------
# Endpoints and observations.


@dataclass(frozen=True)
class Endpoint:
    """A parsed verify URL: ``SCHEME://HOST:PORT`` (config.py has validated it)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        return cls(scheme=scheme, host=host.strip("[]"), port=int(port))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Observation:
    """What one probe saw: the served leaf, or why there was none."""

    endpoint: str
    cert: CertInfo | None
    error: str
    checked_at: datetime


@dataclass(frozen=True)
class Check:
    """One endpoint of one hook compared with one certificate's file on disk."""

    certificate: str
    hook: str
    expected: CertInfo | None
    seen: Observation

    @property
    def ok(self) -> bool:
        return self.expected is not None and self.seen.cert is not None \
            and self.seen.cert.fingerprint == self.expected.fingerprint

    def describe(self) -> str:
        """One line for ``certkeeper verify`` and the logs."""
        where = f"{self.certificate}: {self.hook}: {self.seen.endpoint}"
        if self.ok:
            return f"{where}: ok, serial {format_serial(self.seen.cert.serial)}"  # type: ignore[union-attr]
        return f"{where}: FAILED, {served_text(self.seen, self.expected)}"

    def to_dict(self) -> dict[str, Any]:
        """The record of ``STATE/verify/NAME.json`` and of ``status --json`` (keys: ``RESULT_KEYS``)."""
        served = self.seen.cert
        return {
            "endpoint": self.seen.endpoint,
            "hook": self.hook,
            "serial": format_serial(served.serial) if served else None,
            "fingerprint": served.fingerprint if served else None,
            "not_after": _iso(served.not_after) if served else None,
            "ok": self.ok,
            "error": self.seen.error or (None if self.ok else self._mismatch()),
            "checked_at": _iso(self.seen.checked_at),
        }

    def _mismatch(self) -> str:
        if self.expected is None:
            return "no certificate on disk to compare with"
        return f"expected serial {format_serial(self.expected.serial)}"


def format_serial(serial: int) -> str:
    """Upper-case hex, as ``certkeeper status`` prints it."""
    return f"{serial:X}"


def served_text(seen: Observation, expected: CertInfo | None, previous: CertInfo | None = None) -> str:
    """'served serial X (...)' or 'served no certificate (why)', for failure lines."""
    if seen.cert is None:
        return f"served no certificate ({seen.error})"
    text = f"served serial {format_serial(seen.cert.serial)}"
    if previous is not None and seen.cert.fingerprint == previous.fingerprint:
        return text + " (the previous certificate)"
    if expected is not None and seen.cert.fingerprint != expected.fingerprint:
        return text + f" instead of serial {format_serial(expected.serial)}"
    return text


# ---------------------------------------------------------------------------
# The protocol steps before the TLS handshake, over a line-oriented chat.


class Chat(Protocol):
    """A line-oriented conversation; real (``SocketChat``) or a plain-data fake in tests."""

    def send(self, line: str) -> None: ...

    def line(self) -> str: ...


def smtp_reply(chat: Chat) -> tuple[int, list[str]]:
    """Read one SMTP reply: (code, text lines). RFC 5321 4.2: 'NNN-text' continues, 'NNN text' ends."""
    texts: list[str] = []
    for _ in range(MAX_LINES):
        line = chat.line()
        code, sep = line[:3], line[3:4]
        if not code.isdigit() or sep not in ("-", " ", ""):
            raise ProbeError(f"not an SMTP reply: {line[:80]!r}")
        texts.append(line[4:])
        if sep != "-":
            return int(code), texts
    raise ProbeError(f"SMTP reply longer than {MAX_LINES} lines")


def smtp_starttls(chat: Chat) -> None:
    """Greeting, EHLO, STARTTLS (RFC 3207 4); returns when the server said 220 'go ahead'."""
    code, text = smtp_reply(chat)
    if code != 220:  # RFC 5321 4.3.2: 220 greeting, 554 refusal
        raise ProbeError(f"SMTP greeting {code} {' '.join(text)[:80]}")
    chat.send(f"EHLO {CLIENT_NAME}")
    code, text = smtp_reply(chat)
    if code != 250:
        raise ProbeError(f"EHLO answered {code} {' '.join(text)[:80]}")
    keywords = {t.split(" ", 1)[0].upper() for t in text[1:]}  # RFC 5321 4.1.1.1: line 1 is the domain
    if "STARTTLS" not in keywords:
        raise ProbeError("the server does not offer STARTTLS")
    chat.send("STARTTLS")
    code, text = smtp_reply(chat)
    if code != 220:  # RFC 3207 4: 220 Ready to start TLS; 454 TLS not available
        raise ProbeError(f"STARTTLS answered {code} {' '.join(text)[:80]}")


IMAP_TAG = "ck1"


def imap_starttls(chat: Chat) -> None:
    """Greeting, then STARTTLS (RFC 9051 6.2.1 / RFC 3501 6.2.1); returns on the tagged OK."""
    greeting = chat.line()
    # RFC 9051 7.1: the greeting is an untagged OK, PREAUTH (no STARTTLS possible) or BYE.
    if not greeting.upper().startswith("* OK"):
        raise ProbeError(f"IMAP greeting {greeting[:80]!r}")
    chat.send(f"{IMAP_TAG} STARTTLS")
    for _ in range(MAX_LINES):
        line = chat.line()
        if line.startswith("* "):
            continue  # untagged data (a CAPABILITY) may come first
        tag, _, rest = line.partition(" ")
        status = rest.split(" ", 1)[0].upper()
        if tag != IMAP_TAG:
            raise ProbeError(f"unexpected IMAP line {line[:80]!r}")
        if status == "OK":
            return
        raise ProbeError(f"STARTTLS answered {rest[:80]!r}")  # NO / BAD: no TLS on this port
    raise ProbeError(f"no answer to STARTTLS within {MAX_LINES} lines")


STARTTLS: dict[str, Callable[[Chat], None]] = {"smtp+starttls": smtp_starttls, "imap+starttls": imap_starttls}


class SocketChat:
    """``Chat`` over a plain socket with an overall deadline; reads byte-exactly (no read-ahead)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def send(self, line: str) -> None:
        self.sock.settimeout(self._remaining())
        self.sock.sendall(line.encode("ascii") + b"\r\n")

    def line(self) -> str:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise ProbeError(f"line longer than {MAX_LINE} bytes")
            self.sock.settimeout(self._remaining())
            data = self.sock.recv(4096)
            if not data:
                raise ProbeError("the server closed the connection")
            self.buffer += data
        raw, _, self.buffer = self.buffer.partition(b"\n")
        return raw.rstrip(b"\r").decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Probing.


def probe(url: str, server_name: str, timeout: float = PROBE_TIMEOUT) -> Observation:
    """Connect to ``url``, start TLS with SNI ``server_name`` and return the served leaf."""
    endpoint = Endpoint.parse(url)
    try:
        der = _served_leaf(endpoint, server_name, timeout)
        cert, error = certs.parse_der(der), ""
    except ProbeError as exc:
        cert, error = None, str(exc)
    except ssl.SSLError as exc:
        cert, error = None, f"TLS handshake failed: {exc.reason or exc}"
    except TimeoutError:
        cert, error = None, f"timed out after {timeout:g}s"
    except OSError as exc:
        cert, error = None, (exc.strerror or str(exc) or type(exc).__name__).lower()
    except ValueError as exc:  # a served certificate that does not parse
        cert, error = None, f"unreadable certificate: {exc}"
    return Observation(endpoint=endpoint.url, cert=cert, error=error, checked_at=datetime.now(UTC))


def served_leaf(url: str, server_name: str, timeout: float = PROBE_TIMEOUT) -> bytes:
    """The DER leaf certificate the service at ``url`` presents for ``server_name``; OSError,
    ``ssl.SSLError`` or ``ProbeError`` when it cannot be had."""
    return _served_leaf(Endpoint.parse(url), server_name, timeout)


def _served_leaf(endpoint: Endpoint, server_name: str, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as sock:
        starttls = STARTTLS.get(endpoint.scheme)
        if starttls is not None:
            chat = SocketChat(sock, deadline)
            starttls(chat)
            if chat.buffer:  # RFC 3207 6: nothing may arrive between the 220 and the handshake
                raise ProbeError("the server sent data after agreeing to STARTTLS")
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        with _client_context().wrap_socket(sock, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ProbeError("the server sent no certificate")
    return der


def _client_context() -> ssl.SSLContext:
    # No validation: the fingerprint is compared with the file on disk instead.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------
# Checking certificates, and remembering the last result.


def targets(config: Config, cert: CertificateConfig) -> Iterator[tuple[str, str]]:
    """(hook name, endpoint URL) for every verify endpoint of the certificate's hooks."""
    for name in cert.hooks:
        for url in hook_config(config, name).verify:
            yield name, url


def server_name(cert: CertificateConfig) -> str:
    return cert.domains[0] if cert.domains else cert.name


def on_disk(store: CertificateStore, cert: CertificateConfig) -> CertInfo | None:
    current = store.read(cert)
    return certs.parse_cert(current.cert) if current else None


def check_certificate(config: Config, keeper: Keeper, cert: CertificateConfig,
                      prober: Callable[[str, str], Observation] = probe) -> list[Check]:
    """Probe every verify endpoint of ``cert`` against the leaf on disk (the keeper shows it)."""
    pem = keeper.inspect(cert.name).cert
    try:
        expected = certs.parse_cert(pem) if pem else None
    except ValueError:
        expected = None
    return [Check(cert.name, hook, expected, prober(url, server_name(cert))) for hook, url in targets(config, cert)]


def results_path(state_dir: Path, name: str) -> Path:
    return state_dir / "verify" / f"{name}.json"


def save_results(config: Config, name: str, checks: list[Check]) -> None:
    """Write ``STATE/verify/NAME.json`` atomically (temp file, fsync, rename)."""
    path = results_path(config.state_dir, name)
    data = json.dumps({"certificate": name, "results": [c.to_dict() for c in checks]}, indent=1).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, 0o644)


def last_results(config: Config, name: str) -> list[dict[str, Any]]:
    """The endpoints' results at the last check, each with exactly ``RESULT_KEYS`` (``status --json``
    documents them; a key missing from an older file is None); [] when never checked or unreadable."""
    try:
        data = json.loads(results_path(config.state_dir, name).read_text())
        return [{key: item.get(key) for key in RESULT_KEYS} for item in data["results"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
