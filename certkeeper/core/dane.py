"""DANE for SMTP (RFC 6698, RFC 7671, RFC 7672): TLSA records and when a key may change.

Pure functions and the small per-certificate state; no network, no key files:

- ``tlsa_value(spki_der, usage)``: the rdata of a TLSA record in presentation format
  (``3 1 1 <hex>``: DANE-EE, SubjectPublicKeyInfo, SHA-256);
- ``spki_of(pem)``: the DER SubjectPublicKeyInfo of a private key, a certificate or a public key;
- ``tlsa_names(ports, hosts)``: ``_PORT._tcp.HOST`` for each port and DNS name (RFC 6698 3);
- ``DaneState``: per certificate, the next key's digest and since when its TLSA record has been
  seen on every authoritative server; the digests kept published until a time has passed;
- ``next_key_usable_at(state, ttl)`` / ``may_switch``: RFC 7671 8.1 — a new key may be used only
  once its TLSA record has been visible for at least twice the record's TTL (caches everywhere
  then hold it). The state lives in ``STATE/dane/NAME.json`` (the network worker's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certkeeper.core.files import write_json_atomic

# "3 1 1": DANE-EE(3), SPKI(1), SHA-256(1) — the leaf's own key, the recommended record for SMTP
# (RFC 7672 3.1.1). "2 1 1": DANE-TA(2) — the issuing CA's key: survives our key changes, but breaks
# the day the CA signs with another intermediate (Let's Encrypt rotates them without notice).
USAGES = ("3 1 1", "2 1 1")
SELECTOR_SPKI = 1
MATCHING_SHA256 = 1


def spki_of(pem: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of the first key or certificate in ``pem``; ValueError otherwise."""
    public: Any
    if b"CERTIFICATE-----" in pem:
        public = x509.load_pem_x509_certificate(pem).public_key()
    elif b"PUBLIC KEY-----" in pem and b"PRIVATE" not in pem:
        public = serialization.load_pem_public_key(pem)
    else:
        public = serialization.load_pem_private_key(pem, password=None).public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_type(cert_pem: bytes) -> str:
    """The config name of a certificate's key type ("rsa2048", "ecdsa-p256", ...); "" if unknown."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        return ""
    if isinstance(public, rsa.RSAPublicKey):
        return f"rsa{public.key_size}"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(public.curve.name, public.curve.name)
    return ""


def spki_digest(pem_or_der: bytes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo, lower-case hex (the data of a ``x 1 1`` record)."""
    der = pem_or_der if not pem_or_der.lstrip().startswith(b"-----") else spki_of(pem_or_der)
    return hashlib.sha256(der).hexdigest()


def tlsa_value(spki_der: bytes, usage: str = "3 1 1") -> str:
    """The TLSA rdata for a key: ``USAGE SELECTOR MATCHING HEX`` (RFC 6698 2.2)."""
    if usage not in USAGES:
        raise ValueError(f"{usage!r} is not a supported TLSA usage ({', '.join(USAGES)})")
    return f"{usage} {hashlib.sha256(spki_der).hexdigest()}"


def value_for_digest(digest: str, usage: str = "3 1 1") -> str:
    if usage not in USAGES:
        raise ValueError(f"{usage!r} is not a supported TLSA usage ({', '.join(USAGES)})")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{digest!r} is not a SHA-256 digest in hex")
    return f"{usage} {digest}"


def digest_of_value(value: str) -> str:
    """The hex digest of a ``x 1 1`` TLSA value as a server answers it ("" for other kinds)."""
    parts = value.split()
    if len(parts) < 4 or parts[1:3] != ["1", "1"]:
        return ""
    return "".join(parts[3:]).lower()


def tlsa_names(ports: tuple[int, ...], hosts: tuple[str, ...]) -> tuple[str, ...]:
    """``_PORT._tcp.HOST`` for each port and host; wildcard names have no TLSA owner of their own."""
    names = [f"_{port}._tcp.{host.rstrip('.').lower()}" for host in hosts if not host.startswith("*.")
             for port in ports]
    return tuple(dict.fromkeys(names))


def matches(values: list[str] | tuple[str, ...], digest: str) -> bool:
    """True when one of the published TLSA ``values`` names the key with this SPKI digest."""
    return any(digest_of_value(v) == digest.lower() for v in values)


