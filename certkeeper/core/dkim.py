"""DKIM keys, selectors and key records. Pure: no files, no DNS, no clock.

This module owns what a DKIM key *is*: generating one per configured algorithm,
writing and reading its private key in the formats the signers load, naming
its selector, and the DNS key record (RFC 6376 3.6.1) rendered and parsed side
by side. The lifecycle (when a key is published, used, revoked) lives in
``certkeeper.network.rotation``; the signer configuration in ``certkeeper.keeper.signers``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

DkimPrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Config name → (k= key type, RSA modulus bits). RFC 8301 3.2: RSA keys are at least 1024 bits, 2048 recommended.
ALGORITHMS: dict[str, tuple[str, int]] = {
    "rsa2048": ("rsa", 2048),
    "rsa3072": ("rsa", 3072),
    "rsa4096": ("rsa", 4096),
    "ed25519": ("ed25519", 0),
}
# The a= tag a signer puts in DKIM-Signature for each key type (RFC 8301 3.1, RFC 8463 3).
SIGNATURE_ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}

ED25519_KEY_BYTES = 32  # RFC 8463 4.2: p= is the raw 32-byte public key
MAX_LABEL = 63  # RFC 1035 2.3.4
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 6376 3.2: tag-name = ALPHA *ALNUMPUNC
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------
# Private keys.


def generate_private_key(algorithm: str) -> DkimPrivateKey:
    """A new key for a config algorithm name ("rsa2048", ..., "ed25519")."""
    key_type, bits = ALGORITHMS[algorithm]
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return ed25519.Ed25519PrivateKey.generate()


def private_key_file(key: DkimPrivateKey, raw_ed25519: bool = False) -> bytes:
    """The key file a signer loads.

    RSA: PKCS#1 PEM (``openssl genrsa``'s classic output; rspamd, filter-dkimsign
    and dkimpy all read it). Ed25519: PKCS#8 PEM (filter-dkimsign reads it with
    OpenSSL), or with ``raw_ed25519`` one base64 line of the 64-byte seed+public
    key, the form ``rspamadm dkim_keygen -t ed25519`` writes and rspamd loads.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    if raw_ed25519:
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return base64.b64encode(seed + _raw_public(key)) + b"\n"
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(data: bytes) -> DkimPrivateKey:
    """Read any form ``private_key_file`` writes; ValueError when it is none of them."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise ValueError(f"{type(key).__name__} is not a DKIM key type (RSA or Ed25519)")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("neither PEM nor a base64 Ed25519 key") from None
    if len(raw) not in (32, 64):  # rspamd: a 32-byte seed, or seed + public key
        raise ValueError(f"a base64 Ed25519 key holds 32 or 64 bytes, not {len(raw)}")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    if len(raw) == 64 and raw[32:] != _raw_public(key):
        raise ValueError("the Ed25519 public half does not match the seed")
    return key


def algorithm_of(key: DkimPrivateKey) -> str:
    """The config algorithm name of a key ("rsa2048", "ed25519", ...)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa{key.key_size}"
    return "ed25519"


