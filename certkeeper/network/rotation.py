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
next one will be. It, the state and the status rows live in
``certkeeper.core.dkimstate`` (no DNS code: status and metrics read them); this
module executes the steps. ``run_due`` executes due steps one at a time, re-planning
after each. Every step is idempotent and saves the state right after its side
effect, so a step interrupted by a crash simply runs again: a key file already
written is reused, a record is re-published (publish replaces), the signer
file is rewritten (unchanged) and its hook re-run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from certkeeper.core import dkim
from certkeeper.core.config import Config, DkimConfig
from certkeeper.core.dkimstate import (  # noqa: F401 - the state and the planner, also used through this module
    STATES,
    Action,
    DomainState,
    KeyState,
    Plan,
    _selector,
    activated,
    load_state,
    new_key,
    plan,
    request_rotation,
    save_state,
    schedule,
    set_aside_files,
    state_path,
    status_rows,
)
from certkeeper.core.errors import CertkeeperError, ConfigError, DNSError, LocalError, ServiceError
from certkeeper.keeper import signers
from certkeeper.network.dns import Backend, RecordSet, backend_for
from certkeeper.network.dns.propagation import name_in_use, visible_everywhere, wait_until_absent, wait_until_visible
from certkeeper.network.keeper_client import Keeper

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

RETRY_AFTER = timedelta(minutes=15)  # when a run failed, try again this soon
MAX_SELECTOR_TRIES = 20  # selectors skipped because DNS already holds a record there (made by hand)
CRASH_ENV = "CERTKEEPER_CRASH_AT"  # tests: "dkim-STEP" makes the process SIGKILL itself after STEP's side effect
REVEAL_DIR = "revealed"  # under key_dir: old private keys for a web server to publish (dkim-rotate's layout)


# ---------------------------------------------------------------------------
# Adoption (pure).


def adopted(state: DomainState, item: DkimConfig, selector: str, algorithm: str, key_file: str, record: str,
            now: datetime, signs: bool) -> DomainState:
    """A selector made by hand (its record already in DNS) becomes one of certkeeper's keys.

    When ``signs`` (its private key is at hand, of a configured algorithm, and no key of that
    algorithm is active) it is active: rotated on schedule like certkeeper's own. Otherwise it is
    retiring from ``now``: revoked after retire_after and removed after remove_after.
    """
    if selector in state.selectors:
        raise LocalError(f"dkim {item.domain}: selector {selector} is already certkeeper's")
    active = signs and algorithm in item.algorithms and state.current(algorithm, "active") is None
    return state.with_key(KeyState(
        selector=selector, algorithm=algorithm, state="active" if active else "retiring", created=now,
        key_file=key_file, record=record, published=now, visible=now, activated=now if active else None,
        retired=None if active else now))


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
    keeper: Keeper
    done: set[Action] = field(default_factory=set)

    def say(self, message: str) -> None:
        """One progress line: the worker's keeper logs it (the daemon) or prints it (the CLI), once."""
        self.progress(f"{self.item.domain}: {message}")


def run_steps(config: Config, item: DkimConfig, state: DomainState, now: datetime, progress: Progress,
              keeper: Keeper) -> DomainState:
    """Run every step due at ``now``, one at a time; each step runs at most once per call.

    Private keys and the signer are the keeper's: a step asks it for a key's record, to make
    a key, to switch the signer or to dispose of a key; DNS work is done here. The keeper puts
    the configured owner, group and mode back on the key files first, on every run."""
    run = _Run(config, item, now, progress, keeper)
    keeper.enforce_dkim_keys(item.domain, run.say)
    for _ in range(8 * (len(state.keys) + len(item.algorithms)) + 8):
        due = [a for a in plan(state, item, now).actions if a not in run.done]
        if not due:
            break
        run.done.add(due[0])
        state = STEPS[due[0].kind](run, state, due[0])
    return state


def _create(run: _Run, state: DomainState, action: Action) -> DomainState:
    taken = taken_selectors(run.config, run.item, state, run.now, run.keeper)
    key = new_key(state, run.item, action.algorithm, run.now, taken)
    state = state.with_key(key)
    save_state(run.config, state)
    run.say(f"new {key.algorithm} key, selector {key.selector} (pending)")
    return state


