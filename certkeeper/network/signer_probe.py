"""After a DKIM signer switch: is the service up, and does it sign with the new selector?

Runs in the network worker (the keeper opens no INET socket). ``[[dkim]] probe``
names the endpoint:

- ``smtp://HOST:PORT``: the MTA's listener that signs (filter-dkimsign attached to it,
  or rspamd as its milter). A loopback sink (aiosmtpd) is opened on ``probe_sink``; a
  message from ``certkeeper-probe@DOMAIN`` to ``probe_recipient`` is submitted to the
  listener, which signs it and, by the operator's smtpd.conf rule, relays it to the
  sink (README, "DKIM key rotation")::

      action "certkeeper-probe" relay host smtp://127.0.0.1:10500
      match from local for rcpt-to "dkim-probe@certkeeper.invalid" action "certkeeper-probe"

  The copy the MTA delivered is what is verified.
- ``rspamd://HOST:PORT``: rspamd's normal worker; the message is posted to ``/checkv2``
  as a local MTA submits it (the sender as the authenticated user) and the
  DKIM-Signature rspamd answers is put on it.

Each DKIM-Signature of the copy is verified by dkimpy, the key record looked up at
the zone's authoritative servers (``network.dns.propagation``: no cache, AA answers
only). The switch is good when every expected selector of the domain signs and
verifies, and no other selector of the domain signs (the old one still signing
means the service did not load the new file). Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import smtplib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

from certkeeper.core.config import Config, DkimConfig
from certkeeper.core.errors import ServiceError

log = logging.getLogger(__name__)

UP_TIMEOUT = 30.0  # seconds for the service's port to answer after its hook
PROBE_TIMEOUT = 60.0  # seconds for the signed copy (the MTA's relay to the sink, or rspamd's answer)
RSPAMD_SETTLE = 10.0  # seconds rspamd's answers may still come from workers of before its reload
POLL = 0.2
QUIT_WAIT = 30.0  # seconds the sink waits for the MTA to end its session after the copy
SENDER = "certkeeper-probe"  # the probe's local part at the [[dkim]] domain


class ProbeError(ServiceError):
    """The service is not up, or does not sign as it should after a switch."""


def endpoint(item: DkimConfig) -> tuple[str, str, int]:
    parts = urlsplit(item.probe)
    return parts.scheme, parts.hostname or "", parts.port or 0


def wait_up(item: DkimConfig, timeout: float = UP_TIMEOUT) -> str:
    """"" once the probe endpoint answers (an SMTP greeting 220, rspamd's /ping "pong"); else why not."""
    scheme, host, port = endpoint(item)
    deadline = time.monotonic() + timeout
    problem = "not tried"
    while True:
        problem = _answers(scheme, host, port)
        if not problem or time.monotonic() >= deadline:
            return problem and f"{item.probe} does not answer: {problem}"
        time.sleep(POLL)


def _answers(scheme: str, host: str, port: int) -> str:
    try:
        if scheme == "smtp":
            with socket.create_connection((host, port), timeout=5) as sock:
                greeting = sock.makefile("rb").readline(512)
            return "" if greeting.startswith(b"220") else f"greeting {greeting[:60]!r}"
        with urllib.request.urlopen(f"http://{_netloc(host, port)}/ping", timeout=5) as response:  # noqa: S310
            body = response.read(64)
        return "" if body.strip() == b"pong" else f"/ping answered {body[:40]!r}"
    except (OSError, urllib.error.URLError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe_message(item: DkimConfig, token: str, selectors: Collection[str]) -> bytes:
    sender = f"{SENDER}@{item.domain}"
    lines = [
        f"From: {sender}",
        f"To: {item.probe_recipient}",
        f"Subject: certkeeper DKIM probe {token}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: <{token}@{item.domain}>",
        "Auto-Submitted: auto-generated",
        "",
        f"certkeeper checks that the DKIM signer of {item.domain} signs with {', '.join(sorted(selectors))}.",
        "This message goes to certkeeper's own sink and nowhere else.",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def signed_copy(item: DkimConfig, message: bytes, token: str, timeout: float = PROBE_TIMEOUT,
                sink: ProbeSink | None = None) -> bytes:
    """The message as the signer returns it: the MTA's delivered copy, or rspamd's signature on it."""
    scheme, host, port = endpoint(item)
    if scheme == "rspamd":
        return _rspamd_signed(item, host, port, message, timeout)
    if sink is None:
        with ProbeSink(item) as own:
            return own.relayed(host, port, message, token, timeout)
    return sink.relayed(host, port, message, token, timeout)


class ProbeSink:
    """The loopback SMTP sink on ``probe_sink`` (aiosmtpd), open for the whole switch for an
    ``smtp://`` probe (a no-op otherwise): opened before the hook restarts the MTA, so an MTA that
    starts by relaying an earlier probe still queued finds it there (a refused connection would make
    it hold the route for minutes), and kept until the MTA ends its session (it reuses an idle
    session and notices a closed one only at its next message: a temporary failure, retried later)."""

    def __init__(self, item: DkimConfig) -> None:
        self.item = item
        self.received: dict[str, bytes] = {}  # token → the copy
        self.open_sessions: dict[int, Any] = {}  # sessions that delivered, until the MTA says QUIT
        self.controller: Any = None

    def __enter__(self) -> ProbeSink:
        if endpoint(self.item)[0] != "smtp":
            return self
        from aiosmtpd.controller import Controller

        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's session lines are not ours to log
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                data: Any = getattr(envelope, "original_content", None) or getattr(envelope, "content", b"")
                match = re.search(rb"ckprobe-[0-9a-f]{16}", data) if isinstance(data, bytes) else None
                if match:
                    sink.received[match.group().decode()] = bytes(data)
                sink.open_sessions[id(session)] = server
                return "250 OK"  # an older probe's copy still queued is taken and dropped

            async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                sink.open_sessions.pop(id(session), None)
                return "221 Bye"

        host, _, port = self.item.probe_sink.rpartition(":")
        self.controller = Controller(Handler(), hostname=host.strip("[]"), port=int(port), ready_timeout=10)
        try:
            self.controller.start()
        except (OSError, RuntimeError, TimeoutError) as exc:
            self.controller = None
            raise ProbeError(f"cannot open the probe sink on {self.item.probe_sink}: "
                             f"{' '.join(str(exc).split())}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.controller is None:
            return
        deadline = time.monotonic() + QUIT_WAIT
        while self.open_sessions and time.monotonic() < deadline:
            time.sleep(POLL / 2)
        for server in list(self.open_sessions.values()):  # the MTA did not say QUIT in time: hang up
            transport = getattr(server, "transport", None)
            if transport is not None:
                self.controller.loop.call_soon_threadsafe(transport.close)
        self.controller.stop()
        self.controller = None

    def relayed(self, host: str, port: int, message: bytes, token: str, timeout: float) -> bytes:
        """Submit ``message`` to the MTA at host:port; the copy it relays here (ProbeError when none comes)."""
        item = self.item
        try:
            with smtplib.SMTP(host, port, timeout=timeout) as client:
                client.sendmail(f"{SENDER}@{item.domain}", [item.probe_recipient], message)
        except (OSError, smtplib.SMTPException) as exc:
            raise ProbeError(f"{item.probe} did not take the probe message: {' '.join(str(exc).split())}") from None
        deadline = time.monotonic() + timeout
        while token not in self.received and time.monotonic() < deadline:
            time.sleep(POLL / 2)
        copy = self.received.get(token)
        if copy is None:
            raise ProbeError(f"the probe message sent to {item.probe} did not reach {item.probe_sink} within "
                             f"{timeout:g}s (smtpd.conf needs the rule relaying {item.probe_recipient} there: "
                             "README)")
        return copy.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _rspamd_signed(item: DkimConfig, host: str, port: int, message: bytes, timeout: float) -> bytes:
    sender = f"{SENDER}@{item.domain}"
    request = urllib.request.Request(f"http://{_netloc(host, port)}/checkv2", data=message, headers={
        "IP": "127.0.0.1", "From": sender, "Rcpt": item.probe_recipient, "Helo": "localhost",
        "Hostname": "localhost", "User": sender, "Content-Type": "message/rfc822",
    })
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - rspamd's worker
            answer = json.load(response)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise ProbeError(f"{item.probe}: /checkv2 failed: {' '.join(str(exc).split())}") from None
    values = answer.get("dkim-signature") if isinstance(answer, dict) else None
    if values is None and isinstance(answer, dict):  # the milter form: headers to add
        added = (answer.get("milter") or {}).get("add_headers") or {}
        found = added.get("DKIM-Signature")
        values = found.get("value") if isinstance(found, dict) else found
    if isinstance(values, str):
        values = [values]
    headers = b"".join(b"DKIM-Signature: " + v.encode() + b"\r\n" for v in values or [] if isinstance(v, str))
    return headers + message


def authoritative_txt(config: Config) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc``: the TXT record as the zone's authoritative servers answer it."""
    from certkeeper.network.dns.propagation import Server, authoritative_servers, query, query_timeout, zone_of

    servers: dict[str, list[Server]] = {}  # zone -> its servers, found once per lookup function

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = (name.decode() if isinstance(name, bytes) else name).rstrip(".")
        zone = zone_of(config, qname)
        if zone not in servers:
            servers[zone] = authoritative_servers(config, zone)
        for server in servers[zone]:
            answer = query(server, qname, "TXT", timeout=min(timeout, query_timeout(config)))
            if answer.values:
                return answer.values[0].encode()
        return None

    return lookup


def signature_problem(config: Config, domain: str, message: bytes, selectors: Collection[str]) -> str:
    """Why ``message`` is not signed for ``domain`` by exactly ``selectors`` (each verified), or ""."""
    import dkim as dkimpy

    lookup = authoritative_txt(config)
    checker = dkimpy.DKIM(message)
    headers = [v for k, v in checker.headers if k.lower() == b"dkim-signature"]
    verified: set[str] = set()
    others: list[str] = []
    failed: list[str] = []
    for idx, value in enumerate(headers):
        tags = dict(re.findall(rb"(\w+)\s*=\s*([^;]*)", re.sub(rb"\s+", b"", value)))
        selector = tags.get(b"s", b"").decode(errors="replace")
        if tags.get(b"d", b"").decode(errors="replace").lower() != domain:
            continue
        if selector not in selectors:
            others.append(selector)
            continue
        try:
            ok = checker.verify(idx=idx, dnsfunc=lookup)
        except Exception as exc:  # noqa: BLE001 - dkimpy raises many kinds for a bad signature
            ok = False
            failed.append(f"{selector} ({' '.join(str(exc).split()) or type(exc).__name__})")
        if ok:
            verified.add(selector)
        elif not any(f.startswith(selector) for f in failed):
            failed.append(f"{selector} (does not verify against the authoritative DNS)")
    missing = sorted(set(selectors) - verified)
    if not missing and not others:
        return ""
    found = ", ".join(f"s={s}" for s in [*sorted(verified), *others]) or "no DKIM-Signature of " + domain
    parts = [f"wanted {', '.join(sorted(selectors))}, signed with {found}"]
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return "; ".join(parts)


def verify(config: Config, item: DkimConfig, selectors: Collection[str], progress: Callable[[str], None],
           timeout: float = PROBE_TIMEOUT, sink: ProbeSink | None = None) -> bool:
    """Raise ``ProbeError`` unless the service is up and signs a probe message with ``selectors``
    (verified against the authoritative DNS). False when no probe is configured (nothing checked)."""
    if not item.probe:
        text = f"{item.domain}: no [[dkim]] probe is configured: the switch is not verified by a signed message"
        log.warning("dkim %s", text)
        progress(text)
        return False
    problem = wait_up(item)
    if problem:
        raise ProbeError(f"after the switch {problem}")
    # rspamd answers from its old workers for a moment after a reload: asked again, briefly, before
    # a wrong selector counts. An MTA's delivered copy is what it signed: asked once.
    settle = time.monotonic() + (min(RSPAMD_SETTLE, timeout) if endpoint(item)[0] == "rspamd" else 0.0)
    while True:
        token = f"ckprobe-{os.urandom(8).hex()}"
        copy = signed_copy(item, probe_message(item, token, selectors), token, timeout, sink)
        problem = signature_problem(config, item.domain, copy, selectors)
        if not problem or time.monotonic() + 1.0 > settle:
            break
        time.sleep(1.0)
    if problem:
        raise ProbeError(f"the probe message through {item.probe}: {problem}")
    progress(f"{item.domain}: a probe message through {item.probe} is signed with {', '.join(sorted(selectors))} "
             "and verifies against the authoritative DNS")
    return True
