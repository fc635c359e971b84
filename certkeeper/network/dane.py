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
        visible = self._publish(cert, values)
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