def _generate(run: _Run, state: DomainState, action: Action) -> DomainState:
    key = state.key(action.selector)
    record, created = run.keeper.dkim_key(run.item.domain, key.selector, key.algorithm, create=True)
    if created:
        run.say(f"wrote {key.key_file} (mode {run.item.key_mode:04o})")
    else:
        run.say(f"reusing {key.key_file}, written before an interruption")
    _crash_point("generate")
    state = state.with_key(replace(key, record=record))
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
    record, _ = run.keeper.dkim_key(run.item.domain, key.selector, key.algorithm, create=False)
    if not record or record != key.record:
        # Never let the signer use a key other than the one every server publishes: drop it, start again.
        log.warning("dkim %s: %s is missing or not the published key", run.item.domain, key.key_file)
        state = state.with_key(replace(key, state="retiring", retired=run.now))
        # Its successor starts now (an emergency stays one), not at the next scheduled rotation.
        taken = taken_selectors(run.config, run.item, state, run.now, run.keeper)
        state = state.with_key(new_key(state, run.item, key.algorithm, run.now, taken, key.emergency))
        save_state(run.config, state)
        run.say(f"{key.key_file} is missing or not the key published for selector {key.selector}; "
                "it is retired and a new key takes its place")
        return state
    _ensure_visible(run, key)
    new_state = _switched(run, activated(state, action.selector, run.now), state)
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
        new_state = _switched(run, new_state, state)
    save_state(run.config, new_state)
    run.say(f"selector {key.selector} is retiring: {key.algorithm} is no longer in algorithms")
    return new_state


def _switched(run: _Run, new_state: DomainState, state: DomainState) -> DomainState:
    """``new_state`` once the signer uses its keys (verified); on failure nothing is advanced: the state
    stays ``state`` (the new key pending, the old one active), with the failure and its backoff saved."""
    try:
        _switch_signer(run, new_state, state)
    except SignerSwitchFailed as exc:
        save_state(run.config, state.switch_failed(str(exc), run.now))
        raise
    return new_state.switch_worked()


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


def _switch_signer(run: _Run, new_state: DomainState, old_state: DomainState) -> None:
    """Write the signer file with every key that signs after this step; always run the hook
    (a crash may have come between an earlier write and its hook). Checked before, probed after,
    rolled back on failure (``switch_verified``)."""
    item = run.item
    keys = signing_keys(new_state)
    path = signers.config_path(item)
    for other in run.config.dkim:
        if other.domain != item.domain and other.signer == item.signer and signers.config_path(other) == path:
            keys += signing_keys(load_state(run.config, other.domain))
    with _lock(run.config, ".signers"):
        switch_verified(run.config, item, [(k.domain, k.selector, k.algorithm) for k in keys], run.keeper,
                        run.progress, [k.selector for k in signing_keys(old_state)])


class SignerSwitchFailed(ServiceError):
    """A signer switch failed (its checks, its hook or its probe) and was rolled back."""


SWITCH_ALERT = "dkim-signer:{domain}"  # the alert episode of a domain's signer switches


def switch_verified(config: Config, item: DkimConfig, keys: Sequence[tuple[str, str, str]], keeper: Keeper,
                    progress: Progress, previous: Sequence[str] = ()) -> None:
    """Switch ``item``'s signer to ``keys`` (domain, selector, algorithm) and verify it.

    The keeper checks first (the signer's user reads each key, the service's own config test) and
    writes nothing when a check fails; it runs the hook and puts the old files back itself when the
    hook fails. Then the probe (``signer_probe.verify``): the service answers and signs a message
    with the new selectors, verified against the authoritative DNS. A failed probe rolls back here
    (the keeper restores the files and runs the hook again, the service is checked up). Any failure
    alerts once per episode and raises ``SignerSwitchFailed``; a later success sends the recovery.
    ``previous``: the domain's selectors that signed before (named in the alert)."""
    from certkeeper.network import signer_probe
    from certkeeper.network.alerts import Alerter

    alert_key = SWITCH_ALERT.format(domain=item.domain)
    what = f"DKIM signer switch for {item.domain}"
    selectors = sorted(s for d, s, _ in keys if d == item.domain)
    with signer_probe.ProbeSink(item) as sink:  # open before the hook restarts the MTA (see ProbeSink)
        try:
            keeper.switch_signer(item.domain, keys, progress)
        except CertkeeperError as exc:  # checks failed (nothing written) or the hook failed (the keeper rolled back)
            up = _service_up(item, signer_probe)
            _failed(config, item, keeper, alert_key, what, f"{exc}", up, previous, progress)
        try:
            signer_probe.verify(config, item, selectors, progress, sink=sink)
        except CertkeeperError as exc:
            try:
                restored = keeper.restore_signer(item.domain, progress)
            except CertkeeperError as again:
                restored = f"the rollback failed: {again}"
            up = _service_up(item, signer_probe)
            _failed(config, item, keeper, alert_key, what, f"dkim {item.domain}: {exc}; {restored}", up, previous,
                    progress)
    keeper.confirm_signer(item.domain)
    Alerter(config, keeper=keeper).recovered(alert_key, what, f"The signer signs with {', '.join(selectors)}.")


