"""[fleet]: several MX hosts coordinated through a real three-member etcd cluster (tests/fixtures/etcd.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aetcd
import pytest

from certkeeper.core.config import Config, load
from certkeeper.keeper.service import LocalKeeper
from certkeeper.network import fleet, rotation
from certkeeper.network.rotation import DomainState, DueReport
from tests.fixtures.etcd import EtcdCluster, etcd_cluster  # noqa: F401 - the fixture
from tests.test_rotation import dkim_toml, sign, signer_keys, verifies

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
ALGORITHMS = '["ed25519"]'


def test_three_member_cluster_answers_put_and_get_on_every_member(etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    async def check() -> list[bytes]:
        values = []
        first, *others = etcd_cluster.client_ports.values()
        async with aetcd.Client(host="127.0.0.1", port=first, timeout=5) as client:
            await client.put(b"/test/hello", b"world")
        for port in others:  # written through one member, read through each of the others (linearizable)
            async with aetcd.Client(host="127.0.0.1", port=port, timeout=5) as client:
                got = await client.get(b"/test/hello")
                assert got is not None
                values.append(got.value)
                members = [m async for m in client.members()]
                assert len(members) == 3
        return values

    assert asyncio.run(check()) == [b"world", b"world"]


# -- three certkeeper hosts, one etcd cluster, one BIND -------------------------------------------


@dataclass
class Host:
    name: str
    dir: Path
    config: Config

    @property
    def signer(self) -> Path:
        return self.dir / "signer.conf"

    def signing(self) -> dict[str, Path]:
        return signer_keys(self.signer) if self.signer.exists() else {}

    def run(self, when: datetime) -> tuple[DueReport, list[str]]:
        lines: list[str] = []
        return fleet.run_due(self.config, when, lines.append, LocalKeeper(self.config)), lines

    def rotate_now(self, when: datetime, emergency: bool = False) -> list[str]:
        lines: list[str] = []
        fleet.rotate_now(self.config, self.config.dkim[0], when, emergency, lines.append, LocalKeeper(self.config))
        return lines


@pytest.fixture
def make_host(bind, etcd_cluster: EtcdCluster, tmp_path: Path):  # noqa: F811 - the fixture
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(base64.b64encode(os.urandom(48)) + b"\n")
    secret.chmod(0o600)
    prefix = f"/certkeeper-{tmp_path.name}"

    def make(name: str, extra: str = "") -> Host:
        home = tmp_path / name
        home.mkdir()
        text = (f'state_dir = "{home / "state"}"\n{dkim_toml(home, algorithms=ALGORITHMS)}\n'
                f'[fleet]\n{etcd_cluster.toml(prefix)}host = "{name}.example.test"\nsecret_file = "{secret}"\n'
                f'lease_ttl = 2\nlive_within = "1d"\n{extra}\n{bind.dns_toml()}')
        path = home / "certkeeper.toml"
        path.write_text(text)
        return Host(name, home, load(path))

    return make


def etcd_state(host: Host) -> DomainState:
    async def get() -> bytes:
        port = urlsplit(host.config.fleet.endpoints[0]).port
        async with aetcd.Client(host="127.0.0.1", port=port, timeout=5) as client:
            got = await client.get(f"{host.config.fleet.prefix}/dkim/example.test/state".encode())
            assert got is not None
            return bytes(got.value)

    return DomainState.from_json(json.loads(asyncio.run(get())))


def in_parallel(*calls: Callable[[], object]) -> list[object]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=120) for f in [pool.submit(c) for c in calls]]


def signs_and_verifies(bind, host: Host, selector: str) -> bool:
    signing = host.signing()
    return set(signing) == {selector} and verifies(bind, sign(signing[selector], selector))


def test_one_rotator_every_host_signs_with_the_same_key(bind, make_host) -> None:
    hosts = [make_host(f"mx{i}") for i in (1, 2, 3)]
    # The three hourly jobs at the same moment: one host creates the key, the others see it being made.
    rounds: list[tuple[DueReport, list[str]]] = in_parallel(*[lambda h=h: h.run(T0) for h in hosts])  # type: ignore
    assert all(report.errors == () for report, _ in rounds)
    creators = [h.name for h, (_, lines) in zip(hosts, rounds, strict=True) if any("new ed25519" in x for x in lines)]
    assert len(creators) == 1
    for _ in range(2):
        for h in hosts:
            assert h.run(T0)[0].errors == ()
    (a,) = etcd_state(hosts[0]).keys
    assert a.state == "active"
    assert bind.query(f"{a.selector}._domainkey.example.test", "TXT") == [a.record]
    for h in hosts:  # each host's own key file, its own signer file: dkimpy verifies through BIND
        assert signs_and_verifies(bind, h, a.selector), h.name
        assert fleet.read_status(h.config)["leader"]  # type: ignore[index]

    # rotate-dkim on every host at once is one rotation.
    later = T0 + 10 * DAY
    asked = in_parallel(*[lambda h=h: h.rotate_now(later) for h in hosts])
    news = [x for lines in asked for x in lines if "new ed25519 key" in x]  # type: ignore[attr-defined]
    assert len(news) == 1, asked
    keys = etcd_state(hosts[0]).keys
    assert len(keys) == 2
    b = next(k for k in keys if k.state == "pending")
    for h in hosts:
        h.run(later)  # every host takes the new key before it signs with it
    switch = later + 2 * DAY
    for _ in range(2):
        for h in hosts:
            assert h.run(switch)[0].errors == ()
    state = etcd_state(hosts[0])
    assert {k.selector: k.state for k in state.keys} == {a.selector: "retiring", b.selector: "active"}
    for h in hosts:
        assert signs_and_verifies(bind, h, b.selector), h.name
    # The old selector is revoked only once no host signs with it; then the record says "p=".
    revoke = switch + 8 * DAY
    for h in hosts:
        assert h.run(revoke)[0].errors == ()
    assert {k.selector: k.state for k in etcd_state(hosts[0]).keys}[a.selector] == "revoked"
    assert bind.query(f"{a.selector}._domainkey.example.test", "TXT") == ["v=DKIM1; p="]


def crash_run(host: Host, when: datetime, step: str) -> subprocess.CompletedProcess[str]:
    """The host's hourly DKIM job in a child process that SIGKILLs itself right after ``step``'s side effect."""
    code = ("import sys; from datetime import datetime; from certkeeper.core import config; "
            "from certkeeper.keeper.service import LocalKeeper; from certkeeper.network import fleet; "
            "c = config.load(sys.argv[1]); "
            "fleet.run_due(c, datetime.fromisoformat(sys.argv[2]), print, LocalKeeper(c))")
    env = {**os.environ, rotation.CRASH_ENV: f"dkim-{step}"}
    return subprocess.run([sys.executable, "-c", code, str(host.config.path), when.isoformat()], env=env,
                          capture_output=True, text=True, timeout=60)


def run_until_rotator(host: Host, when: datetime, timeout: float) -> list[str]:
    """Run the host's job until it is the rotator (the dead one's lease must expire first); its lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report, lines = host.run(when)
        assert report.errors == ()
        if fleet.read_status(host.config)["leader"] == host.config.fleet.host:  # type: ignore[index]
            return lines
        time.sleep(0.2)
    raise AssertionError(f"{host.name} did not become the rotator within {timeout} s")


