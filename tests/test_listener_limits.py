"""Issue 12, bounded listeners: connection caps in total, per address and for TLS handshakes (the
longest idle connection is closed first), one short rate-limited line per malformed request, and the
descriptor limit lifted at start. Real listeners on loopback, many source addresses (127.0.0.2 and up)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest
import trustme

from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import parse
from certkeeper.listener import web
from certkeeper.listener.web import ConnectionPool, Limits, WebServer, address_key, connection_budget
from tests.fixtures.peers import free_port
from tests.fixtures.site import MTA_STS, POLICY
from tests.test_web import client_context, get_redirect, handshake_serial, issue, make_config, port_of


@pytest.fixture
def ca():
    return trustme.CA()


async def start_server(tmp_path, ca, **limits) -> WebServer:
    config = make_config(tmp_path, free_port(), free_port())
    for name in config.certificate_names():
        issue(ca, config, name)
    server = WebServer(config, ChallengeTable(), Limits(request_timeout=30.0, handshake_timeout=30.0, **limits))
    await server.start()
    return server


async def connect_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


async def still_open(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.2)
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    return False


async def settle(server: WebServer, count: int) -> None:
    """Wait (bounded) until the server has accepted ``count`` connections in all."""
    for _ in range(200):
        if len(server.pool) + server.pool.evicted >= count:
            return
        await asyncio.sleep(0.01)


async def test_per_address_cap_closes_that_address_longest_idle_first(tmp_path, ca):
    server = await start_server(tmp_path, ca, max_connections_per_address=4)
    port = port_of(server, "http")
    clients = []
    try:
        for _ in range(6):
            clients.append(await connect_from("127.0.0.2", port))
            await settle(server, len(clients))
        # The two oldest of 127.0.0.2 made room for its fifth and sixth; its four newest stay.
        assert [await closed_by_server(r) for r, _ in clients[:2]] == [True, True]
        assert [await still_open(r) for r, _ in clients[2:]] == [True] * 4
        assert len(server.pool.by_key["127.0.0.2"]) == 4
        # Another address is not affected: its request is answered.
        assert b"302 Found" in await get_redirect(port)
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()


async def test_total_cap_over_many_addresses_keeps_answering_a_new_client(tmp_path, ca):
    # 5 addresses x 6 idle connections = 30 > the total cap of 16, each address under its own cap of 8:
    # only the total cap holds, and a client from 127.0.0.1 still gets its answer, repeatedly.
    server = await start_server(tmp_path, ca, max_connections=16, max_connections_per_address=8)
    port = port_of(server, "http")
    clients = []
    try:
        for round_ in range(6):
            for host in range(2, 7):
                clients.append(await connect_from(f"127.0.0.{host}", port))
            await settle(server, len(clients))
            assert b"302 Found" in await get_redirect(port), round_
        assert len(server.pool) <= 16
        open_now = [await still_open(r) for r, _ in clients]
        assert sum(open_now) <= 16 and open_now[-10:] == [True] * 10  # the newest stay, the oldest went
        assert not any(open_now[:10])
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()


async def test_half_open_tls_connections_are_capped_and_a_handshake_still_succeeds(tmp_path, ca):
    server = await start_server(tmp_path, ca, max_handshakes=5)
    port = port_of(server, "https")
    clients = []
    try:
        for i in range(12):  # TCP only, never a ClientHello
            clients.append(await connect_from(f"127.0.0.{2 + i % 4}", port))
        await settle(server, 12)
        assert len(server.pool.shaking) <= 5
        assert [await closed_by_server(r) for r, _ in clients[:7]] == [True] * 7
        serial = await handshake_serial(port, client_context(ca), "mta-sts.example.com")
        assert serial
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()
    assert len(server.pool) == 0 and not server.pool.shaking


async def test_stop_closes_every_connection_and_handshake(tmp_path, ca):
    server = await start_server(tmp_path, ca)
    clients = [await connect_from("127.0.0.2", port_of(server, scheme)) for scheme in ("http", "https") * 3]
    await settle(server, 6)
    try:
        await asyncio.wait_for(server.stop(), 5)
        assert [await closed_by_server(r) for r, _ in clients] == [True] * 6
        assert len(server.pool) == 0
    finally:
        for _, writer in clients:
            writer.close()


async def test_malformed_requests_are_one_short_line_each_and_rate_limited(tmp_path, ca, caplog, monkeypatch):
    monkeypatch.setattr(web, "_request_errors", [])  # a fresh minute, not shared with earlier tests
    server = await start_server(tmp_path, ca)
    port = port_of(server, "http")
    caplog.set_level(logging.DEBUG, logger="certkeeper")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    try:
        for i in range(web.ERROR_LINES_PER_MINUTE + 15):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: mail.example.com\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
            assert b" 400 " in await asyncio.wait_for(reader.read(65536), 5), i
            writer.close()
        assert b"302 Found" in await get_redirect(port)
    finally:
        await server.stop()
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(lines) == web.ERROR_LINES_PER_MINUTE
    assert all(r.exc_info is None and "\n" not in r.getMessage() and len(r.getMessage()) <= 300 for r in lines)
    assert "127.0.0.1" in lines[0].getMessage() and "Got more than" in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


def test_address_key_groups_ipv6_by_64_and_keeps_ipv4():
    assert address_key("127.0.0.2") == "127.0.0.2"
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:127.0.0.3") == "127.0.0.3"
    assert address_key("::1") == "::/64"


def test_the_pool_evicts_least_recently_active_first():
    pool = ConnectionPool(total=3, per_address=2, handshakes=10)
    socks = [socket.socket() for _ in range(5)]
    try:
        a1, a2, b1, a3, c1 = (web.Connection(k, s) for k, s in zip("aabac", socks, strict=True))
        for conn in (a1, a2, b1):
            pool.admit(conn, tls=False)
        pool.touch(a1)  # a1 is now more recently active than a2
        pool.admit(a3, tls=False)  # a's cap of 2: a2 goes, not a1
        assert a2.closed and not a1.closed and set(pool.all) == {a1, b1, a3}
        pool.admit(c1, tls=False)  # total cap of 3: b1 is the longest idle overall
        assert b1.closed and set(pool.all) == {a1, a3, c1}
    finally:
        for sock in socks:
            sock.close()


def test_budget_follows_the_descriptor_limit():
    assert connection_budget(Limits(max_connections=512), 1024) == 512
    assert connection_budget(Limits(max_connections=5000), 1024) == 1024 - web.RESERVED_FDS
    config = parse('[http]\nmax_connections = 100\nmax_connections_per_address = 3\nmax_handshakes = 7\n')
    assert Limits.from_config(config.http).max_connections_per_address == 3
    assert (config.http.max_connections, config.http.max_handshakes) == (100, 7)


@pytest.mark.parametrize("line", ["max_connections = 0", "max_connections_per_address = -1",
                                  "max_handshakes = \"many\""])
def test_bad_caps_are_one_line_each(line):
    from certkeeper.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse(f"[http]\n{line}\n", "ck.toml")
    assert len(info.value.lines) == 1 and info.value.lines[0].startswith(f"ck.toml: http.{line.split()[0]}: ")


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    code = ("import resource; from certkeeper.listener.web import raise_nofile_limit; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); "
            "print(raise_nofile_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    raised, now_soft, now_hard = (int(x) for x in out.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert raised == now_soft == expected and now_hard == hard


# ---------------------------------------------------------------------------
# The daemon under a descriptor limit of 1024, flooded with idle connections from many addresses.

NOFILE_1024 = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
               "os.execv(sys.executable, [sys.executable, '-m', 'certkeeper', *sys.argv[1:]])")


def test_daemon_keeps_serving_under_an_idle_flood_with_nofile_1024(pebble, tmp_path):
    from tests.fixtures.bind import new_bind

    bind = new_bind(tmp_path / "bind", zone="example.com")
    try:
        flood_the_daemon(pebble, bind, tmp_path)
    finally:
        bind.stop()


def flood_the_daemon(pebble, bind, tmp_path) -> None:
    import ssl
    import time
    from pathlib import Path

    from tests.fixtures.load import IdleFlood, Probe, open_fds, sources
    from tests.fixtures.peers import Process, wait_for_port

    https_port = free_port()
    roots = tmp_path / "roots.pem"
    roots.write_bytes(b"".join(pebble.issuer_roots()))
    dns = bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{https_port}", mta_sts_fetch_ca=str(roots))
    text = pebble.config_text(tmp_path, ("mail.example.com", "mta-sts.example.com"),
                              http_listen=[f"127.0.0.1:{pebble.http01_port}"],
                              tls_listen=[f"127.0.0.1:{https_port}"], extra=MTA_STS + dns)
    config_path = tmp_path / "certkeeper.toml"
    config_path.write_text(text)
    root = Path(__file__).parent.parent
    proc = Process("certkeeper", [sys.executable, "-c", NOFILE_1024, "-c", str(config_path), "run", "-d"],
                   tmp_path / "daemon.log", cwd=root)
    flood = None
    try:
        wait_for_port(https_port, proc=proc)
        deadline = time.monotonic() + 60
        while "mta-sts.example.com: serving the new certificate" not in proc.output():
            assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
        context = ssl.create_default_context(cadata="".join(r.decode() for r in pebble.issuer_roots()))
        # 600 idle connections to port 80 from 20 addresses (30 each: under the per-address cap of 32;
        # 600 over the total of 512), and 40 more from one address (over its cap).
        flood = IdleFlood(pebble.http01_port, 600, sources(20)).start()
        greedy = IdleFlood(pebble.http01_port, 40, ["127.0.0.99"]).start()
        flood.wait_for_live(450, timeout=30)
        probe = Probe(https_port, context, POLICY, interval=0.25).start()
        time.sleep(6)
        status = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config_path), "status"],
                                capture_output=True, text=True, timeout=60, cwd=root)
        mark = len(proc.output())
        os.kill(proc.popen.pid, signal.SIGHUP)  # re-reading the config needs descriptors too
        deadline = time.monotonic() + 20
        while "configuration reloaded" not in proc.output()[mark:]:
            assert time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
        result = probe.stop()
        fds = open_fds(proc.popen.pid)
        stats, greedy_stats = flood.stop(), greedy.stop()
        flood = None
        assert status.returncode == 0 and "mta-sts.example.com" in status.stdout, status.stderr
        assert result.attempts >= 15 and result.rate >= 0.98, result.errors[:5]
        assert stats.peak > 450 and stats.closed_by_server > 0  # the total cap made room by closing idle ones
        assert greedy_stats.closed_by_server >= 8  # over its address's cap: its idlest were closed
        assert fds < 1024 - 64, fds
        assert proc.popen.poll() is None
        log = proc.output()
        assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]
    finally:
        if flood is not None:
            flood.stop()
        proc.stop()


async def test_reload_applies_new_caps_to_the_next_connections(tmp_path, ca):
    server = await start_server(tmp_path, ca)
    try:
        lower = parse(f'state_dir = "{tmp_path}/state"\n[http]\nmax_connections = 5\n'
                      "max_connections_per_address = 2\nmax_handshakes = 3\n", tmp_path / "ck.toml")
        server.reload(lower)
        assert (server.pool.total, server.pool.per_address, server.pool.handshakes) == (5, 2, 3)
        port = port_of(server, "http")
        clients = [await connect_from("127.0.0.2", port) for _ in range(3)]
        await settle(server, 3)
        assert await closed_by_server(clients[0][0]) and len(server.pool.by_key["127.0.0.2"]) == 2
        for _, writer in clients:
            writer.close()
    finally:
        await server.stop()
