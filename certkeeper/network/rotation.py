"""DKIM key rotation: every key's lifecycle, persisted so that a crash resumes where it stopped.

This module owns the state of each [[dkim]] domain (``STATE/dkim/DOMAIN.json``)
and every transition of a key through it (M3AAWG key rotation practice,
dkim-rotate)::

    pending   key written to key_dir; record SELECTOR._domainkey.DOMAIN published,
              then seen on every authoritative server ("visible")
    active    publish_ahead after it became visible: the signer is switched to it
              (the first key of an algorithm, and an emergency --now key, switch
              as soon as they are visible)
    retiring  replaced by a newer key: still published, no longer signing
    revoked   retire_after later: the record becomes "v=DKIM1; p=" (RFC 6376 3.6.1),
              saved once every authoritative server answers that
    removed   remove_after later: the record is deleted; once no authoritative server
              has it, the private key is deleted, or with reveal_retired published
              for deniability (dkim-rotate)

A new selector is never one that is in the state, has a key file in key_dir, or
already has a record on an authoritative server (a key made by hand). Right
before the switch, the record is checked on every server once more.

``plan(state, item, now)`` is pure: it says which steps are due and when the
next one will be. ``run_due`` executes due steps one at a time, re-planning
after each. Every step is idempotent and saves the state right after its side
effect, so a step interrupted by a crash simply runs again: a key file already
written is reused, a record is re-published (publish replaces), the signer
file is rewritten (unchanged) and its hook re-run.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import logging
import os
import pwd
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from certkeeper.core import dkim
from certkeeper.core.config import Config, DkimConfig
from certkeeper.core.errors import CertkeeperError, ConfigError, DNSError, LocalError
from certkeeper.core.files import fsync_dir, make_dirs, set_aside, set_aside_copies, write_atomic
from certkeeper.keeper import signers
from certkeeper.network.dns import Backend, RecordSet, backend_for
from certkeeper.network.dns.propagation import name_in_use, visible_everywhere, wait_until_absent, wait_until_visible

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

STATES = ("pending", "active", "retiring", "revoked", "removed")
RETRY_AFTER = timedelta(minutes=15)  # when a run failed, try again this soon
MAX_SELECTOR_TRIES = 20  # selectors skipped because DNS already holds a record there (made by hand)
CRASH_ENV = "CERTKEEPER_CRASH_AT"  # tests: "dkim-STEP" makes the process SIGKILL itself after STEP's side effect
REVEAL_DIR = "revealed"  # under key_dir: old private keys for a web server to publish (dkim-rotate's layout)


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


@dataclass(frozen=True)
class DomainState:
    domain: str
    keys: tuple[KeyState, ...] = ()

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
        return {"domain": self.domain, "keys": [k.to_json() for k in self.keys]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DomainState:
        return cls(domain=data["domain"], keys=tuple(KeyState.from_json(k) for k in data.get("keys", [])))


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
            steps.append((key.retired + item.retire_after, Action("revoke", key.algorithm, key.selector)))
        elif key.state == "revoked" and key.revoked:
            steps.append((key.revoked + item.remove_after, Action("remove", key.algorithm, key.selector)))
    return sorted(steps, key=lambda step: step[0])


def _algorithm_steps(state: DomainState, item: DkimConfig, algorithm: str) -> list[tuple[datetime, Action]]:
    active = state.current(algorithm, "active")
    pending = state.current(algorithm, "pending")
    if pending is None:
        if active is None or active.activated is None:
            return [(datetime.min.replace(tzinfo=UTC), Action("create", algorithm))]
        # Start early enough that the new key has been visible publish_ahead when rotate_every is up.
        return [(active.activated + item.rotate_every - item.publish_ahead, Action("create", algorithm))]
    if not pending.record:
        return [(pending.created, Action("generate", algorithm, pending.selector))]
    if pending.visible is None:
        return [(pending.created, Action("publish", algorithm, pending.selector))]
    # Nobody signs with this algorithm yet, or an emergency: switch as soon as every server answers.
    ahead = timedelta(0) if pending.emergency or active is None else item.publish_ahead
    return [(pending.visible + ahead, Action("activate", algorithm, pending.selector))]


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


def signing_keys(state: DomainState) -> list[signers.SigningKey]:
    return [signers.SigningKey(state.domain, k.selector, k.algorithm, Path(k.key_file))
            for k in state.keys if k.state == "active"]


# ---------------------------------------------------------------------------
# Executing steps (files, DNS, the signer).


@dataclass
class _Run:
    config: Config
    item: DkimConfig
    now: datetime
    progress: Progress
    done: set[Action] = field(default_factory=set)

    def say(self, message: str) -> None:
        log.info("dkim %s: %s", self.item.domain, message)
        self.progress(f"{self.item.domain}: {message}")


def run_steps(config: Config, item: DkimConfig, state: DomainState, now: datetime, progress: Progress) -> DomainState:
    """Run every step due at ``now``, one at a time; each step runs at most once per call."""
    run = _Run(config, item, now, progress)
    for _ in range(8 * (len(state.keys) + len(item.algorithms)) + 8):
        due = [a for a in plan(state, item, now).actions if a not in run.done]
        if not due:
            break
        run.done.add(due[0])
        state = STEPS[due[0].kind](run, state, due[0])
    return state


def _create(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = new_key(state, run.item, action.algorithm, run.now, taken_selectors(run.config, run.item, state, run.now))
    state = state.with_key(key)
    save_state(run.config, state)
    run.say(f"new {key.algorithm} key, selector {key.selector} (pending)")
    return state


def _generate(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    path = Path(key.key_file)
    private = _existing_key(path, key.algorithm)
    if private is None:
        private = dkim.generate_private_key(key.algorithm)
        uid, gid = _owner(run.item)
        data = dkim.private_key_file(private, raw_ed25519=signers.raw_ed25519(run.item.signer))
        write_atomic(path, data, run.item.key_mode, uid, gid)
        run.say(f"wrote {path} (mode {run.item.key_mode:04o})")
    else:
        run.say(f"reusing {path}, written before an interruption")
    _crash_point("generate")
    state = state.with_key(replace(key, record=dkim.key_record_for(private).render()))
    save_state(run.config, state)
    return state


def _publish(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    rrset = _record_set(run, key.selector, key.record)
    _backend(run).publish(rrset)
    run.say(f"published {rrset.name} TXT ({key.algorithm})")
    if key.published is None:
        key = replace(key, published=run.now)
        state = state.with_key(key)
        save_state(run.config, state)
    _crash_point("publish")
    wait_until_visible(run.config, rrset, run.progress)
    state = state.with_key(replace(key, visible=run.now))
    save_state(run.config, state)
    run.say(f"{rrset.name} is answered by every authoritative server")
    return state


def _activate(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    private = _existing_key(Path(key.key_file), key.algorithm)
    if private is None or dkim.key_record_for(private).render() != key.record:
        # Never let the signer use a key other than the one every server publishes: drop it, start again.
        log.warning("dkim %s: %s is missing or not the published key", run.item.domain, key.key_file)
        state = state.with_key(replace(key, state="retiring", retired=run.now))
        # Its successor starts now (an emergency stays one), not at the next scheduled rotation.
        taken = taken_selectors(run.config, run.item, state, run.now)
        state = state.with_key(new_key(state, run.item, key.algorithm, run.now, taken, key.emergency))
        save_state(run.config, state)
        run.say(f"{key.key_file} is missing or not the key published for selector {key.selector}; "
                "it is retired and a new key takes its place")
        return state
    _ensure_visible(run, key)
    new_state = activated(state, action.selector, run.now)
    _switch_signer(run, new_state)
    _crash_point("activate")
    save_state(run.config, new_state)
    run.say(f"selector {action.selector} is active: the signer uses it now")
    for key in new_state.keys:
        if key.state == "retiring" and state.key(key.selector).state == "active":
            run.say(f"selector {key.selector} is retiring (still published, no longer signing)")
    return new_state


def _retire(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    new_state = state.with_key(replace(key, state="retiring", retired=run.now))
    if key.state == "active":
        _switch_signer(run, new_state)
    save_state(run.config, new_state)
    run.say(f"selector {key.selector} is retiring: {key.algorithm} is no longer in algorithms")
    return new_state


def _revoke(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    rrset = _record_set(run, key.selector, dkim.REVOKED.render())
    _backend(run).publish(rrset)
    _crash_point("revoke")
    # Saved as revoked only once every server answers "p=": the removal (and a revealed private key)
    # must never come while some server still hands out the old public key.
    wait_until_visible(run.config, rrset, run.progress)
    state = state.with_key(replace(key, state="revoked", revoked=run.now))
    save_state(run.config, state)
    run.say(f"selector {key.selector} is revoked ({rrset.name} TXT \"{dkim.REVOKED.render()}\")")
    return state


def _remove(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    name = dkim.record_name(key.selector, run.item.domain)
    _backend(run).remove(name, "TXT")
    _crash_point("remove")
    wait_until_absent(run.config, name, "TXT", run.progress)
    _dispose_private_key(run, key)
    state = state.with_key(replace(key, state="removed", removed=run.now))
    save_state(run.config, state)
    run.say(f"selector {key.selector} is removed from DNS")
    return state


STEPS: dict[str, Callable[[_Run, DomainState, Action], DomainState]] = {
    "create": _create, "generate": _generate, "publish": _publish, "activate": _activate,
    "retire": _retire, "revoke": _revoke, "remove": _remove,
}


def _ensure_visible(run: _Run, key: KeyState) -> None:
    """Right before the switch: every authoritative server must still answer the key's record (it was
    visible publish_ahead ago, but a zone may have been edited since); publish it again and wait if not."""
    rrset = _record_set(run, key.selector, key.record)
    if visible_everywhere(run.config, rrset):
        return
    run.say(f"{rrset.name} is no longer answered by every authoritative server; publishing it again")
    _backend(run).publish(rrset)
    wait_until_visible(run.config, rrset, run.progress)


def _switch_signer(run: _Run, new_state: DomainState) -> None:
    """Write the signer file with every key that signs after this step; always run the hook
    (a crash may have come between an earlier write and its hook)."""
    item = run.item
    keys = signing_keys(new_state)
    path = signers.config_path(item)
    for other in run.config.dkim:
        if other.domain != item.domain and other.signer == item.signer and signers.config_path(other) == path:
            keys += signing_keys(load_state(run.config, other.domain))
    with _lock(run.config, ".signers"):
        signers.apply(run.config, item, keys, run.progress, force_hook=True)


def _dispose_private_key(run: _Run, key: KeyState) -> None:
    path = Path(key.key_file)
    if run.item.reveal_retired and path.exists() and key.record:
        private = _existing_key(path, key.algorithm)
        if private is not None:
            target = run.item.key_dir / REVEAL_DIR / dkim.reveal_name(dkim.parse_key_record(key.record))
            make_dirs(target.parent, 0o755)  # not narrowed by certkeeper's umask 077: revealed keys are public
            write_atomic(target, dkim.private_key_file(private), 0o644)
            run.say(f"revealed the retired private key as {target}")
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)
        run.say(f"deleted {path}")


def _existing_key(path: Path, algorithm: str) -> dkim.DkimPrivateKey | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        private = dkim.load_private_key(data)
    except ValueError as exc:
        raise LocalError(f"{path}: not a DKIM private key ({exc}); move it aside") from None
    if dkim.algorithm_of(private) != algorithm:
        raise LocalError(f"{path}: holds a {dkim.algorithm_of(private)} key, not {algorithm}; move it aside")
    return private


def taken_selectors(config: Config, item: DkimConfig, state: DomainState, now: datetime) -> frozenset[str]:
    """Selectors a new key must not take: key files in key_dir (even if the state was lost) and the
    names that already have a record on an authoritative server (a key made by hand, the guide's)."""
    taken = set(_selectors_on_disk(item))
    for algorithm in item.algorithms:
        for _ in range(MAX_SELECTOR_TRIES):
            selector = _selector(item, algorithm, now, state.selectors | taken)
            if not name_in_use(config, dkim.record_name(selector, item.domain)):
                break
            log.info("dkim %s: selector %s already has a record in DNS; not using it", item.domain, selector)
            taken.add(selector)
        else:
            raise DNSError(f"dkim {item.domain}: {MAX_SELECTOR_TRIES} selectors in a row already have records "
                           f"in DNS; change selector_format")
    return frozenset(taken)


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


def _selectors_on_disk(item: DkimConfig) -> frozenset[str]:
    """Selectors of key files already in key_dir: never reuse one, even if the state was lost."""
    prefix, suffix = f"{item.domain}.", ".key"
    try:
        names = os.listdir(item.key_dir)
    except OSError:
        return frozenset()
    return frozenset(n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix))


