"""MTA-STS publishing history and what the daemon must serve (RFC 8461 8.1, 8.3).

This module owns ``STATE/mta-sts/DOMAIN.json``: every policy id published for
a domain, its ``max_age``, when it was published and when a newer one replaced
it. From that history alone (no DNS, no network) it answers what the daemon
must serve, including domains being withdrawn with their ``mode: none``
policy, and when a withdrawal may finish. ``mtasts_publish`` changes DNS and
writes the history; the daemon's web listener only reads it, so the daemon
process never loads the DNS libraries.

With ``[fleet]``, ``STATE/mta-sts/fleet-mx`` holds the fleet's MX names as the
network worker last saw them in etcd (``network.fleet.agreed_policies``); an
``[[mta_sts]]`` table without ``mx`` serves their union (``configured_policy``).

A state file that cannot be read or holds another shape is moved aside as
``DOMAIN.json.corrupt-TIMESTAMP`` (``files.set_aside``, one log line) and that
domain starts with no history: a configured domain has its id published again;
a withdrawn one is no longer served. Other domains, and the daemon's start, are
not affected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from certkeeper.core.config import Config, MtaStsConfig, domain_problem
from certkeeper.core.errors import LocalError
from certkeeper.core.files import set_aside, set_aside_copies, write_json_atomic
from certkeeper.core.mtasts import Policy, parse_policy

log = logging.getLogger(__name__)

# RFC 8461 8.3: withdraw with "mode: none" and a short max_age; one day.
DRAIN_MAX_AGE = 86400


# ---------------------------------------------------------------------------
# Per-domain history.


@dataclass(frozen=True)
class PublishedPolicy:
    policy_id: str
    mode: str
    max_age: int
    text: str  # the policy as served, so a draining domain serves exactly what was published
    published_at: datetime
    superseded_at: datetime | None = None  # when a newer id replaced it


@dataclass(frozen=True)
class DomainState:
    domain: str
    policies: tuple[PublishedPolicy, ...] = ()
    removed_at: datetime | None = None  # the _mta-sts record was removed (RFC 8461 8.3 done)
    tlsrpt: str = ""  # the TLSRPT value in DNS, "" when none

    @property
    def current(self) -> PublishedPolicy | None:
        return self.policies[-1] if self.policies and self.removed_at is None else None

    def with_published(self, policy: Policy, now: datetime) -> DomainState:
        policy_id = policy.policy_id()
        current = self.current
        if current is not None and current.policy_id == policy_id:
            return self
        earlier = tuple(p if p.superseded_at else replace(p, superseded_at=now) for p in self.policies)
        # A policy whose max_age ran out after it was replaced can no longer be cached anywhere.
        earlier = tuple(p for p in earlier if p.superseded_at and p.superseded_at + _age(p) > now)
        new = PublishedPolicy(policy_id, policy.mode, policy.max_age, policy.render(), now)
        return replace(self, policies=(*earlier, new), removed_at=None)

    def drain_until(self) -> datetime | None:
        """RFC 8461 8.3: when every policy before the final ``mode: none`` one has expired from caches."""
        current = self.current
        if current is None or current.mode != "none":
            return None
        ends = [p.superseded_at + _age(p) for p in self.policies[:-1] if p.superseded_at]
        return max(ends, default=current.published_at)


def _age(p: PublishedPolicy) -> timedelta:
    return timedelta(seconds=p.max_age)


def state_path(config: Config, domain: str) -> Path:
    return config.state_dir / "mta-sts" / f"{domain}.json"


def load_state(config: Config, domain: str) -> DomainState:
    """The domain's history; an empty one when there is none or the file is unreadable (moved aside)."""
    path = state_path(config, domain)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("policies", []), list):
            raise TypeError(f"a JSON {type(data).__name__} of another shape")
        st = DomainState(
            domain=domain,
            policies=tuple(PublishedPolicy(
                policy_id=_text(p["policy_id"]), mode=_text(p["mode"]), max_age=_count(p["max_age"]),
                text=_text(p["text"]), published_at=_required_time(p["published_at"]),
                superseded_at=_time(p.get("superseded_at")))
                for p in data.get("policies", [])),
            removed_at=_time(data.get("removed_at")),
            tlsrpt=_text(data.get("tlsrpt", "")),
        )
        for p in st.policies:
            parse_policy(p.text)  # what a withdrawn domain serves must still be a policy
        return st
    except FileNotFoundError:
        return DomainState(domain=domain)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        set_aside(path, f"MTA-STS state of {domain}: {getattr(exc, 'strerror', None) or exc}")
        return DomainState(domain=domain)


