"""The state of DKIM keys and the rotation planner: plain data and pure functions.

``STATE/dkim/DOMAIN.json`` holds one ``DomainState`` per [[dkim]] domain; the
lifecycle of its keys (pending, active, retiring, revoked, removed) is
described in ``certkeeper.network.rotation``, which executes the steps. This
module is what ``certkeeper status`` and the metrics listener need to read that
state and say what happens next: it imports no DNS or network code, so a
status request or a metrics scrape never loads dnspython.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from certkeeper.core import dkim
from certkeeper.core.config import Config, DkimConfig
from certkeeper.core.errors import ConfigError
from certkeeper.core.files import set_aside, set_aside_copies, write_atomic

STATES = ("pending", "active", "retiring", "revoked", "removed")
NEVER = datetime.max.replace(tzinfo=UTC)  # a step so far ahead that datetime cannot count that far


def after(when: datetime, delay: timedelta) -> datetime:
    """``when + delay``, or ``NEVER`` where that is past the last datetime (a huge duration never overflows)."""
    try:
        return when + delay
    except OverflowError:
        return NEVER if delay > timedelta(0) else datetime.min.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------
# State (plain data, JSON on disk).


@dataclass(frozen=True)
class KeyState:
    """One key and the times it passed each step (aware UTC datetimes)."""

    selector: str
    algorithm: str
    state: str
    created: datetime
    key_file: str
    record: str = ""  # the TXT value that publishes it ("" until the key is generated)
    emergency: bool = False  # rotate-dkim --now: switch as soon as visible
    published: datetime | None = None  # sent to the DNS primary
    visible: datetime | None = None  # every authoritative server answered it
    activated: datetime | None = None
    retired: datetime | None = None
    revoked: datetime | None = None
    removed: datetime | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown key state {self.state!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyState:
        times = {"created", "published", "visible", "activated", "retired", "revoked", "removed"}
        values: dict[str, Any] = {k: datetime.fromisoformat(v) if k in times and v else v for k, v in data.items()}
        return cls(**values)


# After a failed signer switch (its checks, its hook or its probe), the switch is tried again this long
# after the 1st, 2nd, 3rd, later failure in a row (each try restarts the signer).
SWITCH_BACKOFF = (timedelta(minutes=15), timedelta(hours=1), timedelta(hours=4), timedelta(days=1))


@dataclass(frozen=True)
class DomainState:
    domain: str
    keys: tuple[KeyState, ...] = ()
    switch_failures: int = 0  # failed signer switches in a row (0: the last one worked)
    switch_error: str = ""  # why the last one failed
    switch_retry: datetime | None = None  # no switch before this (the backoff)

    @property
    def selectors(self) -> frozenset[str]:
        return frozenset(k.selector for k in self.keys)

    def key(self, selector: str) -> KeyState:
        return next(k for k in self.keys if k.selector == selector)

    def with_key(self, new: KeyState) -> DomainState:
        """The state with ``new`` replacing the key of the same selector, or added."""
        if new.selector in self.selectors:
            return replace(self, keys=tuple(new if k.selector == new.selector else k for k in self.keys))
        return replace(self, keys=(*self.keys, new))

    def current(self, algorithm: str, state: str) -> KeyState | None:
        """The newest key of ``algorithm`` in ``state``."""
        found = [k for k in self.keys if k.algorithm == algorithm and k.state == state]
        return max(found, key=lambda k: k.created) if found else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"domain": self.domain, "keys": [k.to_json() for k in self.keys]}
        if self.switch_failures:
            data["switch"] = {"failures": self.switch_failures, "error": self.switch_error,
                              "retry": self.switch_retry.isoformat() if self.switch_retry else None}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DomainState:
        switch = data.get("switch") or {}
        retry = switch.get("retry")
        return cls(domain=data["domain"], keys=tuple(KeyState.from_json(k) for k in data.get("keys", [])),
                   switch_failures=int(switch.get("failures", 0)), switch_error=str(switch.get("error", "")),
                   switch_retry=datetime.fromisoformat(retry) if retry else None)

    def switch_failed(self, error: str, now: datetime) -> DomainState:
        """One more failed signer switch: the next try waits ``SWITCH_BACKOFF``."""
        failures = self.switch_failures + 1
        delay = SWITCH_BACKOFF[min(failures, len(SWITCH_BACKOFF)) - 1]
        return replace(self, switch_failures=failures, switch_error=error, switch_retry=now + delay)

    def switch_worked(self) -> DomainState:
        return replace(self, switch_failures=0, switch_error="", switch_retry=None)


def state_path(config: Config, domain: str) -> Path:
    return config.state_dir / "dkim" / f"{domain}.json"


def load_state(config: Config, domain: str) -> DomainState:
    """The domain's keys; none when there is no state, or when the file cannot be read or holds another
    shape: it is then moved aside (``files.set_aside``, one log line) and only this domain starts over
    (its keys on disk stay where they are; a new key is made and published)."""
    path = state_path(config, domain)
    try:
        data = json.loads(path.read_text())
        state = DomainState.from_json(data)
        if state.domain != domain or not all(isinstance(getattr(k, f), str) for k in state.keys
                                             for f in ("selector", "algorithm", "key_file", "record")):
            raise TypeError("keys of another shape")
        for key in state.keys:
            times = (key.created, key.published, key.visible, key.activated, key.retired, key.revoked, key.removed)
            if not isinstance(key.created, datetime) or any(
                    when is not None and (not isinstance(when, datetime) or when.tzinfo is None) for when in times):
                raise TypeError(f"key {key.selector}: a time that is missing or has no time zone")
        if state.switch_retry is not None and state.switch_retry.tzinfo is None:
            raise TypeError("the switch retry time has no time zone")
        return state
    except FileNotFoundError:
        return DomainState(domain)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        set_aside(path, f"DKIM state of {domain}: {getattr(exc, 'strerror', None) or exc}")
        return DomainState(domain)


def set_aside_files(config: Config, domain: str) -> list[Path]:
    """Copies of the domain's state file that were set aside as unreadable."""
    return set_aside_copies(state_path(config, domain))


