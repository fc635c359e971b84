"""Publishing MTA-STS and TLSRPT in DNS, in the order RFC 8461 asks for.

This module owns *when* the ``_mta-sts.DOMAIN`` and ``_smtp._tls.DOMAIN`` TXT
records change; the formats live in ``certkeeper.core.mtasts`` and the DNS work in
``certkeeper.network.dns``. It also owns the per-domain history in
``STATE/mta-sts/DOMAIN.json`` (every policy id published, its ``max_age``,
when it was published and when a newer one replaced it).

- **Publish** (RFC 8461 8.1): the id is derived from the policy, so it changes
  exactly when the policy does. A new id is published only after
  ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` serves the new policy
  (fetched and compared), then waited for on every authoritative server.
- **Remove** (RFC 8461 8.3): when an ``[[mta_sts]]`` table disappears, the
  domain keeps being served, first with a ``mode: none`` policy with a short
  ``max_age`` under a new id, until every earlier policy's ``max_age`` has
  passed since it was replaced; then the TXT record is removed and the domain
  drops out of ``domains_to_serve`` (the daemon stops serving it).
- **TLSRPT** (RFC 8460 3): ``v=TLSRPTv1; rua=...`` for each ``[tlsrpt] domains``
  (default: every ``[[mta_sts]]`` domain); removed when no longer wanted.

The daemon calls ``domains_to_serve`` to build what it serves and then
``publish_all`` (start, SIGHUP); ``certkeeper mta-sts publish`` runs
``command_mta_sts``; ``certkeeper status`` shows ``status_rows`` (in core/mtasts_state.py: no DNS code).
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from certkeeper.core import mtasts_state
from certkeeper.core.config import Config
from certkeeper.core.errors import CertkeeperError, LocalError, ServiceError
from certkeeper.core.files import write_json_atomic
from certkeeper.core.mtasts import MEDIA_TYPE, WELL_KNOWN_PATH, MtaStsError, Policy, parse_policy, render_txt
from certkeeper.core.mtasts_state import (  # noqa: F401 - status_rows: certkeeper status reads it from here too
    domains_to_serve,
    drain_policy,
    known_domains,
    load_state,
    save_state,
    status_rows,
)
from certkeeper.network.dns import Backend, Progress, RecordSet, backend_for, split_host_port
from certkeeper.network.dns.propagation import visible_everywhere, wait_until_absent, wait_until_visible
from certkeeper.network.keeper_client import Keeper

log = logging.getLogger(__name__)

RETRY_AFTER = timedelta(minutes=10)  # a failed publication: the daemon tries again then (worker.job_publish)

FETCH_TIMEOUT = 10.0
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: senders may refuse larger policy bodies
TLSRPT_VERSION = "TLSRPTv1"

Fetch = Callable[[Config, str], str]


# ---------------------------------------------------------------------------
# TLSRPT record (RFC 8460 3): render and parse side by side.


def render_tlsrpt(rua: tuple[str, ...]) -> str:
    """``v=TLSRPTv1; rua=URI[,URI]`` (RFC 8460 3: rua URIs are comma separated)."""
    if not rua:
        raise ValueError("a TLSRPT record needs at least one rua URI")
    return f"v={TLSRPT_VERSION}; rua={','.join(rua)}"


def parse_tlsrpt(text: str) -> tuple[str, ...]:
    """The rua URIs of a TLSRPT record; ValueError when it is not one."""
    fields = [f.strip() for f in text.split(";") if f.strip()]
    if not fields or fields[0] != f"v={TLSRPT_VERSION}":  # RFC 8460 3: the record starts with v=TLSRPTv1
        raise ValueError(f"{text[:60]!r} does not start with v={TLSRPT_VERSION}")
    for item in fields[1:]:
        name, _, value = item.partition("=")
        if name.strip() == "rua":
            return tuple(u.strip() for u in value.split(",") if u.strip())
    raise ValueError(f"{text[:60]!r} has no rua field")


# ---------------------------------------------------------------------------
# Checking that a policy is served (RFC 8461 3.3 + 8.1).


def fetch_policy(config: Config, domain: str) -> str:
    """GET ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` as a sender would: valid certificate for
    the name, 200, text/plain, no redirects (RFC 8461 3.3). ``[dns] mta_sts_fetch_address`` /
    ``mta_sts_fetch_ca`` redirect the connection and the trust (tests, split horizon)."""
    host = f"mta-sts.{domain}"
    url = f"https://{host}{WELL_KNOWN_PATH}"
    addr, port = split_host_port(config.dns.mta_sts_fetch_address, 443) if config.dns.mta_sts_fetch_address \
        else (host, 443)
    ca = config.dns.mta_sts_fetch_ca
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        with socket.create_connection((addr, port), timeout=FETCH_TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            conn = http.client.HTTPSConnection(host, port, timeout=FETCH_TIMEOUT, context=context)
            conn.sock = tls
            conn.putrequest("GET", WELL_KNOWN_PATH, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read(MAX_POLICY_BYTES + 1)
    except ssl.SSLCertVerificationError as exc:
        raise ServiceError(f"{url}: certificate not valid ({exc.verify_message})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ServiceError(f"{url}: cannot fetch from {addr}:{port}: {' '.join(str(exc).split())}") from None
    if response.status != 200:
        raise ServiceError(f"{url}: answered HTTP {response.status}, not 200 (RFC 8461 3.3: no redirects)")
    media_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if media_type != MEDIA_TYPE:
        raise ServiceError(f"{url}: served as {media_type or 'no media type'!r}, not {MEDIA_TYPE} (RFC 8461 3.3)")
    if len(body) > MAX_POLICY_BYTES:
        raise ServiceError(f"{url}: larger than {MAX_POLICY_BYTES} bytes")
    return body.decode("ascii", errors="replace")


def check_served(config: Config, domain: str, policy: Policy, fetch: Fetch) -> None:
    """RFC 8461 8.1: the new policy must be served before its id is published; ServiceError if not."""
    url = f"https://mta-sts.{domain}{WELL_KNOWN_PATH}"
    try:
        served = parse_policy(fetch(config, domain))
    except MtaStsError as exc:
        raise ServiceError(f"{url} does not serve a valid policy ({exc}); the _mta-sts id is not published") \
            from None
    if served != policy:
        raise ServiceError(f"{url} serves another policy (mode {served.mode}, id {served.policy_id()}), not the "
                           f"new one (mode {policy.mode}, id {policy.policy_id()}); the _mta-sts id is published "
                           "only once the new policy is served (RFC 8461 8.1): reload the daemon first")


# ---------------------------------------------------------------------------
# Publishing.


@dataclass(frozen=True)
class Outcome:
    domain: str
    record: str  # "_mta-sts.DOMAIN" or "_smtp._tls.DOMAIN"
    status: str  # published | unchanged | draining | removed | failed
    detail: str = ""
    changed: bool = False  # a record was published or removed


@dataclass
class _Run:
    config: Config
    backend: Backend
    progress: Progress
    now: datetime
    fetch: Fetch
    outcomes: list[Outcome] = field(default_factory=list)


def publish_all(config: Config, progress: Progress, now: datetime | None = None, fetch: Fetch | None = None,
                domains: tuple[str, ...] | None = None, backend: Backend | None = None,
                keeper: Keeper | None = None) -> list[Outcome]:
    """Bring every ``_mta-sts`` and ``_smtp._tls`` record in line with the configuration.

    Never raises for one domain's failure: each record gets an ``Outcome`` (status ``failed`` with a
    one-line detail), so one broken domain does not hold up the others. ``domains`` limits the work.
    """
    run = _Run(config, backend or backend_for(config, progress, keeper), progress, now or datetime.now(UTC),
               fetch or fetch_policy)
    wanted = {m.domain: m for m in config.mta_sts}
    for domain in sorted(set(wanted) | set(known_domains(config))):
        if domains is not None and domain not in domains:
            continue
        record = f"_mta-sts.{domain}"
        try:
            if domain in wanted:
                _publish_policy(run, domain, mtasts_state.configured_policy(config, wanted[domain]), "published")
            else:
                _drain(run, domain)
        except CertkeeperError as exc:
            log.warning("%s: %s", record, exc)
            run.outcomes.append(Outcome(domain, record, "failed", str(exc)))
            _record_failure(config, domain, str(exc), run.now + RETRY_AFTER)
        else:
            _record_failure(config, domain, "", None)
    _tlsrpt_all(run, domains)
    return run.outcomes


def _record_failure(config: Config, domain: str, error: str, retry_at: datetime | None) -> None:
    path = mtasts_state.failure_path(config, domain)
    try:
        if error and retry_at is not None:
            write_json_atomic(path, {"error": error, "retry_at": retry_at.isoformat(timespec="seconds")})
        else:
            path.unlink(missing_ok=True)
    except (OSError, LocalError) as exc:  # write_json_atomic says LocalError; unlink and mkdir, OSError
        log.error("%s: %s", path, getattr(exc, "strerror", None) or exc)


def _rrset(config: Config, domain: str, policy: Policy) -> RecordSet:
    return RecordSet(f"_mta-sts.{domain}", "TXT", (render_txt(policy.policy_id()),), config.dns.ttl)


def _publish_policy(run: _Run, domain: str, policy: Policy, status: str) -> None:
    """Serve-check, publish the id, remember it, wait for every server (RFC 8461 8.1)."""
    st = load_state(run.config, domain)
    rrset = _rrset(run.config, domain, policy)
    current = st.current
    if current is not None and current.policy_id == policy.policy_id() and visible_everywhere(run.config, rrset):
        run.outcomes.append(Outcome(domain, rrset.name, "unchanged" if status == "published" else status,
                                    f"id={policy.policy_id()} mode {policy.mode}"))
        return
    run.progress(f"{rrset.name}: checking that https://mta-sts.{domain}{WELL_KNOWN_PATH} serves the new policy")
    check_served(run.config, domain, policy, run.fetch)
    if run.config.fleet.enabled and visible_everywhere(run.config, rrset):
        # Another host of the fleet published this id (every live host serves this policy): not sent again.
        save_state(run.config, st.with_published(policy, run.now))
        run.outcomes.append(Outcome(domain, rrset.name, "unchanged" if status == "published" else status,
                                    f"id={policy.policy_id()} mode {policy.mode} (published by the fleet)"))
        return
    run.progress(f"{rrset.name}: publishing {rrset.values[0]!r}")
    run.backend.publish(rrset)
    save_state(run.config, st.with_published(policy, run.now))
    wait_until_visible(run.config, rrset, run.progress)
    run.outcomes.append(Outcome(domain, rrset.name, status, f"id={policy.policy_id()} mode {policy.mode}",
                                changed=True))


def _drain(run: _Run, domain: str) -> None:
    """RFC 8461 8.3 for a domain whose [[mta_sts]] table was removed."""
    st = load_state(run.config, domain)
    if st.current is None:
        return  # removed earlier: nothing left to do
    _publish_policy(run, domain, drain_policy(st), "draining")
    st = load_state(run.config, domain)
    until = st.drain_until()
    assert until is not None  # the current policy is mode none now
    if run.now < until:
        outcome = run.outcomes.pop()
        run.outcomes.append(replace(outcome, detail=f"{outcome.detail}; serving mode none until "
                                                    f"{until.isoformat(timespec='seconds')}"))
        return
    record = f"_mta-sts.{domain}"
    run.outcomes.pop()  # one outcome per record: "removed", or "failed" from publish_all
    run.progress(f"{record}: every earlier policy has expired; removing the record (RFC 8461 8.3)")
    run.backend.remove(record, "TXT")
    # Only once no authoritative server has the id does the daemon stop serving the policy (RFC 8461 8.3).
    wait_until_absent(run.config, record, "TXT", run.progress)
    save_state(run.config, replace(st, removed_at=run.now))
    run.outcomes.append(Outcome(domain, record, "removed", f"mta-sts.{domain} no longer needs to be served",
                                changed=True))


def tlsrpt_domains(config: Config) -> tuple[str, ...]:
    """RFC 8460 3: the domains that get ``_smtp._tls``; none without ``[tlsrpt] rua``."""
    if not config.tlsrpt.rua:
        return ()
    return config.tlsrpt.domains or tuple(m.domain for m in config.mta_sts)


def _tlsrpt_all(run: _Run, only: tuple[str, ...] | None) -> None:
    wanted = tlsrpt_domains(run.config)
    for domain in sorted(set(wanted) | set(known_domains(run.config))):
        if only is not None and domain not in only:
            continue
        record = f"_smtp._tls.{domain}"
        try:
            if domain in wanted:
                _publish_tlsrpt(run, domain, record)
            elif load_state(run.config, domain).tlsrpt:
                _remove_tlsrpt(run, domain, record)
        except CertkeeperError as exc:
            log.warning("%s: %s", record, exc)
            run.outcomes.append(Outcome(domain, record, "failed", str(exc)))


def _publish_tlsrpt(run: _Run, domain: str, record: str) -> None:
    value = render_tlsrpt(run.config.tlsrpt.rua)
    rrset = RecordSet(record, "TXT", (value,), run.config.dns.ttl)
    st = load_state(run.config, domain)
    if st.tlsrpt == value and visible_everywhere(run.config, rrset):
        run.outcomes.append(Outcome(domain, record, "unchanged", value))
        return
    run.progress(f"{record}: publishing {value!r}")
    run.backend.publish(rrset)
    save_state(run.config, replace(st, tlsrpt=value))
    wait_until_visible(run.config, rrset, run.progress)
    run.outcomes.append(Outcome(domain, record, "published", value, changed=True))


def _remove_tlsrpt(run: _Run, domain: str, record: str) -> None:
    run.progress(f"{record}: no longer configured; removing it")
    run.backend.remove(record, "TXT")
    wait_until_absent(run.config, record, "TXT", run.progress)
    save_state(run.config, replace(load_state(run.config, domain), tlsrpt=""))
    run.outcomes.append(Outcome(domain, record, "removed", "", changed=True))
