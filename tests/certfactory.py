"""Make keys and certificates for unit tests (a throwaway CA; no network)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certkeeper.core import certs
from certkeeper.keeper.store import CertificateSet

_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])


def make_set(domains: tuple[str, ...] = ("mail.example.com",), not_before: dt.datetime | None = None,
             days: float = 90, key_type: str = "ecdsa-p256", key_pem: bytes | None = None) -> CertificateSet:
    """A certificate set for ``domains`` valid ``days`` from ``not_before``, signed by a throwaway CA."""
    not_before = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    key_pem = key_pem or certs.generate_key(key_type)
    key = certs.load_private_key(key_pem)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
        .issuer_name(_CA_NAME).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(_CA_KEY.public_key()), critical=False)
        .sign(_CA_KEY, hashes.SHA256())
    )
    chain = (
        x509.CertificateBuilder().subject_name(_CA_NAME).issuer_name(_CA_NAME).public_key(_CA_KEY.public_key())
        .serial_number(1).not_valid_before(not_before).not_valid_after(not_before + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(_CA_KEY, hashes.SHA256())
    )
    return CertificateSet(key=key_pem, cert=leaf.public_bytes(serialization.Encoding.PEM),
                          chain=chain.public_bytes(serialization.Encoding.PEM))
