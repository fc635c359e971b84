"""Propagation: a change counts as published only when every authoritative server answers it.

Owns the lookups that decide "visible" and "absent":

1. the servers: ``[dns] check_servers`` when set (a hidden primary, tests), else
   the zone's NS records looked up through ``[dns] resolver`` (or the system's
   resolver) and each NS host resolved to its addresses;
2. each server is asked directly by address with recursion off (RD=0), so no
   cache stands between us and the answer (RFC 1034 4.3.1); only an answer with
   the AA flag counts, so a referral or a lame server never passes for "absent";
3. TXT values are compared joined (a DKIM key split in 255-byte strings is one
   value); other types in canonical presentation form; the TTL is ignored.

The wait is bounded (``[dns] propagation_timeout``, polled every
``propagation_interval``) and reports progress lines such as
``waiting for 2 of 3 servers: ...``. On timeout a ``DNSError`` names each
server that lags and what it answered. Time and sleeping are injectable.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from certkeeper.core.config import Config
from certkeeper.core.errors import DNSError
from certkeeper.network.dns import Progress, RecordSet, canonical_values, from_rdata, split_host_port

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 3.0  # seconds for one query to one server, at most (see query_timeout)


@dataclass(frozen=True)
class Server:
    label: str  # what the operator recognises: "ns1.example.com (192.0.2.1)" or "127.0.0.1:5353"
    addr: str
    port: int = 53


@dataclass(frozen=True)
class Answer:
    """What one server said about (name, type): ``status`` is NOERROR/NXDOMAIN/REFUSED/timeout..."""

    status: str
    values: tuple[str, ...] = ()
    other_types: tuple[str, ...] = ()  # other records in the answer section (e.g. a CNAME at the name)

    def describe(self) -> str:
        if self.values:
            return "answers " + ", ".join(repr(v) for v in self.values)
        if self.other_types:
            return "answers only " + ", ".join(self.other_types) + " records there"
        if self.status in ("NOERROR", "NXDOMAIN"):
            return "has no such record" + (" (NXDOMAIN)" if self.status == "NXDOMAIN" else "")
        return f"fails: {self.status}"


# ---------------------------------------------------------------------------
# Lookups.


def query_timeout(config: Config) -> float:
    """The limit of one query: ``QUERY_TIMEOUT``, or ``[dns] propagation_timeout`` when that is shorter
    (one query never outlasts the whole wait)."""
    return max(0.2, min(QUERY_TIMEOUT, config.dns.propagation_timeout))


def make_resolver(config: Config) -> dns.resolver.Resolver:
    """``[dns] resolver`` ("addr:port") or the system's resolver."""
    if not config.dns.resolver:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise DNSError("no system resolver is configured; set [dns] resolver") from None
    else:
        host, port = split_host_port(config.dns.resolver)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [_address(host, port)]
        resolver.port = port
    resolver.timeout = query_timeout(config)
    resolver.lifetime = query_timeout(config) * 2
    return resolver


def query(server: Server, name: str, rtype: str, timeout: float = QUERY_TIMEOUT) -> Answer:
    """Ask one server directly, recursion off; never raises for DNS failures."""
    message = dns.message.make_query(name.rstrip(".") + ".", rtype)
    message.flags &= ~dns.flags.RD
    try:
        response, _ = dns.query.udp_with_fallback(message, server.addr, port=server.port, timeout=timeout)
    except dns.exception.Timeout:
        return Answer("no answer (timeout)")
    except (OSError, dns.exception.DNSException) as exc:
        return Answer(f"no answer ({' '.join(str(exc).split()) or type(exc).__name__})")
    status = dns.rcode.to_text(response.rcode())
    if status in ("NOERROR", "NXDOMAIN") and not response.flags & dns.flags.AA:
        # RFC 1035 4.1.1: only an answer with AA set comes from the zone itself; a referral or a lame
        # server's empty NOERROR must not count as "the record is absent".
        return Answer(f"{status} without the AA flag (not authoritative for the zone)")
    kind = dns.rdatatype.from_text(rtype)
    qname = message.question[0].name
    # Only the queried name counts: a CNAME at the name is not the record certkeeper published.
    values = [from_rdata(r) for rrset in response.answer if rrset.rdtype == kind and rrset.name == qname
              for r in rrset]
    others = tuple(sorted({dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer
                           if rrset.rdtype != kind or rrset.name != qname}))
    return Answer(status, tuple(sorted(values)), others)


def zone_of(config: Config, name: str) -> str:
    """``[dns] zone`` when it holds ``name``, else the enclosing zone found by SOA lookups."""
    zone = config.dns.zone
    if zone and (name == zone or name.endswith("." + zone)):
        return zone
    try:
        found = dns.resolver.zone_for_name(name.rstrip(".") + ".", resolver=make_resolver(config))
    except dns.exception.DNSException as exc:
        raise DNSError(f"cannot find the zone of {name}: {' '.join(str(exc).split())}") from None
    return found.to_text(omit_final_dot=True)


