"""The renewal planner: a pure function of (configuration, files on disk, state, now).

It decides, per certificate, whether to renew now and, if not, when. No I/O and
no clock: ``now`` is passed in, so every rule is tested without sleeping.

The rules, first match wins:

1. ``--force`` renews.
2. A failure backoff (1 min, 10 min, 100 min, then daily; never sooner than
   the server's Retry-After) postpones everything below it: retrying sooner
   would fail the same way and count against the CA's rate limits. Our own
   backoff (not the server's Retry-After) is lifted when the settings that
   failed were changed since (``config_digest``: the certificate's and
   ``[acme]``'s settings, ``ca_bundle`` included, and every hook of the
   certificate): the operator fixed something. A backoff whose time has passed
   is over: a retry time is never in the past.
3. Missing, unreadable or mismatched files renew: no set on disk, a
   certificate that does not parse, a key that does not match the
   certificate, a certificate that does not cover the configured domains (or
   covers ones no longer configured), a key of another type than configured,
   chain or full-chain files that do not complete the set (``disk_problem``,
   from ``CertificateStore.check``). Chain files that can be rebuilt from
   the other one (``repairable``, e.g. a new chain path after
   ``import-acme-client``) are "repair on the next run", not a new order.
4. An expired certificate renews (and no ARI is asked, RFC 9773 4.3).
5. ARI (RFC 9773): when the server gave a suggested window for this
   certificate, renew at a point inside it chosen from the serial (stable
   across restarts, spread across hosts).
6. Otherwise renew when less than a third of the lifetime remains (half when
   the lifetime is under 10 days: short-lived certificates).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from certkeeper.core import certs
from certkeeper.core.config import HOOK_DEFAULT_COMMANDS, AcmeConfig, CertificateConfig, Config
from certkeeper.core.state import CertState
from certkeeper.keeper.store import CertificateSet

# Let's Encrypt's integration guide: retry after about 1 min, 10 min, 100 min, then daily.
BACKOFF = (timedelta(minutes=1), timedelta(minutes=10), timedelta(minutes=100), timedelta(days=1))
SHORT_LIVED = timedelta(days=10)


@dataclass(frozen=True)
class Decision:
    name: str
    due: bool
    when: datetime  # now when due; else the next renewal time
    reason: str
    not_after: datetime | None = None  # of the certificate on disk, if any
    # What happens at ``when``: "obtain" | "renew" | "repair" (rebuild chain files, no order) |
    # "retry" (after a failure backoff, until ``when``) | "" (an older peer).
    action: str = ""
    lifts: str = ""  # for "retry": what ends the backoff before ``when``


def plan(cert: CertificateConfig, on_disk: CertificateSet | None, state: CertState, now: datetime,
         force: bool = False, settings: str = "", disk_problem: str = "", repairable: bool = False) -> Decision:
    """``settings`` is ``config_digest`` of the configuration now (rule 2); ``disk_problem`` what
    ``CertificateStore.check`` found wrong with the chain files and ``repairable`` whether
    ``CertificateStore.repair`` can rebuild them (rule 3)."""
    def due(reason: str, not_after: datetime | None = None, action: str = "renew") -> Decision:
        return Decision(cert.name, True, now, reason, not_after, action)

    info = on_disk.info() if on_disk else None
    not_after = info.not_after if info else None
    if force:
        return due("forced", not_after, "renew" if on_disk else "obtain")
    if state.retry_not_before and state.retry_not_before > now and (
            state.retry_by_server or not settings or state.failed_settings == settings):
        lifts = ("the ACME server's Retry-After" if state.retry_by_server else
                 f"its time, or a change to the settings of {cert.name}, [acme] or any of its hooks")
        return Decision(cert.name, False, state.retry_not_before,
                        f"retrying after {state.consecutive_failures} failure(s): {state.last_error}", not_after,
                        "retry", lifts)
    if on_disk is None:
        return due("no certificate on disk", action="obtain")
    if info is None:
        return due("the certificate on disk does not parse")
    problem = files_problem(cert, on_disk, info)
    if problem:
        return due(problem, info.not_after)
    if info.not_after <= now:
        return due(f"expired at {_fmt(info.not_after)}", info.not_after)
    if disk_problem and repairable:
        return Decision(cert.name, False, now, f"{disk_problem}: rebuilt from the files on disk at the next run, "
                        "no new order", info.not_after, "repair")
    if disk_problem:
        return due(disk_problem, info.not_after)
    when, why = renewal_time(info, state)
    if when <= now:
        return due(why, info.not_after)
    return Decision(cert.name, False, when, why, info.not_after, "renew")


def settings_digest(cert: CertificateConfig, acme: AcmeConfig, *fallbacks: AcmeConfig,
                    hooks: tuple[object, ...] = ()) -> str:
    """A digest of everything that decides whether a renewal can succeed: the order's settings at
    ``acme`` (the certificate's authority) and at the ``fallbacks`` it may ask, their ``ca_bundle``,
    the challenge, and ``hooks`` (what installs and checks it, see ``certificate_settings``)."""
    relevant: tuple[object, ...] = (cert.domains, cert.key_type, cert.profile, acme.directory, acme.profile,
                                    acme.eab_kid, str(acme.eab_hmac_key_file), str(acme.account_key), acme.contact,
                                    str(acme.ca_bundle))
    for other in fallbacks:
        relevant += (other.directory, other.profile, other.eab_kid, str(other.eab_hmac_key_file),
                     str(other.account_key), other.contact, str(other.ca_bundle))
    if cert.challenge != "http-01":
        relevant += (cert.challenge,)
    if hooks:
        relevant += (hooks,)
    return hashlib.sha256(repr(relevant).encode()).hexdigest()[:16]


def certificate_settings(config: Config, cert: CertificateConfig) -> str:
    """``settings_digest`` over the certificate's whole chain of authorities and every hook of the
    certificate (command, verify endpoints, timeouts): a backoff lifts when any of them changes."""
    hooks = tuple((name, config.hooks.get(name) or HOOK_DEFAULT_COMMANDS.get(name)) for name in cert.hooks)
    return settings_digest(cert, *(acme for _, acme in config.chain(cert)), hooks=hooks)


def files_problem(cert: CertificateConfig, on_disk: CertificateSet, info: certs.CertInfo) -> str:
    """Why the set on disk cannot stay as it is, or ""."""
    if not certs.key_matches_cert(on_disk.key, on_disk.cert):
        return "the key on disk does not match the certificate"
    if set(info.domains) != set(cert.domains):
        return f"the certificate covers {', '.join(info.domains) or 'no names'}, not {', '.join(cert.domains)}"
    try:
        key_type = certs.key_type_of(on_disk.key)
    except Exception:  # noqa: BLE001 - any parse failure means the key must be replaced
        return "the key on disk does not parse"
    if key_type != cert.key_type:  # reuse_key keeps a key only while it is of the configured type
        return f"the key is {key_type}, the configuration asks for {cert.key_type}"
    return ""


def renewal_time(info: certs.CertInfo, state: CertState) -> tuple[datetime, str]:
    """When to renew a healthy certificate, and why then."""
    if state.ari_renewal_time and state.ari_cert == info.fingerprint:
        return state.ari_renewal_time, "in the ACME server's suggested renewal window (ARI)"
    lifetime = info.not_after - info.not_before
    fraction = 2 if lifetime < SHORT_LIVED else 3
    when = info.not_after - lifetime / fraction
    share = "half" if fraction == 2 else "a third"
    return when, f"{share} of its lifetime left then"


def point_in_window(start: datetime, end: datetime, serial: int) -> datetime:
    """RFC 9773 4.2: a time in [start, end], fixed per certificate so restarts do not move it."""
    digest = hashlib.sha256(str(serial).encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return start + (end - start) * fraction


def backoff(failures: int, retry_after: datetime | None, now: datetime) -> datetime:
    """When to try again after ``failures`` consecutive failures (>= 1)."""
    delay = BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]
    when = now + delay
    return max(when, retry_after) if retry_after else when


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")