def _owner(item: DkimConfig) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(item.key_owner).pw_uid if item.key_owner else -1
    except KeyError:
        raise LocalError(f"dkim {item.domain}: key_owner {item.key_owner!r} is no user on this host") from None
    try:
        gid = grp.getgrnam(item.key_group).gr_gid if item.key_group else -1
    except KeyError:
        raise LocalError(f"dkim {item.domain}: key_group {item.key_group!r} is no group on this host") from None
    return uid, gid


def _record_set(run: _Run, selector: str, value: str) -> RecordSet:
    return RecordSet(dkim.record_name(selector, run.item.domain), "TXT", (value,), run.config.dns.ttl)


def _backend(run: _Run) -> Backend:
    return backend_for(run.config, run.progress)


def _crash_point(step: str) -> None:
    """Tests only: die as kill -9 would, right after ``step``'s side effect and before its state is saved."""
    if os.environ.get(CRASH_ENV) == f"dkim-{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _lock(config: Config, name: str, wait: bool = True) -> Iterator[bool]:
    """An flock on STATE/dkim/NAME.lock: one process at a time works on a domain (daemon or CLI)."""
    path = config.state_dir / "dkim" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Entry points: the daemon's job, the CLI command, the status table.


@dataclass(frozen=True)
class DueReport:
    errors: tuple[str, ...]  # one line per domain that failed
    next_due: datetime | None  # when run_due should run next


