"""DANE for SMTP (issue 15): TLSA records for the current and the next key, checked through DNSSEC."""

from __future__ import annotations

import hashlib
import json
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certkeeper import protocol
from certkeeper.core import certs, config, dane
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError
from certkeeper.keeper.service import LocalKeeper, Refusal, answer, next_key_path
from certkeeper.keeper.store import CertificateStore
from certkeeper.network import verification
from certkeeper.network.alerts import Alerter
from certkeeper.network.dane import render as render_tlsa
from certkeeper.network.runner import Renewer
from tests.certfactory import make_set
from tests.fixtures.dnssec import MAIL_ADDRESS, TTL, Resolver, SignedZone, StartResolver, wrong_anchor
from tests.fixtures.http01 import serving
from tests.fixtures.mailservices import MailServices
from tests.fixtures.pebble import Pebble
from tests.fixtures.peers import require_binary

# ---------------------------------------------------------------------------
# TLSA records (pure).


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa2048"])
def test_tlsa_3_1_1_is_the_sha256_of_the_subject_public_key_info(tmp_path: Path, key_type: str) -> None:
    """Checked against openssl: ``pkey -pubout -outform DER | dgst -sha256`` (RFC 6698 2.1, RFC 7671 5.1)."""
    key = certs.generate_key(key_type)
    (tmp_path / "key.pem").write_bytes(key)
    der = subprocess.run([require_binary("openssl"), "pkey", "-in", str(tmp_path / "key.pem"), "-pubout",
                          "-outform", "DER"], capture_output=True, check=True, timeout=10).stdout
    expected = hashlib.sha256(der).hexdigest()
    assert dane.spki_digest(key) == expected
    assert dane.tlsa_value(dane.spki_of(key)) == f"3 1 1 {expected}"
    leaf = make_set(("mail.example.test",), key_pem=key).cert
    assert dane.spki_digest(leaf) == expected  # the certificate's key: the same record
    assert dane.public_key_type(leaf) == key_type
    assert dane.digest_of_value(f"3 1 1 {expected.upper()[:32]} {expected.upper()[32:]}") == expected
    assert dane.matches([f"3 1 1 {expected}"], expected) and not dane.matches(["3 1 1 00"], expected)
    assert dane.digest_of_value("3 0 1 " + expected) == ""  # a full-certificate record names no SPKI


def test_tlsa_names_values_and_bad_input() -> None:
    assert dane.tlsa_names((25, 465), ("Mail.Example.test.", "*.example.test", "mx.example.test")) == (
        "_25._tcp.mail.example.test", "_465._tcp.mail.example.test", "_25._tcp.mx.example.test",
        "_465._tcp.mx.example.test")
    digest = "ab" * 32
    assert dane.wanted_values(digest, "cd" * 32, ("ab" * 32,), "3 1 1") == (f"3 1 1 {digest}", f"3 1 1 {'cd' * 32}")
    assert dane.wanted_values("", "cd" * 32, (), "3 1 1") == (f"3 1 1 {'cd' * 32}",)
    with pytest.raises(ValueError, match="not a supported TLSA usage"):
        dane.tlsa_value(b"x", "1 1 1")
    with pytest.raises(ValueError, match="SHA-256"):
        dane.value_for_digest("xyz")


def test_next_key_is_usable_two_ttls_after_it_was_seen(tmp_path: Path) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    state = dane.DaneState("mail")
    assert dane.next_key_usable_at(state, "aa", 300) is None
    dane.seen(state, "aa", t0)
    dane.seen(state, "aa", t0 + timedelta(seconds=100))  # the first sighting counts
    assert dane.next_key_usable_at(state, "aa", 300) == t0 + timedelta(seconds=600)
    assert not dane.may_switch(state, "aa", 300, t0 + timedelta(seconds=599))
    assert dane.may_switch(state, "aa", 300, t0 + timedelta(seconds=600))
    assert not dane.may_switch(state, "bb", 300, t0 + timedelta(days=1))  # another key: not measured
    dane.not_seen(state, "aa")  # gone from a server: measuring starts again
    assert dane.next_key_usable_at(state, "aa", 300) is None
    dane.retire(state, "cc", 300, t0)
    assert dane.still_retiring(state, t0 + timedelta(seconds=299)) == ("cc",)
    dane.save_state(tmp_path, state)
    loaded = dane.load_state(tmp_path, "mail")
    assert loaded == state and stat.S_IMODE((tmp_path / "dane" / "mail.json").stat().st_mode) == 0o600
    assert dane.still_retiring(loaded, t0 + timedelta(seconds=300)) == () and loaded.retired == {}
    (tmp_path / "dane" / "mail.json").write_text("{not json")
    assert dane.load_state(tmp_path, "mail") == dane.DaneState("mail")


