"""DANE on the network side: publish the TLSA records of the current and the next key, measure
since when every authoritative server answers them, and check an issued certificate against them.

The keeper owns the keys and hands out only their SPKI digests (``Keeper.dane_keys``). Records
go through the configured DNS backend at ``_PORT._tcp.HOST`` for every DNS name of the
certificate; ``certkeeper.core.dane`` decides when the next key may be used (2 x TTL after its
record was first seen on every authoritative server, RFC 7671 8.1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from certkeeper.core import dane
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import CertkeeperError, DNSError, ServiceError
from certkeeper.network.dns import Backend, RecordSet, backend_for, propagation
from certkeeper.network.keeper_client import Keeper

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KeyPlan:
    current: str  # SPKI digest of the key in use ("" before the first certificate)
    next: str  # SPKI digest of the next key
    visible: bool  # every record is answered by every authoritative server now
    usable_at: datetime | None  # when the next key may be used (None: not seen yet)
    use_next: bool  # this renewal may take the next key
    new_type: bool = False  # the key on disk is not of the configured key_type


def ttl(config: Config) -> int:
    return config.dane.ttl or config.dns.ttl


def record_sets(config: Config, cert: CertificateConfig, values: tuple[str, ...]) -> list[RecordSet]:
    return [RecordSet(name, "TLSA", values, ttl(config)) for name in dane.tlsa_names(config.dane.ports, cert.domains)]


class Dane:
    """The TLSA records of the dane certificates, from the network worker."""

    def __init__(self, config: Config, keeper: Keeper, progress: Progress,
                 backend: Backend | None = None) -> None:
        self.config = config
        self.keeper = keeper
        self.progress = progress
        self.backend = backend or backend_for(config, progress, keeper)

    def maintain(self, cert: CertificateConfig, now: datetime, want_change: bool) -> KeyPlan:
        """Publish current + next (+ retiring) records, note when they are seen, decide the key."""
        current, next_digest = self.keeper.dane_keys(cert.name)
        state = dane.load_state(self.config.state_dir, cert.name)
        values = dane.wanted_values(current, next_digest, dane.still_retiring(state, now), self.config.dane.usage)
        names = dane.tlsa_names(self.config.dane.ports, cert.domains)
        for gone in (n for n in state.names if n not in names):  # a port or name no longer configured
            self._withdraw(gone)
        state.names, state.withdrawn = names, None
        visible = self._publish(cert, values)
        state.dns, state.checked = (values if visible else ()), now
        if visible:
            dane.seen(state, next_digest, now)
        else:
            dane.not_seen(state, next_digest)
        dane.save_state(self.config.state_dir, state)
        usable_at = dane.next_key_usable_at(state, next_digest, ttl(self.config))
        use_next = (not current) or (want_change and dane.may_switch(state, next_digest, ttl(self.config), now))
        return KeyPlan(current, next_digest, visible, usable_at, use_next)

    def _publish(self, cert: CertificateConfig, values: tuple[str, ...]) -> bool:
        visible = True
        for rrset in record_sets(self.config, cert, values):
            try:
                if propagation.visible_everywhere(self.config, rrset):
                    continue
            except CertkeeperError:
                pass
            self.backend.publish(rrset)
            try:
                propagation.wait_until_visible(self.config, rrset, self.progress)
            except DNSError as exc:
                self.progress(f"{cert.name}: TLSA {rrset.name}: not yet on every server: {exc}")
                visible = False
        return visible

    def withdraw(self, cert: CertificateConfig, now: datetime) -> bool:
        """``dane = false``: remove the records published for ``cert``; True once every server has none.
        The key then stays until caches have forgotten them (``key_change_allowed_after``)."""
        state = dane.load_state(self.config.state_dir, cert.name)
        if not state.names or state.withdrawn is not None:
            return True
        for name in state.names:
            self._withdraw(name)
        state.withdrawn, state.dns, state.next_digest, state.next_seen, state.retired = now, (), "", None, {}
        dane.save_state(self.config.state_dir, state)
        self.progress(f"{cert.name}: dane is off: TLSA records withdrawn from {', '.join(state.names)}; the key "
                      f"stays until {dane.key_change_allowed_after(state, ttl(self.config)):%Y-%m-%d %H:%M:%S} UTC")
        return True

    def _withdraw(self, name: str) -> None:
        self.backend.remove(name, "TLSA")
        propagation.wait_until_absent(self.config, name, "TLSA", self.progress)

    def switched(self, cert: CertificateConfig, old: str, now: datetime) -> None:
        """After the next key became the current one: keep the old record one TTL more, and publish a
        new next key."""
        state = dane.load_state(self.config.state_dir, cert.name)
        dane.retire(state, old, ttl(self.config), now)
        dane.save_state(self.config.state_dir, state)
        plan = self.maintain(cert, now, want_change=False)
        self.progress(f"{cert.name}: new next key {plan.next[:16]}… published; the old key's TLSA record "
                      f"stays for one TTL ({ttl(self.config)} s)")

    def check_before_install(self, cert: CertificateConfig, fullchain: bytes) -> None:
        """ServiceError unless every authoritative server publishes, at every TLSA name of the
        certificate, a record that matches the key of ``fullchain``."""
        digest = dane.spki_digest(fullchain.split(b"-----END CERTIFICATE-----", 1)[0]
                                  + b"-----END CERTIFICATE-----\n")
        for name in dane.tlsa_names(self.config.dane.ports, cert.domains):
            zone = propagation.zone_of(self.config, name)
            for server in propagation.authoritative_servers(self.config, zone):
                answer = propagation.query(server, name, "TLSA")
                if not dane.matches(answer.values, digest):
                    raise ServiceError(f"{cert.name}: not installed: no TLSA record at {name} on {server.label} "
                                       f"matches the new key ({digest[:16]}…); the old set stays")


# ---------------------------------------------------------------------------
# `certkeeper dns` and `dns --check`.

# How `dns --check` starts TLS on a port: STARTTLS for SMTP submission and relay (and any port it
# does not know: DANE is for SMTP, RFC 7672), implicit TLS where that is the port's convention.
PORT_SCHEMES = {465: "smtps", 993: "imaps", 143: "imap+starttls", 443: "https", 25: "smtp+starttls",
                587: "smtp+starttls"}


def dane_certificates(config: Config, domain: str = "") -> list[CertificateConfig]:
    return [c for c in config.certificates if c.dane
            and (not domain or any(d == domain or d.endswith("." + domain) for d in c.domains))]


def render(config: Config, digests: dict[str, tuple[str, str]], now: datetime) -> str:
    """BIND lines of every dane certificate's TLSA records (``digests``: name -> (current, next))."""
    lines = ["; DANE (RFC 7672): TLSA 3 1 1 of the current and the next key; certkeeper publishes these"]
    for cert in config.certificates:
        if cert.name not in digests:
            continue
        current, next_digest = digests[cert.name]
        if not current or not next_digest:
            lines.append(f"; {cert.name}: no {'certificate' if not current else 'next key'} yet; "
                         "the next renewal check makes it and publishes its record")
        retiring = dane.still_retiring(dane.load_state(config.state_dir, cert.name), now)
        values = dane.wanted_values(current, next_digest, retiring, config.dane.usage)
        if not values:
            continue
        notes = {dane.value_for_digest(d, config.dane.usage): why for d, why in
                 ((current, "current key"), (next_digest, "next key"), *((r, "retiring") for r in retiring)) if d}
        for rrset in record_sets(config, cert, values):
            for line, value in zip(rrset.to_bind().splitlines(), rrset.values, strict=True):
                lines.append(f"{line}  ; {notes.get(value, '')}")
    return "\n".join(lines) + "\n"