def _service_up(item: DkimConfig, signer_probe: Any) -> str:
    if not item.probe:
        return ""
    problem = signer_probe.wait_up(item)
    return f"the service is DOWN: {problem}" if problem else f"the service is up ({item.probe} answers)"


def _failed(config: Config, item: DkimConfig, keeper: Keeper, alert_key: str, what: str, error: str, up: str,
            previous: Sequence[str], progress: Progress) -> NoReturn:
    from certkeeper.network.alerts import Alerter

    message = f"{error}" + (f"; {up}" if up else "")
    log.error("%s", message)
    progress(f"{item.domain}: {message}")
    signing = ", ".join(sorted(previous))
    detail = (f"The signer keeps its previous configuration ({signing or 'as it was'}); the new selector is not "
              "active and the switch is tried again later.")
    Alerter(config, keeper=keeper).failed(alert_key, what, message, detail)
    raise SignerSwitchFailed(message)


def _dispose_private_key(run: _Run, key: KeyState) -> None:
    run.keeper.dispose_dkim_key(run.item.domain, key.selector, key.algorithm, run.progress)


def taken_selectors(config: Config, item: DkimConfig, state: DomainState, now: datetime,
                    keeper: Keeper) -> frozenset[str]:
    """Selectors a new key must not take: key files in key_dir (even if the state was lost) and the
    names that already have a record on an authoritative server (a key made by hand, the guide's)."""
    taken = set(keeper.dkim_selectors(item.domain))
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


def _record_set(run: _Run, selector: str, value: str) -> RecordSet:
    return RecordSet(dkim.record_name(selector, run.item.domain), "TXT", (value,), run.config.dns.ttl)


def _backend(run: _Run) -> Backend:
    return backend_for(run.config, run.progress, run.keeper)


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


def run_due(config: Config, now: datetime, progress: Progress, keeper: Keeper | None = None) -> DueReport:
    """Run every step due at ``now`` for every [[dkim]] domain (the daemon's scheduled job).

    ``keeper``: the worker's pipe; by default a ``LocalKeeper`` in this process.

    A domain another process is working on is skipped; a failure is logged and
    reported, and the domain is retried after ``RETRY_AFTER``.
    """
    keeper = keeper or _local_keeper(config)
    errors: list[str] = []
    wake: list[datetime] = []
    for item in config.dkim:
        with _lock(config, item.domain, wait=False) as locked:
            if not locked:
                log.info("dkim %s: another certkeeper process is working on it; skipped", item.domain)
                wake.append(now + RETRY_AFTER)
                continue
            try:
                state = run_steps(config, item, load_state(config, item.domain), now, progress, keeper)
            except (CertkeeperError, OSError) as exc:
                log.error("dkim %s: %s", item.domain, exc)
                errors.append(f"{item.domain}: {exc}")
                retry = load_state(config, item.domain).switch_retry if isinstance(exc, SignerSwitchFailed) else None
                wake.append(retry if retry is not None and retry > now else now + RETRY_AFTER)
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


def _local_keeper(config: Config) -> Keeper:
    from certkeeper.keeper.service import LocalKeeper

    return LocalKeeper(config)


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


