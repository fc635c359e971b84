"""Several ACME authorities: two real Pebbles on loopback as two CAs.

The first one is down (nothing listens at its directory), the certificate comes
from the second in the same run; once the first is back, the next renewal goes
to it again. A failure on our side (the HTTP-01 challenge not reachable) is not
taken to the next authority. Also: the ``[acme]``/``[authority.NAME]`` rules of the
configuration, CAA for every authority, and what ``status`` shows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from certkeeper.core import config
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.errors import ConfigError
from certkeeper.core.state import load_cert_state
from certkeeper.network import records
from certkeeper.network.runner import Renewer
from tests.fixtures.http01 import serving
from tests.fixtures.pebble import Pebble, make_ca, start_pebble
from tests.fixtures.peers import free_port
from tests.test_ari import AcmeProxy

ROOT = Path(__file__).resolve().parent.parent
NAME = "mail.example.com"


def certkeeper(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certkeeper", "--config", str(conf), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def authority(name: str, directory: str, ca_file: Path, tmp_path: Path) -> str:
    return (f"[authority.{name}]\ndirectory = \"{directory}\"\ncontact = [\"mailto:postmaster@example.com\"]\n"
            f"account_key = \"{tmp_path}/acme/{name}.pem\"\nca_bundle = \"{ca_file}\"\ntimeout = 5\n")


def write_config(tmp_path: Path, http01_port: int, authorities: str, cert_extra: str) -> Path:
    text = "\n".join([
        f'state_dir = "{tmp_path}/state"',
        f'control_socket = "{tmp_path}/certkeeper.sock"',
        f'pid_file = "{tmp_path}/certkeeper.pid"',
        "[http]",
        f'listen = ["127.0.0.1:{http01_port}"]',
        "tls_listen = []",
        "[[certificate]]",
        f'name = "{NAME}"',
        f'key = "{tmp_path}/ssl/private/{NAME}.key"',
        f'cert = "{tmp_path}/ssl/{NAME}.crt"',
        f'chain = "{tmp_path}/ssl/{NAME}.chain.pem"',
        f'fullchain = "{tmp_path}/ssl/{NAME}.fullchain.pem"',
        cert_extra,
        authorities,
    ])
    path = tmp_path / "certkeeper.toml"
    path.write_text(text + "\n")
    return path


def issued_by(server: Pebble, fullchain: bytes) -> bool:
    """The chain verifies to ``server``'s own root (each Pebble has its own)."""
    blocks = x509.load_pem_x509_certificates(fullchain)
    roots = [x509.load_pem_x509_certificate(pem) for pem in server.issuer_roots()]
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName(NAME))
    try:
        verifier.verify(blocks[0], blocks[1:])
    except Exception:  # noqa: BLE001 - any verification failure means "not this CA"
        return False
    return True


def test_first_authority_down_then_back(pebble: Pebble, tmp_path: Path) -> None:
    """Down: the certificate comes from the fallback in the same run. Back: the next renewal uses it."""
    port = free_port()
    first_dir = tmp_path / "first"
    ca_file, _, _ = make_ca(first_dir / "tls")  # start_pebble writes the same files again when it starts
    conf = write_config(tmp_path, pebble.http01_port,
                        authority("first", f"https://127.0.0.1:{port}/dir", ca_file, tmp_path)
                        + authority("second", pebble.directory, pebble.ca_file, tmp_path),
                        'authority = "first"\nfallback = ["second"]')
    cfg = config.load(conf)
    cert = cfg.certificates[0]

    down = certkeeper(conf, "renew")
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.startswith(f"{NAME}: renewed, valid until ") and down.stdout.rstrip().endswith("from second")
    assert issued_by(pebble, cert.fullchain.read_bytes())
    state = load_cert_state(cfg.state_dir, NAME)
    assert state.authority == "second"
    assert state.authority_failures("first") == 1 and "second" not in state.authority_backoff
    # Both accounts' keys were made by the keeper (root, 0600) and handed to the worker.
    for name in ("first", "second"):
        assert (tmp_path / "acme" / f"{name}.pem").stat().st_mode & 0o777 == 0o600
    row = json.loads(certkeeper(conf, "status", "--json").stdout)["certificates"][0]
    assert row["authority"] == "second" and row["status"] == "ok"
    assert "issued by: second" in certkeeper(conf, "status").stdout

    with start_pebble(first_dir, http01_port=pebble.http01_port, acme_port=port) as first:
        back = certkeeper(conf, "renew", "--force")
        assert back.returncode == 0, back.stdout + back.stderr
        assert back.stdout.rstrip().endswith("from first")
        assert issued_by(first, cert.fullchain.read_bytes())
        assert not issued_by(pebble, cert.fullchain.read_bytes())
    state = load_cert_state(cfg.state_dir, NAME)
    assert state.authority == "first" and state.authority_backoff == {}
    assert json.loads(certkeeper(conf, "status", "--json").stdout)["certificates"][0]["authority"] == "first"