@pytest.mark.parametrize("step", ["generate", "publish"])
def test_sigkill_of_the_rotator_mid_rotation_is_finished_by_another_host(bind, make_host, step) -> None:
    mx1, mx2 = make_host("mx1"), make_host("mx2")
    done = crash_run(mx1, T0, step)
    assert done.returncode == -9, done.stderr
    created = re.findall(r"new ed25519 key, selector (\S+)", done.stdout)
    assert len(created) == 1
    (interrupted,) = etcd_state(mx1).keys
    assert interrupted.selector == created[0] and interrupted.state == "pending"
    assert (interrupted.published is not None) == (step == "publish")

    lines = run_until_rotator(mx2, T0, timeout=mx1.config.fleet.lease_ttl + 15)
    assert not any("new ed25519 key" in x for x in lines), lines  # finished, not restarted
    if step == "publish":
        assert any("published by an earlier rotator; not sent again" in x for x in lines), lines
        assert not any(x.startswith("example.test: published ") for x in lines), lines
    (key,) = etcd_state(mx2).keys
    assert key.selector == interrupted.selector and key.visible is not None
    assert bind.query(f"{key.selector}._domainkey.example.test", "TXT") == [key.record]
    # mx1 reported in before it died: the key becomes active once mx1 is back and holds it too.
    assert key.state == "pending" and any("waits: mx1.example.test not yet holding" in x for x in lines), lines
    for host in (mx1, mx2, mx1):
        assert host.run(T0)[0].errors == ()
    (key,) = etcd_state(mx2).keys
    assert key.selector == interrupted.selector and key.state == "active"
    for host in (mx1, mx2):
        assert signs_and_verifies(bind, host, key.selector), host.name