def set_aside_files(config: Config, domain: str) -> list[Path]:
    """Copies of the domain's state file that were set aside as unreadable."""
    return set_aside_copies(state_path(config, domain))


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{value!r} is not a number of seconds")
    return value


def save_state(config: Config, st: DomainState) -> None:
    data = {
        "domain": st.domain,
        "policies": [{"policy_id": p.policy_id, "mode": p.mode, "max_age": p.max_age, "text": p.text,
                      "published_at": p.published_at.isoformat(),
                      "superseded_at": p.superseded_at.isoformat() if p.superseded_at else None}
                     for p in st.policies],
        "removed_at": st.removed_at.isoformat() if st.removed_at else None,
        "tlsrpt": st.tlsrpt,
    }
    try:
        write_json_atomic(state_path(config, st.domain), data)
    except OSError as exc:
        raise LocalError(f"{state_path(config, st.domain)}: cannot write: {exc.strerror}") from None


def known_domains(config: Config) -> list[str]:
    """Domains with a state file (published once), sorted."""
    directory = config.state_dir / "mta-sts"
    if not directory.is_dir():
        return []
    return sorted(p.name[:-len(".json")] for p in directory.glob("*.json") if not p.name.startswith("."))


def _required_time(value: str) -> datetime:
    when = _time(value)
    if when is None:
        raise ValueError("published_at is empty")
    return when


def _time(value: str | None) -> datetime | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{value!r} is not a time")
    return datetime.fromisoformat(value).astimezone(UTC) if value else None


# ---------------------------------------------------------------------------
# What must be served.


def drain_policy(st: DomainState) -> Policy:
    """The policy a domain being withdrawn serves (RFC 8461 8.3): its last one if already mode none,
    else a new ``mode: none`` policy with a short max_age."""
    current = st.current
    if current is not None and current.mode == "none":
        return parse_policy(current.text)
    longest = max((p.max_age for p in st.policies), default=DRAIN_MAX_AGE)
    return Policy(mode="none", mx=(), max_age=min(DRAIN_MAX_AGE, longest))


# ---------------------------------------------------------------------------
# [fleet]: the union of the fleet's MX names, for [[mta_sts]] tables without mx.

FLEET_MX_FILE = "fleet-mx"  # STATE/mta-sts/fleet-mx (not *.json: no domain's history); the listener reads it
MAX_FLEET_MX = 256  # names: a policy stays far below RFC 8461 3.3's 64 KiB
MAX_FLEET_MX_BYTES = 64 * 1024


def fleet_mx_path(config: Config) -> Path:
    return config.state_dir / "mta-sts" / FLEET_MX_FILE


def fleet_mx_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Sorted, without duplicates; ``ValueError`` naming the first entry that is no mx pattern (RFC 8461 3.2)
    or when there are more than ``MAX_FLEET_MX``."""
    clean = sorted({str(n).lower().rstrip(".") for n in names})
    if len(clean) > MAX_FLEET_MX:
        raise ValueError(f"{len(clean)} MX names, more than {MAX_FLEET_MX}")
    for name in clean:
        problem = domain_problem(name, wildcard=True)
        if problem:
            raise ValueError(f"{name[:80]!r} {problem}")
    return tuple(clean)


def save_fleet_mx(config: Config, names: tuple[str, ...]) -> bool:
    """Write the fleet's MX names (the network worker, after reading etcd); True when they changed."""
    names = fleet_mx_names(names)
    if load_fleet_mx(config) == names:
        return False
    try:
        write_json_atomic(fleet_mx_path(config), {"mx": list(names)})
    except OSError as exc:
        raise LocalError(f"{fleet_mx_path(config)}: cannot write: {exc.strerror}") from None
    return True


def read_fleet_mx(config: Config) -> tuple[str, ...]:
    """The fleet's MX names as last seen in etcd; () when there is no file; ``ValueError`` (or ``OSError``)
    when it is not ``{"mx": [NAME, ...]}`` of at most ``MAX_FLEET_MX`` mx patterns in ``MAX_FLEET_MX_BYTES``."""
    try:
        with fleet_mx_path(config).open("rb") as f:
            raw = f.read(MAX_FLEET_MX_BYTES + 1)
    except FileNotFoundError:
        return ()
    if len(raw) > MAX_FLEET_MX_BYTES:
        raise ValueError(f"larger than {MAX_FLEET_MX_BYTES} bytes")
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("mx"), list) \
            or not all(isinstance(n, str) for n in data["mx"]):
        raise ValueError('not {"mx": [NAME, ...]}')
    return fleet_mx_names(data["mx"])