def rotate_now(config: Config, item: DkimConfig, now: datetime, emergency: bool, progress: Progress,
               keeper: Keeper | None = None) -> None:
    with _lock(config, item.domain, wait=False) as locked:
        if not locked:
            raise LocalError(f"another certkeeper process is working on {item.domain} "
                             f"({config.state_dir / 'dkim' / item.domain}.lock); try again later")
        before = load_state(config, item.domain)
        if before.switch_retry is not None:  # the operator asks now: a failed switch is tried again at once
            before = replace(before, switch_retry=None)
        keeper = keeper or _local_keeper(config)
        state = request_rotation(before, item, now, emergency, taken_selectors(config, item, before, now, keeper))
        if state != before:
            save_state(config, state)
            for key in state.keys:
                if key.selector not in before.selectors:
                    progress(f"{item.domain}: new {key.algorithm} key, selector {key.selector} (pending"
                             + (", emergency: publish_ahead skipped)" if emergency else ")"))
        state = run_steps(config, item, state, now, progress, keeper)
    for algorithm in item.algorithms:
        pending = state.current(algorithm, "pending")
        if pending is not None and pending.visible is not None:
            at = pending.visible + item.publish_ahead
            progress(f"{item.domain}: selector {pending.selector} becomes active at {at:%Y-%m-%d %H:%M} UTC "
                     "(publish_ahead); the daemon switches the signer then")


def adopt(config: Config, item: DkimConfig, selector: str, now: datetime, progress: Progress,
          keeper: Keeper) -> KeyState:
    """``rotate-dkim --adopt SELECTOR``: take over a key made by hand (see ``adopted``).

    Its record is read from the authoritative servers. Its private key is looked for in key_dir
    (DOMAIN.SELECTOR.key) and where the signer's configuration names it; when found and matching
    the record it is copied into key_dir (owner, group, mode from the config) and the signer is
    switched to it. Without it, the selector is retired on schedule.
    """
    from certkeeper.network.dns.propagation import authoritative_servers, query, zone_of

    name = dkim.record_name(selector, item.domain)
    answers = [query(server, name, "TXT") for server in authoritative_servers(config, zone_of(config, name))]
    values = sorted({v for a in answers for v in a.values if "p=" in v.replace(" ", "")})
    if len(values) != 1:
        found = "; ".join(a.describe() for a in answers) or "no authoritative server"
        raise DNSError(f"dkim {item.domain}: {name} TXT holds no single DKIM key record to adopt ({found})")
    try:
        record = dkim.parse_key_record(values[0])
    except ValueError as exc:
        raise DNSError(f"dkim {item.domain}: {name} TXT is not a DKIM key record: {exc}") from None
    if not record.public_key:
        raise DNSError(f"dkim {item.domain}: {name} TXT is already revoked (p=); nothing to adopt")
    target = item.key_dir / dkim.key_file_name(item.domain, selector)
    with _lock(config, item.domain, wait=False) as locked:
        if not locked:
            raise LocalError(f"another certkeeper process is working on {item.domain}; try again later")
        state = load_state(config, item.domain)
        if selector in state.selectors:
            raise LocalError(f"dkim {item.domain}: selector {selector} is already certkeeper's")
        # The keeper looks for the private key (key_dir, or where the signer's file names it) and,
        # when it matches the record, copies it into key_dir: "" when it has none.
        found = keeper.adopt_dkim_key(item.domain, selector, values[0], progress)
        private = found or None
        algorithm = found or _record_algorithm(record)
        state = adopted(state, item, selector, algorithm, str(target), values[0], now, signs=private is not None)
        key = state.key(selector)
        if key.state == "active":
            _switch_signer(_Run(config, item, now, progress, keeper), state, load_state(config, item.domain))
        save_state(config, state)
    if key.state == "active":
        progress(f"{item.domain}: adopted selector {selector} ({algorithm}): active, the signer uses it; "
                 f"rotated like certkeeper's own keys")
    else:
        why = "its private key was not found" if private is None else "another key of its algorithm is active"
        progress(f"{item.domain}: adopted selector {selector} ({algorithm}) as retiring ({why}): revoked after "
                 f"retire_after, removed after remove_after")
    return key


def _record_algorithm(record: dkim.KeyRecord) -> str:
    """The config name of a published key (rsa2048 ...), or e.g. rsa1024 for a size certkeeper never makes."""
    if record.key_type == "ed25519":
        return "ed25519"
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        bits = load_der_public_key(record.public_key).key_size  # type: ignore[union-attr]
    except ValueError:
        return "rsa"
    return f"rsa{bits}"