def save_state(config: Config, state: DomainState) -> None:
    path = state_path(config, state.domain)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, (json.dumps(state.to_json(), indent=1) + "\n").encode(), 0o600)


# ---------------------------------------------------------------------------
# The planner (pure).


@dataclass(frozen=True)
class Action:
    """One step: ``create`` a key for ``algorithm``, or ``generate`` | ``publish`` | ``activate`` |
    ``retire`` | ``revoke`` | ``remove`` the key ``selector``."""

    kind: str
    algorithm: str
    selector: str = ""


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]  # due now, in the order to run them
    next_at: datetime | None  # when the next step falls due (None: nothing scheduled)


def plan(state: DomainState, item: DkimConfig, now: datetime) -> Plan:
    """What is due at ``now`` for one domain, and when the next step will be."""
    steps = schedule(state, item)
    due = tuple(action for at, action in steps if at <= now)
    later = [at for at, _ in steps if at > now]
    return Plan(due, min(later) if later else None)


def schedule(state: DomainState, item: DkimConfig) -> list[tuple[datetime, Action]]:
    """Every next step of every key with the time it falls due, earliest first."""
    steps: list[tuple[datetime, Action]] = []
    for algorithm in item.algorithms:
        steps += _algorithm_steps(state, item, algorithm)
    for key in state.keys:
        if key.state in ("pending", "active") and key.algorithm not in item.algorithms:
            steps.append((key.created, Action("retire", key.algorithm, key.selector)))  # algorithm dropped
        elif key.state == "retiring" and key.retired:
            steps.append((after(key.retired, item.retire_after), Action("revoke", key.algorithm, key.selector)))
        elif key.state == "revoked" and key.revoked:
            steps.append((after(key.revoked, item.remove_after), Action("remove", key.algorithm, key.selector)))
    if state.switch_retry is not None:  # a failed signer switch: steps that switch wait for the backoff
        retry = state.switch_retry
        steps = [(max(at, retry), action) if action.kind in ("activate", "retire") else (at, action)
                 for at, action in steps]
    return sorted(steps, key=lambda step: step[0])


def _algorithm_steps(state: DomainState, item: DkimConfig, algorithm: str) -> list[tuple[datetime, Action]]:
    active = state.current(algorithm, "active")
    pending = state.current(algorithm, "pending")
    if pending is None:
        if active is None or active.activated is None:
            return [(datetime.min.replace(tzinfo=UTC), Action("create", algorithm))]
        # Start early enough that the new key has been visible publish_ahead when rotate_every is up.
        return [(after(active.activated, item.rotate_every - item.publish_ahead), Action("create", algorithm))]
    if not pending.record:
        return [(pending.created, Action("generate", algorithm, pending.selector))]
    if pending.visible is None:
        return [(pending.created, Action("publish", algorithm, pending.selector))]
    # Nobody signs with this algorithm yet, or an emergency: switch as soon as every server answers.
    ahead = timedelta(0) if pending.emergency or active is None else item.publish_ahead
    return [(after(pending.visible, ahead), Action("activate", algorithm, pending.selector))]