def load_fleet_mx(config: Config) -> tuple[str, ...]:
    """``read_fleet_mx``, with () for a file that is unusable (one log line)."""
    try:
        return read_fleet_mx(config)
    except (OSError, ValueError) as exc:
        log.warning("%s: %s; serving this host's own [fleet] mx", fleet_mx_path(config),
                    getattr(exc, "strerror", None) or exc)
        return ()


def configured_policy(config: Config, m: MtaStsConfig) -> Policy:
    """The policy of an ``[[mta_sts]]`` table: its mx, or with [fleet] and no mx, the fleet's MX names (this
    host's own ``[fleet] mx`` and those last seen in etcd) — the same text on every host of the fleet."""
    if not m.fleet_mx:
        return Policy.from_config(m)
    names = (*config.fleet.mx, *load_fleet_mx(config)) or (config.fleet.host,)
    return Policy(mode=m.mode, mx=fleet_mx_names(names), max_age=m.max_age)


def domains_to_serve(config: Config, now: datetime | None = None) -> dict[str, Policy]:
    """Domain → the policy the daemon must serve at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``.

    Every ``[[mta_sts]]`` domain with its configured policy, plus each domain whose table was removed
    but whose ``_mta-sts`` record is still published (RFC 8461 8.3), with its ``mode: none`` policy.
    Depends only on the configuration and the state files (``now`` is accepted for symmetry and
    future use), so the daemon can serve the drain policy before ``publish_all`` publishes its id.
    """
    serve = {m.domain: configured_policy(config, m) for m in config.mta_sts}
    for domain in known_domains(config):
        if domain in serve:
            continue
        st = load_state(config, domain)
        if st.current is not None:
            serve[domain] = drain_policy(st)
    return serve


def next_due(config: Config) -> datetime | None:
    """When ``publish_all`` next has work without a configuration change: the earliest end of a
    drain (RFC 8461 8.3), so the daemon's scheduler can run it then. None when nothing drains."""
    configured = {m.domain for m in config.mta_sts}
    ends = [load_state(config, d).drain_until() for d in known_domains(config) if d not in configured]
    return min((e for e in ends if e is not None), default=None)


def status_rows(config: Config, now: datetime | None = None) -> list[dict[str, object]]:
    """One row per MTA-STS domain (configured or still draining), from config and state only (no DNS).

    Keys: domain, mode, max_age, policy_id (of the policy that must be served), published_id (last
    id certkeeper published; None), published_at (ISO 8601; None), status (published | pending |
    draining | removed), drain_until (ISO 8601; None), tlsrpt (the TLSRPT value published; ""), fleet_mx
    (the MX names a policy without mx takes from the fleet; None).
    """
    now = now or datetime.now(UTC)
    serve = domains_to_serve(config, now)
    from_fleet = {m.domain for m in config.mta_sts if m.fleet_mx}
    rows: list[dict[str, object]] = []
    for domain in sorted(set(serve) | set(known_domains(config))):
        st = load_state(config, domain)
        policy = serve.get(domain)
        current = st.current
        configured = any(m.domain == domain for m in config.mta_sts)
        if policy is None:
            status = "removed"
        elif current is None or current.policy_id != policy.policy_id():
            status = "pending"
        else:
            status = "published" if configured else "draining"
        until = st.drain_until() if not configured else None
        error, retry_at = last_failure(config, domain)
        rows.append({
            "domain": domain,
            "mode": policy.mode if policy else None,
            "max_age": policy.max_age if policy else None,
            "policy_id": policy.policy_id() if policy else None,
            "published_id": current.policy_id if current else None,
            "published_at": current.published_at.isoformat(timespec="seconds") if current else None,
            "status": status,
            "drain_until": until.isoformat(timespec="seconds") if until else None,
            "tlsrpt": st.tlsrpt,
            "error": error or None,  # the last failed publication, and when the daemon tries again
            "retry_at": retry_at.isoformat(timespec="seconds") if retry_at else None,
            # [fleet], a table without mx: the MX names the policy lists (the fleet's, as last seen)
            "fleet_mx": list(policy.mx) if policy and domain in from_fleet else None,
        })
    return rows


def failure_path(config: Config, domain: str) -> Path:
    """``STATE/mta-sts/DOMAIN.retry``: the last failed publication of ``_mta-sts.DOMAIN`` and its retry time."""
    return config.state_dir / "mta-sts" / f"{domain}.retry"


def last_failure(config: Config, domain: str) -> tuple[str, datetime | None]:
    """(error, retry time) of the last failed publication of the domain's id; ("", None) when none."""
    try:
        data = json.loads(failure_path(config, domain).read_text())
        return str(data["error"]), datetime.fromisoformat(data["retry_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return "", None
