"""The daemon's listeners: handlers through aiohttp's test server, then the real
listeners on loopback with TLS (SNI, certificate swap, malformed and slow clients)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest
import trustme
from aiohttp import ClientSession, TCPConnector
from aiohttp.test_utils import RawTestServer, TestClient

from certkeeper.core import certs
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config, parse
from certkeeper.listener.web import Handlers, Limits, Site, WebServer
from tests.fixtures.peers import free_port

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmax_age: 604800\r\n"


def make_config(tmp_path: Path, http_port: int = 0, https_port: int = 0, mode: str = "enforce") -> Config:
    certs_toml = ""
    for name in ("mail.example.com", "mta-sts.example.com"):
        certs_toml += f"""
[[certificate]]
name = "{name}"
domains = ["{name}"]
key = "{tmp_path}/{name}.key"
cert = "{tmp_path}/{name}.crt"
chain = "{tmp_path}/{name}.chain.pem"
fullchain = "{tmp_path}/{name}.fullchain.pem"
"""
    return parse(f"""
state_dir = "{tmp_path}/state"
[http]
listen = ["127.0.0.1:{http_port or 1}"]
tls_listen = ["127.0.0.1:{https_port or 1}"]
{certs_toml}
[[mta_sts]]
domain = "example.com"
mode = "{mode}"
mx = ["mail.example.com"]
max_age = 604800
certificate = "mta-sts.example.com"
""", tmp_path / "certkeeper.toml")


def issue(ca: trustme.CA, config: Config, name: str) -> str:
    """Write a certificate for ``name`` from ``ca`` where the config says; return its serial."""
    cert_cfg = config.certificate(name)
    leaf = ca.issue_cert(name)
    cert_cfg.key.write_bytes(leaf.private_key_pem.bytes())
    cert_cfg.fullchain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return certs.parse_cert(leaf.cert_chain_pems[0].bytes()).serial


# ---------------------------------------------------------------------------
# Handlers, through aiohttp's test server (plain HTTP).


@pytest.fixture
async def handlers(tmp_path):
    table = ChallengeTable()
    table.add("tok_EN-1", "tok_EN-1.thumbprint")
    return Handlers(Site.from_config(make_config(tmp_path)), table)


@pytest.fixture
async def http_client(handlers):
    client = TestClient(RawTestServer(handlers.http))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def https_client(handlers):
    client = TestClient(RawTestServer(handlers.https))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_challenge_is_answered_from_the_table(http_client):
    resp = await http_client.get("/.well-known/acme-challenge/tok_EN-1", headers={"Host": "mail.example.com"})
    assert resp.status == 200
    assert await resp.text() == "tok_EN-1.thumbprint"
    assert resp.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize("path", [
    "/.well-known/acme-challenge/unknown",
    "/.well-known/acme-challenge/",
    "/.well-known/acme-challenge/tok_EN-1/",
    "/.well-known/acme-challenge/%2e%2e%2fetc%2fpasswd",
])
async def test_unknown_challenge_is_404_not_a_redirect(http_client, path):
    resp = await http_client.get(path, headers={"Host": "mail.example.com"}, allow_redirects=False)
    assert resp.status == 404


async def test_challenge_only_for_get(http_client):
    resp = await http_client.post("/.well-known/acme-challenge/tok_EN-1", headers={"Host": "mail.example.com"})
    assert resp.status == 404


class RecordingTable(ChallengeTable):
    """The real table, noting each token the listener looks up."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups: list[str] = []

    def get(self, token: str) -> str | None:
        self.lookups.append(token)
        return super().get(token)


