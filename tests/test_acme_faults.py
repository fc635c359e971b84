"""Every ACME error path, against the real Pebble behind a fault-injecting proxy.

``FaultProxy`` extends test_ari's ``AcmeProxy`` (which forwards to Pebble and adds
ARI): a test puts *cues* on it, each a path pattern and what to answer instead,
for a number of requests. Each fault gets its documented behaviour, and the
timing is asserted against the ``Retry-After`` the proxy sent. Also the ARI
CertID known answer (RFC 9773 4.1) and the spread of renewal times over a window.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certkeeper.core import config, renewal
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.state import load_cert_state, save_cert_state
from certkeeper.network.issuer import ari_cert_id
from certkeeper.network.runner import Renewer, RenewReport
from tests.fixtures.http01 import serving
from tests.fixtures.pebble import Pebble
from tests.test_ari import AcmeProxy

NAME = "mail.example.com"
Answer = Callable[["FaultProxy", web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Cue:
    path: str  # a regular expression the request path must match
    answer: Answer
    times: int = 1
    when: Callable[[dict[str, object]], bool] = lambda payload: True  # on the JWS payload
    after_upstream: bool = False  # the answer forwards first; Pebble's own error (a random badNonce) keeps the cue


@dataclass
class FaultProxy(AcmeProxy):
    cues: list[Cue] = field(default_factory=list)
    seen: list[tuple[str, float, int]] = field(default_factory=list)  # (path, time.monotonic(), status)
    cued: list[str] = field(default_factory=list)  # paths answered by a cue

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        response = await self._answer(request)
        self.seen.append((request.path, arrived, response.status))
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        for cue in self.cues:
            if cue.times > 0 and re.search(cue.path, request.path) and cue.when(await _payload(request)):
                response = await cue.answer(self, request)
                if response.status < 400 or not cue.after_upstream:  # an upstream error leaves the cue
                    cue.times -= 1
                    self.cued.append(request.path)
                return response
        return await super().handle(request)

    def times_of(self, pattern: str) -> list[float]:
        """When the requests to ``pattern`` that were answered without an error arrived (Pebble
        refuses 5 % of nonces at random: those retries do not count)."""
        return [t for p, t, status in self.seen if re.search(pattern, p) and status < 400]


async def _payload(request: web.Request) -> dict[str, object]:
    body = await request.read()  # aiohttp keeps it: the forwarding handler reads it again
    try:
        payload = json.loads(body)["payload"]
        return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) or b"{}"))
    except (ValueError, KeyError, TypeError):
        return {}


def problem(status: int, kind: str, headers: dict[str, str] | None = None) -> Answer:
    async def answer(proxy: FaultProxy, request: web.Request) -> web.StreamResponse:
        body = {"type": f"urn:ietf:params:acme:error:{kind}", "detail": f"injected {kind}", "status": status}
        return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json",
                            headers=headers or {})
    return answer


def plain(status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> Answer:
    async def answer(proxy: FaultProxy, request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type, headers=headers or {})
    return answer


def replaced_body(body: bytes) -> Answer:
    """Forward the request, but answer with ``body`` (the upstream's status and nonce kept). An error
    from upstream (Pebble's random badNonce) is passed on and the cue stays for the retry."""
    async def answer(proxy: FaultProxy, request: web.Request) -> web.StreamResponse:
        upstream = await AcmeProxy.handle(proxy, request)
        if upstream.status >= 400:
            return upstream
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("replay-nonce", "link", "content-type")}
        return web.Response(status=upstream.status, body=body, headers=headers)
    return answer


def processing(retry_after: int) -> Answer:
    """Forward the poll, but say the order is still ``processing`` (RFC 8555 7.1.6) with Retry-After."""
    async def answer(proxy: FaultProxy, request: web.Request) -> web.StreamResponse:
        upstream = await AcmeProxy.handle(proxy, request)
        if upstream.status >= 400:
            return upstream
        assert isinstance(upstream, web.Response) and upstream.body is not None
        order = json.loads(bytes(upstream.body))  # type: ignore[arg-type]
        order["status"] = "processing"
        order.pop("certificate", None)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("replay-nonce", "link", "location")}
        return web.json_response(order, headers={**headers, "Retry-After": str(retry_after)})
    return answer


