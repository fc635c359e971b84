"""The manual backend: tell the operator exactly which records to add or delete.

For providers with only a web form (the guide's Vultr set-up). ``publish`` and
``remove`` print the change in BIND format through the ``progress`` callback
and return; the caller then waits in ``propagation.wait_until_visible`` (or
``wait_until_absent``) until every authoritative server answers it, so a
typo in the web form shows up as a server that "answers something else".
What was asked for is remembered in ``STATE/dns/manual.json`` so ``list()``
can say which records certkeeper expects to exist.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from certkeeper.core.config import Config
from certkeeper.core.errors import LocalError
from certkeeper.core.state import write_json_atomic
from certkeeper.network.dns import Backend, Progress, RecordSet, check_in_zone, file_lock, sorted_sets

log = logging.getLogger(__name__)


class ManualBackend(Backend):
    name = "manual"

    def __init__(self, config: Config, progress: Progress) -> None:
        self.zone = config.dns.zone
        self.progress = progress
        self.path: Path = config.state_dir / "dns" / "manual.json"

    def publish(self, rrset: RecordSet) -> None:
        check_in_zone(rrset.name, self.zone)
        self.progress(f"manual DNS: at your DNS provider, set {rrset.name} {rrset.rtype} to exactly "
                      f"(delete any other {rrset.rtype} record of that name):")
        for line in rrset.to_bind().splitlines():
            self.progress(f"    {line}")
        self.progress("certkeeper will check the authoritative servers until they answer it")
        with file_lock(self.path):
            sets = {(s.name, s.rtype): s for s in self.list()}
            sets[(rrset.name, rrset.rtype)] = rrset
            self._save(sets.values())

    def remove(self, name: str, rtype: str) -> None:
        check_in_zone(name, self.zone)
        name, rtype = name.rstrip(".").lower(), rtype.upper()
        self.progress(f"manual DNS: at your DNS provider, delete every {rtype} record of {name}.")
        self.progress("certkeeper will check the authoritative servers until it is gone")
        with file_lock(self.path):
            self._save([s for s in self.list() if (s.name, s.rtype) != (name, rtype)])

    def list(self) -> list[RecordSet]:
        try:
            items = json.loads(self.path.read_text())
            return sorted_sets(RecordSet(i["name"], i["rtype"], tuple(i["values"]), int(i["ttl"])) for i in items)
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LocalError(f"{self.path}: unreadable ({exc}); remove it and publish again") from None

    def _save(self, sets: Iterable[RecordSet]) -> None:
        data = [{"name": s.name, "rtype": s.rtype, "values": list(s.values), "ttl": s.ttl}
                for s in sorted_sets(sets)]
        try:
            write_json_atomic(self.path, data, mode=0o644)
        except OSError as exc:
            raise LocalError(f"{self.path}: cannot write: {exc.strerror}") from None