@pytest.fixture
def counting_proxy(pebble: Pebble) -> Iterator[AcmeProxy]:
    with AcmeProxy(pebble).running() as proxy:
        yield proxy


def test_a_failure_on_our_side_is_not_taken_to_the_fallback(pebble: Pebble, counting_proxy: AcmeProxy,
                                                            tmp_path: Path) -> None:
    """Pebble's validator cannot reach our listener: another CA would fail the same way; it is not asked."""
    conf = write_config(tmp_path, free_port(),  # our listener is not where Pebble validates
                        authority("first", pebble.directory, pebble.ca_file, tmp_path)
                        + authority("second", counting_proxy.directory, pebble.ca_file, tmp_path),
                        'authority = "first"\nfallback = ["second"]')
    cfg = config.load(conf)
    challenges = ChallengeTable()
    report = Renewer(cfg, challenges).renew(None, serve_challenges=lambda: serving(cfg, challenges))
    assert report.exit_code == 1
    assert "urn:ietf:params:acme:error:connection" in report.outcomes[0].detail
    assert counting_proxy.orders == []  # the fallback was never asked
    state = load_cert_state(cfg.state_dir, NAME)
    assert state.authority_failures("first") == 1 and "second" not in state.authority_backoff
    assert state.consecutive_failures == 1


def test_replaces_and_ari_go_only_to_the_issuing_authority(pebble: Pebble, tmp_path: Path) -> None:
    """The certificate came from the fallback: ARI is asked there, and an order at the first
    authority carries no ``replaces`` (it never saw the old certificate); one at the issuer does."""
    with AcmeProxy(pebble).running() as first, AcmeProxy(pebble).running() as second:
        conf = write_config(tmp_path, pebble.http01_port,
                            authority("first", first.directory, pebble.ca_file, tmp_path)
                            + authority("second", second.directory, pebble.ca_file, tmp_path),
                            'authority = "second"')
        cfg = config.load(conf)
        now = dt.datetime.now(dt.UTC)
        challenges = ChallengeTable()
        assert Renewer(cfg, challenges, clock=lambda: now).renew(
            None, serve_challenges=lambda: serving(cfg, challenges)).exit_code == 0
        old = cfg.certificates[0].cert.read_bytes()
        # Now the certificate asks "first" first: ARI still goes to "second", the issuer.
        conf = write_config(tmp_path, pebble.http01_port,
                            authority("first", first.directory, pebble.ca_file, tmp_path)
                            + authority("second", second.directory, pebble.ca_file, tmp_path),
                            'authority = "first"\nfallback = ["second"]')
        cfg = config.load(conf)
        later = now + dt.timedelta(hours=7)
        renewer = Renewer(cfg, challenges, clock=lambda: later)
        assert not renewer.decide(cfg.certificates[0]).due
        assert second.ari_requests and not first.ari_requests
        report = renewer.renew(None, force=True, serve_challenges=lambda: serving(cfg, challenges))
        assert report.exit_code == 0, report.outcomes
        assert first.orders and "replaces" not in first.orders[-1]
        assert load_cert_state(cfg.state_dir, NAME).authority == "first"
        assert old != cfg.certificates[0].cert.read_bytes()