@pytest.mark.parametrize("token", [
    "%2e%2e%2fetc%2fpasswd", "tok_EN-1%2f..", "a.b", "a/b", "tok EN", "tok_EN-1=", "x" * 257, "",
])
async def test_a_token_that_is_not_base64url_is_never_looked_up(tmp_path, token):
    """RFC 8555 8.3: a token is 1*256 base64url characters; the listener refuses anything else before it
    touches the table (the table must never be asked about a path)."""
    table = RecordingTable()
    table.add("tok_EN-1", "tok_EN-1.thumbprint")
    client = TestClient(RawTestServer(Handlers(Site.from_config(make_config(tmp_path)), table).http))
    await client.start_server()
    try:
        resp = await client.get(f"/.well-known/acme-challenge/{token}", headers={"Host": "mail.example.com"},
                                allow_redirects=False)
        assert resp.status == 404 and "Location" not in resp.headers
        assert table.lookups == []
        longest = "y" * 256  # the longest token there can be is looked up (and unknown: 404)
        resp = await client.get(f"/.well-known/acme-challenge/{longest}", headers={"Host": "mail.example.com"})
        assert resp.status == 404 and table.lookups == [longest]
    finally:
        await client.close()


@pytest.mark.parametrize(("host", "name"), [
    ("mail.example.com", "mail.example.com"), ("MAIL.Example.COM:8080", "mail.example.com"),
    ("mail.example.com.", "mail.example.com"), ("mail..example.com", None), ("mail.example.com..", None),
    (".mail.example.com", None), ("a" * 254, None), ("", None),
    ("mail.example.com:80:80", None), ("mail.example.com\\", None),
])
def test_request_host_refuses_empty_labels_and_malformed_names(host, name):
    """The Host check itself (the handlers answer 404 for unknown names anyway, so only this can show it)."""
    from aiohttp.test_utils import make_mocked_request

    from certkeeper.listener.web import request_host

    assert request_host(make_mocked_request("GET", "/", headers={"Host": host})) == name


@pytest.mark.parametrize("host, path, location", [
    ("mta-sts.example.com", "/", "https://mta-sts.example.com/"),
    ("MTA-STS.example.com:8080", "/a/b?c=d&e=%20f", "https://mta-sts.example.com/a/b?c=d&e=%20f"),
    ("mta-sts.example.com.", "/.well-known/mta-sts.txt", "https://mta-sts.example.com/.well-known/mta-sts.txt"),
])
async def test_configured_host_is_redirected_to_https(http_client, host, path, location):
    resp = await http_client.get(path, headers={"Host": host}, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == location


@pytest.mark.parametrize("host", [
    "mail.example.com",  # a certificate of the mail server: the listener does not serve it, so no redirect
    "evil.example.net", "example.com", "127.0.0.1", "[::1]:80", "mail.example.com/evil", "a b",
    "user@mail.example.com", "mail..example.com", "mail.example.com:", "",
])
async def test_other_hosts_get_404_never_a_redirect(http_client, host):
    resp = await http_client.get("/x", headers={"Host": host}, allow_redirects=False)
    assert resp.status == 404
    assert "Location" not in resp.headers


@pytest.mark.parametrize("host", ["mta-sts.example.com", "MTA-STS.Example.com:443", "mta-sts.example.com."])
async def test_mta_sts_policy_is_served(https_client, host):
    resp = await https_client.get("/.well-known/mta-sts.txt", headers={"Host": host}, allow_redirects=False)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain"
    assert await resp.read() == POLICY.encode()
    head = await https_client.head("/.well-known/mta-sts.txt", headers={"Host": host})
    assert head.status == 200 and head.headers["Content-Length"] == str(len(POLICY))


@pytest.mark.parametrize("method, host, path", [
    ("GET", "mail.example.com", "/.well-known/mta-sts.txt"),  # not an mta-sts host
    ("GET", "mta-sts.example.org", "/.well-known/mta-sts.txt"),
    ("GET", "mta-sts.example.com", "/"),
    ("GET", "mta-sts.example.com", "/.well-known/mta-sts.txt/"),
    ("POST", "mta-sts.example.com", "/.well-known/mta-sts.txt"),
])
async def test_https_other_requests_are_404(https_client, method, host, path):
    resp = await https_client.request(method, path, headers={"Host": host}, allow_redirects=False)
    assert resp.status == 404


# ---------------------------------------------------------------------------
# The real listeners on loopback, with TLS.


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
async def server(tmp_path, ca):
    config = make_config(tmp_path, free_port(), free_port())
    for name in config.certificate_names():
        issue(ca, config, name)
    server = WebServer(config, ChallengeTable(), Limits(request_timeout=1.0, handshake_timeout=1.0))
    await server.start()
    server.config = config
    try:
        yield server
    finally:
        await server.stop()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def port_of(server: WebServer, scheme: str) -> int:
    return next(port for s, port in server.bound if s == scheme)


async def handshake_serial(port: int, context: ssl.SSLContext, server_name: str | None) -> str:
    """Connect, shake hands with ``server_name`` as SNI, and return the served certificate's serial."""
    if server_name is None:
        context.check_hostname = False
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname=server_name or "")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return certs.parse_der(der).serial
    finally:
        writer.close()