def _conf(text: str) -> str:
    return ('[[certificate]]\nname = "mail"\ndomains = ["mail.example.test"]\ndane = true\n'
            '[dns]\nbackend = "rfc2136"\nzone = "example.test"\nserver = "127.0.0.1:53"\n' + text)


def test_dane_configuration() -> None:
    cfg = config.parse(_conf(""))
    assert cfg.certificates[0].dane and cfg.dane == config.DaneConfig()
    assert cfg.dane.ports == (25,) and cfg.dane.usage == "3 1 1"
    cfg = config.parse(_conf('[dane]\nports = [25, 465, 587]\nttl = 60\nresolver = "127.0.0.1:5353"\n'))
    assert cfg.dane.ports == (25, 465, 587) and cfg.dane.ttl == 60
    assert not config.parse('[[certificate]]\nname = "m"\ndomains = ["m.example.test"]\n').certificates[0].dane


@pytest.mark.parametrize(("text", "message"), [
    ('[dane]\nports = [25, 25]\n', "dane.ports[2]: 25 is listed twice"),
    ('[dane]\nports = [0]\n', "dane.ports[1]: 0 is not a TCP port"),
    ('[dane]\nports = []\n', "dane.ports: is empty"),
    ('[dane]\nusage = "1 0 1"\n', "dane.usage: '1 0 1' is not one of 3 1 1"),
    ('[dane]\nresolver = "nowhere"\n', "dane.resolver: 'nowhere'"),
    ('[dane]\ncheck_address = "mail.example.test"\n', "dane.check_address: 'mail.example.test' is not a numeric"),
    ('[dane]\nport = 25\n', "dane.port: unknown key"),
])
def test_bad_dane_configuration_is_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(_conf(text), "certkeeper.toml")
    assert any(message in line and line.startswith("certkeeper.toml: ") for line in info.value.lines), \
        info.value.lines


def test_dane_and_mta_sts_agree_on_the_mx_host() -> None:
    base = ('[[certificate]]\nname = "mail.example.test"\ndomains = ["mail.example.test"]\ndane = true\n'
            '[[certificate]]\nname = "mta-sts.example.test"\ndomains = ["mta-sts.example.test"]\n'
            '[dns]\nbackend = "rfc2136"\nzone = "example.test"\nserver = "127.0.0.1:53"\n'
            '[[mta_sts]]\ndomain = "example.test"\nmode = "enforce"\nmax_age = 86400\nmx = MX\n')
    for mx in ('["mail.example.test"]', '["*.example.test"]'):
        assert config.parse(base.replace("MX", mx)).mta_sts[0].mx
    with pytest.raises(ConfigError) as info:
        config.parse(base.replace("MX", '["mx.example.test"]'), "certkeeper.toml")
    assert any("mta_sts[1].mx: the MX host 'mail.example.test' has DANE TLSA records (certificate[1] dane = true)"
               in line for line in info.value.lines), info.value.lines
    # mode "none" is a policy being withdrawn: nothing to agree with.
    config.parse(base.replace("MX", '["mx.example.test"]').replace('"enforce"', '"none"'))


def test_dane_needs_a_dns_backend_that_publishes_in_the_zone() -> None:
    with pytest.raises(ConfigError, match=r"certificate\[1\]\.dane: needs \[dns\] backend"):
        config.parse('[[certificate]]\nname = "m"\ndomains = ["m.example.test"]\ndane = true\n')
    with pytest.raises(ConfigError, match="outside"):
        config.parse(_conf("").replace("mail.example.test", "mail.example.org"))


