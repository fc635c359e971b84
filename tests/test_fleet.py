"""[fleet]: several MX hosts coordinated through a real three-member etcd cluster (tests/fixtures/etcd.py)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aetcd
import pytest
import trustme

from certkeeper import cli, protocol
from certkeeper.core.config import Config, FleetConfig, load, parse
from certkeeper.core.errors import ConfigError, LocalError
from certkeeper.keeper import status
from certkeeper.keeper.service import LocalKeeper, Refusal
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
    with fleet.Etcd(host.config.fleet) as etcd:  # any member that answers
        value, _ = etcd.get(etcd.key("dkim", "example.test", "state"))
    assert value is not None
    return DomainState.from_json(json.loads(value))


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
    seen = fleet.read_status(mx1.config)
    assert seen is not None and {h["host"] for h in seen["hosts"]} == {"mx1.example.test", "mx2.example.test",
                                                                      "mx3.example.test"}
    assert mx3.run(later)[0].errors == ()
    assert mx1.run(later)[0].errors == () and etcd_state(mx1).key(b.selector).state == "active"
    for host in (mx2, mx3):
        assert host.run(later)[0].errors == ()
    for host in (mx1, mx2, mx3):
        assert signs_and_verifies(bind, host, b.selector), host.name
    # certkeeper status (read by the keeper from the worker's last snapshot): hosts, heartbeats, rotator, keys.
    doc = status.collect(mx3.config, now=later + HOUR)
    fleet_doc = doc["fleet"]
    assert fleet_doc["leader"] == "mx3.example.test" and fleet_doc["host"] == "mx3.example.test"
    rows = {h["host"]: h for h in fleet_doc["hosts"]}
    assert sorted(rows) == ["mx1.example.test", "mx2.example.test", "mx3.example.test"]
    assert all(r["live"] and r["signing"] == {"example.test": [b.selector]} for r in rows.values())
    assert rows["mx3.example.test"]["last_heartbeat"] == later.isoformat().replace("+00:00", "Z")
    assert set(rows["mx1.example.test"]["keys"]["example.test"]) == {a.selector, b.selector}
    text = status.render_text(doc)
    assert "Fleet (etcd; as of" in text and "rotator mx3.example.test" in text
    assert f"mx3.example.test  {later:%Y-%m-%d %H:%M}  rotator  {b.selector}" in text, text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "fleet" not in status.collect(Config(path=Path("certkeeper.toml"), state_dir=mx3.dir / "state"))


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


def test_rotate_dkim_now_through_the_unprivileged_worker_on_two_hosts_at_once(bind, make_host) -> None:
    """The CLI forks the real roles: the network worker (unprivileged, Landlock) talks to etcd and carries
    only ciphertext; each host's keeper seals or opens the key."""
    mx1, mx2 = make_host("mx1"), make_host("mx2")
    now = datetime.now(UTC)
    for _ in range(2):
        for host in (mx1, mx2):  # the hourly job's DKIM part: both hosts have reported, a first key is active
            assert host.run(now)[0].errors == ()
    (a,) = etcd_state(mx1).keys
    outs = [io.StringIO(), io.StringIO()]
    codes = in_parallel(*[lambda h=h, o=o: cli.main(["rotate-dkim", "--now", "-c", str(h.config.path)], out=o)
                          for h, o in zip((mx1, mx2), outs, strict=True)])
    assert codes == [0, 0], [o.getvalue() for o in outs]
    text = "".join(o.getvalue() for o in outs)
    assert text.count("new ed25519 key") == 1 and "joined it" in text, text
    now = datetime.now(UTC)  # after the request: the new key became visible at the workers' "now"
    for _ in range(2):
        for host in (mx1, mx2):
            assert host.run(now)[0].errors == ()
    keys = {k.selector: k.state for k in etcd_state(mx1).keys}
    (b,) = [s for s, state in keys.items() if state == "active"]
    assert keys == {a.selector: "retiring", b: "active"}
    for host in (mx1, mx2):
        assert signs_and_verifies(bind, host, b), host.name
        assert not any("PRIVATE KEY" in v for v in etcd_values(host))  # only ciphertext in etcd


def etcd_values(host: Host) -> list[str]:
    with fleet.Etcd(host.config.fleet) as etcd:
        return [value.decode(errors="replace") for _, value in etcd.get_prefix(etcd.key())]


# -- configuration and the keeper's sealing (no etcd) ---------------------------------------------