def new_key(state: DomainState, item: DkimConfig, algorithm: str, now: datetime, taken: frozenset[str] = frozenset(),
            emergency: bool = False) -> KeyState:
    """A pending key with a selector never used before (``taken``: names seen outside the state)."""
    selector = _selector(item, algorithm, now, state.selectors | taken)
    path = item.key_dir / dkim.key_file_name(item.domain, selector)
    return KeyState(selector=selector, algorithm=algorithm, state="pending", created=now, key_file=str(path),
                    emergency=emergency)


def request_rotation(state: DomainState, item: DkimConfig, now: datetime, emergency: bool,
                     taken: frozenset[str] = frozenset()) -> DomainState:
    """Start a rotation now for every algorithm: a new pending key, unless one is already under way
    (an emergency then marks it so that it switches as soon as it is visible)."""
    for algorithm in item.algorithms:
        pending = state.current(algorithm, "pending")
        if pending is None:
            state = state.with_key(new_key(state, item, algorithm, now, taken, emergency))
        elif emergency and not pending.emergency:
            state = state.with_key(replace(pending, emergency=True))
    return state


def activated(state: DomainState, selector: str, now: datetime) -> DomainState:
    """The key becomes active; the key it replaces (same algorithm) starts retiring."""
    new = state.key(selector)
    old = state.current(new.algorithm, "active")
    if old is not None:
        state = state.with_key(replace(old, state="retiring", retired=now))
    return state.with_key(replace(new, state="active", activated=now))


def _selector(item: DkimConfig, algorithm: str, now: datetime, taken: frozenset[str] | set[str]) -> str:
    """``dkim.selector_for``, its problem reported as a config error (config.py checks only sample dates)."""
    try:
        selector = dkim.selector_for(item.selector_format, algorithm, now, taken)
    except ValueError as exc:
        raise ConfigError([f"dkim {item.domain}: selector_format: {exc}"]) from None
    name = dkim.record_name(selector, item.domain)
    if len(name) > 253:  # RFC 1035 2.3.4
        raise ConfigError([f"dkim {item.domain}: selector_format: {name} is longer than 253 characters"])
    return selector



# ---------------------------------------------------------------------------
# The status table.


def status_rows(config: Config) -> list[dict[str, Any]]:
    """One row per key not yet removed (or one per algorithm without a key), for ``certkeeper status``:
    domain, selector, algorithm, state, created, activated, retired, revoked, next_action, next_action_at
    (ISO 8601 UTC strings or None; next_action_at None means as soon as certkeeper runs)."""
    rows: list[dict[str, Any]] = []
    for item in config.dkim:
        state = load_state(config, item.domain)
        steps = schedule(state, item)
        keys = [k for k in state.keys if k.state != "removed"]
        for key in sorted(keys, key=lambda k: (k.algorithm, k.created)):
            action, at = _next_step(key, steps)
            rows.append({
                "domain": item.domain, "selector": key.selector, "algorithm": key.algorithm, "state": key.state,
                "created": _iso(key.created), "activated": _iso(key.activated), "retired": _iso(key.retired),
                "revoked": _iso(key.revoked), "next_action": action, "next_action_at": _iso(at),
            })
            if key.state == "pending" and state.switch_failures and action == "activate":
                # The switch to it failed (and was rolled back): the old selector still signs.
                rows[-1]["switch_error"] = (f"{state.switch_error} ({state.switch_failures} failed switch"
                                            f"{'es' if state.switch_failures > 1 else ''} in a row)")
        for algorithm in item.algorithms:
            if not any(k.algorithm == algorithm for k in keys):
                rows.append({"domain": item.domain, "selector": None, "algorithm": algorithm, "state": "none",
                             "created": None, "activated": None, "retired": None, "revoked": None,
                             "next_action": "create key", "next_action_at": None})
    return rows


_STEP_NAMES = {"create": "rotate", "generate": "generate key", "publish": "publish", "activate": "activate",
               "retire": "retire", "revoke": "revoke", "remove": "remove record"}


def _next_step(key: KeyState, steps: list[tuple[datetime, Action]]) -> tuple[str | None, datetime | None]:
    """What happens next to ``key`` and when; an active key retires when its successor activates."""
    for at, action in steps:
        when = None if at.year == 1 else at  # datetime.min: at once
        if action.selector == key.selector:
            return _STEP_NAMES[action.kind], when
        if key.state == "active" and action.algorithm == key.algorithm:
            if action.kind == "create":
                return "rotate", when
            if action.kind == "activate":
                return "retire", when
            if action.kind in ("generate", "publish"):
                return "retire", None  # publish_ahead after its successor is visible
    return None, None


def _iso(when: datetime | None) -> str | None:
    """ISO 8601 in UTC with "Z", as ``certkeeper status --json`` prints every time."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z") if when else None
