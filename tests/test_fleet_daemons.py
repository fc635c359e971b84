"""[fleet] with real daemons: two ``certkeeper run`` (keeper as root, unprivileged listener and workers, the
fleet-watch worker), a real three-member etcd cluster, Pebble and BIND on loopback.

- HTTP-01 for a name both hosts serve: host A's order is validated by Pebble against host B's listener (A's
  own listener is on a port Pebble never dials); the token reached B through etcd.
- A rotator daemon killed half-way through a rotation: the other daemon finishes it within the lease TTL
  (plus a worker start and the DNS wait), not at its next hourly run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certkeeper import control
from certkeeper.core.config import Config, parse
from certkeeper.keeper.service import LocalKeeper
from certkeeper.network import fleet, rotation
from certkeeper.network.rotation import DomainState
from tests.fixtures.etcd import EtcdCluster, etcd_cluster  # noqa: F401 - the fixture
from tests.fixtures.peers import Process, free_port, wait_for_port
from tests.test_rotation import dkim_toml, signer_keys

LEASE_TTL = 3
NAME = "mta-sts.example.test"


class FleetDaemon:
    """``certkeeper run -d`` for one fleet host, in its own directory."""

    def __init__(self, home: Path, host: str, text: str, env: dict[str, str] | None = None) -> None:
        self.home, self.host = home, host
        self.config_path = home / "certkeeper.toml"
        self.config_path.write_text(text)
        self.config: Config = parse(text, self.config_path)
        self.log = home / "daemon.log"
        self.proc = Process(f"certkeeper-{host}", [sys.executable, "-m", "certkeeper", "-c", str(self.config_path),
                                                   "run", "-d"], self.log, env=env, cwd=Path(__file__).parent.parent)

    def output(self) -> str:
        return self.proc.output()

    def kill(self) -> None:
        """SIGKILL the daemon with its listener and workers (its process group), as a power cut would."""
        os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.popen.wait(10)


def wait_until(check: Callable[[], object], timeout: float, what: str, *daemons: FleetDaemon) -> float:
    """Poll ``check`` until it is true; the seconds it took."""
    started = time.monotonic()
    while not check():
        for d in daemons:
            assert d.proc.popen.poll() is None, f"{d.host} ended: {d.output()[-3000:]}"
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s\n" + "\n".join(
                f"--- {d.host}\n{d.output()[-3000:]}" for d in daemons))
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture
def site(pebble, etcd_cluster: EtcdCluster, tmp_path: Path):  # noqa: F811 - the fixture
    """``start(host, http_port, extra, env)``: a fleet daemon; every daemon is stopped at the end."""
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(base64.b64encode(os.urandom(48)) + b"\n")
    secret.chmod(0o600)
    prefix = f"/certkeeper-{tmp_path.name}"
    started: list[FleetDaemon] = []

    def start(host: str, http_port: int, names: tuple[str, ...] = (), dkim: bool = False, dns: str = "",
              env: dict[str, str] | None = None, tls_port: int | None = None) -> FleetDaemon:
        home = tmp_path / host
        home.mkdir()
        extra = (dkim_toml(home / "dkim", algorithms='["ed25519"]') if dkim else "") + dns
        tls_listen = [f"127.0.0.1:{tls_port}"] if tls_port is not None else []
        text = pebble.config_text(home, names, http_listen=[f"127.0.0.1:{http_port}"], tls_listen=tls_listen, extra=(
            f'{extra}\n[fleet]\n{etcd_cluster.toml(prefix)}host = "{host}.example.test"\nsecret_file = "{secret}"\n'
            f"lease_ttl = {LEASE_TTL}\n"))
        daemon = FleetDaemon(home, f"{host}.example.test", text, env)
        started.append(daemon)
        wait_for_port(http_port, proc=daemon.proc)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.proc.stop()


def etcd_get(config: Config, *parts: str) -> bytes | None:
    with fleet.Etcd(config.fleet) as etcd:
        return etcd.get(etcd.key(*parts))[0]


def test_an_order_of_one_host_is_validated_against_another_hosts_listener(pebble, site) -> None:
    b = site("b", pebble.http01_port, names=(NAME,))  # the only listener Pebble's validator reaches
    wait_until(lambda: etcd_get(b.config, fleet.WATCHERS, b.host), 30, "b's fleet-watch worker", b)
    a = site("a", free_port(), names=(NAME,))
    cert = a.config.certificate(NAME).cert
    wait_until(cert.exists, 60, "a's certificate", a, b)
    assert f"answering HTTP-01 for {NAME} (an order of a.example.test)" in b.output()
    assert b.config.certificate(NAME).cert.exists()  # and b's own order, through its own listener
    assert "refused a request" not in a.output() + b.output()


def domain_state(config: Config) -> DomainState:
    value = etcd_get(config, "dkim", "example.test", "state")
    return DomainState.from_json(json.loads(value)) if value is not None else DomainState("example.test")


def test_a_rotator_daemon_killed_mid_rotation_is_finished_by_the_other_within_the_lease_ttl(
        pebble, bind, site) -> None:
    b = site("b", free_port(), dkim=True, dns=bind.dns_toml())
    # b alone: its start-up DKIM run makes the fleet's first key and activates it.
    wait_until(lambda: [k.state for k in domain_state(b.config).keys] == ["active"], 60, "b's first key", b)
    (first,) = domain_state(b.config).keys
    # a joins; its workers die (SIGKILL) right after a new key's generate step.
    a = site("a", free_port(), dkim=True, dns=bind.dns_toml(), env={rotation.CRASH_ENV: "dkim-generate"})
    wait_until(lambda: set(signer_keys(a.home / "dkim" / "signer.conf")) == {first.selector}
               if (a.home / "dkim" / "signer.conf").exists() else False, 60, "a signing with the fleet's key", a, b)
    wait_until(lambda: etcd_get(a.config, "leader") is None and etcd_get(a.config, fleet.WATCHERS, a.host), 30,
               "a's start-up run to end", a, b)
    assert "is gone (its lease expired)" not in b.output()  # a resigned after its run: nothing to take over

    # A rotation is asked for in etcd (as rotate-dkim does), and a's daemon runs the DKIM job: it wins the
    # election, makes the key, seals it into etcd and dies there. Then the whole daemon is killed.
    item = a.config.dkim[0]
    now = datetime.now(UTC)
    with fleet.Etcd(a.config.fleet) as etcd:
        state, revision = fleet.load_domain(etcd, item.domain)
        taken = rotation.taken_selectors(a.config, item, state, now, LocalKeeper(a.config))
        new = rotation.request_rotation(state, item, now, True, taken)
        assert etcd.swap(etcd.key("dkim", item.domain, "state"), json.dumps(new.to_json()).encode(), revision,
                         as_leader=False)
    (pending,) = [k for k in new.keys if k.selector != first.selector]
    control.forward(a.config, "schedule-dkim", {}, io.StringIO(), timeout=60)
    a.kill()
    assert etcd_get(a.config, "dkim", item.domain, "keys", pending.selector) is not None  # sealed, then died
    assert domain_state(a.config).key(pending.selector).record == ""  # the state was not saved: a died first

    took = wait_until(lambda: domain_state(b.config).key(pending.selector).visible is not None,
                      LEASE_TTL + 20, "b finishing the rotation", b)
    assert took <= LEASE_TTL + 20  # not at b's next hourly run
    out = b.output()
    assert "the rotator a.example.test is gone (its lease expired)" in out, out[-3000:]
    key = domain_state(b.config).key(pending.selector)
    assert bind.query(f"{key.selector}._domainkey.example.test", "TXT") == [key.record]
    assert {k.selector for k in domain_state(b.config).keys} == {first.selector, pending.selector}  # none more


def test_two_daemons_without_mx_serve_the_union_of_their_mx_names_and_publish_its_id(pebble, bind, site,
                                                                                   tmp_path: Path) -> None:
    """[[mta_sts]] without mx on two real daemons: after a reload each listener process serves the same policy,
    listing both hosts' MX names, and its id is in BIND."""
    from certkeeper.core.mtasts import parse_policy, render_txt

    roots = tmp_path / "pebble-roots.pem"
    roots.write_bytes(b"".join(pebble.issuer_roots()))
    table = '[[mta_sts]]\ndomain = "example.test"\nmode = "enforce"\n'
    ports = {"b": free_port(), "a": free_port()}

    def dns(host: str) -> str:
        return bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{ports[host]}", mta_sts_fetch_ca=str(roots)) + table

    b = site("b", pebble.http01_port, names=(NAME,), dns=dns("b"), tls_port=ports["b"])
    wait_until(lambda: etcd_get(b.config, fleet.WATCHERS, b.host), 30, "b's fleet-watch worker", b)
    a = site("a", free_port(), names=(NAME,), dns=dns("a"), tls_port=ports["a"])
    for d in (a, b):
        wait_until(lambda d=d: "mta-sts.example.test: serving the new certificate" in d.output(), 60,
                   f"{d.host}'s certificate served", a, b)

    def served(host: str) -> str:
        context = ssl.create_default_context(cafile=str(roots))
        with socket.create_connection(("127.0.0.1", ports[host]), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
                        .encode())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        return answer.partition(b"\r\n\r\n")[2].decode()

    union = ("a.example.test", "b.example.test")
    for d in (b, a):  # a reload runs the publish job: each host reports, follows the union, publishes once agreed
        os.kill(d.proc.popen.pid, signal.SIGHUP)
        wait_until(lambda d=d: parse_policy(served(d.host[0])).mx == union, 30, f"{d.host} serving the union", a, b)
    policy = parse_policy(served("a"))
    assert served("a") == served("b")
    wait_until(lambda: bind.query("_mta-sts.example.test", "TXT") == [render_txt(policy.policy_id())], 30,
               "the union's id in BIND", a, b)
    assert "refused a request" not in a.output() + b.output()