def test_acme_beside_authority_acme_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse('[acme]\ndirectory = "https://a.example/dir"\n[authority.acme]\n'
                     'directory = "https://b.example/dir"\n', tmp_path / "c.toml")
    assert info.value.lines == [f"{tmp_path}/c.toml: acme: [acme] is the authority named 'acme': it cannot stand "
                                "beside [authority.acme]; move its keys into one of them"]


def test_acme_is_the_authority_named_acme_and_the_default(tmp_path: Path) -> None:
    cfg = config.parse('[acme]\ndirectory = "https://a.example/dir"\n[authority.other]\n'
                       'directory = "https://b.example/dir"\nprofile = "shortlived"\n'
                       '[[certificate]]\nname = "mail.example.com"\nfallback = ["other"]\n'
                       '[[certificate]]\nname = "mx2.example.com"\nauthority = "other"\n')
    assert list(cfg.authorities) == ["acme", "other"]
    assert cfg.default_authority == "acme" and cfg.acme.directory == "https://a.example/dir"
    assert cfg.certificates[0].authorities == ("acme", "other")
    assert cfg.certificates[1].authorities == ("other",)
    assert cfg.authority("other").profile == "shortlived"
    # Without [acme], the first [authority.NAME] is the default.
    only = config.parse('[authority.le]\ndirectory = "https://a.example/dir"\n'
                        '[[certificate]]\nname = "mail.example.com"\n')
    assert only.default_authority == "le" and only.certificates[0].authority == "le"
    assert list(only.authorities) == ["le"]


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[[certificate]]\nname = "a.example.com"\nauthority = "nope"\n',
     "certificate[1].authority: 'nope' is not a configured authority (acme)"),
    ('[acme]\n[authority.b]\n[[certificate]]\nname = "a.example.com"\nfallback = ["b", "b"]\n',
     "certificate[1].fallback[2]: 'b' is already asked before"),
    ('[authority.b]\ntimeout = "x"\n', "authority.b.timeout: 'x' is not an integer or a number"),
    ('[authority.b]\ndirectory = "http://x.example/dir"\n',
     "authority.b.directory: 'http://x.example/dir' is not an https:// URL"),
    ('[authority."b c"]\n', "authority.b c: 'b c' may hold only letters, digits, '.', '_' and '-'"),
    ('authority = 3\n', "authority: must be a table ([authority]), not an integer"),
])
def test_authority_errors_are_one_line(tmp_path: Path, snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(snippet, tmp_path / "c.toml")
    assert info.value.lines == [f"{tmp_path}/c.toml: {expected}"]


def test_caa_lists_every_authority_and_issuewild_for_wildcards(tmp_path: Path) -> None:
    cfg = config.parse(
        '[acme]\n[authority.zerossl]\ndirectory = "https://acme.zerossl.com/v2/DV90"\n'
        '[dns]\nbackend = "zonefile"\nzone = "example.com"\nzonefile = "/var/named/certkeeper.zone"\n'
        '[[certificate]]\nname = "mail.example.com"\nfallback = ["zerossl"]\n'
        '[[certificate]]\nname = "wild"\ndomains = ["*.example.com"]\nchallenge = "dns-01"\n')
    caa = {e.name: e.values for e in records.expected_records(cfg, "example.com") if e.rtype == "CAA"}
    assert caa["mail.example.com"] == ('0 issue "letsencrypt.org"', '0 issue "sectigo.com"')
    assert caa["example.com"] == ('0 issue "letsencrypt.org"', '0 issue "sectigo.com"',
                                  '0 issuewild "letsencrypt.org"', '0 issuewild "sectigo.com"')