# ---------------------------------------------------------------------------
# When the next key may be used.


@dataclass
class DaneState:
    name: str
    next_digest: str = ""  # the next key's SPKI digest whose visibility is being measured
    next_seen: datetime | None = None  # first time every authoritative server answered its record
    retired: dict[str, str] = field(default_factory=dict)  # digest -> ISO time it may be withdrawn
    dns: tuple[str, ...] = ()  # the TLSA values every authoritative server answered at the last check
    checked: datetime | None = None  # that check
    names: tuple[str, ...] = ()  # the TLSA names published (withdrawn when dane is set to false)
    withdrawn: datetime | None = None  # when every server stopped answering them (dane = false)


def key_change_allowed_after(state: DaneState, ttl: int) -> datetime | None:
    """After a withdrawal, the key may change only once caches have forgotten the records (2 x TTL)."""
    return state.withdrawn + timedelta(seconds=2 * ttl) if state.withdrawn else None


def next_key_usable_at(state: DaneState, digest: str, ttl: int) -> datetime | None:
    """When the next key (``digest``) may be used: 2 x TTL after its record was seen everywhere."""
    if not digest or state.next_digest != digest or state.next_seen is None:
        return None
    return state.next_seen + timedelta(seconds=2 * ttl)


def may_switch(state: DaneState, digest: str, ttl: int, now: datetime) -> bool:
    usable = next_key_usable_at(state, digest, ttl)
    return usable is not None and now >= usable


def seen(state: DaneState, digest: str, now: datetime) -> None:
    """Record that the next key's record is visible everywhere now (the first time counts)."""
    if state.next_digest != digest:
        state.next_digest, state.next_seen = digest, now
    elif state.next_seen is None:
        state.next_seen = now


def not_seen(state: DaneState, digest: str) -> None:
    """The record was not (or no longer) visible everywhere: measuring starts again."""
    state.next_digest, state.next_seen = digest, None


def retire(state: DaneState, digest: str, ttl: int, now: datetime) -> None:
    """Keep ``digest`` published for one more TTL after the key stopped being served."""
    if digest:
        state.retired[digest] = (now + timedelta(seconds=ttl)).isoformat()


def still_retiring(state: DaneState, now: datetime) -> tuple[str, ...]:
    """Retired digests whose records must stay; the others are dropped from the state."""
    keep = {d: t for d, t in state.retired.items() if datetime.fromisoformat(t) > now}
    state.retired = keep
    return tuple(sorted(keep))


def wanted_values(current: str, next_digest: str, retiring: tuple[str, ...], usage: str) -> tuple[str, ...]:
    """The TLSA RRset to publish: the current key, the next key, and keys still retiring."""
    digests = [d for d in (current, next_digest, *retiring) if d]
    return tuple(dict.fromkeys(value_for_digest(d, usage) for d in digests))


def _path(state_dir: Path, name: str) -> Path:
    return state_dir / "dane" / f"{name}.json"


def load_state(state_dir: Path, name: str) -> DaneState:
    try:
        raw: dict[str, Any] = json.loads(_path(state_dir, name).read_text())
        return DaneState(name=name, next_digest=str(raw.get("next_digest", "")),
                         next_seen=datetime.fromisoformat(raw["next_seen"]) if raw.get("next_seen") else None,
                         retired={str(k): str(v) for k, v in dict(raw.get("retired", {})).items()},
                         dns=tuple(str(v) for v in raw.get("dns", ())),
                         checked=datetime.fromisoformat(raw["checked"]) if raw.get("checked") else None,
                         names=tuple(str(v) for v in raw.get("names", ())),
                         withdrawn=datetime.fromisoformat(raw["withdrawn"]) if raw.get("withdrawn") else None)
    except (OSError, ValueError, TypeError, AttributeError):
        return DaneState(name=name)


def save_state(state_dir: Path, state: DaneState) -> None:
    write_json_atomic(_path(state_dir, state.name), {
        "next_digest": state.next_digest,
        "next_seen": state.next_seen.isoformat() if state.next_seen else None,
        "retired": state.retired,
        "dns": list(state.dns),
        "checked": state.checked.isoformat() if state.checked else None,
        "names": list(state.names),
        "withdrawn": state.withdrawn.isoformat() if state.withdrawn else None,
    })
