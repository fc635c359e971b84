"""The zonefile backend: certkeeper's records in a BIND-format include file, then a reload.

Owns one file, ``[dns] zonefile``, which the operator ``$INCLUDE``s from the zone
(``$INCLUDE "/var/nsd/zones/certkeeper.inc"``). certkeeper rewrites the whole file
on each change, atomically (temp file in the same directory, mode set before
the data, fsync, rename, fsync the directory), with absolute names and explicit
TTLs so it means the same wherever it is included. Then it runs
``[dns] reload_command`` (``rndc reload ZONE``, ``nsd-control reload ZONE``)
without a shell. If the zone has secondaries, the reload command must also bump
the SOA serial (or the server must do it), or they will not transfer the change.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.name
import dns.rrset
import dns.zone

from certkeeper.core.config import DnsConfig
from certkeeper.core.errors import DNSError, LocalError
from certkeeper.core.files import inherited_umask, write_atomic
from certkeeper.network.dns import Backend, RecordSet, check_in_zone, file_lock, record_set_from_rrset, sorted_sets

log = logging.getLogger(__name__)

RELOAD_TIMEOUT = 60.0
HEADER = "; Written by certkeeper: every change here is overwritten. Include it from the zone file.\n"


class ZonefileBackend(Backend):
    name = "zonefile"

    def __init__(self, config: DnsConfig) -> None:
        assert config.zonefile is not None  # config.py requires it with this backend
        self.config = config
        self.path: Path = config.zonefile

    def publish(self, rrset: RecordSet) -> None:
        check_in_zone(rrset.name, self.config.zone)
        with file_lock(self.path):
            current = {(s.name, s.rtype): s for s in self.list()}
            if current.get((rrset.name, rrset.rtype)) == rrset:
                return  # idempotent: nothing to write or reload
            current[(rrset.name, rrset.rtype)] = rrset
            self._write(current.values())
            self._reload()

    def remove(self, name: str, rtype: str) -> None:
        check_in_zone(name, self.config.zone)
        with file_lock(self.path):
            current = {(s.name, s.rtype): s for s in self.list()}
            if current.pop((name.rstrip(".").lower(), rtype.upper()), None) is None:
                return
            self._write(current.values())
            self._reload()

    def list(self) -> list[RecordSet]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LocalError(f"{self.path}: cannot read ([dns] zonefile): {exc.strerror}") from None
        return parse_include(text, str(self.path))

    # -- internals -------------------------------------------------------------------

    def _write(self, sets: Iterable[RecordSet]) -> None:
        body = HEADER + "".join(s.to_bind() + "\n" for s in sorted_sets(sets))
        write_text_atomic(self.path, body)
        log.info("zonefile: wrote %s", self.path)

    def _reload(self) -> None:
        command = list(self.config.reload_command)
        if not command:
            log.info("zonefile: no [dns] reload_command; the DNS server must notice %s by itself", self.path)
            return
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RELOAD_TIMEOUT, check=False,
                                  stdin=subprocess.DEVNULL, umask=inherited_umask())
        except FileNotFoundError:
            raise LocalError(f"[dns] reload_command: {command[0]!r} not found") from None
        except subprocess.TimeoutExpired:
            raise DNSError(f"[dns] reload_command {' '.join(command)!r} did not finish in {RELOAD_TIMEOUT:g}s") \
                from None
        if done.returncode != 0:
            said = " ".join((done.stderr or done.stdout).split())[:200]
            raise DNSError(f"[dns] reload_command {' '.join(command)!r} exited with {done.returncode}: {said}")


def parse_include(text: str, where: str = "<zonefile>") -> list[RecordSet]:
    """The record sets of a BIND-format include file (absolute names, as ``render`` writes them)."""
    try:
        zone = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    except (dns.exception.DNSException, ValueError) as exc:
        raise LocalError(f"{where}: not a valid zone file fragment: {' '.join(str(exc).split())}") from None
    sets = []
    for name, rdataset in zone.iterate_rdatasets():
        rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
        rrset.update(rdataset)
        sets.append(record_set_from_rrset(rrset))
    return sorted_sets(sets)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Temp file beside ``path`` with its final mode before any data, fsync, rename, fsync dir.
    The mode defaults to the current file's, or 0644 (a zone file is public data)."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    write_atomic(path, text.encode(), mode)