def test_the_keeper_keeps_the_next_key_and_hands_out_only_digests(tmp_path: Path) -> None:
    text = (f'state_dir = "{tmp_path}/state"\n'
            + "".join(f'[[certificate]]\nname = "{n}"\ndomains = ["{n}.example.test"]\ndane = {d}\n'
                      f'key = "{tmp_path}/{n}.key"\ncert = "{tmp_path}/{n}.crt"\nchain = "{tmp_path}/{n}.chain"\n'
                      f'fullchain = "{tmp_path}/{n}.full"\nkey_mode = "0640"\n' for n, d in (("mx", "true"),
                                                                                              ("www", "false")))
            + '[dns]\nbackend = "rfc2136"\nzone = "example.test"\nserver = "127.0.0.1:53"\n')
    cfg = config.parse(text)
    keeper = LocalKeeper(cfg)
    assert keeper.dane_keys("mx", create=False) == ("", "")  # what `certkeeper dns` reads: nothing made
    printed = render_tlsa(cfg, {"mx": ("", "")}, datetime.now(UTC))
    assert "mx: no certificate yet" in printed and " IN TLSA " not in printed
    assert not next_key_path(cfg.certificate("mx")).exists()
    current, upcoming = keeper.dane_keys("mx")
    cert = cfg.certificate("mx")
    path = next_key_path(cert)
    assert current == "" and path == tmp_path / "mx.key.next"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and upcoming == dane.spki_digest(path.read_bytes())
    assert keeper.dane_keys("mx") == ("", upcoming)  # kept, not made again
    # The first certificate takes the next key; protocol round trip as the worker would ask.
    reply = answer(keeper, protocol.MakeCsr("mx", False), lambda line: None, lambda: datetime.now(UTC))
    assert isinstance(reply, protocol.Csr)
    csr = x509.load_pem_x509_csr(reply.csr.encode())
    assert dane.spki_digest(csr.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)) == upcoming
    reply = answer(keeper, protocol.DaneKeys("mx"), lambda line: None, lambda: datetime.now(UTC))
    assert reply == protocol.DaneDigests("mx", "", upcoming)
    # A certificate without dane has no next key, and the worker cannot ask for one.
    with pytest.raises(Refusal, match="dane is not set"):
        keeper.dane_keys("www")
    with pytest.raises(Refusal, match="only kept for a certificate with dane"):
        answer(keeper, protocol.MakeCsr("www", use_next=True), lambda line: None, lambda: datetime.now(UTC))
    with pytest.raises(Refusal, match="no \\[\\[certificate\\]\\] named"):
        keeper.dane_keys("other")
    assert not next_key_path(cfg.certificate("www")).exists()
    # A key_type change: the next key of the old type is replaced by one of the new type.
    rsa = config.parse(text.replace('dane = true\n', 'dane = true\nkey_type = "rsa2048"\n', 1))
    _, rsa_next = LocalKeeper(rsa).dane_keys("mx")
    assert rsa_next != upcoming and certs.key_type_of(path.read_bytes()) == "rsa2048"


# ---------------------------------------------------------------------------
# The test zone and its validating resolver.


def test_validating_resolver_sets_ad_only_with_the_right_anchor(signed_bind: SignedZone,
                                                                 validating_resolver: Resolver,
                                                                 resolver_factory: StartResolver) -> None:
    values, ad = validating_resolver.query("ns1.example.test", "A")
    assert values == ["127.0.0.1"]
    assert ad, "the zone's own key as anchor: the answer is validated"
    wrong = resolver_factory(wrong_anchor(signed_bind.trust_anchor))
    values, ad = wrong.query("ns1.example.test", "A")
    assert not ad
    assert values == []  # bogus: unbound answers SERVFAIL, no data


# ---------------------------------------------------------------------------
# The renewal: the served key matches a published TLSA record at every moment.


NAME = "mail.example.test"


def _toml(pebble: Pebble, ms: MailServices, resolver: Resolver, hooks: bool, reuse_key: bool = False,
          alerts: Path | None = None, key_type: str = "ecdsa-p256", dane_on: bool = True) -> str:
    cert = ms.certificate_config(NAME)
    hook_names = '["smtpd"]' if hooks else "[]"
    return f"""
[acme]
directory = "{pebble.directory}"
contact = ["mailto:postmaster@example.test"]
account_key = "{ms.root}/acme/account.pem"
ca_bundle = "{pebble.ca_file}"
[http]
listen = ["127.0.0.1:{pebble.http01_port}"]
tls_listen = []
[[certificate]]
name = "{NAME}"
domains = ["{NAME}"]
key = "{cert.key}"
cert = "{cert.cert}"
chain = "{cert.chain}"
fullchain = "{cert.fullchain}"
reuse_key = {str(reuse_key).lower()}
key_type = "{key_type}"
hooks = {hook_names}
dane = {str(dane_on).lower()}
[hooks.smtpd]
command = {json.dumps(list(ms.smtpd_restart()))}
verify = ["smtp+starttls://127.0.0.1:{ms.smtp_port}"]
[dane]
ports = [{ms.smtp_port}]
resolver = "{resolver.server}"
check_address = "127.0.0.1"
[records]
ipv4 = ["{MAIL_ADDRESS}"]
mx = ["{NAME}"]
caa_issuer = "pebble.test"
""" + (f'[alerts]\ncommand = ["/bin/sh", "-c", "cat >> {alerts}"]\n' if alerts else "")