def _raw_public(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------------------
# The key record: RFC 6376 3.6.1 (RSA), RFC 8463 4.2 (Ed25519).


@dataclass(frozen=True)
class KeyRecord:
    """A DKIM key record. ``public_key`` is the decoded p= value; empty means revoked."""

    key_type: str = "rsa"  # k=
    public_key: bytes = b""  # p=

    def __post_init__(self) -> None:
        if self.key_type not in SIGNATURE_ALGORITHMS:
            raise ValueError(f"k={_shown(self.key_type)} is not a supported key type (rsa, ed25519)")
        if not self.public_key:
            return
        if self.key_type == "ed25519" and len(self.public_key) != ED25519_KEY_BYTES:
            # RFC 8463 4.2: the raw key, not a SubjectPublicKeyInfo.
            raise ValueError(f"an Ed25519 p= holds {ED25519_KEY_BYTES} bytes, not {len(self.public_key)}")
        if self.key_type == "rsa":
            # RFC 6376 3.6.1: for k=rsa, p= is an ASN.1 DER SubjectPublicKeyInfo.
            try:
                key = serialization.load_der_public_key(self.public_key)
            except (ValueError, UnsupportedAlgorithm):
                raise ValueError("the RSA p= is not a DER SubjectPublicKeyInfo") from None
            if not isinstance(key, rsa.RSAPublicKey):
                raise ValueError("the p= of a k=rsa record is not an RSA key")

    @property
    def revoked(self) -> bool:
        return not self.public_key

    def render(self) -> str:
        """The TXT value, unsplit (a DNS backend splits it into <=255-byte strings)."""
        if self.revoked:
            return "v=DKIM1; p="  # RFC 6376 3.6.1: an empty p= means the key has been revoked
        # RFC 6376 3.6.1: v= first; p= is base64 (RFC 2045) without line breaks.
        return f"v=DKIM1; k={self.key_type}; p={base64.b64encode(self.public_key).decode('ascii')}"


REVOKED = KeyRecord()


def key_record_for(key: DkimPrivateKey) -> KeyRecord:
    """The record that publishes ``key``'s public half."""
    if isinstance(key, rsa.RSAPrivateKey):
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return KeyRecord("rsa", spki)
    return KeyRecord("ed25519", _raw_public(key))


def parse_key_record(text: str) -> KeyRecord:
    """Parse a TXT value (its strings already joined); ValueError names the first problem."""
    tags = parse_tag_list(text)
    if "v" in tags and (next(iter(tags)) != "v" or tags["v"] != "DKIM1"):
        # RFC 6376 3.6.1: v= is optional, but when present it is first and exactly "DKIM1".
        raise ValueError("v= must come first and be DKIM1")
    if "p" not in tags:
        raise ValueError("p= is required")  # RFC 6376 3.6.1
    key_type = tags.get("k", "rsa")  # RFC 6376 3.6.1: k= defaults to rsa
    if key_type not in SIGNATURE_ALGORITHMS:
        raise ValueError(f"k={_shown(key_type)} is not a supported key type")
    b64 = re.sub(r"[ \t\r\n]", "", tags["p"])  # RFC 6376 3.2: FWS may appear inside base64 values
    try:
        public_key = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise ValueError("p= is not base64") from None
    return KeyRecord(key_type, public_key)


def _shown(value: str) -> str:
    """A tag value quoted in an error: one line, at most 30 characters."""
    return " ".join(value.split())[:30]


def parse_tag_list(text: str) -> dict[str, str]:
    """RFC 6376 3.2 tag=value list, in order; a repeated tag name is an error."""
    tags: dict[str, str] = {}
    specs = text.split(";")
    if specs and not specs[-1].strip():
        specs.pop()  # tag-list = tag-spec *( ";" tag-spec ) [ ";" ]
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip(" \t\r\n")
        if not sep or not _TAG_NAME.match(name):
            raise ValueError(f"{spec.strip()[:60]!r} is not tag=value")
        if name in tags:
            raise ValueError(f"tag {name}= appears twice")  # RFC 6376 3.2: duplicate tags invalidate
        tags[name] = value.strip(" \t\r\n")
    return tags


# ---------------------------------------------------------------------------
# Names.


def record_name(selector: str, domain: str) -> str:
    """RFC 6376 3.6.2.1: the key record lives at SELECTOR._domainkey.DOMAIN."""
    return f"{selector}._domainkey.{domain}"


def key_file_name(domain: str, selector: str) -> str:
    """One file per selector, rspamd's ``$domain.$selector.key`` pattern (rspamd#2809)."""
    return f"{domain}.{selector}.key"


def selector_for(fmt: str, algorithm: str, when: datetime, taken: frozenset[str] | set[str] = frozenset()) -> str:
    """The selector for a new key: strftime of ``fmt`` with ``{alg}`` replaced.

    A selector is never reused (a cached old key must never meet a new
    signature): when the name is in ``taken``, "-2", "-3", ... is added to its
    last label, shortening the label so that it stays within 63 characters.
    """
    base = when.strftime(fmt.replace("{alg}", algorithm)).lower()
    if not all(_LABEL.match(label) for label in base.split(".")):
        raise ValueError(f"selector_format {fmt!r} makes {base!r}, which is not a valid DNS label")
    if base not in taken:
        return base
    head, dot, last = base.rpartition(".")
    for n in range(2, 10000):
        suffix = f"-{n}"
        candidate = f"{head}{dot}{last[:MAX_LABEL - len(suffix)]}{suffix}"
        if candidate not in taken:
            return candidate
    raise ValueError(f"no free selector left for {base!r}")


def reveal_name(record: KeyRecord) -> str:
    """dkim-rotate's layout for a revealed private key: hh/HEX.pem, HEX = MD5 of the decoded p=."""
    digest = hashlib.md5(record.public_key, usedforsecurity=False).hexdigest()
    return f"{digest[:2]}/{digest}.pem"