def run_due(config: Config, now: datetime, progress: Progress) -> DueReport:
    """Run every step due at ``now`` for every [[dkim]] domain (the daemon's scheduled job).

    A domain another process is working on is skipped; a failure is logged and
    reported, and the domain is retried after ``RETRY_AFTER``.
    """
    errors: list[str] = []
    wake: list[datetime] = []
    for item in config.dkim:
        with _lock(config, item.domain, wait=False) as locked:
            if not locked:
                log.info("dkim %s: another certkeeper process is working on it; skipped", item.domain)
                wake.append(now + RETRY_AFTER)
                continue
            try:
                state = run_steps(config, item, load_state(config, item.domain), now, progress)
            except (CertkeeperError, OSError) as exc:
                log.error("dkim %s: %s", item.domain, exc)
                errors.append(f"{item.domain}: {exc}")
                wake.append(now + RETRY_AFTER)
                continue
        next_at = plan(state, item, now).next_at
        if next_at is not None:
            wake.append(next_at)
    return DueReport(tuple(errors), min(wake) if wake else None)


def next_due(config: Config, now: datetime) -> datetime | None:
    """When the next DKIM step falls due (for a scheduler), without doing anything."""
    times = [plan(load_state(config, i.domain), i, now) for i in config.dkim]
    due = [now if p.actions else p.next_at for p in times]
    return min((t for t in due if t is not None), default=None)


