"""DNS-01 for real: Pebble's validator resolves through the test BIND, which certkeeper updates
with TSIG-signed RFC 2136 messages; a wildcard certificate included.

The TXT record must be on every authoritative server (here the primary and a real
secondary that transfers from it) before the CA is asked to look, and is gone afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from certkeeper.core import certs, config
from certkeeper.core.errors import ConfigError
from certkeeper.core.state import load_cert_state
from tests.fixtures.bind import BindServer, StartBind
from tests.fixtures.pebble import Pebble, start_pebble

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dns_pebble(bind: BindServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    with start_pebble(tmp_path_factory.mktemp("pebble-dns"), dns_server=bind.server) as server:
        yield server


def certkeeper(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certkeeper", "--config", str(conf), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_wildcard_certificate_through_rfc2136_and_every_authoritative_server(
        dns_pebble: Pebble, bind: BindServer, bind_factory: StartBind, tmp_path: Path) -> None:
    secondary = bind_factory(primary=bind, name="secondary")
    text = dns_pebble.config_text(tmp_path, ["wild"]).replace(
        'domains = ["wild"]', 'domains = ["*.example.test", "example.test"]\nchallenge = "dns-01"')
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(text + bind.dns_toml(check_servers=[bind.server, secondary.server], propagation_timeout=20))
    result = certkeeper(conf, "renew")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("wild: renewed, valid until ")
    cert = config.load(conf).certificates[0]
    info = certs.parse_cert(cert.cert.read_bytes())
    assert set(info.domains) == {"*.example.test", "example.test"}
    assert certs.key_matches_cert(cert.key.read_bytes(), cert.cert.read_bytes())
    blocks = x509.load_pem_x509_certificates(cert.fullchain.read_bytes())
    roots = [x509.load_pem_x509_certificate(pem) for pem in dns_pebble.issuer_roots()]
    PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName("www.example.test")).verify(
        blocks[0], blocks[1:])
    # Removed afterwards, from the primary and (by transfer) the secondary.
    assert bind.query("_acme-challenge.example.test", "TXT") == []
    assert secondary.query("_acme-challenge.example.test", "TXT") == []
    assert load_cert_state(config.load(conf).state_dir, "wild").consecutive_failures == 0


def test_the_ca_is_not_asked_to_look_before_every_server_has_the_record(
        dns_pebble: Pebble, bind: BindServer, bind_factory: StartBind, tmp_path: Path) -> None:
    """A second authoritative server that never hears of the change: the order fails after the
    propagation wait, the challenge was never answered, and the record is removed again."""
    lagging = bind_factory(dynamic=False, name="lagging")
    text = dns_pebble.config_text(tmp_path, ["apex"]).replace(
        'domains = ["apex"]', 'domains = ["example.test"]\nchallenge = "dns-01"')
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(text + bind.dns_toml(check_servers=[bind.server, lagging.server], propagation_timeout=1))
    result = certkeeper(conf, "renew")
    assert result.returncode == 1
    assert result.stdout.startswith("apex: failed: _acme-challenge.example.test TXT: after 1s 1 of 2 "
                                    "authoritative servers still lag"), result.stdout
    assert "/chalZ/" not in (dns_pebble.workdir / "pebble.log").read_text()  # never asked to validate
    assert bind.query("_acme-challenge.example.test", "TXT") == []
    state = load_cert_state(config.load(conf).state_dir, "apex")
    assert state.consecutive_failures == 1 and state.authority_backoff == {}  # our side: no CA is blamed


def test_dns01_needs_a_backend_that_can_publish(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse('[[certificate]]\nname = "wild"\ndomains = ["*.example.com"]\nchallenge = "dns-01"\n',
                     tmp_path / "c.toml")
    assert info.value.lines == [f'{tmp_path}/c.toml: certificate[1].challenge: "dns-01" needs [dns] backend '
                                '"rfc2136" or "zonefile"']


def test_a_wildcard_needs_dns01(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse('[[certificate]]\nname = "wild"\ndomains = ["*.example.com"]\n', tmp_path / "c.toml")
    assert info.value.lines == [f"{tmp_path}/c.toml: certificate[1].domains[1]: '*.example.com' may not contain '*'"]


def test_dns01_through_the_zone_file_the_keeper_owns(bind_factory: StartBind, tmp_path: Path) -> None:
    """The zonefile backend: the keeper writes certkeeper's include file and reloads BIND."""
    from certkeeper.network.runner import Renewer

    include = tmp_path / "certkeeper.inc"
    include.write_text("")
    server = bind_factory(include=include, name="zf", dynamic=False)
    with start_pebble(tmp_path / "pebble", dns_server=server.server) as pebble:
        text = pebble.config_text(tmp_path, ["zf"]).replace(
            'domains = ["zf"]', 'domains = ["*.example.test"]\nchallenge = "dns-01"')
        dns = server.dns_toml(backend="zonefile", zonefile=str(include), server=None, tsig_key_name=None,
                              tsig_secret_file=None, reload_command=server.rndc("reload", "example.test"))
        conf = config.parse(text + dns, tmp_path / "certkeeper.toml")
        report = Renewer(conf).renew(None)
        assert report.exit_code == 0, report.outcomes
        assert certs.parse_cert(conf.certificates[0].cert.read_bytes()).domains == ("*.example.test",)
    assert "_acme-challenge" not in include.read_text()  # removed again
    assert server.query("_acme-challenge.example.test", "TXT") == []