class Watcher:
    """Polls the validating resolver and the certificate smtpd serves on its STARTTLS port; notes every
    moment the served key has no validated TLSA record."""

    def __init__(self, ms: MailServices, resolver: Resolver) -> None:
        self.url = f"smtp+starttls://127.0.0.1:{ms.smtp_port}"
        self.tlsa = f"_{ms.smtp_port}._tcp.{NAME}"
        self.resolver = resolver
        self.served: list[str] = []  # digests seen, in order, without repeats
        self.checks = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                der = verification.served_leaf(self.url, NAME, timeout=3)
            except (OSError, ssl.SSLError, verification.ProbeError):
                continue  # smtpd restarting: nothing served, nothing wrong
            digest = dane.spki_digest(x509.load_der_x509_certificate(der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
            values, ad = self.resolver.query(self.tlsa, "TLSA")
            self.checks += 1
            if not self.served or self.served[-1] != digest:
                self.served.append(digest)
            if not ad:
                self.problems.append(f"TLSA answer without AD: {values}")
            elif not dane.matches(values, digest):
                self.problems.append(f"served key {digest[:16]} not in {values}")


def _key_digest(path: Path) -> str:
    return dane.spki_digest(path.read_bytes())


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def dane_mail(pebble: Pebble, signed_bind: SignedZone, validating_resolver: Resolver,
              mail_services: MailServices) -> Iterator[tuple[Config, MailServices, ChallengeTable]]:
    """smtpd serving a set certkeeper did not make (an operator adopting certkeeper, a valid
    certificate with its own key); the configuration with dane = true for it."""
    ms = mail_services
    cfg = signed_bind.config(_toml(pebble, ms, validating_resolver, hooks=True, alerts=ms.root / "alerts.txt"),
                             state_dir=ms.root / "state", ttl=TTL)
    CertificateStore(cfg.state_dir).install(cfg.certificates[0], make_set((NAME,)))
    ms.start_smtpd()
    yield cfg, ms, ChallengeTable()


def test_key_changes_only_after_the_next_tlsa_was_seen_for_twice_the_ttl(
        dane_mail: tuple[Config, MailServices, ChallengeTable], signed_bind: SignedZone,
        validating_resolver: Resolver) -> None:
    cfg, ms, challenges = dane_mail
    cert = cfg.certificates[0]
    next_path = next_key_path(cert)
    tlsa = f"_{ms.smtp_port}._tcp.{NAME}"
    # A check with nothing due publishes the records of the current and the next key.
    report = Renewer(cfg, challenges).renew()
    assert [o.status for o in report.outcomes] == ["not-due"], report.outcomes
    first_key = _key_digest(cert.key)
    assert next_path.exists() and stat.S_IMODE(next_path.stat().st_mode) == 0o600
    next_key = _key_digest(next_path)
    assert dane_values(signed_bind.query(tlsa, "TLSA")) == {first_key, next_key}
    lines: list[str] = []
    with Watcher(ms, validating_resolver) as watcher, serving(cfg, challenges):
        # At once: the next key's record is too young; the renewal keeps the current key and says so.
        report = Renewer(cfg, challenges).renew(force=True, progress=lines.append)
        assert [o.status for o in report.outcomes] == ["renewed"], report.outcomes
        assert _key_digest(cert.key) == first_key
        assert any("keeping the current key" in line for line in lines), lines
        assert "kept the current key (the next key's TLSA record is usable from" in report.outcomes[0].detail
        state = dane.load_state(cfg.state_dir, NAME)
        assert state.next_digest == next_key and state.next_seen is not None
        usable = dane.next_key_usable_at(state, next_key, TTL)
        assert usable is not None and usable - state.next_seen == timedelta(seconds=2 * TTL)
        # Once 2 x TTL have passed: the next key becomes the key, a new next key is published and the
        # old key's record stays one more TTL.
        _wait_for(lambda: datetime.now(UTC) >= usable, 4 * TTL + 5, "the next key to become usable")
        lines.clear()
        report = Renewer(cfg, challenges).renew(force=True, progress=lines.append)
        assert [o.status for o in report.outcomes] == ["renewed"], report.outcomes
        assert _key_digest(cert.key) == next_key
        assert any("switching to the next key" in line for line in lines), lines
        third = _key_digest(next_path)
        assert third not in (first_key, next_key)
        assert dane_values(signed_bind.query(tlsa, "TLSA")) == {first_key, next_key, third}
        _wait_for(lambda: next_key in watcher.served, 20, "smtpd to serve the new key")
        # One TTL later the old record goes (at the next check, even with nothing due).
        time.sleep(TTL + 0.5)
        report = Renewer(cfg, challenges).renew(progress=lines.append)
        assert [o.status for o in report.outcomes] == ["not-due"]
        assert dane_values(signed_bind.query(tlsa, "TLSA")) == {next_key, third}
        time.sleep(1.5)  # the resolver's cache (1 s) catches up while smtpd serves the new key
    assert watcher.problems == []
    assert watcher.served[0] == first_key and watcher.served[-1] == next_key
    assert watcher.checks >= 10


def dane_values(values: list[str]) -> set[str]:
    return {dane.digest_of_value(v) for v in values}


def test_a_tlsa_record_removed_by_hand_blocks_the_install(
        dane_mail: tuple[Config, MailServices, ChallengeTable], signed_bind: SignedZone) -> None:
    cfg, ms, challenges = dane_mail
    cert = cfg.certificates[0]
    tlsa = f"_{ms.smtp_port}._tcp.{NAME}"
    assert [o.status for o in Renewer(cfg, challenges).renew().outcomes] == ["not-due"]
    assert signed_bind.query(tlsa, "TLSA")
    before = cert.fullchain.read_bytes(), cert.key.read_bytes()
    served = verification.served_leaf(f"smtp+starttls://127.0.0.1:{ms.smtp_port}", NAME)
    removed: list[str] = []

    def remove_by_hand(line: str) -> None:
        """While the CA validates the order, the operator deletes the record with nsupdate."""
        if "challenges validated" in line and not removed:
            script = (f"server {signed_bind.addr} {signed_bind.port}\nzone {signed_bind.zone}\n"
                      f"key {signed_bind.algorithm}:{signed_bind.key_name} {signed_bind.secret}\n"
                      f"update delete {tlsa} TLSA\nsend\n")
            subprocess.run([require_binary("nsupdate")], input=script, text=True, check=True, timeout=20)
            removed.append(line)

    with serving(cfg, challenges):
        report = Renewer(cfg, challenges).renew(force=True, progress=remove_by_hand)
    assert removed, "the order went through its challenges"
    assert signed_bind.query(tlsa, "TLSA") == []
    (outcome,) = report.outcomes
    assert outcome.status == "failed"
    assert "not installed: no TLSA record" in outcome.detail and tlsa in outcome.detail
    assert (cert.fullchain.read_bytes(), cert.key.read_bytes()) == before
    assert verification.served_leaf(f"smtp+starttls://127.0.0.1:{ms.smtp_port}", NAME) == served
    Alerter(cfg).after_renewal(report.outcomes)
    alert = (ms.root / "alerts.txt").read_text()
    assert "no TLSA record" in alert and NAME in alert


def _certkeeper(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(conf), *args], capture_output=True,
                          text=True, timeout=120)


def test_dns_prints_the_tlsa_records_and_check_validates_them_and_the_live_port(
        dane_mail: tuple[Config, MailServices, ChallengeTable], signed_bind: SignedZone) -> None:
    cfg, ms, challenges = dane_mail
    cert = cfg.certificates[0]
    tlsa = f"_{ms.smtp_port}._tcp.{NAME}"
    assert [o.status for o in Renewer(cfg, challenges).renew().outcomes] == ["not-due"]
    current, upcoming = _key_digest(cert.key), _key_digest(next_key_path(cert))
    printed = _certkeeper(cfg.path, "dns")
    assert printed.returncode == 0, printed.stderr
    tlsa_lines = [line for line in printed.stdout.splitlines() if " IN TLSA " in line]
    assert sorted(line.split("  ; ")[0].split()[-1] for line in tlsa_lines) == sorted([current, upcoming])
    assert all(line.startswith(f"{tlsa}. {TTL} IN TLSA 3 1 1 ") for line in tlsa_lines)
    assert any("current key" in line for line in tlsa_lines) and any("next key" in line for line in tlsa_lines)
    # The operator adds what `certkeeper dns` printed (the reverse zone already has its PTR).
    adds = [f"update add {line.split('  ; ')[0].strip()}" for line in printed.stdout.splitlines()
            if line and not line.startswith(";") and " IN PTR " not in line]
    script = (f"server {signed_bind.addr} {signed_bind.port}\nzone {signed_bind.zone}\n"
              f"key {signed_bind.algorithm}:{signed_bind.key_name} {signed_bind.secret}\n" + "\n".join(adds)
              + "\nsend\n")
    subprocess.run([require_binary("nsupdate")], input=script, text=True, check=True, timeout=20)
    green = _certkeeper(cfg.path, "dns", "--check")
    assert green.returncode == 0, green.stdout + green.stderr
    assert f"{tlsa} TLSA" in green.stdout and f"{NAME} port {ms.smtp_port} key" in green.stdout
    rows = [line for line in green.stdout.splitlines()[1:-1] if not line.startswith(" ")]  # not wrapped lines
    assert rows and all(line.rstrip().endswith(" ok") for line in rows), green.stdout
    assert green.stdout.splitlines()[-1].endswith(" ok, 0 missing, 0 wrong")
    # Someone puts another certificate in place by hand and restarts smtpd: the live port no longer
    # presents a key that DNS names.
    CertificateStore(cfg.state_dir).install(cert, make_set((NAME,)))
    subprocess.run(ms.smtpd_restart(), check=True, timeout=60)
    red = _certkeeper(cfg.path, "dns", "--check")
    assert red.returncode == 1
    lines = red.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if f"{NAME} port {ms.smtp_port} key" in line)
    block = [lines[at]] + [line for line in lines[at + 1:] if line.startswith(" ")][:3]  # a wrapped row
    assert lines[at].rstrip().endswith("wrong") and _key_digest(cert.key)[:20] in "".join(block).replace(" ", "")


