"""certkeeper.core.dkim: keys, selectors and key records (render + parse side by side), and the
selector_format config check. Signatures are made and checked with dkimpy."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from certkeeper.core import config as ck_config
from certkeeper.core import dkim
from certkeeper.core.errors import ConfigError

WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
MESSAGE = (b"From: alice@example.test\r\nTo: bob@example.org\r\nSubject: rotation\r\n"
           b"Date: Wed, 04 Mar 2026 05:06:07 +0000\r\nMessage-ID: <1@example.test>\r\n\r\nhello\r\n")


@pytest.fixture(scope="module")
def keys() -> dict[str, dkim.DkimPrivateKey]:
    return {alg: dkim.generate_private_key(alg) for alg in dkim.ALGORITHMS}


def dkimpy_key(key: dkim.DkimPrivateKey) -> bytes:
    """What dkimpy's sign() takes: PEM for RSA, base64 of the 32-byte seed for Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return base64.b64encode(base64.b64decode(dkim.private_key_file(key, raw_ed25519=True))[:32])
    return dkim.private_key_file(key)


def sign_and_verify(key: dkim.DkimPrivateKey, record: str) -> bool:
    alg = dkim.SIGNATURE_ALGORITHMS[dkim.ALGORITHMS[dkim.algorithm_of(key)][0]].encode()
    signature = dkimpy.sign(MESSAGE, b"sel", b"example.test", dkimpy_key(key), signature_algorithm=alg)
    return bool(dkimpy.verify(signature + MESSAGE, dnsfunc=lambda name, timeout=5: record.encode()))


# -- keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(dkim.ALGORITHMS))
def test_generated_key_matches_its_algorithm_and_record_round_trips(keys, algorithm):
    key = keys[algorithm]
    assert dkim.algorithm_of(key) == algorithm
    record = dkim.key_record_for(key)
    text = record.render()
    assert dkim.parse_key_record(text) == record
    key_type, bits = dkim.ALGORITHMS[algorithm]
    assert text.startswith(f"v=DKIM1; k={key_type}; p=")
    if key_type == "rsa":
        public = serialization.load_der_public_key(record.public_key)
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == bits
    else:
        assert len(record.public_key) == 32  # RFC 8463: the raw key, not an SPKI
    assert sign_and_verify(key, text)


@pytest.mark.parametrize("raw", [False, True])
def test_key_files_load_back(keys, raw):
    for algorithm, key in keys.items():
        data = dkim.private_key_file(key, raw_ed25519=raw)
        loaded = dkim.load_private_key(data)
        assert dkim.key_record_for(loaded) == dkim.key_record_for(key), algorithm
    if raw:  # rspamd's form: one base64 line of seed + public key
        line = dkim.private_key_file(keys["ed25519"], raw_ed25519=True)
        assert len(base64.b64decode(line)) == 64 and b"-----" not in line
    assert dkim.private_key_file(keys["rsa2048"]).startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def test_bad_key_files_are_refused(keys):
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    raw = base64.b64decode(dkim.private_key_file(keys["ed25519"], raw_ed25519=True))
    other = dkim.generate_private_key("ed25519")
    mismatched = base64.b64encode(raw[:32] + dkim.key_record_for(other).public_key)
    for data in (ec_pem, b"not a key", base64.b64encode(b"x" * 40), mismatched, b"-----BEGIN PRIVATE KEY-----\nx\n"):
        with pytest.raises(ValueError):
            dkim.load_private_key(data)


# -- key records: good and bad tables (RFC 6376 3.6.1, RFC 8463) -------------------------


def test_revoked_record_renders_and_parses():
    assert dkim.REVOKED.render() == "v=DKIM1; p="
    parsed = dkim.parse_key_record("v=DKIM1; p=")
    assert parsed.revoked and parsed == dkim.REVOKED
    assert dkim.parse_key_record("v=DKIM1; k=ed25519; p=").revoked


def test_good_records(keys):
    rsa_record = dkim.key_record_for(keys["rsa2048"])
    b64 = base64.b64encode(rsa_record.public_key).decode()
    ed_b64 = base64.b64encode(dkim.key_record_for(keys["ed25519"]).public_key).decode()
    folded = " ".join(b64[i:i + 60] for i in range(0, len(b64), 60))
    good = {
        f"k=rsa; t=s; p={b64}": rsa_record,  # the guide's hand-made record: no v=
        f"p={b64}": rsa_record,  # k= defaults to rsa
        f"v=DKIM1;k=rsa;p={b64};": rsa_record,  # no spaces, trailing ';'
        f"v=DKIM1; k=rsa; p={folded}": rsa_record,  # FWS inside the base64 value
        f"v=DKIM1; h=sha256; k=ed25519; n=notes; p={ed_b64}": dkim.KeyRecord("ed25519", base64.b64decode(ed_b64)),
    }
    for text, want in good.items():
        assert dkim.parse_key_record(text) == want, text


