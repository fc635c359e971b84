"""End to end against a real ACME server (Pebble): `certkeeper renew` obtains, skips, forces, fails safely."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.verification import PolicyBuilder, Store

from certkeeper.core import certs, config
from certkeeper.core.state import load_cert_state
from certkeeper.keeper.store import CertificateStore
from tests.fixtures.pebble import Pebble, start_pebble
from tests.fixtures.peers import free_port

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["mail.example.com", "mta-sts.example.com"]


def certkeeper(conf: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certkeeper", "--config", str(conf), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def verify_chain(pebble: Pebble, fullchain: bytes, name: str) -> x509.Certificate:
    """The served chain must verify to Pebble's current root for ``name`` (a real path validation)."""
    blocks = x509.load_pem_x509_certificates(fullchain)
    roots = [x509.load_pem_x509_certificate(pem) for pem in pebble.issuer_roots()]
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName(name))
    verifier.verify(blocks[0], blocks[1:])
    return blocks[0]


def write_config(pebble: Pebble, tmp_path: Path, names: list[str] = NAMES, **overrides: object) -> Path:
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(pebble.config_text(tmp_path, names, **overrides))
    return conf


def test_renew_obtains_skips_and_forces(pebble: Pebble, tmp_path: Path) -> None:
    conf = write_config(pebble, tmp_path)
    first = certkeeper(conf, "renew")
    assert first.returncode == 0, first.stdout + first.stderr
    assert [line.split(":")[0] for line in first.stdout.splitlines()] == NAMES
    assert all(": renewed, valid until " in line for line in first.stdout.splitlines())
    cfg = config.load(conf)
    serials = {}
    for cert_cfg in cfg.certificates:
        key, leaf = cert_cfg.key.read_bytes(), cert_cfg.cert.read_bytes()
        assert certs.key_matches_cert(key, leaf)
        assert cert_cfg.fullchain.read_bytes() == leaf + cert_cfg.chain.read_bytes()
        assert stat.S_IMODE(cert_cfg.key.stat().st_mode) == 0o600
        assert certs.key_type_of(key) == "ecdsa-p256"
        served = verify_chain(pebble, cert_cfg.fullchain.read_bytes(), cert_cfg.name)
        assert served.serial_number == certs.parse_cert(leaf).serial
        serials[cert_cfg.name] = served.serial_number
    assert stat.S_IMODE(cfg.acme.account_key.stat().st_mode) == 0o600

    again = certkeeper(conf, "renew")
    assert again.returncode == 2, again.stdout + again.stderr
    assert all(": not due until " in line for line in again.stdout.splitlines())
    assert len(again.stdout.splitlines()) == 2

    forced = certkeeper(conf, "renew", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    store = CertificateStore(cfg.state_dir)
    for cert_cfg in cfg.certificates:
        now_serial = certs.parse_cert(cert_cfg.cert.read_bytes()).serial
        assert now_serial != serials[cert_cfg.name]
        previous = store.read_previous(cert_cfg)
        assert previous is not None and certs.parse_cert(previous.cert).serial == serials[cert_cfg.name]

    one = certkeeper(conf, "renew", "--force", "mail.example.com")
    assert one.returncode == 0 and one.stdout.startswith("mail.example.com: renewed")
    assert len(one.stdout.splitlines()) == 1

    status = certkeeper(conf, "status")
    assert status.returncode == 0, status.stderr
    for cert_cfg in cfg.certificates:
        row = next(line for line in status.stdout.splitlines() if line.startswith(cert_cfg.name))
        not_after = certs.parse_cert(cert_cfg.cert.read_bytes()).not_after
        assert " ok " in row and not_after.strftime("%Y-%m-%d") in row
    doc = json.loads(certkeeper(conf, "status", "--json").stdout)
    assert [c["name"] for c in doc["certificates"]] == NAMES
    assert all(c["status"] == "ok" and c["days_left"] > 1000 for c in doc["certificates"])


def test_unknown_name_is_an_error(pebble: Pebble, tmp_path: Path) -> None:
    conf = write_config(pebble, tmp_path)
    result = certkeeper(conf, "renew", "--force", "nosuch.example.com")
    assert result.returncode == 1
    assert result.stderr.strip() == f"certkeeper: no [[certificate]] named 'nosuch.example.com' in {conf}"


def test_failed_order_keeps_the_working_set_and_backs_off(pebble: Pebble, tmp_path: Path) -> None:
    conf = write_config(pebble, tmp_path, names=["mail.example.com"])
    assert certkeeper(conf, "renew").returncode == 0
    cfg = config.load(conf)
    cert_cfg = cfg.certificates[0]
    before = {role: getattr(cert_cfg, role).read_bytes() for role in ("key", "cert", "chain", "fullchain")}
    # The challenge listener moves to a port Pebble's validator does not dial: the order fails half way.
    broken = write_config(pebble, tmp_path, names=["mail.example.com"], http_listen=[f"127.0.0.1:{free_port()}"])
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)  # the state keeps whole seconds at most
    failed = certkeeper(broken, "renew", "--force")
    ended = dt.datetime.now(dt.UTC)
    assert failed.returncode == 1
    assert failed.stdout.startswith("mail.example.com: failed: ")
    assert "urn:ietf:params:acme:error:" in failed.stdout and "Traceback" not in failed.stderr + failed.stdout
    after = {role: getattr(cert_cfg, role).read_bytes() for role in ("key", "cert", "chain", "fullchain")}
    assert after == before
    verify_chain(pebble, after["fullchain"], "mail.example.com")
    state = load_cert_state(cfg.state_dir, "mail.example.com")
    assert state.consecutive_failures == 1 and "urn:ietf:params:acme:error:" in state.last_error
    assert state.retry_not_before is not None
    # one minute after the failed attempt, however long the order took on a loaded machine
    assert started + dt.timedelta(minutes=1) <= state.retry_not_before <= ended + dt.timedelta(minutes=1)
    assert state.last_attempt is not None and started <= state.last_attempt <= ended
    # The next (fixed) run succeeds and clears the backoff.
    fixed = certkeeper(write_config(pebble, tmp_path, names=["mail.example.com"]), "renew", "--force")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert load_cert_state(cfg.state_dir, "mail.example.com").consecutive_failures == 0