def validated(server: str, name: str, rtype: str = "TLSA") -> tuple[tuple[str, ...], bool, str]:
    """Ask a DNSSEC-validating resolver: (values, AD bit set, error or "")."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    from certkeeper.network.dns import from_rdata, split_host_port

    host, port = split_host_port(server)
    message = dns.message.make_query(name.rstrip(".") + ".", rtype, want_dnssec=True)
    message.flags |= dns.flags.AD | dns.flags.RD  # RFC 6840 5.7: ask for the AD bit
    try:
        response, _ = dns.query.udp_with_fallback(message, host, port=port, timeout=propagation.QUERY_TIMEOUT)
    except (OSError, dns.exception.DNSException) as exc:
        return (), False, f"no answer from {server} ({' '.join(str(exc).split()) or type(exc).__name__})"
    status = dns.rcode.to_text(response.rcode())
    if status not in ("NOERROR", "NXDOMAIN"):
        return (), False, f"{status} from {server} (a bogus signature fails validation this way)"
    kind = dns.rdatatype.from_text(rtype)
    values = tuple(sorted(from_rdata(r) for rrset in response.answer if rrset.rdtype == kind for r in rrset))
    return values, bool(response.flags & dns.flags.AD), ""


def check_rows(config: Config, keeper: Keeper, domain: str) -> list[Any]:
    """``dns --check`` rows for the dane certificates of ``domain``: each TLSA RRset through the validating
    resolver (no AD bit: "not validated"), then the key each port presents against what DNS has."""
    from certkeeper.network import verification
    from certkeeper.network.records import Row

    resolver = config.dane.resolver or config.dns.resolver
    rows: list[Row] = []
    for cert in dane_certificates(config, domain):
        current, next_digest = keeper.dane_keys(cert.name)
        want = dane.wanted_values(current, next_digest, (), config.dane.usage)
        found: dict[str, tuple[str, ...]] = {}
        for name in dane.tlsa_names(config.dane.ports, cert.domains):
            label = f"{name} TLSA"
            if not resolver:
                rows.append(Row(label, ", ".join(want), "no validating resolver: set [dane] resolver", "missing"))
                continue
            values, ad, error = validated(resolver, name)
            shown = ", ".join(values) or error or "-"
            if not values:
                rows.append(Row(label, ", ".join(want), shown, "missing"))
            elif not ad:
                rows.append(Row(label, ", ".join(want), shown, "not validated"))
            else:
                found[name] = values
                complete = all(dane.matches(values, d) for d in (current, next_digest) if d)
                rows.append(Row(label, ", ".join(want), shown, "ok" if complete else "wrong"))
        for port in config.dane.ports:
            for host in (d for d in cert.domains if not d.startswith("*.")):
                name = f"_{port}._tcp.{host}"
                address = config.dane.check_address or host
                url = f"{PORT_SCHEMES.get(port, 'smtp+starttls')}://{address}:{port}"
                label = f"{host} port {port} key"
                try:
                    der = verification.served_leaf(url, host)
                except (OSError, ValueError, verification.ProbeError) as exc:
                    rows.append(Row(label, "a key named by TLSA", f"no TLS ({exc})", "missing"))
                    continue
                digest = dane.spki_digest(_spki_of_der(der))
                ok = dane.matches(found.get(name, ()), digest)
                rows.append(Row(label, "a key named by validated TLSA", f"3 1 1 {digest}",
                                "ok" if ok else "wrong"))
    return rows


def _spki_of_der(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