def test_roll_key_waits_for_the_next_keys_record_then_takes_it(
        dane_mail: tuple[Config, MailServices, ChallengeTable], signed_bind: SignedZone) -> None:
    """Through the CLI: the keeper (this user) and an unprivileged network worker over the protocol."""
    cfg, ms, challenges = dane_mail
    cert = cfg.certificates[0]
    tlsa = f"_{ms.smtp_port}._tcp.{NAME}"
    early = _certkeeper(cfg.path, "roll-key", NAME)
    assert early.returncode == 2, early.stdout + early.stderr
    assert "usable from" in early.stdout and "nothing ordered" in early.stdout
    current, upcoming = _key_digest(cert.key), _key_digest(next_key_path(cert))
    assert dane_values(signed_bind.query(tlsa, "TLSA")) == {current, upcoming}
    usable = dane.next_key_usable_at(dane.load_state(cfg.state_dir, NAME), upcoming, TTL)
    assert usable is not None
    _wait_for(lambda: datetime.now(UTC) >= usable, 4 * TTL + 5, "the next key to become usable")
    rolled = _certkeeper(cfg.path, "roll-key", NAME)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert _key_digest(cert.key) == upcoming
    newest = _key_digest(next_key_path(cert))
    assert dane_values(signed_bind.query(tlsa, "TLSA")) == {current, upcoming, newest}
    served = verification.served_leaf(f"smtp+starttls://127.0.0.1:{ms.smtp_port}", NAME)
    assert dane.spki_digest(x509.load_der_x509_certificate(served).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)) == upcoming
    status = _certkeeper(cfg.path, "status", "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)["dane"]
    assert row["host"] == tlsa and row["certificate"] == NAME
    assert (row["current_key"], row["next_key"]) == (upcoming, newest)
    assert set(row["dns"]) == {current, upcoming, newest} and row["dns_checked"]
    # The new next key's record was first seen when it was published after the switch: 2 x TTL from then.
    seen = datetime.fromisoformat(row["dns_checked"].replace("Z", "+00:00"))
    usable_at = datetime.fromisoformat(row["next_key_usable_at"].replace("Z", "+00:00"))
    assert timedelta(seconds=2 * TTL - 1) <= usable_at - seen <= timedelta(seconds=2 * TTL + 1)
    text = _certkeeper(cfg.path, "status").stdout
    assert "DANE hosts" in text and f"{tlsa[:20]}" in text and upcoming[:12] in text
    not_dane = _certkeeper(cfg.path, "roll-key", "nope")
    assert not_dane.returncode == 1 and "no [[certificate]] named 'nope'" in not_dane.stderr


def test_a_key_type_change_orders_nothing_until_the_new_types_next_key_was_seen(
        dane_mail: tuple[Config, MailServices, ChallengeTable], pebble: Pebble, signed_bind: SignedZone,
        validating_resolver: Resolver) -> None:
    cfg, ms, challenges = dane_mail
    rsa = signed_bind.config(_toml(pebble, ms, validating_resolver, hooks=True, reuse_key=True, key_type="rsa2048"),
                             state_dir=cfg.state_dir, ttl=TTL)
    cert = rsa.certificates[0]
    before = cert.fullchain.read_bytes()
    report = Renewer(rsa, challenges).renew()
    (outcome,) = report.outcomes
    assert outcome.status == "not-due" and "key_type change waits" in outcome.detail, outcome
    assert cert.fullchain.read_bytes() == before and certs.key_type_of(cert.key.read_bytes()) == "ecdsa-p256"
    upcoming = _key_digest(next_key_path(cert))
    assert certs.key_type_of(next_key_path(cert).read_bytes()) == "rsa2048"
    usable = dane.next_key_usable_at(dane.load_state(rsa.state_dir, NAME), upcoming, TTL)
    assert usable is not None and outcome.next_renewal == usable
    _wait_for(lambda: datetime.now(UTC) >= usable, 4 * TTL + 5, "the next key to become usable")
    with serving(rsa, challenges):
        report = Renewer(rsa, challenges).renew()
    assert [o.status for o in report.outcomes] == ["renewed"], report.outcomes
    assert _key_digest(cert.key) == upcoming and certs.key_type_of(cert.key.read_bytes()) == "rsa2048"


def test_dane_false_withdraws_the_records_and_keeps_the_key_while_caches_may_hold_them(
        dane_mail: tuple[Config, MailServices, ChallengeTable], pebble: Pebble, signed_bind: SignedZone,
        validating_resolver: Resolver) -> None:
    cfg, ms, challenges = dane_mail
    tlsa = f"_{ms.smtp_port}._tcp.{NAME}"
    assert [o.status for o in Renewer(cfg, challenges).renew().outcomes] == ["not-due"]
    assert len(signed_bind.query(tlsa, "TLSA")) == 2
    off = signed_bind.config(_toml(pebble, ms, validating_resolver, hooks=True, dane_on=False),
                             state_dir=cfg.state_dir, ttl=TTL)
    cert = off.certificates[0]
    key = _key_digest(cert.key)
    lines: list[str] = []
    assert [o.status for o in Renewer(off, challenges).renew(progress=lines.append).outcomes] == ["not-due"]
    assert signed_bind.query(tlsa, "TLSA") == []
    assert not next_key_path(cert).exists()
    state = dane.load_state(off.state_dir, NAME)
    assert state.withdrawn is not None and state.names == (tlsa,)
    # A renewal now keeps the key out of the way of caches that still hold the records.
    (outcome,) = Renewer(off, challenges).renew(force=True).outcomes
    assert outcome.status == "not-due" and "may still be cached" in outcome.detail, outcome
    assert _key_digest(cert.key) == key
    after = dane.key_change_allowed_after(state, TTL)
    assert after is not None and outcome.next_renewal == after
    _wait_for(lambda: datetime.now(UTC) >= after, 4 * TTL + 5, "the withdrawn records to expire from caches")
    with serving(off, challenges):
        report = Renewer(off, challenges).renew(force=True)
    assert [o.status for o in report.outcomes] == ["renewed"], report.outcomes
    assert _key_digest(cert.key) != key
    assert dane.load_state(off.state_dir, NAME) == dane.DaneState(NAME)  # nothing left to guard
