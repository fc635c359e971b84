"""DNS records certkeeper owns: one value type, one backend interface, one factory.

This package is the only place that talks DNS. It owns:

- ``RecordSet``: one name + type with all its values (an RRset, RFC 2181 5);
- ``Backend``: the three operations every backend offers (publish, remove, list);
- ``backend_for(config)``: the backend chosen by ``[dns] backend``;
- TXT splitting: a TXT value is carried whole; on the wire it becomes
  character-strings of at most 255 bytes (RFC 1035 3.3.14) that are compared joined;
- BIND presentation format for the records printed to an operator.

One module per backend (``rfc2136``, ``zonefile``, ``manual``); ``propagation``
waits until every authoritative server answers the new data.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from certkeeper.core.errors import DNSError, LocalError
from certkeeper.core.files import make_dirs

if TYPE_CHECKING:
    from certkeeper.core.config import Config
    from certkeeper.network.keeper_client import Keeper

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

TXT_CHUNK = 255  # RFC 1035 3.3.14: a <character-string> holds at most 255 bytes
TXT_TYPES = ("TXT", "SPF")


# ---------------------------------------------------------------------------
# The value.


@dataclass(frozen=True)
class RecordSet:
    """All records of one name and type (an RRset).

    ``name`` is absolute, lower case, without the trailing dot
    (``_mta-sts.example.com``). ``rtype`` is the upper-case type (``TXT``).
    ``values`` are the rdata in presentation format: a TXT value is the whole
    unsplit string without quotes (``v=STSv1; id=abc``); others as in a zone
    file (``10 mail.example.com.``, ``0 issue "letsencrypt.org"``), names
    absolute. Built normalized: the name lowered and stripped of its dot, values
    de-duplicated and sorted, so two equal record sets compare equal.
    """

    name: str
    rtype: str
    values: tuple[str, ...]
    ttl: int = 300

    def __post_init__(self) -> None:
        name = self.name.strip().rstrip(".").lower()
        rtype = self.rtype.strip().upper()
        if not name:
            raise ValueError("a record set needs a name")
        try:
            dns.rdatatype.from_text(rtype)
        except dns.rdatatype.UnknownRdatatype:
            raise ValueError(f"{rtype!r} is not a DNS record type") from None
        if not self.values:
            raise ValueError(f"{name} {rtype}: a record set needs at least one value (use remove to delete it)")
        if not 0 <= self.ttl <= 2**31 - 1:  # RFC 2181 8
            raise ValueError(f"{name} {rtype}: TTL {self.ttl} is out of range")
        values = tuple(sorted(set(self.values)))
        for value in values:
            to_rdata(rtype, value)  # raises ValueError on bad rdata
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "rtype", rtype)
        object.__setattr__(self, "values", values)

    def same_data(self, other: RecordSet | Iterable[str]) -> bool:
        """True when ``other`` holds exactly these values (TXT joined, names canonical); TTL ignored."""
        theirs = other.values if isinstance(other, RecordSet) else tuple(other)
        return canonical_values(self.rtype, theirs) == canonical_values(self.rtype, self.values)

    def to_bind(self) -> str:
        """The record set as zone file lines (``name. TTL IN TYPE rdata``), TXT split into strings."""
        return "\n".join(f"{self.name}. {self.ttl} IN {self.rtype} {to_rdata(self.rtype, v).to_text()}"
                         for v in self.values)

    def rdatas(self) -> list[dns.rdata.Rdata]:
        return [to_rdata(self.rtype, v) for v in self.values]


# ---------------------------------------------------------------------------
# Values <-> dnspython rdata (render and parse side by side).


def split_txt(value: str) -> tuple[bytes, ...]:
    """RFC 1035 3.3.14 / RFC 7208 3.3: split one long TXT value into <= 255-byte strings."""
    data = value.encode("utf-8")
    if not data:
        return (b"",)
    return tuple(data[i:i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK))


def join_txt(strings: Iterable[bytes]) -> str:
    """RFC 7208 3.3 / RFC 6376 3.6.2.2: the strings of one TXT record are joined without spaces."""
    return b"".join(strings).decode("utf-8", errors="replace")


def to_rdata(rtype: str, value: str) -> dns.rdata.Rdata:
    """One value in presentation format → rdata; TXT values are split, not parsed."""
    kind = dns.rdatatype.from_text(rtype)
    if rtype.upper() in TXT_TYPES:
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, kind, split_txt(value))
    try:
        return dns.rdata.from_text(dns.rdataclass.IN, kind, value, origin=dns.name.root, relativize=False)
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"{value!r} is not valid {rtype} data: {exc}") from None


def from_rdata(rdata: dns.rdata.Rdata) -> str:
    """One rdata → the value as ``RecordSet.values`` holds it (TXT joined, unquoted)."""
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT) or dns.rdatatype.to_text(rdata.rdtype) in TXT_TYPES:
        return join_txt(rdata.strings)  # type: ignore[attr-defined]
    return rdata.to_text(origin=dns.name.root, relativize=False)


def canonical_values(rtype: str, values: Iterable[str]) -> frozenset[str]:
    """Values in one canonical spelling, for comparing what we want with what a server answers."""
    if rtype.upper() in TXT_TYPES:
        return frozenset(values)
    out = set()
    for value in values:
        try:
            out.add(to_rdata(rtype, value).to_text(origin=dns.name.root, relativize=False).lower())
        except ValueError:
            out.add(value)
    return frozenset(out)


def record_set_from_rrset(rrset: dns.rrset.RRset) -> RecordSet:
    """dnspython RRset (from an answer, a transfer or a zone file) → RecordSet."""
    return RecordSet(name=rrset.name.to_text(omit_final_dot=True), rtype=dns.rdatatype.to_text(rrset.rdtype),
                     values=tuple(from_rdata(r) for r in rrset), ttl=rrset.ttl)


def in_zone(name: str, zone: str) -> bool:
    name, zone = name.rstrip(".").lower(), zone.rstrip(".").lower()
    return name == zone or name.endswith("." + zone)


def check_in_zone(name: str, zone: str) -> None:
    if zone and not in_zone(name, zone):
        raise DNSError(f"{name} is not inside the zone {zone} ([dns] zone); it cannot be published there")


# ---------------------------------------------------------------------------
# The interface.


class Backend(abc.ABC):
    """Where certkeeper's records are published. Every backend promises:

    - ``publish(rrset)`` REPLACES the whole RRset ``(rrset.name, rrset.rtype)``
      with exactly ``rrset.values`` (other names and types are untouched). It is
      idempotent: publishing the same set twice is a no-op the second time.
      It returns once the primary (or the zone file) holds the new data; it does
      NOT wait until every authoritative server answers it — call
      ``certkeeper.network.dns.propagation.wait_until_visible`` for that.
    - ``remove(name, rtype)`` deletes that RRset. Removing an RRset that does not
      exist is not an error (so retries are safe).
    - ``list()`` returns the RRsets the backend can see (rfc2136: the whole zone
      by a signed transfer; zonefile: the records in certkeeper's include file;
      manual: the records certkeeper has asked the operator to add). The order
      is sorted by (name, type). Nothing found is ``[]``, never an error.
    - A record outside ``[dns] zone`` raises ``DNSError`` before anything is sent.
    - Failures raise ``DNSError`` (the server refused, timed out, or a TSIG key
      was rejected: one line naming the server and the rcode) or ``LocalError``
      (a file could not be read or written, a reload command failed to start).
      Secrets (TSIG) never appear in a message or a log line.
    - Calls are blocking (the daemon runs them off its event loop) and safe to
      make concurrently, from threads or from the CLI beside the daemon: an RFC
      2136 update is atomic on the server; the zonefile and manual backends hold
      an exclusive lock file beside their file around each read-modify-write.
      A backend holds no state between calls other than its configuration
      (zonefile: the include file; manual: a small JSON file).
    """

    name: str = "backend"

    @abc.abstractmethod
    def publish(self, rrset: RecordSet) -> None:
        """Replace the RRset (name, rtype) with ``rrset``."""

    @abc.abstractmethod
    def remove(self, name: str, rtype: str) -> None:
        """Delete the RRset (name, rtype); absent is fine."""

    @abc.abstractmethod
    def list(self) -> list[RecordSet]:
        """The RRsets this backend sees, sorted by (name, type)."""


def backend_for(config: Config, progress: Progress | None = None, keeper: Keeper | None = None) -> Backend:
    """The backend chosen by ``[dns] backend``. ``progress`` receives lines meant for a person
    (the manual backend prints the records to add there; default: the log at warning level).
    With a ``keeper`` (the worker's pipe), the zone file is written by the keeper, which owns it."""
    kind = config.dns.backend
    if kind == "rfc2136":
        from certkeeper.network.dns.rfc2136 import Rfc2136Backend

        return Rfc2136Backend(config.dns)
    if kind == "zonefile" and keeper is not None:
        return KeeperZonefile(keeper, config)
    if kind == "zonefile":
        from certkeeper.network.dns.zonefile import ZonefileBackend

        return ZonefileBackend(config.dns)
    if kind == "manual":
        from certkeeper.network.dns.manual import ManualBackend

        return ManualBackend(config, progress or _log_progress)
    raise DNSError(f"[dns] backend {kind!r} is not supported")  # config.py rejects it first


class KeeperZonefile(Backend):
    """The zonefile backend seen from the network worker: the keeper writes the file and reloads."""

    def __init__(self, keeper: Keeper, config: Config) -> None:
        self.keeper = keeper
        self.zone = config.dns.zone

    def publish(self, rrset: RecordSet) -> None:
        check_in_zone(rrset.name, self.zone)
        self.keeper.zone_publish(rrset.name, rrset.rtype, rrset.ttl, rrset.values)

    def remove(self, name: str, rtype: str) -> None:
        check_in_zone(name, self.zone)
        self.keeper.zone_remove(name, rtype)

    def list(self) -> list[RecordSet]:
        raise LocalError("the zone file is the keeper's; list it as root")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``.NAME.lock`` beside ``path`` (threads and processes alike)."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        make_dirs(lock.parent, 0o755)  # the zone file's directory: named must read it
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalError(f"{lock}: cannot create the lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _log_progress(line: str) -> None:
    log.warning("%s", line)


def sorted_sets(sets: Iterable[RecordSet]) -> list[RecordSet]:
    return sorted(sets, key=lambda s: (s.name, s.rtype))


def split_host_port(value: str, default_port: int = 53) -> tuple[str, int]:
    """``"addr:port"`` / ``"[v6]:port"`` / ``"host"`` → (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port)
    return value, default_port
