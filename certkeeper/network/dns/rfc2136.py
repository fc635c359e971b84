"""The rfc2136 backend: TSIG-signed dynamic updates (RFC 2136, RFC 8945) with dnspython.

Owns the update messages and the zone transfer used by ``list()``. The TSIG
secret is read from ``[dns] tsig_secret_file`` at each operation (so a replaced
file is picked up), registered with the log filter and never put in a message.
A refusal comes back as one ``DNSError`` line naming the server, the record and
the reason (REFUSED, NOTAUTH, BADKEY, BADSIG, a timeout). Each publish carries
the prerequisite "no CNAME at the name" (RFC 2136 2.4.3), since a server
silently drops other data added beside a CNAME (3.4.2.2); that case comes back
as YXRRSET. ``list()`` needs a zone transfer (``allow-transfer { key KEY; }``);
certkeeper's own publishing never calls it, it is for an operator's inspection.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update
import dns.xfr
import dns.zone

from certkeeper.core import logs, secrets
from certkeeper.core.config import DnsConfig
from certkeeper.core.errors import DNSError, LocalError
from certkeeper.network.dns import (
    Backend,
    RecordSet,
    check_in_zone,
    record_set_from_rrset,
    sorted_sets,
    split_host_port,
)

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds per update or transfer
_KEY_CLAUSE = re.compile(r'secret\s+"([^"]+)"')

# What an rcode means for the operator (RFC 2136 2.2, RFC 8945 5.3.2).
_HINTS = {
    "REFUSED": "the server refuses this update (check the zone's update-policy/allow-update for the key)",
    "NOTAUTH": "the server is not authoritative for the zone or did not accept the TSIG key",
    "NOTZONE": "the name is outside the zone",
    "SERVFAIL": "the server failed to apply the update",
    "YXRRSET": "the name has a CNAME record, so no other record can be published there (RFC 2136 3.4.2.2); "
               "remove the CNAME first",
}


def read_tsig_secret(path: Path) -> str:
    """The base64 secret in ``path``: the bare secret, or a BIND ``key { secret "..."; }`` clause
    (what ``tsig-keygen`` prints). Never logged."""
    try:
        text = secrets.read(path).decode("utf-8", errors="replace")  # handed over by the keeper in a worker
        mode = 0o600 if secrets.handed(path) else os.stat(path).st_mode  # the keeper checked it then
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the TSIG secret ([dns] tsig_secret_file): {exc.strerror}") from None
    if mode & 0o077:
        log.warning("%s: the TSIG secret file is readable by others (mode %04o); use 0600", path, mode & 0o777)
    match = _KEY_CLAUSE.search(text)
    secret = (match.group(1) if match else text).strip()
    try:
        if not secret or not base64.b64decode(secret, validate=True):
            raise ValueError
    except (binascii.Error, ValueError):
        raise LocalError(f"{path}: does not hold a base64 TSIG secret ([dns] tsig_secret_file)") from None
    logs.register_secret(secret)
    return secret


class Rfc2136Backend(Backend):
    """RFC 2136 updates to ``[dns] server``, signed with ``[dns] tsig_key_name`` when set."""

    name = "rfc2136"

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self.zone = config.zone
        self.host, self.port = split_host_port(config.server)

    # -- the interface -----------------------------------------------------------------

    def publish(self, rrset: RecordSet) -> None:
        check_in_zone(rrset.name, self.zone)
        update = self._message()
        name = _absolute(rrset.name)
        if rrset.rtype != "CNAME":
            # RFC 2136 3.4.2.2: a server silently ignores non-CNAME data added at a CNAME, answering
            # NOERROR; the prerequisite "no CNAME here" (2.4.3) turns that into a YXRRSET refusal.
            update.absent(name, "CNAME")
        update.replace(name, rrset.ttl, *rrset.rdatas())  # RFC 2136 2.5.2 delete the RRset + 2.5.1 add
        self._send(update, f"publish {rrset.name} {rrset.rtype}")
        log.info("rfc2136: published %s %s at %s", rrset.name, rrset.rtype, self.config.server)

    def remove(self, name: str, rtype: str) -> None:
        check_in_zone(name, self.zone)
        update = self._message()
        update.delete(_absolute(name), rtype.upper())  # RFC 2136 2.5.2: delete an RRset; absent is fine
        self._send(update, f"remove {name} {rtype.upper()}")
        log.info("rfc2136: removed %s %s at %s", name, rtype.upper(), self.config.server)

    def list(self) -> list[RecordSet]:
        """Every RRset of the zone, by a TSIG-signed AXFR (the zone must allow transfers to the key)."""
        zone = dns.zone.Zone(_absolute(self.zone), relativize=False)
        what = f"transfer of {self.zone} from {self.config.server}"
        try:
            query, _ = dns.xfr.make_query(zone, serial=None, keyring=self._key())
            dns.query.inbound_xfr(self._address(), zone, query=query, port=self.port, timeout=TIMEOUT,
                                  lifetime=TIMEOUT * 3)
        except dns.xfr.TransferError as exc:
            rcode = dns.rcode.to_text(exc.rcode)
            raise DNSError(f"{what} refused: {rcode} (allow-transfer must admit the key)") from None
        except dns.tsig.PeerError as exc:
            raise DNSError(f"{what} refused: {_tsig_reason(exc)}") from None
        except dns.exception.Timeout:
            raise DNSError(f"{what}: no answer within {TIMEOUT:g}s") from None
        except (OSError, EOFError, dns.exception.DNSException) as exc:
            raise DNSError(f"{what} failed: {_one_line(exc)}") from None
        sets = (record_set_from_rrset(rrset) for rrset in _iter_rrsets(zone))
        return sorted_sets(sets)

    # -- internals -------------------------------------------------------------------

    def _key(self) -> dns.tsig.Key | None:
        if not self.config.tsig_key_name:
            return None
        assert self.config.tsig_secret_file is not None  # config.py requires it with a key name
        secret = read_tsig_secret(self.config.tsig_secret_file)
        return dns.tsig.Key(self.config.tsig_key_name, secret, self.config.tsig_algorithm)

    def _message(self) -> dns.update.UpdateMessage:
        update = dns.update.UpdateMessage(_absolute(self.zone))
        key = self._key()
        if key is not None:
            update.use_tsig(key)
        return update

    def _address(self) -> str:
        """``[dns] server`` may be a host name; dnspython needs an address."""
        try:
            ipaddress.ip_address(self.host)
            return self.host
        except ValueError:
            pass
        try:
            return str(socket.getaddrinfo(self.host, self.port, proto=socket.IPPROTO_TCP)[0][4][0])
        except OSError as exc:
            raise DNSError(f"[dns] server {self.host!r} does not resolve: {exc.strerror or exc}") from None

    def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        where = f"{self.config.server}"
        try:
            response = dns.query.tcp(update, self._address(), port=self.port, timeout=TIMEOUT)
        except dns.tsig.PeerError as exc:
            raise DNSError(f"{where} refused to {what}: {_tsig_reason(exc)}") from None
        except dns.exception.Timeout:
            raise DNSError(f"{where} did not answer the update to {what} within {TIMEOUT:g}s") from None
        except (OSError, EOFError, dns.exception.DNSException) as exc:
            raise DNSError(f"{where}: update to {what} failed: {_one_line(exc)}") from None
        rcode = dns.rcode.to_text(response.rcode())
        if response.rcode() != dns.rcode.NOERROR:
            signed = f"signed by key {self.config.tsig_key_name!r}" if self.config.tsig_key_name else "unsigned"
            hint = _HINTS.get(rcode, "the update was not applied")
            raise DNSError(f"{where} refused to {what} ({signed}): {rcode}: {hint}")


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def _tsig_reason(exc: dns.tsig.PeerError) -> str:
    if isinstance(exc, dns.tsig.PeerBadKey):
        return "BADKEY: the server does not know this TSIG key name/algorithm ([dns] tsig_key_name)"
    if isinstance(exc, dns.tsig.PeerBadSignature):
        return "BADSIG: the TSIG signature does not verify; the secret in [dns] tsig_secret_file is wrong"
    if isinstance(exc, dns.tsig.PeerBadTime):
        return "BADTIME: the clocks of this host and the DNS server differ too much"
    return f"TSIG error: {_one_line(exc)}"


def _iter_rrsets(zone: dns.zone.Zone) -> list[dns.rrset.RRset]:
    out = []
    for name, rdataset in zone.iterate_rdatasets():
        rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
        rrset.update(rdataset)
        out.append(rrset)
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__