async def test_sni_picks_the_certificate_of_the_name(server, ca):
    port = port_of(server, "https")
    for name in ("mail.example.com", "mta-sts.example.com"):
        want = certs.parse_cert(server.config.certificate(name).fullchain.read_bytes()).serial
        assert await handshake_serial(port, client_context(ca), name) == want


async def test_no_sni_gets_the_first_certificate(server, ca):
    want = certs.parse_cert(server.config.certificate("mail.example.com").fullchain.read_bytes()).serial
    assert await handshake_serial(port_of(server, "https"), client_context(ca), None) == want


async def test_unknown_sni_fails_the_handshake(server, ca):
    context = client_context(ca)
    context.check_hostname = False
    # The server sends unrecognized_name and aborts; the client may see the alert or only the reset.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await handshake_serial(port_of(server, "https"), context, "other.example.org")


class FakeSSLObject:
    context = None


async def test_ip_address_as_sni_is_treated_as_no_sni(server):
    # RFC 6066 3 forbids IP literals in SNI; tools such as wrk send them anyway.
    sslobj = FakeSSLObject()
    assert server.tls._choose(sslobj, "127.0.0.1", server.tls.front) is None
    assert sslobj.context is server.tls._snapshot.default is not None


async def test_policy_over_https_with_sni(server, ca):
    port = port_of(server, "https")
    connector = TCPConnector(ssl=client_context(ca), resolver=LoopbackResolver())
    async with ClientSession(connector=connector) as session:
        async with session.get(f"https://mta-sts.example.com:{port}/.well-known/mta-sts.txt") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain"
            assert await resp.read() == POLICY.encode()