def authoritative_servers(config: Config, zone: str) -> list[Server]:
    """``[dns] check_servers``, or every address of every NS host of ``zone``."""
    if config.dns.check_servers:
        out = []
        for item in config.dns.check_servers:
            host, port = split_host_port(item)
            out.append(Server(label=item, addr=_address(host, port), port=port))
        return out
    resolver = make_resolver(config)
    try:
        ns_hosts = sorted(r.target.to_text(omit_final_dot=True) for r in resolver.resolve(zone + ".", "NS"))
    except dns.exception.DNSException as exc:
        raise DNSError(f"cannot look up the NS records of {zone}: {' '.join(str(exc).split())}") from None
    servers = [Server(label=f"{host} ({addr})", addr=addr) for host in ns_hosts for addr in _addresses(resolver, host)]
    if not servers:
        raise DNSError(f"none of the NS hosts of {zone} ({', '.join(ns_hosts)}) has an address")
    return servers


def _addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    found: list[str] = []
    for rtype in ("A", "AAAA"):
        try:
            found += [r.to_text() for r in resolver.resolve(host + ".", rtype)]
        except dns.exception.DNSException:
            continue
    return found


def _address(host: str, port: int) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0][4][0])
    except OSError as exc:
        raise DNSError(f"DNS server {host!r} does not resolve: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------
# Waiting.


def wait_until_visible(config: Config, rrset: RecordSet, progress: Progress, timeout: float | None = None,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> None:
    """Return when every authoritative server answers exactly ``rrset.values``; DNSError on timeout."""
    want = canonical_values(rrset.rtype, rrset.values)

    def good(answer: Answer) -> bool:
        return answer.status == "NOERROR" and canonical_values(rrset.rtype, answer.values) == want

    shown = ", ".join(repr(v) for v in rrset.values)
    _wait(config, rrset.name, rrset.rtype, good, f"to answer {shown}", progress, timeout, clock, sleep)


def visible_everywhere(config: Config, rrset: RecordSet) -> bool:
    """One round, no waiting: does every authoritative server answer exactly ``rrset.values``?"""
    want = canonical_values(rrset.rtype, rrset.values)
    for server in authoritative_servers(config, zone_of(config, rrset.name)):
        answer = query(server, rrset.name, rrset.rtype, timeout=query_timeout(config))
        if answer.status != "NOERROR" or canonical_values(rrset.rtype, answer.values) != want:
            return False
    return True


def name_in_use(config: Config, name: str, rtype: str = "TXT") -> bool:
    """One round, no waiting: does any authoritative server hold ``rtype`` (or a CNAME) at ``name``?
    Used before choosing a new DKIM selector, so a record made by hand is never replaced."""
    for server in authoritative_servers(config, zone_of(config, name)):
        answer = query(server, name, rtype, timeout=query_timeout(config))
        if answer.values or answer.other_types:
            return True
    return False


def wait_until_absent(config: Config, name: str, rtype: str, progress: Progress, timeout: float | None = None,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> None:
    """Return when no authoritative server has a ``rtype`` record at ``name``; DNSError on timeout."""

    def good(answer: Answer) -> bool:
        return answer.status in ("NOERROR", "NXDOMAIN") and not answer.values  # query() demands AA

    _wait(config, name.rstrip(".").lower(), rtype.upper(), good, "to have no such record", progress, timeout,
          clock, sleep)


def _wait(config: Config, name: str, rtype: str, good: Callable[[Answer], bool], goal: str, progress: Progress,
          timeout: float | None, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    servers = authoritative_servers(config, zone_of(config, name))
    limit = config.dns.propagation_timeout if timeout is None else timeout
    deadline = clock() + limit
    lagging: dict[Server, Answer] = {s: Answer("not asked yet") for s in servers}
    last_line = ""
    while True:
        for server in list(lagging):
            answer = query(server, name, rtype, timeout=min(query_timeout(config), max(0.2, deadline - clock())))
            if good(answer):
                del lagging[server]  # once a server has the data, it keeps it
            else:
                lagging[server] = answer
        if not lagging:
            log.info("%s %s is visible on all %d server(s)", name, rtype, len(servers))
            return
        line = (f"{name} {rtype}: waiting for {len(lagging)} of {len(servers)} servers {goal}: "
                + "; ".join(f"{s.label} {a.describe()}" for s, a in lagging.items()))
        if clock() >= deadline:
            raise DNSError(f"{name} {rtype}: after {limit:g}s {len(lagging)} of {len(servers)} authoritative "
                           f"servers still lag (wanted them {goal}): "
                           + "; ".join(f"{s.label} {a.describe()}" for s, a in lagging.items()))
        if line != last_line:
            progress(line)
            last_line = line
        sleep(min(config.dns.propagation_interval, max(0.0, deadline - clock())))
