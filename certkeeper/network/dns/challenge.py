"""DNS-01 (RFC 8555 8.4) through the configured DNS backend.

``Dns01Records.publish`` puts every validation value of an order into
``_acme-challenge.NAME`` TXT record sets (a wildcard and its base name share
one name, so one set holds both values), and returns only once every
authoritative server answers them (``propagation.wait_until_visible``): the CA
is asked to look after that, never before. ``remove`` deletes them again and
waits until they are gone; a failure there is logged, not raised (the
certificate is already issued; the next order replaces the set anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from certkeeper.core.config import Config
from certkeeper.core.errors import CertkeeperError
from certkeeper.network.dns import Backend, RecordSet
from certkeeper.network.dns.propagation import wait_until_absent, wait_until_visible

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
PREFIX = "_acme-challenge."


def record_name(identifier: str) -> str:
    """RFC 8555 8.4: ``_acme-challenge.`` + the identifier without a wildcard label."""
    return PREFIX + identifier.removeprefix("*.").rstrip(".").lower()


class Dns01Records:
    def __init__(self, config: Config, backend: Backend) -> None:
        self.config = config
        self.backend = backend

    def publish(self, values: dict[str, list[str]], progress: Progress) -> None:
        """``values``: record name → the key authorisation digests to publish there."""
        sets = [RecordSet(name, "TXT", tuple(vals), self.config.dns.ttl) for name, vals in values.items()]
        for rrset in sets:
            log.info("dns-01: publishing %s TXT", rrset.name)
            self.backend.publish(rrset)
        for rrset in sets:
            wait_until_visible(self.config, rrset, progress)

    def remove(self, names: list[str], progress: Progress) -> None:
        for name in names:
            try:
                self.backend.remove(name, "TXT")
                wait_until_absent(self.config, name, "TXT", progress)
            except CertkeeperError as exc:
                log.warning("dns-01: could not remove %s TXT: %s", name, exc)
