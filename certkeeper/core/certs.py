"""Pure helpers on keys and certificates: generate, parse, compare. No I/O.

Everything here works on PEM bytes and returns plain values, so the rest of
certkeeper never touches ``cryptography`` objects directly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from certkeeper.core.errors import LocalError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----\r?\n?", re.S)


@dataclass(frozen=True)
class CertInfo:
    """What certkeeper needs to know about a leaf certificate."""

    serial: int
    not_before: datetime  # aware, UTC
    not_after: datetime  # aware, UTC
    domains: tuple[str, ...]  # DNS SANs (lower case)
    fingerprint: str  # SHA-256 of the DER, hex
    issuer: str

    @property
    def lifetime_seconds(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def covers(self, domains: tuple[str, ...] | list[str]) -> bool:
        return set(d.lower() for d in domains) <= set(self.domains)


def generate_key(key_type: str) -> bytes:
    """A new private key in PKCS#8 PEM (unencrypted; the file mode protects it)."""
    key: PrivateKey
    if key_type.startswith("rsa"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    elif key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes, where: str = "key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise LocalError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise LocalError(f"{where}: unsupported key algorithm {type(key).__name__}")
    return key


def key_type_of(pem: bytes) -> str:
    """The config name of a key's type ("rsa2048", "ecdsa-p256", ...)."""
    key = load_private_key(pem)
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name, key.curve.name)
    return "ed25519"


def make_csr(key_pem: bytes, domains: tuple[str, ...] | list[str]) -> bytes:
    """A CSR for ``domains`` (first one is the common name; all are SANs)."""
    key = load_private_key(key_pem)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def split_pem_chain(fullchain: bytes) -> tuple[bytes, bytes]:
    """(leaf, rest of the chain) from a PEM bundle, each normalised to end in a newline."""
    blocks = [b.strip() + b"\n" for b in PEM_CERT.findall(fullchain)]
    if not blocks:
        raise ValueError("no PEM certificate found")
    return blocks[0], b"".join(blocks[1:])


def parse_cert(pem: bytes) -> CertInfo:
    cert = x509.load_pem_x509_certificate(pem)
    return info_of(cert)


def parse_der(der: bytes) -> CertInfo:
    return info_of(x509.load_der_x509_certificate(der))


def info_of(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        domains = tuple(d.lower() for d in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        domains = ()
    return CertInfo(
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        domains=domains,
        fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        issuer=cert.issuer.rfc4514_string(),
    )


def public_key_der(pem: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of a private key or a certificate (PEM)."""
    if b"CERTIFICATE" in pem.split(b"\n", 1)[0]:
        public = x509.load_pem_x509_certificate(pem).public_key()
    else:
        public = load_private_key(pem).public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    try:
        return public_key_der(key_pem) == public_key_der(cert_pem)
    except (ValueError, LocalError):
        return False