def test_unreachable_acme_server_is_one_line(pebble: Pebble, tmp_path: Path) -> None:
    conf = write_config(pebble, tmp_path, names=["mail.example.com"],
                        directory=f"https://127.0.0.1:{free_port()}/dir")
    result = certkeeper(conf, "renew")
    assert result.returncode == 1
    assert "cannot reach the ACME server" in result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ssl").exists() or not list((tmp_path / "ssl").rglob("*.key"))


def test_existing_acme_client_rsa_account_key_is_reused(pebble: Pebble, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = tmp_path / "acme" / "account.pem"
    account.parent.mkdir()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # "BEGIN RSA PRIVATE KEY", as acme-client writes
    account.write_bytes(pem)
    account.chmod(0o600)
    conf = write_config(pebble, tmp_path, names=["mail.example.com"])
    assert certkeeper(conf, "renew").returncode == 0
    assert account.read_bytes() == pem  # used as is, never rewritten
    cache = json.loads((tmp_path / "state" / "acme" / "account.json").read_text())
    url = cache[pebble.directory]["url"]
    # Without the cached URL the same key finds the same account (RFC 8555 7.3.1).
    (tmp_path / "state" / "acme" / "account.json").unlink()
    assert certkeeper(conf, "renew", "--force").returncode == 0
    assert json.loads((tmp_path / "state" / "acme" / "account.json").read_text())[pebble.directory]["url"] == url


def test_rsa_key_type_and_several_names(pebble: Pebble, tmp_path: Path) -> None:
    conf = tmp_path / "certkeeper.toml"
    text = pebble.config_text(tmp_path, ["mail.example.com"], key_type="rsa2048")
    conf.write_text(text.replace('domains = ["mail.example.com"]',
                                 'domains = ["mail.example.com", "smtp.example.com", "imap.example.com"]'))
    assert certkeeper(conf, "renew").returncode == 0
    cert_cfg = config.load(conf).certificates[0]
    info = certs.parse_cert(cert_cfg.cert.read_bytes())
    assert set(info.domains) == {"mail.example.com", "smtp.example.com", "imap.example.com"}
    assert certs.key_type_of(cert_cfg.key.read_bytes()) == "rsa2048"
    verify_chain(pebble, cert_cfg.fullchain.read_bytes(), "imap.example.com")


def test_many_certificates_concurrently_with_frequent_bad_nonce(tmp_path: Path) -> None:
    """A third of all nonces rejected: every order still succeeds (badNonce is retried)."""
    with start_pebble(tmp_path / "pebble", env={"PEBBLE_WFE_NONCEREJECT": "33"}) as noisy:
        names = [f"mx{i}.example.com" for i in range(6)]
        conf = tmp_path / "certkeeper.toml"
        conf.write_text(noisy.config_text(tmp_path, names, extra="") .replace("[http]", "concurrency = 3\n[http]"))
        result = certkeeper(conf, "renew", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(line.split(":")[0] for line in result.stdout.splitlines()) == sorted(names)
        for cert_cfg in config.load(conf).certificates:
            verify_chain(noisy, cert_cfg.fullchain.read_bytes(), cert_cfg.name)


@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_key_option(pebble: Pebble, tmp_path: Path, reuse: bool) -> None:
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(pebble.config_text(tmp_path, ["mail.example.com"]).replace(
        'key_type = "ecdsa-p256"', f'key_type = "ecdsa-p256"\nreuse_key = {str(reuse).lower()}'))
    assert certkeeper(conf, "renew").returncode == 0
    key_path = config.load(conf).certificates[0].key
    first_key = key_path.read_bytes()
    assert certkeeper(conf, "renew", "--force").returncode == 0
    assert (key_path.read_bytes() == first_key) is reuse


def test_two_runs_never_renew_the_same_certificate_at_once(pebble: Pebble, tmp_path: Path) -> None:
    """Two Renewers (as two processes would be: no shared in-process lock) race for one missing
    certificate: the file lock makes the second wait, re-plan, and find nothing due."""
    import threading

    from certkeeper.core.challenges import ChallengeTable
    from certkeeper.network.runner import Renewer
    from tests.fixtures.http01 import serving

    cfg = config.load(write_config(pebble, tmp_path, names=["mail.example.com"]))
    challenges = ChallengeTable()
    reports = []
    with serving(cfg, challenges):
        threads = [threading.Thread(target=lambda: reports.append(Renewer(cfg, challenges).renew())) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(r.outcomes[0].status for r in reports) == ["not-due", "renewed"]
    assert sorted(r.exit_code for r in reports) == [0, 2]


def test_account_the_server_forgot_is_registered_again(tmp_path: Path) -> None:
    """RFC 8555 7.3.1: a cached account URL the server no longer knows (a reset CA) is replaced."""
    acme_port = free_port()
    with start_pebble(tmp_path / "first", acme_port=acme_port) as first:
        conf = write_config(first, tmp_path, names=["mail.example.com"])
        assert certkeeper(conf, "renew").returncode == 0
        old_url = json.loads((tmp_path / "state" / "acme" / "account.json").read_text())[first.directory]["url"]
    with start_pebble(tmp_path / "second", acme_port=acme_port, http01_port=first.http01_port) as second:
        conf = write_config(second, tmp_path, names=["mail.example.com"])
        result = certkeeper(conf, "renew", "--force")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "does not know the cached account" in result.stderr
        cache = json.loads((tmp_path / "state" / "acme" / "account.json").read_text())
        assert cache[second.directory]["url"].startswith(second.directory.rsplit("/", 1)[0])
        assert old_url.startswith(first.directory.rsplit("/", 1)[0])
        verify_chain(second, config.load(conf).certificates[0].fullchain.read_bytes(), "mail.example.com")


EAB_KID, EAB_KEY = "kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def test_external_account_binding(tmp_path: Path) -> None:
    """RFC 8555 7.3.4: a CA that requires EAB; the HMAC key is used and never printed, even at -vv."""
    with start_pebble(tmp_path / "pebble", eab_keys={EAB_KID: EAB_KEY}) as eab_pebble:
        conf = write_config(eab_pebble, tmp_path, names=["mail.example.com"])
        refused = certkeeper(conf, "renew")
        assert refused.returncode == 1
        assert "externalAccountRequired" in refused.stdout
        hmac_file = tmp_path / "eab.hmac"
        hmac_file.write_text(EAB_KEY + "\n")
        hmac_file.chmod(0o600)
        conf.write_text(conf.read_text().replace(
            "[http]", f'eab_kid = "{EAB_KID}"\neab_hmac_key_file = "{hmac_file}"\n[http]'))
        result = certkeeper(conf, "-vv", "renew")
        assert result.returncode == 0, result.stdout + result.stderr
        assert EAB_KEY not in result.stdout + result.stderr


def test_lost_fullchain_is_rebuilt_without_an_order_and_lost_chains_are_renewed(pebble: Pebble,
                                                                                 tmp_path: Path) -> None:
    conf = write_config(pebble, tmp_path, names=["mail.example.com"])
    assert certkeeper(conf, "renew").returncode == 0
    cert_cfg = config.load(conf).certificates[0]
    fullchain, serial = cert_cfg.fullchain.read_bytes(), certs.parse_cert(cert_cfg.cert.read_bytes()).serial
    cert_cfg.fullchain.unlink()
    repaired = certkeeper(conf, "renew")
    assert repaired.returncode == 2, repaired.stdout + repaired.stderr  # nothing ordered
    assert "rebuilt" in repaired.stderr and cert_cfg.fullchain.read_bytes() == fullchain
    assert certs.parse_cert(cert_cfg.cert.read_bytes()).serial == serial
    # With both chain files gone nothing can rebuild them: the certificate is ordered again.
    cert_cfg.fullchain.unlink()
    cert_cfg.chain.unlink()
    renewed = certkeeper(conf, "renew")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    verify_chain(pebble, cert_cfg.fullchain.read_bytes(), "mail.example.com")


def test_reuse_key_with_a_changed_key_type_gets_a_new_key(pebble: Pebble, tmp_path: Path) -> None:
    conf = tmp_path / "certkeeper.toml"
    text = pebble.config_text(tmp_path, ["mail.example.com"]).replace(
        'key_type = "ecdsa-p256"', 'key_type = "ecdsa-p256"\nreuse_key = true')
    conf.write_text(text)
    assert certkeeper(conf, "renew").returncode == 0
    conf.write_text(text.replace('key_type = "ecdsa-p256"', 'key_type = "rsa2048"'))
    result = certkeeper(conf, "renew")
    assert result.returncode == 0, result.stdout + result.stderr
    assert certs.key_type_of(config.load(conf).certificates[0].key.read_bytes()) == "rsa2048"


def test_a_reload_that_keeps_failing_backs_off_further_each_time(pebble: Pebble, tmp_path: Path) -> None:
    """1 min, then 10 min: a broken service must not cost an order and a restart every minute."""
    conf = write_config(pebble, tmp_path, names=["mail.example.com"])
    assert certkeeper(conf, "renew").returncode == 0  # a working set to roll back to
    conf.write_text(conf.read_text().replace('fullchain = ', 'hooks = ["broken"]\nfullchain = ', 1)
                    + '[hooks.broken]\ncommand = ["/bin/false"]\n')
    state_dir = config.load(conf).state_dir
    delays = []
    for _ in range(2):
        started = dt.datetime.now(dt.UTC)
        result = certkeeper(conf, "renew", "--force")
        assert result.returncode == 1 and "broken: " in result.stdout
        assert len(result.stdout.splitlines()) == 1  # one line per certificate
        state = load_cert_state(state_dir, "mail.example.com")
        delays.append(round((state.retry_not_before - started).total_seconds() / 60))  # from the attempt
    assert delays == [1, 10]
    assert load_cert_state(state_dir, "mail.example.com").consecutive_failures == 2


def test_a_profile_the_server_does_not_offer_is_refused_before_ordering(pebble: Pebble, tmp_path: Path) -> None:
    """Debian's Pebble lists no profiles: asking for one is a one-line error, not a silent default."""
    conf = write_config(pebble, tmp_path, names=["mail.example.com"])
    conf.write_text(conf.read_text().replace("[http]", 'profile = "shortlived"\n[http]'))
    result = certkeeper(conf, "renew")
    assert result.returncode == 1
    assert result.stdout == ("mail.example.com: failed: the ACME server offers no profiles; "
                             "remove profile = 'shortlived' from the configuration\n")
    assert not config.load(conf).certificates[0].key.exists()


def test_a_directory_url_that_is_not_an_acme_server_is_one_clear_line(pebble: Pebble, tmp_path: Path) -> None:
    wrong = pebble.directory.replace("/dir", "/no-such-directory")
    conf = write_config(pebble, tmp_path, names=["mail.example.com"], directory=wrong)
    result = certkeeper(conf, "renew")
    assert result.returncode == 1
    assert f"HTTP 404 Not Found from {wrong}" in result.stdout


def test_one_renewed_and_one_failed_exits_1(pebble: Pebble, tmp_path: Path) -> None:
    """`certkeeper renew && rcctl restart smtpd` must not hide a failure because another certificate
    renewed: a failure wins over a renewal (acme-client's 1)."""
    from certkeeper.network.runner import Outcome, RenewReport

    conf = write_config(pebble, tmp_path)  # mail.example.com renews; mta-sts.example.com asks for a profile
    conf.write_text(conf.read_text().replace('name = "mta-sts.example.com"',  # Pebble does not offer
                                             'name = "mta-sts.example.com"\nprofile = "shortlived"'))
    result = certkeeper(conf, "renew")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mail.example.com: renewed, valid until "), result.stdout + result.stderr
    assert lines[1].startswith("mta-sts.example.com: failed: the ACME server offers no profiles")
    assert result.returncode == 1
    assert config.load(conf).certificates[0].cert.exists()
    for order in ([Outcome("a", "renewed", ""), Outcome("b", "failed", "")],
                  [Outcome("b", "failed", ""), Outcome("a", "renewed", ""), Outcome("c", "not-due", "")]):
        assert RenewReport(order).exit_code == 1
    assert RenewReport([Outcome("a", "renewed", ""), Outcome("c", "not-due", "")]).exit_code == 0
    assert RenewReport([Outcome("c", "not-due", "")]).exit_code == 2