async def keepalive_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str) -> bytes:
    """One request on an open connection; returns the body (Content-Length framed)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    assert head.startswith(b"HTTP/1.1 200 "), head
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return await asyncio.wait_for(reader.readexactly(length), 5.0)


async def test_renewed_certificate_goes_to_the_next_handshake_and_open_connections_stay(server, ca):
    port = port_of(server, "https")
    name = "mta-sts.example.com"
    old_serial = certs.parse_cert(server.config.certificate(name).fullchain.read_bytes()).serial
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca), server_hostname=name)
    try:
        served = certs.parse_der(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)).serial
        assert served == old_serial
        assert await keepalive_get(reader, writer, name, "/.well-known/mta-sts.txt") == POLICY.encode()
        new_serial = issue(ca, server.config, name)
        await asyncio.to_thread(server.on_installed, server.config.certificate(name))
        # The open connection (old certificate) still answers; the next handshake gets the new one.
        assert await keepalive_get(reader, writer, name, "/.well-known/mta-sts.txt") == POLICY.encode()
    finally:
        writer.close()
    assert new_serial != old_serial
    assert await handshake_serial(port, client_context(ca), name) == new_serial


async def test_reload_keeps_serving_a_certificate_whose_files_are_unreadable_now(server, ca):
    name = "mta-sts.example.com"
    serial = certs.parse_cert(server.config.certificate(name).fullchain.read_bytes()).serial
    server.config.certificate(name).key.write_bytes(b"half-written\n")
    problems = await asyncio.to_thread(server.tls.load_all, server.config.certificates)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: cannot load")
    assert problems[0].endswith("still serving the certificate loaded before")
    assert await handshake_serial(port_of(server, "https"), client_context(ca), name) == serial


async def test_reload_serves_the_new_policy(server, ca, tmp_path):
    http_port, https_port = port_of(server, "http"), port_of(server, "https")
    config = make_config(tmp_path, http_port, https_port, mode="testing")
    server.reload(config)
    connector = TCPConnector(ssl=client_context(ca), resolver=LoopbackResolver())
    async with ClientSession(connector=connector) as session:
        async with session.get(f"https://mta-sts.example.com:{https_port}/.well-known/mta-sts.txt") as resp:
            assert await resp.text() == POLICY.replace("enforce", "testing")


# ---------------------------------------------------------------------------
# Malformed and slow clients.


class LoopbackResolver:
    """aiohttp resolver that sends every name to 127.0.0.1 (SNI and Host keep the name)."""

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        return None


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


async def get_redirect(port: int) -> bytes:
    return await raw_request(port, b"GET /ok HTTP/1.1\r\nHost: mta-sts.example.com\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: mta-sts.example.com\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: mta-sts.example.com\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: mta-sts.example.com\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", b"400"),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: mta-sts.example.com\r\nConnection: close\r\n\r\n", b"302"),
    (b"GET /x HTTP/1.0\r\n\r\n", b"404"),  # no Host at all
    (b"GET /x HTTP/1.1\r\nHost: mta-sts.example.com\r\nHost: evil.example.net\r\n\r\n", b"400"),
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
])
async def test_malformed_requests_are_refused_and_others_still_served(server, request_bytes, status):
    port = port_of(server, "http")
    answer = await raw_request(port, request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert b"root:" not in answer
    if status == b"302":
        assert b"\r\nLocation: https://mta-sts.example.com/" in answer
    assert b"302 Found" in await get_redirect(port)


async def test_slow_client_does_not_hold_up_others_and_is_closed(server):
    port = port_of(server, "http")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: mail.exa")  # and then nothing more
        await writer.drain()
        assert b"302 Found" in await get_redirect(port)
        # Limits.request_timeout (1 s here) closes the trickling connection; 5 s bounds the wait.
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
    finally:
        writer.close()


async def test_slow_tls_handshake_does_not_hold_up_others(server, ca):
    port = port_of(server, "https")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # TCP only, no ClientHello
    try:
        assert await handshake_serial(port, client_context(ca), "mail.example.com")
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # handshake_timeout closes it
    finally:
        writer.close()


def test_a_withdrawn_domain_keeps_serving_mode_none_until_its_record_is_gone(tmp_path):
    """RFC 8461 8.3: after [[mta_sts]] is removed, the history decides what is still served."""
    from datetime import UTC, datetime

    from certkeeper.core.mtasts import Policy
    from certkeeper.core.mtasts_state import DomainState, save_state

    configured = make_config(tmp_path)
    published = DomainState("example.com").with_published(Policy.from_config(configured.mta_sts[0]),
                                                          datetime(2026, 1, 1, tzinfo=UTC))
    save_state(configured, published)
    withdrawn = Config(path=configured.path, state_dir=configured.state_dir, http=configured.http,
                       certificates=configured.certificates)  # the same, without [[mta_sts]]
    site = Site.from_config(withdrawn)
    assert site.policies["mta-sts.example.com"].startswith(b"version: STSv1\r\nmode: none\r\n")
    # Once the record is removed (the history says so), nothing is served any more.
    from dataclasses import replace

    save_state(configured, replace(published, removed_at=datetime(2026, 2, 1, tzinfo=UTC)))
    assert Site.from_config(withdrawn).policies == {}
