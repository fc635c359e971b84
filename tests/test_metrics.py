"""[metrics]: scraped over HTTP and parsed with prometheus_client.parser."""

from __future__ import annotations

import socket
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from certkeeper.core import config, state
from certkeeper.core.errors import LocalError
from certkeeper.keeper.store import CertificateStore
from tests.fixtures.metrics_server import start_metrics_server
from tests.fixtures.peers import free_port
from tests.fixtures.throwaway_ca import ThrowawayCA

NOW = datetime.now(UTC).replace(microsecond=0)


def make_config(tmp_path: Path, listen: str, extra: str = "") -> config.Config:
    blocks = "".join(f"""
[[certificate]]
name = "{name}"
key = "{tmp_path}/ssl/{name}.key"
cert = "{tmp_path}/ssl/{name}.crt"
chain = "{tmp_path}/ssl/{name}.chain.pem"
fullchain = "{tmp_path}/ssl/{name}.fullchain.pem"
""" for name in ("mail.example.com", "mta-sts.example.com"))
    text = f'state_dir = "{tmp_path}/state"\n[metrics]\nlisten = "{listen}"\n' + extra + blocks
    return config.parse(text, tmp_path / "certkeeper.toml")


def scrape(listen: str) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict[str, list], metric: str, /, **labels: str) -> float:
    matches = [s.value for s in families[metric] if s.name == metric and all(s.labels.get(k) == v
                                                                            for k, v in labels.items())]
    assert len(matches) == 1, (metric, labels, families.get(metric))
    return matches[0]


@pytest.fixture
def served(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    cfg = make_config(tmp_path, listen)
    store = CertificateStore(cfg.state_dir)
    ca = ThrowawayCA()
    not_after = NOW + timedelta(days=60)
    store.install(cfg.certificate("mail.example.com"),
                  ca.issue(["mail.example.com"], NOW - timedelta(days=30), not_after))
    state.save_cert_state(cfg.state_dir, state.CertState(
        name="mail.example.com", last_attempt=NOW - timedelta(hours=2), last_success=NOW - timedelta(days=30)))
    state.save_cert_state(cfg.state_dir, state.CertState(
        name="mta-sts.example.com", last_attempt=NOW - timedelta(hours=1), consecutive_failures=2,
        last_error="boom"))
    stop = start_metrics_server(cfg, started_at=NOW - timedelta(seconds=90))
    try:
        yield cfg, listen, not_after
    finally:
        stop()


def test_scrape_certificate_metrics(served):
    cfg, listen, not_after = served
    families = scrape(listen)
    assert value(families, "certkeeper_certificate_not_after_seconds", name="mail.example.com") == \
        not_after.timestamp()
    assert value(families, "certkeeper_certificate_present", name="mail.example.com") == 1
    assert value(families, "certkeeper_certificate_present", name="mta-sts.example.com") == 0
    assert not [s for s in families["certkeeper_certificate_not_after_seconds"]
                if s.labels["name"] == "mta-sts.example.com"]  # no file, no made-up expiry
    assert value(families, "certkeeper_certificate_last_renewal_attempt_seconds", name="mail.example.com") == \
        (NOW - timedelta(hours=2)).timestamp()
    assert value(families, "certkeeper_certificate_last_renewal_success_seconds", name="mail.example.com") == \
        (NOW - timedelta(days=30)).timestamp()
    assert value(families, "certkeeper_certificate_renewal_consecutive_failures", name="mta-sts.example.com") == 2
    assert value(families, "certkeeper_start_time_seconds") == (NOW - timedelta(seconds=90)).timestamp()
    assert value(families, "certkeeper_uptime_seconds") >= 90


def test_scrape_reads_state_at_scrape_time(served):
    cfg, listen, _ = served
    assert value(scrape(listen), "certkeeper_certificate_renewal_consecutive_failures",
                 name="mail.example.com") == 0
    state.save_cert_state(cfg.state_dir, state.CertState(name="mail.example.com", consecutive_failures=5))
    assert value(scrape(listen), "certkeeper_certificate_renewal_consecutive_failures",
                 name="mail.example.com") == 5


def test_verify_and_dkim_metrics(bind, tmp_path):
    from certkeeper.network import rotation, verification

    listen = f"127.0.0.1:{free_port()}"
    # The operator's dkim_signing.conf, as the README shows it: certkeeper writes the two maps it names.
    (tmp_path / "signer.conf").write_text(f'selector_map = "{tmp_path}/selectors.map";\n'
                                          f'path_map = "{tmp_path}/paths.map";\n')
    cfg = make_config(tmp_path, listen, extra=bind.dns_toml() + f"""
[hooks.signer]
command = ["true"]
[[dkim]]
domain = "example.test"
algorithms = ["ed25519"]
key_dir = "{tmp_path / 'keys'}"
key_owner = ""
signer_config = "{tmp_path / 'signer.conf'}"
signer_hook = "signer"
""")
    store = CertificateStore(cfg.state_dir)
    store.install(cfg.certificate("mail.example.com"),
                  ThrowawayCA().issue(["mail.example.com"], NOW - timedelta(days=30), NOW + timedelta(days=60)))
    info = verification.on_disk(store, cfg.certificate("mail.example.com"))
    checks = [
        verification.Check("mail.example.com", "smtpd", info,
                           verification.Observation("smtp+starttls://127.0.0.1:25", info, "", NOW)),
        verification.Check("mail.example.com", "dovecot", info,
                           verification.Observation("imaps://127.0.0.1:993", None, "connection refused", NOW)),
    ]
    verification.save_results(cfg, "mail.example.com", checks)
    t0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)  # the DKIM state as the rotation executor writes it
    assert rotation.run_due(cfg, t0, lambda line: None).errors == ()
    (selector,) = rotation.load_state(cfg, "example.test").selectors
    stop = start_metrics_server(cfg, started_at=NOW)
    try:
        families = scrape(listen)
    finally:
        stop()
    assert value(families, "certkeeper_verify_ok", hook="smtpd", endpoint="smtp+starttls://127.0.0.1:25") == 1
    assert value(families, "certkeeper_verify_ok", hook="dovecot", endpoint="imaps://127.0.0.1:993") == 0
    assert value(families, "certkeeper_verify_checked_seconds", hook="smtpd") == NOW.timestamp()
    assert selector == "20260304"
    assert value(families, "certkeeper_dkim_selector_state", selector=selector, algorithm="ed25519",
                 state="active") == 1
    # the next step is the rotation: publish_ahead (2d) before rotate_every (90d) is up
    assert value(families, "certkeeper_dkim_selector_next_action_seconds", selector=selector) == \
        (t0 + timedelta(days=88)).timestamp()


def test_stop_closes_the_port(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    stop = start_metrics_server(make_config(tmp_path, listen), NOW)
    host, port = listen.split(":")
    socket.create_connection((host, int(port)), timeout=5).close()
    stop()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()


def test_off_by_default_and_clear_errors(tmp_path, monkeypatch):
    cfg = config.parse(f'state_dir = "{tmp_path}/s"\n')
    assert cfg.metrics.listen == ""
    start_metrics_server(cfg, NOW)()  # a no-op stop
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        with pytest.raises(LocalError, match=rf"\[metrics\] listen 127.0.0.1:{port}: cannot listen"):
            start_metrics_server(make_config(tmp_path, f"127.0.0.1:{port}"), NOW)
    finally:
        busy.close()
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if it were not installed
    with pytest.raises(LocalError, match="prometheus-client is not installed") as info:
        start_metrics_server(make_config(tmp_path, f"127.0.0.1:{free_port()}"), NOW)
    assert "\n" not in str(info.value)
