"""ARI (RFC 9773) and ACME profiles, which Debian's Pebble 2.4 lacks.

A small HTTPS proxy of the test suite's own sits in front of the real Pebble:
it forwards every ACME request unchanged (the Host header is kept, so Pebble's
URLs and JWS ``url`` checks name the proxy), adds ``renewalInfo`` and
``meta.profiles`` to the directory, answers renewalInfo GETs with a window the
test sets, and records the payload of every newOrder.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from certkeeper.core import config
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.state import load_cert_state
from certkeeper.network.issuer import ari_cert_id
from certkeeper.network.runner import Renewer
from tests.fixtures.http01 import serving
from tests.fixtures.pebble import Pebble
from tests.fixtures.peers import free_port

PROFILES = {"classic": "90 days", "shortlived": "6 days"}


@dataclass
class AcmeProxy:
    pebble: Pebble
    port: int = field(default_factory=free_port)
    window: tuple[dt.datetime, dt.datetime] | None = None
    retry_after: int = 3600
    orders: list[dict[str, object]] = field(default_factory=list)
    ari_requests: list[str] = field(default_factory=list)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/ari/"):
            self.ari_requests.append(request.path[len("/ari/"):])
            if self.window is None:
                return web.Response(status=404)
            start, end = self.window
            body = {"suggestedWindow": {"start": start.isoformat().replace("+00:00", "Z"),
                                        "end": end.isoformat().replace("+00:00", "Z")}}
            return web.json_response(body, headers={"Retry-After": str(self.retry_after)})
        body = await request.read()
        if request.path == "/order-plz":
            payload = json.loads(body)["payload"]
            self.orders.append(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
        upstream = f"https://127.0.0.1:{self.pebble.directory.split(':')[2].split('/')[0]}{request.path_qs}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("host", "content-type")}
        async with self.session.request(request.method, upstream, data=body or None, headers=headers) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items()
                   if k.lower() in ("content-type", "replay-nonce", "location", "link", "retry-after")}
            if request.path == "/dir":
                directory = json.loads(data)
                directory["renewalInfo"] = f"https://127.0.0.1:{self.port}/ari"
                directory.setdefault("meta", {})["profiles"] = PROFILES
                data = json.dumps(directory).encode()
            return web.Response(status=resp.status, body=data, headers=out)

    @contextmanager
    def running(self) -> Iterator[AcmeProxy]:
        loop = asyncio.new_event_loop()
        tls = self.pebble.workdir / "tls"
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(tls / "cert.pem", tls / "key.pem")
        client_ctx = ssl.create_default_context(cafile=str(self.pebble.ca_file))
        ready = threading.Event()
        runner_box: list[web.AppRunner] = []

        async def start() -> None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx))
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=server_ctx).start()
            runner_box.append(runner)

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert ready.wait(10)
        try:
            yield self
        finally:
            async def stop() -> None:
                await runner_box[0].cleanup()
                await self.session.close()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


@pytest.fixture
def proxy(pebble: Pebble) -> Iterator[AcmeProxy]:
    with AcmeProxy(pebble).running() as running:
        yield running


def renewer_at(conf: config.Config, when: dt.datetime) -> tuple[Renewer, ChallengeTable]:
    challenges = ChallengeTable()
    return Renewer(conf, challenges, clock=lambda: when), challenges


def load(proxy: AcmeProxy, tmp_path: Path, extra: str = "") -> config.Config:
    text = proxy.pebble.config_text(tmp_path, ["mail.example.com"], directory=proxy.directory)
    (tmp_path / "certkeeper.toml").write_text(text.replace("[http]", extra + "\n[http]"))
    return config.load(tmp_path / "certkeeper.toml")


def renew(conf: config.Config, when: dt.datetime, force: bool = False) -> str:
    renewer, challenges = renewer_at(conf, when)
    report = renewer.renew(None, force=force, serve_challenges=lambda: serving(conf, challenges))
    assert report.exit_code in (0, 2), report.outcomes
    return report.outcomes[0].status


def test_ari_window_in_the_past_renews_with_replaces(proxy: AcmeProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    now = dt.datetime.now(dt.UTC)
    assert renew(conf, now) == "renewed"
    assert "replaces" not in proxy.orders[0]
    old_cert = conf.certificates[0].cert.read_bytes()
    # Hours later the CA says: renew now (e.g. it will revoke). The window lies in the past.
    proxy.window = (now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    assert renew(conf, now + dt.timedelta(hours=7)) == "renewed"
    assert proxy.ari_requests[-1] == ari_cert_id(old_cert)
    assert proxy.orders[-1]["replaces"] == ari_cert_id(old_cert)  # RFC 9773 5


def test_ari_window_in_the_future_sets_the_next_renewal(proxy: AcmeProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path)
    now = dt.datetime.now(dt.UTC)
    assert renew(conf, now) == "renewed"
    start, end = now + dt.timedelta(days=20), now + dt.timedelta(days=21)
    proxy.window = (start, end)
    proxy.retry_after = 7200
    later = now + dt.timedelta(hours=7)
    renewer, _ = renewer_at(conf, later)
    decision = renewer.decide(conf.certificates[0])
    assert not decision.due
    assert start <= decision.when <= end  # inside the window, not at two thirds of the lifetime
    assert "ARI" in decision.reason
    state = load_cert_state(conf.state_dir, "mail.example.com")
    assert state.ari_next_check is not None
    # Retry-After of 2 h is honoured (RFC 9773 4.3: clamped to 1 min..1 day).
    assert dt.timedelta(hours=1.9) < state.ari_next_check - later <= dt.timedelta(hours=2)
    # Until then the server is not asked again.
    asked = len(proxy.ari_requests)
    renewer.decide(conf.certificates[0])
    assert len(proxy.ari_requests) == asked


def test_profile_is_sent_in_the_order(proxy: AcmeProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path, extra='profile = "shortlived"')
    assert renew(conf, dt.datetime.now(dt.UTC)) == "renewed"
    assert proxy.orders[-1]["profile"] == "shortlived"


def test_unknown_profile_is_a_one_line_error(proxy: AcmeProxy, tmp_path: Path) -> None:
    conf = load(proxy, tmp_path, extra='profile = "tlsclient"')
    renewer, challenges = renewer_at(conf, dt.datetime.now(dt.UTC))
    report = renewer.renew(None, serve_challenges=lambda: serving(conf, challenges))
    assert report.exit_code == 1
    assert report.outcomes[0].detail == ("the ACME server offers no profile 'tlsclient' "
                                         "(it has classic, shortlived)")
    assert not proxy.orders
    assert not conf.certificates[0].key.exists()