FLEET_OK = ('[fleet]\nbackend = "etcd"\nendpoints = ["http://127.0.0.1:2379"]\n'
            'secret_file = "/etc/certkeeper/fleet.key"\n')


@pytest.mark.parametrize("toml, problem", [
    ('[fleet]\nbackend = "consul"', "fleet.backend: 'consul' is not one of etcd"),
    ('[fleet]\nendpoints = ["http://127.0.0.1:2379"]\nsecret_file = "/k"\nhost = "mx1.example.test"',
     'fleet.backend: is required ("etcd")'),
    ('[fleet]\nbackend = "etcd"\nsecret_file = "/k"\nhost = "mx1.example.test"', "fleet.endpoints: is required"),
    (FLEET_OK.replace("http://127.0.0.1", "http://192.0.2.1") + 'host = "mx1.example.test"',
     "fleet.endpoints[1]: 'http://192.0.2.1:2379' is plain http: use https://"),
    (FLEET_OK.replace(":2379", "") + 'host = "mx1.example.test"', "needs a port"),
    (FLEET_OK.replace("http://127.0.0.1:2379", "etcd.example:2379") + 'host = "mx1.example.test"',
     "is not an etcd client URL"),
    (FLEET_OK + 'host = "mx1.example.test"\ncert = "/c.pem"', "fleet.key: is required with cert"),
    (FLEET_OK + 'host = "mx1.example.test"\nca = "/ca.pem"', "use https:// URLs with ca/cert/key"),
    (FLEET_OK + 'host = "mx1.example.test"\nusername = "mx1"', "fleet.password_file: is required with username"),
    (FLEET_OK.replace('secret_file = "/etc/certkeeper/fleet.key"\n', "") + 'host = "mx1.example.test"',
     "fleet.secret_file: is required"),
    (FLEET_OK, "fleet.host: is required when there is no [[certificate]]"),
    (FLEET_OK + 'host = "mx 1"', "fleet.host: 'mx 1'"),
    (FLEET_OK + 'host = "mx1.example.test"\nprefix = "certkeeper"', "fleet.prefix: 'certkeeper' is not a key prefix"),
    (FLEET_OK + 'host = "mx1.example.test"\nlease_ttl = 1', "fleet.lease_ttl"),
    (FLEET_OK + 'host = "mx1.example.test"\nendpoint = "x"', "fleet"),
])
def test_fleet_config_errors_are_one_line_each(toml: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(toml, "/etc/certkeeper.toml")
    assert any(problem in line and line.startswith("/etc/certkeeper.toml: ") for line in error.value.lines), \
        error.value.lines


def test_fleet_config_defaults_and_host_from_the_first_certificate() -> None:
    assert not parse("").fleet.enabled  # without [fleet], nothing changes
    text = ('[[certificate]]\nname = "MX1.example.test"\ndomains = ["mx1.example.test"]\n'
            'cert = "/c.pem"\nkey = "/k.pem"\n' + FLEET_OK.replace('"http://127.0.0.1:2379"',
                                                                    '"https://10.0.0.1:2379", "https://[fd00::2]:2379"'))
    config = parse(text + 'ca = "/ca.pem"\ncert = "/c.pem"\nkey = "/k.pem"\nprefix = "/mail/"\n')
    assert config.fleet.enabled and config.fleet.host == "mx1.example.test" and config.fleet.prefix == "/mail"
    assert config.fleet.endpoints == ("https://10.0.0.1:2379", "https://[fd00::2]:2379")


@pytest.fixture
def sealing_keepers(tmp_path: Path) -> tuple[LocalKeeper, LocalKeeper, Path]:
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(base64.b64encode(os.urandom(48)))
    secret.chmod(0o600)

    def keeper(name: str) -> LocalKeeper:
        home = tmp_path / name
        home.mkdir()
        text = (f'state_dir = "{home / "state"}"\n{dkim_toml(home, algorithms=ALGORITHMS)}\n'
                f'{FLEET_OK.replace("/etc/certkeeper/fleet.key", str(secret))}host = "{name}.example.test"\n')
        return LocalKeeper(parse(text, home / "certkeeper.toml"))

    return keeper("mx1"), keeper("mx2"), secret


def test_a_sealed_key_opens_only_on_a_fleet_host_and_only_for_its_selector(sealing_keepers) -> None:
    mx1, mx2, secret = sealing_keepers
    record, _ = mx1.dkim_key("example.test", "s1", "ed25519", create=True)
    sealed = mx1.seal_dkim_key("example.test", "s1", "ed25519")
    assert sealed.startswith("v1:") and "PRIVATE" not in sealed
    key_file = mx1.dkim_key_path("example.test", "s1").read_bytes()
    assert key_file not in base64.b64decode(sealed[3:])
    assert mx2.install_dkim_key("example.test", "s1", "ed25519", sealed) == (record, True)
    installed = mx2.dkim_key_path("example.test", "s1")
    assert installed.stat().st_mode & 0o777 == 0o440
    assert mx2.install_dkim_key("example.test", "s1", "ed25519", sealed) == (record, False)  # already there
    with pytest.raises(LocalError, match="does not open with"):  # bound to its selector
        mx2.install_dkim_key("example.test", "s2", "ed25519", sealed)
    tampered = sealed[:-6] + ("AAAA==" if not sealed.endswith("AAAA==") else "BBBB==")
    with pytest.raises(LocalError, match="does not open with|not base64"):
        mx2.install_dkim_key("example.test", "s1", "ed25519", tampered)
    with pytest.raises(Refusal, match="is not in algorithms"):
        mx2.install_dkim_key("example.test", "s1", "rsa2048", sealed)
    with pytest.raises(Refusal, match="no \\[\\[dkim\\]\\] table"):
        mx2.install_dkim_key("example.org", "s1", "ed25519", sealed)
    with pytest.raises(Refusal, match="no key file for selector"):
        mx1.seal_dkim_key("example.test", "s9", "ed25519")
    secret.chmod(0o644)
    with pytest.raises(LocalError, match="mode 0644 lets others read it"):
        mx1.seal_dkim_key("example.test", "s1", "ed25519")
    secret.chmod(0o600)
    secret.write_bytes(b"short")
    with pytest.raises(LocalError, match="holds 5 bytes"):
        mx1.seal_dkim_key("example.test", "s1", "ed25519")
    plain = LocalKeeper(parse(dkim_toml(mx1.config.state_dir.parent, algorithms=ALGORITHMS)))  # no [fleet]
    with pytest.raises(Refusal, match="no \\[fleet\\] table"):
        plain.seal_dkim_key("example.test", "s1", "ed25519")


def test_seal_and_install_messages_round_trip_through_the_protocol() -> None:
    for message in (protocol.SealDkimKey("example.test", "s1", "ed25519"),
                    protocol.InstallDkimKey("example.test", "s1", "ed25519", "v1:AAAA"), protocol.SealedKey("v1:AAAA")):
        assert protocol.parse(protocol.render(message)[4:]) == message


def test_tls_to_etcd_with_a_client_certificate(tmp_path: Path) -> None:
    """[fleet] ca/cert/key: an etcd member that requires a client certificate of the fleet's CA."""
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("mx1.example.test")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key",
             "client_cert": tmp_path / "client.pem", "client_key": tmp_path / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    cluster = EtcdCluster(tmp_path / "etcd", members=("t1",), tls=files)
    try:
        cluster.start()
        text = (f'[fleet]\n{cluster.toml("/tls")}host = "mx1.example.test"\nsecret_file = "/unused"\n'
                f'ca = "{files["ca"]}"\ncert = "{files["client_cert"]}"\nkey = "{files["client_key"]}"\n')
        with fleet.Etcd(parse(text).fleet) as etcd:
            etcd.put(etcd.key("hello"), b"over TLS")
            assert etcd.get(etcd.key("hello"))[0] == b"over TLS"
            assert etcd.campaign("mx1.example.test") == "mx1.example.test"
        without = parse(text.replace(f'cert = "{files["client_cert"]}"\nkey = "{files["client_key"]}"\n', "")).fleet
        with pytest.raises(fleet.FleetError, match="etcd unreachable"):
            fleet.Etcd(without)  # the member refuses a client without a certificate
    finally:
        cluster.stop()


def test_a_host_that_rotated_alone_brings_its_active_key_into_the_fleet(bind, make_host) -> None:
    mx1, mx2 = make_host("mx1"), make_host("mx2")
    alone = dataclasses.replace(mx1.config, fleet=FleetConfig())  # the same host before it had [fleet]
    assert rotation.run_due(alone, T0, lambda _: None).errors == ()
    (a,) = rotation.load_state(alone, "example.test").keys
    assert a.state == "active" and signs_and_verifies(bind, mx1, a.selector)
    lines = mx1.run(T0 + HOUR)[1]
    assert any("are now the fleet's" in x for x in lines), lines
    assert mx2.run(T0 + HOUR)[0].errors == ()
    assert [(k.selector, k.state) for k in etcd_state(mx1).keys] == [(a.selector, "active")]
    for host in (mx1, mx2):
        assert signs_and_verifies(bind, host, a.selector), host.name


def mta_sts_host(make_host, name: str, mx: list[str]) -> Host:
    listed = ", ".join(f'"{m}"' for m in mx)
    return make_host(name, extra=f'[[certificate]]\nname = "mta-sts.example.test"\ndomains = ["mta-sts.example.test"]\n'
                                 f'cert = "/c.pem"\nkey = "/k.pem"\n[[mta_sts]]\ndomain = "example.test"\n'
                                 f'mode = "enforce"\nmx = [{listed}]\n[tlsrpt]\nrua = ["mailto:tlsrpt@example.test"]\n')


def test_an_mta_sts_id_is_published_only_for_a_policy_every_live_host_serves(make_host) -> None:
    """Half-way through a config roll-out the hosts serve different policies: neither id is published, and the
    TLSRPT record of that domain waits with it; once both serve the same policy, both may publish its id."""
    mx1 = mta_sts_host(make_host, "mx1", ["mx1.example.test", "mx2.example.test"])
    mx2 = mta_sts_host(make_host, "mx2", ["mx1.example.test", "mx2.example.test", "mx3.example.test"])
    assert fleet.agreed_policies(mx1.config, lambda _: None, T0) == ("example.test",)  # nobody else seen yet
    lines: list[str] = []
    assert fleet.agreed_policies(mx2.config, lines.append, T0) == ()
    (line,) = lines
    assert line.startswith("_mta-sts.example.test: not published: this host serves id=")
    assert "mx1.example.test serves id=" in line and "make [[mta_sts]] the same on every host" in line
    assert fleet.agreed_policies(mx1.config, lambda _: None, T0) == ()
    # mx2 gets the same [[mta_sts]] as mx1 (a new host name: its own state, same config).
    mx2b = mta_sts_host(make_host, "mx2b", ["mx1.example.test", "mx2.example.test"])
    mx2b = Host(mx2b.name, mx2b.dir, dataclasses.replace(mx2b.config, fleet=mx2.config.fleet))
    assert fleet.agreed_policies(mx2b.config, lambda _: None, T0) == ("example.test",)
    assert fleet.agreed_policies(mx1.config, lambda _: None, T0) == ("example.test",)
    # A host not seen within live_within does not hold anyone back.
    assert fleet.agreed_policies(mx2.config, lambda _: None, T0 + 2 * DAY) == ("example.test",)


def test_an_mta_sts_id_waits_until_its_mx_covers_every_live_hosts_mx_name(make_host) -> None:
    """A policy that leaves out a live host's MX name would make senders in enforce mode refuse that host."""
    mx1 = mta_sts_host(make_host, "mx1", ["mx1.example.test", "mx2.example.test"])
    mx3 = mta_sts_host(make_host, "mx3", ["mx1.example.test", "mx2.example.test"])  # mx3 forgot itself
    assert mx1.config.fleet.mx == ("mx1.example.test",)  # [fleet] mx: by default the host's name
    assert fleet.agreed_policies(mx1.config, lambda _: None, T0) == ("example.test",)
    lines: list[str] = []
    assert fleet.agreed_policies(mx3.config, lines.append, T0) == ()
    assert lines == ["_mta-sts.example.test: not published: its mx does not cover mx3.example.test "
                     "(mx3.example.test), an MX host of the fleet; list every host's MX name in [[mta_sts]] mx on "
                     "every host"]
    assert fleet.agreed_policies(mx1.config, lambda _: None, T0) == ()  # mx3 is live and not covered
    # One wildcard pattern covering every host, on both: published.
    wild = [Host(h.name, h.dir, dataclasses.replace(mta_sts_host(make_host, f"{h.name}w", ["*.example.test"]).config,
                                                    fleet=h.config.fleet)) for h in (mx1, mx3)]
    for h in wild:  # each writes its new id: the first still sees the other's old one
        fleet.agreed_policies(h.config, lambda _: None, T0)
    assert [fleet.agreed_policies(h.config, lambda _: None, T0) for h in wild] == [("example.test",)] * 2


# -- one MTA-STS policy: the union of the fleet's MX names -------------------------------------------


@dataclass
class PolicyHost:
    """A host whose listener code (``listener.process.Listener``, as the listener process runs it) serves the
    policy from its configuration and state files, and is rebuilt when the keeper is asked to."""
    host: Host
    listener: Any
    sockets: tuple[socket.socket, socket.socket]

    @property
    def config(self) -> Config:
        return self.host.config

    def served(self) -> str:
        return self.listener.web.handlers.site.policies["mta-sts.example.test"].decode()

    def rebuild(self) -> None:  # what the daemon's keeper does (daemon._rebuild_policies: Reconfigure)
        assert self.listener.answer(protocol.Reconfigure(self.config.path.read_text())) == protocol.Ok()

    def agree(self, when: datetime, lines: list[str] | None = None) -> tuple[str, ...]:
        """The publish job's fleet step, its keeper requests going over a socketpair to a served LocalKeeper."""
        from certkeeper.keeper.service import serve
        from certkeeper.network.keeper_client import PipeKeeper

        mine, theirs = socket.socketpair()
        keeper = LocalKeeper(self.config, on_policies=self.rebuild)
        server = threading.Thread(target=serve, args=(theirs, keeper, lambda _: None, lambda: when), daemon=True)
        server.start()
        try:
            agreed = fleet.agreed_policies(self.config, (lines if lines is not None else []).append, when,
                                           PipeKeeper(self.config, mine))
            protocol.send(mine, protocol.Exit(0, ""))
            server.join(10)
            assert not server.is_alive()
            return agreed
        finally:
            mine.close()
            theirs.close()

    def publish(self, domains: tuple[str, ...], when: datetime) -> list[Any]:
        from certkeeper.network import mtasts_publish

        return mtasts_publish.publish_all(self.config, lambda _: None, when, lambda c, d: self.served(),
                                          domains=domains, keeper=LocalKeeper(self.config))


@pytest.fixture
def policy_host(make_host):
    made: list[PolicyHost] = []

    def make(name: str, fleet_mx: list[str], mta_sts_mx: list[str] | None = None) -> PolicyHost:
        from certkeeper.listener.process import Listener

        quoted = ", ".join(f'"{m}"' for m in fleet_mx)
        table = '[[mta_sts]]\ndomain = "example.test"\nmode = "enforce"\n'
        if mta_sts_mx is not None:
            table += "mx = [" + ", ".join(f'"{m}"' for m in mta_sts_mx) + "]\n"
        host = make_host(name, extra=f'mx = [{quoted}]\n[[certificate]]\nname = "mta-sts.example.test"\n'
                                     f'cert = "/c.pem"\nkey = "/k.pem"\n{table}')
        pair = socket.socketpair()
        made.append(PolicyHost(host, Listener(host.config, pair[0]), pair))
        return made[-1]

    yield make
    for h in made:
        for sock in h.sockets:
            sock.close()


def mx_lines(policy: str) -> list[str]:
    return [line[len("mx: "):] for line in policy.split("\r\n") if line.startswith("mx: ")]


def test_without_mx_every_host_serves_the_union_of_the_fleets_mx_names_and_one_id_is_published(
        bind, policy_host) -> None:
    from certkeeper.core import mtasts_state
    from certkeeper.core.mtasts import parse_policy, render_txt

    mx1 = policy_host("mx1", ["mx1.example.test"])
    mx2 = policy_host("mx2", ["mx2.example.test", "smtp.example.test"])
    assert mx1.config.mta_sts[0].fleet_mx and mx1.config.mta_sts[0].mx == ()
    assert mx_lines(mx1.served()) == ["mx1.example.test"]  # before etcd was read: this host's own names
    # Round one: mx1 sees nobody yet; mx2 sees mx1, serves both and holds its id back (mx1 serves another).
    assert mx1.agree(T0) == ("example.test",)
    lines: list[str] = []
    assert mx2.agree(T0, lines) == ()
    assert mx_lines(mx2.served()) == ["mx1.example.test", "mx2.example.test", "smtp.example.test"]
    assert "fleet: the MTA-STS policies without mx now list the fleet's MX names mx1.example.test, " \
           "mx2.example.test, smtp.example.test" in lines, lines
    # Round two: mx1 sees mx2; its listener is rebuilt before anything is checked; both agree.
    assert mx1.agree(T0) == ("example.test",) and mx2.agree(T0) == ("example.test",)
    assert mx1.served() == mx2.served()
    union = parse_policy(mx1.served())
    assert union.mx == ("mx1.example.test", "mx2.example.test", "smtp.example.test")
    # The id is sent to BIND once: the second host finds it published and served by itself too.
    first, second = mx1.publish(("example.test",), T0), mx2.publish(("example.test",), T0)
    assert [(o.record, o.status, o.changed) for o in first] == [("_mta-sts.example.test", "published", True)]
    assert [(o.record, o.status, o.changed) for o in second] == [("_mta-sts.example.test", "unchanged", False)]
    assert "published by the fleet" in second[0].detail
    assert bind.query("_mta-sts.example.test", "TXT") == [render_txt(union.policy_id())]
    for h in (mx1, mx2):
        assert mtasts_state.load_state(h.config, "example.test").current.policy_id == union.policy_id()  # type: ignore[union-attr]
    # certkeeper status shows the names the policy takes from the fleet.
    doc = status.collect(mx2.config, now=T0)
    (row,) = doc["mta_sts"]
    assert row["fleet_mx"] == list(union.mx) and row["status"] == "published"
    assert "mx from the fleet: mx1.example.test, mx2.example.test, smtp.example.test" in status.render_text(doc)

    # A third host joins: every host follows the new union, and its id replaces the old one, once.
    later = T0 + HOUR
    mx3 = policy_host("mx3", ["mx3.example.test"])
    for _ in range(3):  # mx3 reports; each host follows the new union; each sees the others serve it
        agreed = [h.agree(later) for h in (mx1, mx2, mx3)]
    assert agreed == [("example.test",)] * 3
    assert mx1.served() == mx2.served() == mx3.served()
    grown = parse_policy(mx3.served())
    assert grown.mx == ("mx1.example.test", "mx2.example.test", "mx3.example.test", "smtp.example.test")
    outcomes = [h.publish(("example.test",), later) for h in (mx3, mx1, mx2)]
    assert [o[0].changed for o in outcomes] == [True, False, False]
    assert bind.query("_mta-sts.example.test", "TXT") == [render_txt(grown.policy_id())]

    # A host with an explicit list keeps it, and never writes the fleet's names (seen alone, two days on).
    mx4 = policy_host("mx4", ["mx4.example.test"], mta_sts_mx=["*.example.test"])
    assert mx4.agree(later + 2 * DAY) == ("example.test",)
    assert mx_lines(mx4.served()) == ["*.example.test"]
    assert not mtasts_state.fleet_mx_path(mx4.config).exists()
    with pytest.raises(Refusal, match="no \\[\\[mta_sts\\]\\] table takes its mx from the fleet"):
        LocalKeeper(mx4.config).refresh_policies()


def test_the_fleets_mx_names_are_checked_where_they_are_read(policy_host) -> None:
    from certkeeper.core import mtasts_state

    mx1 = policy_host("mx1", ["mx1.example.test"])
    path = mtasts_state.fleet_mx_path(mx1.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    for bad in (b'{"mx": ["mx2.example.test", "not a name"]}', b"[]", b'{"mx": ["a.example.test"]}' + b" " * 70000,
                json.dumps({"mx": [f"mx{i}.example.test" for i in range(300)]}).encode()):
        path.write_bytes(bad)
        with pytest.raises(Refusal, match="fleet-mx"):  # the keeper refuses to have the listener serve it
            LocalKeeper(mx1.config).refresh_policies()
        mx1.rebuild()  # the listener serves this host's own names instead
        assert mx_lines(mx1.served()) == ["mx1.example.test"]
    path.write_bytes(b'{"mx": ["MX2.example.test.", "mx1.example.test"]}')
    LocalKeeper(mx1.config).refresh_policies()
    mx1.rebuild()
    assert mx_lines(mx1.served()) == ["mx1.example.test", "mx2.example.test"]
    # A name another host reported that is no mx pattern is left out of the union, with one line.
    with fleet.Etcd(mx1.config.fleet) as etcd:
        etcd.put(etcd.key("mta-sts", "bad.example.test"), json.dumps(
            {"host": "bad.example.test", "at": T0.isoformat(), "ids": {}, "mx": ["a b", "mx9.example.test"]}).encode())
    lines: list[str] = []
    mx1.agree(T0, lines)
    assert any("left out of the MTA-STS policies: 'a b'" in x for x in lines), lines
    assert mx_lines(mx1.served()) == ["mx1.example.test", "mx9.example.test"]
    without_fleet = dataclasses.replace(mx1.config, fleet=FleetConfig())
    with pytest.raises(Refusal, match="no \\[fleet\\] table"):
        LocalKeeper(without_fleet).refresh_policies()
    assert protocol.parse(protocol.render(protocol.RefreshPolicies())[protocol.HEADER.size:]) == \
        protocol.RefreshPolicies()


def test_an_mta_sts_table_without_mx_needs_a_fleet() -> None:
    table = '[[certificate]]\nname = "mta-sts.example.test"\n[[mta_sts]]\ndomain = "example.test"\n'
    with pytest.raises(ConfigError) as err:
        parse(table)
    assert any("mta_sts[1].mx: is required when mode is 'testing'" in line for line in err.value.lines)
    fleet_toml = ('[fleet]\nbackend = "etcd"\nendpoints = ["http://127.0.0.1:2379"]\nhost = "mx1.example.test"\n'
                  'secret_file = "/k"\n')
    (m,) = parse(table + fleet_toml).mta_sts
    assert m.fleet_mx and m.mx == ()
    (m,) = parse(table + 'mx = ["mail.example.test"]\n' + fleet_toml).mta_sts
    assert not m.fleet_mx and m.mx == ("mail.example.test",)
    (m,) = parse(table + 'mode = "none"\n' + fleet_toml).mta_sts
    assert not m.fleet_mx and m.mx == ()


def test_fleet_mx_is_this_hosts_list_of_mx_names() -> None:
    base = ('[fleet]\nbackend = "etcd"\nendpoints = ["http://127.0.0.1:2379"]\nhost = "mx1.example.test"\n'
            'secret_file = "/k"\n')
    assert parse(base + 'mx = ["MX1.example.test.", "smtp.example.test"]\n').fleet.mx == (
        "mx1.example.test", "smtp.example.test")
    with pytest.raises(ConfigError) as err:
        parse(base + 'mx = ["not a name"]\n')
    assert any("fleet.mx[1]: 'not a name' is not" in line for line in err.value.lines), err.value.lines


def test_the_worker_is_handed_the_etcd_client_files_but_never_the_fleet_secret(tmp_path: Path) -> None:
    from certkeeper.privsep import handed_secrets

    files = {name: tmp_path / name for name in ("ca.pem", "client.pem", "client.key", "password", "fleet.key")}
    for name, path in files.items():
        path.write_text(f"content of {name}\n")
        path.chmod(0o600)
    text = (f'state_dir = "{tmp_path / "state"}"\n[acme]\naccount_key = "{tmp_path / "account.key"}"\n'
            f'[fleet]\nbackend = "etcd"\nendpoints = ["https://127.0.0.1:2379"]\nhost = "mx1.example.test"\n'
            f'ca = "{files["ca.pem"]}"\ncert = "{files["client.pem"]}"\nkey = "{files["client.key"]}"\n'
            f'username = "mx1"\npassword_file = "{files["password"]}"\nsecret_file = "{files["fleet.key"]}"\n')
    handed = handed_secrets(parse(text))
    for name in ("ca.pem", "client.pem", "client.key", "password"):
        assert handed[str(files[name])] == f"content of {name}\n".encode()
    assert str(files["fleet.key"]) not in handed


# -- the fleet-watch worker: shared HTTP-01 tokens, a dead rotator taken over at once ----------------


@dataclass
class Watching:
    host: Host
    keeper: LocalKeeper
    takeovers: list[str]
    lines: list[str]
    stop: threading.Event
    thread: threading.Thread

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.thread.is_alive(), "the watcher ended"
            assert time.monotonic() < deadline, f"{what} not within {timeout} s: {self.lines}"
            time.sleep(0.02)


@pytest.fixture
def watching():
    """``start(host)``: the host's fleet-watch loop in a thread, with an in-process keeper; stopped at the end."""
    started: list[Watching] = []

    def start(host: Host) -> Watching:
        takeovers: list[str] = []
        lines: list[str] = []
        keeper = LocalKeeper(host.config, on_takeover=takeovers.append)
        stop = threading.Event()
        thread = threading.Thread(target=fleet.watch, args=(host.config, keeper, lines.append, lambda: None, stop),
                                  daemon=True)
        w = Watching(host, keeper, takeovers, lines, stop, thread)
        thread.start()
        started.append(w)
        with fleet.Etcd(host.config.fleet) as etcd:  # registered: orders wait for its acknowledgement
            w.wait(lambda: etcd.get(etcd.key(fleet.WATCHERS, host.config.fleet.host))[0] is not None, 15,
                   "registration")
        return w

    yield start
    for w in started:
        w.stop.set()
    for w in started:
        w.thread.join(20)
        assert not w.thread.is_alive()


def test_an_http01_token_reaches_the_other_hosts_listener_table_before_the_ca_is_told(make_host, watching) -> None:
    mx1 = mta_sts_host(make_host, "mx1", ["mx1.example.test", "mx2.example.test"])
    mx2 = mta_sts_host(make_host, "mx2", ["mx1.example.test", "mx2.example.test"])
    other = make_host("mx3")  # no [[mta_sts]], no certificate for the name: it acknowledges, never answers
    w2, w3 = watching(mx2), watching(other)
    local = LocalKeeper(mx1.config).challenges
    shared = fleet.SharedChallenges(mx1.config, local)
    try:
        shared.add("tok-A_1", "tok-A_1.thumb", name="mta-sts.example.test")
        # add returned: every watching host has seen it, and mx2's listener table has it already.
        assert w2.keeper.challenges.get("tok-A_1") == "tok-A_1.thumb"
        assert local.get("tok-A_1") == "tok-A_1.thumb" and w3.keeper.challenges.get("tok-A_1") is None
        assert any("answering HTTP-01 for mta-sts.example.test (an order of mx1.example.test)" in x
                   for x in w2.lines)
        shared.add("tok-B", "tok-B.thumb", name="mail.elsewhere.test")  # not a name mx2 serves
        assert w2.keeper.challenges.get("tok-B") is None
        shared.remove("tok-A_1")
        w2.wait(lambda: w2.keeper.challenges.get("tok-A_1") is None, 10, "withdrawal")
        assert local.get("tok-A_1") is None
    finally:
        shared.close()
    assert not [v for v in etcd_values(mx1) if "thumb" in v]  # every token's key went with its lease


def test_the_keeper_answers_another_hosts_token_only_for_its_own_names(make_host) -> None:
    mx2 = mta_sts_host(make_host, "mx2", ["mx2.example.test"])
    keeper = LocalKeeper(mx2.config)
    keeper.shared_challenge("t1", "t1.x", "MTA-STS.example.test.")
    assert keeper.challenges.get("t1") == "t1.x"
    for token, ka, name in [("t2", "t2.x", "www.example.test"), ("t3", "other.x", "mta-sts.example.test"),
                            ("t/4", "t/4.x", "mta-sts.example.test")]:
        with pytest.raises(Refusal):
            keeper.shared_challenge(token, ka, name)
    with pytest.raises(Refusal):
        LocalKeeper(dataclasses.replace(mx2.config, fleet=FleetConfig())).shared_challenge("t1", "t1.x",
                                                                                         "mta-sts.example.test")
    for message in (protocol.SharedChallenge("t", "t.x", "n"), protocol.Takeover("mx1"), protocol.Alive()):
        assert protocol.parse(protocol.render(message)[protocol.HEADER.size:]) == message


def test_a_rotator_that_dies_is_taken_over_at_once_one_that_resigns_is_not(bind, make_host, watching) -> None:
    mx1, mx2 = make_host("mx1"), make_host("mx2")
    w2 = watching(mx2)
    assert mx1.run(T0)[0].errors == ()  # a whole run: the rotator resigns at its end
    time.sleep(mx1.config.fleet.lease_ttl + 1)
    assert w2.takeovers == []
    started = time.monotonic()
    done = crash_run(mx1, T0 + 100 * DAY, "generate")  # the next rotation: mx1 dies half-way
    assert done.returncode == -9, done.stderr
    w2.wait(lambda: w2.takeovers == ["mx1.example.test"], mx1.config.fleet.lease_ttl + 5, "the takeover")
    assert time.monotonic() - started <= mx1.config.fleet.lease_ttl + 5
    assert any("the rotator mx1.example.test is gone" in x for x in w2.lines), w2.lines


def test_without_etcd_an_order_goes_on_with_this_hosts_listener_alone(tmp_path: Path) -> None:
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(48))
    secret.chmod(0o600)
    from tests.fixtures.peers import free_port

    config = parse(f'state_dir = "{tmp_path / "state"}"\n[fleet]\nbackend = "etcd"\n'
                   f'endpoints = ["http://127.0.0.1:{free_port()}"]\nhost = "mx1.example.test"\n'
                   f'secret_file = "{secret}"\n', tmp_path / "certkeeper.toml")
    local = LocalKeeper(config).challenges
    shared = fleet.SharedChallenges(config, local)
    try:
        started = time.monotonic()
        shared.add("tok1", "tok1.thumb", name="mta-sts.example.test")
        shared.add("tok2", "tok2.thumb", name="mta-sts.example.test")  # etcd is not tried again in this job
        assert time.monotonic() - started < 3 * fleet.REQUEST_TIMEOUT
        assert local.get("tok1") == "tok1.thumb" and local.get("tok2") == "tok2.thumb"
        shared.remove("tok1")
        assert local.get("tok1") is None
    finally:
        shared.close()
    assert len(local) == 0