@pytest.mark.parametrize("text, problem", [
    ("v=DKIM2; p=", "v= must"),
    ("k=rsa; v=DKIM1; p=", "v= must"),
    ("v=DKIM1; k=rsa", "p= is required"),
    ("v=DKIM1; p=; p=", "twice"),
    ("v=DKIM1; k=dsa; p=", "k=dsa"),
    ("v=DKIM1; k=rsa; p=!!!", "not base64"),
    ("v=DKIM1; k=rsa; p=" + base64.b64encode(b"not der").decode(), "SubjectPublicKeyInfo"),
    ("v=DKIM1; k=ed25519; p=" + base64.b64encode(b"x" * 33).decode(), "32 bytes"),
    ("hello", "not tag=value"),
    ("v=DKIM1; 1x=y; p=", "not tag=value"),
])
def test_bad_records(text, problem):
    with pytest.raises(ValueError, match=problem):
        dkim.parse_key_record(text)


def test_ed25519_p_must_not_be_an_spki(keys):
    spki = keys["ed25519"].public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="32 bytes"):
        dkim.KeyRecord("ed25519", spki)


def test_long_rsa_record_is_one_unsplit_value(keys):
    text = dkim.key_record_for(keys["rsa4096"]).render()
    assert len(text) > 255 and "\n" not in text and '"' not in text  # the DNS backend splits it


# -- names ---------------------------------------------------------------------------------


def test_selector_from_strftime_and_alg():
    assert dkim.selector_for("%Y%m%d", "rsa2048", WHEN) == "20260304"
    assert dkim.selector_for("%Y%m%d-{alg}", "ed25519", WHEN) == "20260304-ed25519"
    assert dkim.selector_for("{alg}.%Y", "rsa2048", WHEN) == "rsa2048.2026"
    assert dkim.record_name("20260304", "example.com") == "20260304._domainkey.example.com"
    assert dkim.key_file_name("example.com", "20260304") == "example.com.20260304.key"


def test_taken_selector_gets_a_suffix_that_stays_a_label():
    assert dkim.selector_for("%Y%m%d", "rsa2048", WHEN, {"20260304"}) == "20260304-2"
    assert dkim.selector_for("%Y%m%d", "rsa2048", WHEN, {"20260304", "20260304-2"}) == "20260304-3"
    assert dkim.selector_for("{alg}.%Y", "rsa2048", WHEN, {"rsa2048.2026"}) == "rsa2048.2026-2"
    long_fmt = "k" * 55 + "%Y%m%d"  # a 63-character label
    taken = {dkim.selector_for(long_fmt, "rsa2048", WHEN)}
    again = dkim.selector_for(long_fmt, "rsa2048", WHEN, taken)
    assert again not in taken and len(again) == 63 and again.endswith("-2")
    assert ck_config.domain_problem(f"{again}.example.com") == ""


def test_selector_that_is_no_label_is_refused():
    with pytest.raises(ValueError, match="not a valid DNS label"):
        dkim.selector_for("%Y_%m", "rsa2048", WHEN)


def test_reveal_name_follows_dkim_rotate(keys):
    record = dkim.key_record_for(keys["ed25519"])
    name = dkim.reveal_name(record)
    head, _, tail = name.partition("/")
    assert tail.startswith(head) and tail.endswith(".pem") and len(tail) == 32 + 4


# -- selector_format is checked with the configuration ------------------------------------


@pytest.mark.parametrize("fmt, algorithms", [
    ("%Y_%m_%d", '["rsa2048"]'),  # "_" is not allowed in a host label
    ("%Y%m%d..x", '["rsa2048"]'),  # an empty label
    ("-%Y%m%d", '["rsa2048"]'),  # a label cannot start with "-"
    ("%Y%m%d", '["rsa2048", "ed25519"]'),  # two keys would share one selector
])
def test_invalid_selector_format_is_a_one_line_config_error(fmt, algorithms):
    text = (f'[[dkim]]\ndomain = "example.com"\nalgorithms = {algorithms}\nselector_format = "{fmt}"\n'
            'signer = "none"\n')  # (rspamd would add its own line for two algorithms)
    with pytest.raises(ConfigError) as err:
        ck_config.parse(text, "/etc/certkeeper.toml")
    assert len(err.value.lines) == 1
    line = err.value.lines[0]
    assert line.startswith("/etc/certkeeper.toml: dkim[1].selector_format: ") and "\n" not in line
    assert fmt in line