async def reset(proxy: FaultProxy, request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()  # TCP reset: no answer at all
    return web.Response()


async def drip(proxy: FaultProxy, request: web.Request) -> web.StreamResponse:
    """A body of spaces, one byte every 0.1 s: each read succeeds, the whole never ends in time."""
    response = web.StreamResponse(status=201, headers={"Content-Type": "application/json"})
    response.content_length = 1000
    await response.prepare(request)
    try:
        for _ in range(600):
            await response.write(b" ")
            await asyncio.sleep(0.1)
    except (ConnectionError, RuntimeError):
        pass
    return response


@pytest.fixture
def proxy(pebble: Pebble) -> Iterator[FaultProxy]:
    with FaultProxy(pebble).running() as running:
        assert isinstance(running, FaultProxy)
        yield running


def load(proxy: FaultProxy, tmp_path: Path, acme_extra: str = "", fallback: bool = False) -> config.Config:
    pebble = proxy.pebble
    text = pebble.config_text(tmp_path, [NAME], directory=proxy.directory)
    text = text.replace("[http]", acme_extra + "\n[http]")
    if fallback:  # a second authority: the real Pebble, not through the proxy
        text = text.replace('fullchain = ', 'fallback = ["direct"]\nfullchain = ')
        text += (f'[authority.direct]\ndirectory = "{pebble.directory}"\naccount_key = "{tmp_path}/acme/direct.pem"\n'
                 f'ca_bundle = "{pebble.ca_file}"\n')
    (tmp_path / "certkeeper.toml").write_text(text)
    return config.load(tmp_path / "certkeeper.toml")


def renew(conf: config.Config, when: dt.datetime, force: bool = False) -> RenewReport:
    challenges = ChallengeTable()
    renewer = Renewer(conf, challenges, clock=lambda: when)
    return renewer.renew(None, force=force, serve_challenges=lambda: serving(conf, challenges))


def working_set(conf: config.Config) -> dict[str, bytes]:
    cert = conf.certificates[0]
    return {role: getattr(cert, role).read_bytes() for role in ("key", "cert", "chain", "fullchain")}


# ---------------------------------------------------------------------------
# Rate limits and unavailability: the next try waits for the server's Retry-After.


def test_rate_limited_with_retry_after_seconds(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    proxy.cues.append(Cue("^/order-plz$", problem(429, "rateLimited", {"Retry-After": "7200"})))
    now = dt.datetime.now(dt.UTC)
    report = renew(conf, now)
    assert report.exit_code == 1 and "urn:ietf:params:acme:error:rateLimited" in report.outcomes[0].detail
    state = load_cert_state(conf.state_dir, NAME)
    assert state.retry_not_before == now + dt.timedelta(seconds=7200)  # the header, not our 1 minute
    assert state.retry_by_server
    renewer = Renewer(conf, ChallengeTable(), clock=lambda: now + dt.timedelta(seconds=7199))
    assert not renewer.decide(conf.certificates[0]).due
    renewer = Renewer(conf, ChallengeTable(), clock=lambda: now + dt.timedelta(seconds=7201))
    assert renewer.decide(conf.certificates[0]).due


def test_rate_limited_with_retry_after_as_http_date(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    until = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)).replace(microsecond=0)
    proxy.cues.append(Cue("^/order-plz$", problem(429, "rateLimited",
                                                 {"Retry-After": format_datetime(until, usegmt=True)})))
    now = dt.datetime.now(dt.UTC)
    assert renew(conf, now).exit_code == 1
    state = load_cert_state(conf.state_dir, NAME)
    assert state.retry_not_before is not None
    assert abs((state.retry_not_before - until).total_seconds()) < 3
    assert state.retry_by_server


def test_503_with_retry_after_goes_to_the_fallback_and_backs_off_that_authority(proxy: FaultProxy,
                                                                                tmp_path: Path) -> None:
    conf = load(proxy, tmp_path, fallback=True)
    proxy.cues.append(Cue("^/order-plz$", plain(503, b"down for maintenance", "text/plain", {"Retry-After": "120"})))
    now = dt.datetime.now(dt.UTC)
    report = renew(conf, now)
    assert report.exit_code == 0, report.outcomes
    assert report.outcomes[0].detail.endswith("from direct")
    state = load_cert_state(conf.state_dir, NAME)
    assert state.authority == "direct" and state.consecutive_failures == 0
    assert state.authority_retry("acme") == now + dt.timedelta(seconds=120)  # the header (over our 1 min)
    assert state.authority_failures("acme") == 1


def test_an_authority_in_its_backoff_is_skipped_unless_forced(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path, fallback=True)
    now = dt.datetime.now(dt.UTC)
    state = load_cert_state(conf.state_dir, NAME)
    state.authority_backoff["acme"] = [1, (now + dt.timedelta(hours=1)).isoformat()]
    save_cert_state(conf.state_dir, state)
    report = renew(conf, now)  # due: no certificate on disk
    assert report.exit_code == 0 and report.outcomes[0].detail.endswith("from direct")
    assert proxy.orders == []  # the authority in backoff was not asked
    report = renew(conf, now, force=True)  # --force asks the first authority again
    assert report.exit_code == 0 and report.outcomes[0].detail.endswith("from acme")
    assert len(proxy.orders) == 1
    assert load_cert_state(conf.state_dir, NAME).authority_backoff == {}


def test_both_authorities_failing_waits_for_the_sooner_one(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path, fallback=True)
    direct = conf.authority("direct")
    conf = config.parse((tmp_path / "certkeeper.toml").read_text().replace(
        direct.directory, direct.directory.replace("/dir", "/nothing-here")), tmp_path / "certkeeper.toml")
    proxy.cues.append(Cue("^/order-plz$", problem(429, "rateLimited", {"Retry-After": "7200"})))
    now = dt.datetime.now(dt.UTC)
    report = renew(conf, now)
    assert report.exit_code == 1
    detail = report.outcomes[0].detail
    assert detail.startswith("acme: ") and "; direct: " in detail and "rateLimited" in detail
    state = load_cert_state(conf.state_dir, NAME)
    # "direct" failed without a Retry-After (1 minute); the certificate waits for the sooner of the two.
    assert state.authority_retry("acme") == now + dt.timedelta(seconds=7200)
    assert state.authority_retry("direct") == now + dt.timedelta(minutes=1)
    assert state.retry_not_before == now + dt.timedelta(minutes=1)


# ---------------------------------------------------------------------------
# Finalisation and polling.


def test_order_not_ready_at_finalize_is_finalized_again(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    proxy.cues.append(Cue("^/finalize-order/", problem(403, "orderNotReady")))
    assert renew(conf, dt.datetime.now(dt.UTC)).exit_code == 0
    assert len(proxy.cued) == 1  # refused once ...
    assert len(proxy.times_of("^/finalize-order/")) == 1  # ... then finalized for real


def test_processing_with_retry_after_is_polled_no_sooner(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    proxy.cues.append(Cue("^/my-order/", processing(1), times=2, after_upstream=True))
    assert renew(conf, dt.datetime.now(dt.UTC)).exit_code == 0
    polls = proxy.times_of("^/my-order/")
    assert len(polls) == 3
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    assert all(0.95 <= gap < 3 for gap in gaps), gaps  # Retry-After: 1, not our 20 ms first poll


def test_already_replaced_orders_again_without_replaces(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    now = dt.datetime.now(dt.UTC)
    assert renew(conf, now).exit_code == 0
    old = conf.certificates[0].cert.read_bytes()
    proxy.cues.append(Cue("^/order-plz$", problem(409, "alreadyReplaced"), when=lambda p: "replaces" in p))
    report = renew(conf, now, force=True)
    assert report.exit_code == 0, report.outcomes
    assert proxy.cued == ["/order-plz"]  # the order with replaces was refused ...
    assert "replaces" not in proxy.orders[-1]  # ... and the one without it went through
    assert conf.certificates[0].cert.read_bytes() != old
    assert ari_cert_id(old)  # the refused order did carry the old CertID (it matched the cue)


def test_connection_reset_during_finalize_keeps_the_working_set(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    now = dt.datetime.now(dt.UTC)
    assert renew(conf, now).exit_code == 0
    before = working_set(conf)
    proxy.cues.append(Cue("^/finalize-order/", reset))
    report = renew(conf, now, force=True)
    assert report.exit_code == 1
    assert "finalizing the order: cannot reach the ACME server" in report.outcomes[0].detail
    assert working_set(conf) == before
    state = load_cert_state(conf.state_dir, NAME)
    assert state.consecutive_failures == 1 and state.retry_not_before == now + dt.timedelta(minutes=1)


def test_a_certificate_that_is_not_pem_is_refused(proxy: FaultProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    now = dt.datetime.now(dt.UTC)
    assert renew(conf, now).exit_code == 0
    before = working_set(conf)
    proxy.cues.append(Cue("^/certZ/", replaced_body(b"\x30\x82 not a certificate"), after_upstream=True))
    report = renew(conf, now, force=True)
    assert report.exit_code == 1
    assert report.outcomes[0].detail == "the ACME server sent a certificate that is not PEM"
    assert working_set(conf) == before


def test_a_certificate_for_another_key_is_refused_and_the_fallback_asked(proxy: FaultProxy, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    conf = load(proxy, tmp_path, fallback=True)
    proxy.cues.append(Cue("^/certZ/", replaced_body(_foreign_certificate()), after_upstream=True))
    with caplog.at_level("WARNING", logger="certkeeper.network.runner"):
        report = renew(conf, dt.datetime.now(dt.UTC))
    assert report.exit_code == 0, report.outcomes
    assert proxy.cued and report.outcomes[0].detail.endswith("from direct")
    state = load_cert_state(conf.state_dir, NAME)
    assert state.authority == "direct" and state.authority_failures("acme") == 1
    assert "another key than the one in the CSR" in caplog.text
    cert = conf.certificates[0]
    from certkeeper.core import certs

    assert certs.key_matches_cert(cert.key.read_bytes(), cert.cert.read_bytes())


def _foreign_certificate() -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------
# The order deadline holds against a server that drips its answer.


def test_order_timeout_holds_against_a_dripping_server_and_the_backoff_grows(proxy: FaultProxy,
                                                                            tmp_path: Path) -> None:
    conf = load(proxy, tmp_path, acme_extra="order_timeout = 1")
    proxy.cues.append(Cue("^/order-plz$", drip, times=2))
    now = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    report = renew(conf, now)
    took = time.monotonic() - started
    assert report.exit_code == 1
    assert "did not answer in time" in report.outcomes[0].detail
    assert took < 4, took  # the deadline (1 s) plus the listener's start, not the 60 s drip
    first = load_cert_state(conf.state_dir, NAME)
    assert first.retry_not_before == now + dt.timedelta(minutes=1)
    later = now + dt.timedelta(minutes=2)
    assert renew(conf, later).exit_code == 1
    second = load_cert_state(conf.state_dir, NAME)
    assert second.consecutive_failures == 2
    assert second.retry_not_before == later + dt.timedelta(minutes=10)  # the backoff grew


# ---------------------------------------------------------------------------
# ARI (RFC 9773): the CertID, and renewal times spread over the window.


def test_ari_cert_id_known_answer_from_rfc_9773_section_4_1() -> None:
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")  # the example's keyIdentifier
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0x87654321).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert ari_cert_id(pem) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_ari_renewal_times_are_spread_over_the_window() -> None:
    start = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=2)
    times = [renewal.point_in_window(start, end, serial) for serial in range(10**12, 10**12 + 2000)]
    assert all(start <= t <= end for t in times)
    quarters = [0, 0, 0, 0]
    for t in times:
        quarters[min(int((t - start) / (end - start) * 4), 3)] += 1
    assert all(400 <= q <= 600 for q in quarters), quarters  # about 500 each: not bunched at the start
    # Stable per certificate (restarts do not move it).
    assert renewal.point_in_window(start, end, 12345) == renewal.point_in_window(start, end, 12345)