def test_a_host_joining_later_gets_the_active_key_and_is_waited_for(bind, make_host) -> None:
    mx1, mx2 = make_host("mx1"), make_host("mx2")
    for _ in range(2):
        for host in (mx1, mx2):
            assert host.run(T0)[0].errors == ()
    (a,) = etcd_state(mx1).keys
    mx3 = make_host("mx3")
    lines = mx3.run(T0 + 20 * HOUR)[1]
    assert any(f"installed the fleet's key for selector {a.selector}" in x for x in lines), lines
    assert signs_and_verifies(bind, mx3, a.selector)
    # The next switch waits until the newcomer holds the new key too.
    later = T0 + 22 * HOUR  # every host seen within live_within (a day)
    mx1.rotate_now(later, emergency=True)
    (b,) = [k for k in etcd_state(mx1).keys if k.state == "pending"]
    assert b.visible is not None
    for host in (mx1, mx2):
        assert host.run(later)[0].errors == ()
    assert etcd_state(mx1).key(b.selector).state == "pending"  # mx3, seen 2 hours ago, has not got it yet
    status = fleet.read_status(mx1.config)
    assert status is not None and {h["host"] for h in status["hosts"]} == {"mx1.example.test", "mx2.example.test",
                                                                          "mx3.example.test"}
    assert mx3.run(later)[0].errors == ()
    assert mx1.run(later)[0].errors == () and etcd_state(mx1).key(b.selector).state == "active"
    for host in (mx2, mx3):
        assert host.run(later)[0].errors == ()
    for host in (mx1, mx2, mx3):
        assert signs_and_verifies(bind, host, b.selector), host.name


def test_etcd_down_every_host_keeps_signing_and_nothing_changes(bind, make_host, etcd_cluster) -> None:  # noqa: F811
    hosts = [make_host("mx1"), make_host("mx2")]
    for _ in range(2):
        for host in hosts:
            assert host.run(T0)[0].errors == ()
    (a,) = etcd_state(hosts[0]).keys
    before = {h.name: h.signer.read_bytes() for h in hosts}
    etcd_cluster.stop()
    try:
        for host in hosts:
            report, _ = host.run(T0 + 100 * DAY)  # a rotation would be due: none happens
            assert len(report.errors) == 1 and "etcd unreachable" in report.errors[0]
            assert report.next_due is not None
            assert host.signer.read_bytes() == before[host.name]
            assert signs_and_verifies(bind, host, a.selector)
    finally:
        etcd_cluster.start()
    assert {k.selector for k in etcd_state(hosts[0]).keys} == {a.selector}