def selected_items(config: Config, domain: str | None) -> list[DkimConfig]:
    if not domain:
        if not config.dkim:
            raise ConfigError([f"{config.path}: dkim: no [[dkim]] table is configured"])
        return list(config.dkim)
    wanted = domain.lower().rstrip(".")
    items = [i for i in config.dkim if i.domain == wanted]
    if not items:
        raise ConfigError([f"{config.path}: dkim: {domain!r} has no [[dkim]] table"])
    return items


def rotate_now(config: Config, item: DkimConfig, now: datetime, emergency: bool, progress: Progress) -> None:
    with _lock(config, item.domain, wait=False) as locked:
        if not locked:
            raise LocalError(f"another certkeeper process is working on {item.domain} "
                             f"({config.state_dir / 'dkim' / item.domain}.lock); try again later")
        before = load_state(config, item.domain)
        state = request_rotation(before, item, now, emergency, taken_selectors(config, item, before, now))
        if state != before:
            save_state(config, state)
            for key in state.keys:
                if key.selector not in before.selectors:
                    progress(f"{item.domain}: new {key.algorithm} key, selector {key.selector} (pending"
                             + (", emergency: publish_ahead skipped)" if emergency else ")"))
        state = run_steps(config, item, state, now, progress)
    for algorithm in item.algorithms:
        pending = state.current(algorithm, "pending")
        if pending is not None and pending.visible is not None:
            at = pending.visible + item.publish_ahead
            progress(f"{item.domain}: selector {pending.selector} becomes active at {at:%Y-%m-%d %H:%M} UTC "
                     "(publish_ahead); the daemon switches the signer then")


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
