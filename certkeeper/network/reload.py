"""After new certificate sets are on disk: reload each hook once, prove it, roll back what broke.

The order of one run (``reload_and_verify``), called by the runner once every
renewed set is installed:

1. plan: group the renewed certificates by hook, so a hook shared by several
   certificates runs once, after all their files are in place (certbot#4823);
2. probe every verify endpoint once, to know what was up BEFORE the run: a
   service that was already down is reported as such, never blamed on the new
   certificate (and nothing is rolled back for it);
3. run each hook (with its timeout), then retry its endpoints with a short
   backoff for up to ``verify_timeout`` until each serves the new leaf;
4. for every certificate whose hook failed or whose endpoint served the wrong
   or no certificate: restore the previous set, run every hook of the plan that
   uses it again, and check the files now on disk are what is served;
5. one failure line per hook: the service, the endpoint and what it served;
   ``ReloadResult`` also says which certificates each line concerns and which
   were rolled back (their renewal did not stick: a failed attempt for the runner).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from certkeeper.core import certs
from certkeeper.core.certs import CertInfo
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import CertkeeperError
from certkeeper.keeper.hooks import CommandResult, Hook, hook_for
from certkeeper.network.keeper_client import Keeper
from certkeeper.network.verification import (
    PROBE_TIMEOUT,
    Check,
    Observation,
    format_serial,
    probe,
    save_results,
    served_text,
    server_name,
)

log = logging.getLogger(__name__)

Prober = Callable[[str, str, float], Observation]  # (url, server name, timeout)
FIRST_DELAY = 0.1  # seconds before the first re-probe; doubles up to MAX_DELAY
MAX_DELAY = 2.0


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    failures: list[str] = field(default_factory=list)  # one line each, naming service, endpoint, serial
    # certificate name → the failure lines that concern it (for the runner's per-certificate outcome)
    by_certificate: dict[str, list[str]] = field(default_factory=dict)
    # certificates whose previous set was put back: their renewal did not stick (the runner should
    # count it as a failed attempt, with backoff, rather than a success)
    rolled_back: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """One endpoint of one hook, checked for one certificate (SNI = its first domain)."""

    certificate: CertificateConfig
    url: str

    @property
    def key(self) -> tuple[str, str]:
        return self.certificate.name, self.url


@dataclass(frozen=True)
class Step:
    """One hook to run once for every renewed certificate that uses it."""

    hook: Hook
    certificates: tuple[CertificateConfig, ...]

    @property
    def targets(self) -> list[Target]:
        return [Target(cert, url) for cert in self.certificates for url in self.hook.verify]

    def names(self, only: set[str] | None = None) -> list[str]:
        return [c.name for c in self.certificates if only is None or c.name in only]


@dataclass
class Outcome:
    """What one run of one hook did."""

    command: CommandResult
    checks: list[Check] = field(default_factory=list)
    blamed: set[str] = field(default_factory=set)  # certificates to roll back
    problems: list[str] = field(default_factory=list)  # pieces of the hook's failure line


def plan(config: Config, renewed: Sequence[CertificateConfig]) -> list[Step]:
    """Hooks in order of first use, each with every renewed certificate that names it."""
    users: dict[str, list[CertificateConfig]] = {}
    for cert in renewed:
        for name in cert.hooks:
            if cert not in users.setdefault(name, []):
                users[name].append(cert)
    return [Step(hook_for(config, name), tuple(certificates)) for name, certificates in users.items()]


def reload_and_verify(config: Config, keeper: Keeper, renewed: Sequence[CertificateConfig],
                      progress: Callable[[str], None], *, prober: Prober = probe,
                      sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic) -> ReloadResult:
    """Reload every hook of ``renewed`` once, verify, roll back failures (see the module comment).

    The keeper runs the hooks and rolls back; the probes run here, on the unprivileged side."""
    steps = plan(config, renewed)
    if not steps:
        return ReloadResult(ok=True)
    run = _Run(keeper, progress, prober, sleep, clock, renewed)
    run.probe_before(steps)
    first = [run.reload(step, expect_new=True) for step in steps]
    blamed = set().union(*(o.blamed for o in first))
    restored = run.roll_back([c for c in renewed if c.name in blamed])
    second = [run.reload(step, expect_new=False) if restored & set(step.names()) else None for step in steps]
    run.save(config, first, second)
    return run.result(steps, first, second, restored)


class _Run:
    """State of one reload_and_verify call: what was served before, what was restored."""

    def __init__(self, keeper: Keeper, progress: Callable[[str], None], prober: Prober,
                 sleep: Callable[[float], None], clock: Callable[[], float],
                 renewed: Sequence[CertificateConfig]) -> None:
        self.keeper = keeper
        self.progress = progress
        self.prober = prober
        self.sleep = sleep
        self.clock = clock
        self.before: dict[tuple[str, str], Observation] = {}
        self.still_down: set[tuple[str, str]] = set()
        self.rollback_errors: list[tuple[str, str]] = []  # (certificate, line)
        self.previous = {c.name: _info(keeper.inspect(c.name).previous) for c in renewed}

    # -- 2. before --------------------------------------------------------------

    def probe_before(self, steps: list[Step]) -> None:
        for step in steps:
            for target in step.targets:
                if target.key not in self.before:
                    seen = self.prober(target.url, server_name(target.certificate), PROBE_TIMEOUT)
                    self.before[target.key] = seen
                    if seen.cert is None:
                        self.progress(f"{step.hook.name}: {target.url} is down before the reload: {seen.error}")

    def on_disk(self, cert: CertificateConfig) -> CertInfo | None:
        """What the served certificate must be: the leaf on disk now."""
        return _info(self.keeper.inspect(cert.name).cert)

    def was_down(self, target: Target) -> bool:
        seen = self.before.get(target.key)
        return seen is not None and seen.cert is None

    # -- 3. reload and verify ---------------------------------------------------

    def reload(self, step: Step, expect_new: bool) -> Outcome:
        hook = step.hook
        names = step.names()
        self.progress(f"{hook.name}: {'reloading' if expect_new else 'reloading after the rollback'} "
                      f"for {', '.join(names)} ({' '.join(hook.command)})")
        outcome = Outcome(command=self.keeper.run_hook(hook.name, names))
        targets = [t for t in step.targets if expect_new or t.key not in self.still_down]
        if not outcome.command.ok:
            self.command_failed(step, outcome, targets, expect_new)
            return outcome
        outcome.checks = self.verify(hook, targets)
        for target, check in zip(targets, outcome.checks, strict=True):
            if check.ok:
                continue
            if expect_new and check.seen.cert is None and self.was_down(target):
                self.still_down.add(target.key)
                outcome.problems.append(f"{target.url} was already down before the reload "
                                        f"({self.before[target.key].error}) and still is; not caused by the "
                                        f"new certificate of {target.certificate.name}")
                continue
            outcome.blamed.add(target.certificate.name)
            outcome.problems.append(self.wrong(check, target))
        return outcome

    def command_failed(self, step: Step, outcome: Outcome, targets: list[Target], expect_new: bool) -> None:
        what = outcome.command.describe()
        if expect_new and targets and all(self.was_down(t) for t in targets):
            self.still_down.update(t.key for t in targets)
            downs = ", ".join(f"{t.url}: {self.before[t.key].error}" for t in targets)
            outcome.problems.append(f"was already down before the reload ({downs}) and its reload failed "
                                    f"({what}); not caused by the new certificate of {', '.join(step.names())}, "
                                    "nothing rolled back")
            return
        outcome.blamed.update(step.names())
        outcome.problems.append(f"reload failed ({what})")
        for target in targets:  # one look, no retries: what does it serve now?
            seen = self.prober(target.url, server_name(target.certificate), PROBE_TIMEOUT)
            check = Check(target.certificate.name, step.hook.name, self.on_disk(target.certificate), seen)
            outcome.checks.append(check)
            if not check.ok:
                outcome.problems.append(self.wrong(check, target))

    def verify(self, hook: Hook, targets: list[Target]) -> list[Check]:
        """Probe until every target serves the file on disk, or ``verify_timeout`` has passed."""
        expected = {t.certificate.name: self.on_disk(t.certificate) for t in targets}
        deadline = self.clock() + hook.verify_timeout
        results: dict[tuple[str, str], Check] = {}
        pending, delay = list(targets), FIRST_DELAY
        while pending:
            for target in pending:
                timeout = max(1.0, min(PROBE_TIMEOUT, deadline - self.clock()))
                seen = self.prober(target.url, server_name(target.certificate), timeout)
                results[target.key] = Check(target.certificate.name, hook.name, expected[target.certificate.name],
                                            seen)
            pending = [t for t in pending if not results[t.key].ok]
            left = deadline - self.clock()
            if pending and left > 0:
                self.sleep(min(delay, left))
                delay = min(delay * 2, MAX_DELAY)
            elif pending:
                break
        for check in results.values():
            self.progress(f"{hook.name}: {check.seen.endpoint} for {check.certificate}: "
                          f"{'ok' if check.ok else 'FAILED'}, {served_text(check.seen, check.expected)}")
        return [results[t.key] for t in targets]

    def wrong(self, check: Check, target: Target) -> str:
        return (f"{target.url} {served_text(check.seen, check.expected, self.previous.get(check.certificate))}"
                f" for {check.certificate}")

    # -- 4. roll back ------------------------------------------------------------

    def roll_back(self, certificates: list[CertificateConfig]) -> set[str]:
        restored: set[str] = set()
        for cert in certificates:
            self.progress(f"{cert.name}: rolling back to the previous certificate")
            try:
                self.keeper.rollback(cert.name)
            except CertkeeperError as exc:
                self.rollback_errors.append((cert.name, f"cannot roll back: {exc}"))
                continue
            restored.add(cert.name)
        return restored

    # -- 5. report ---------------------------------------------------------------

    def failure_line(self, step: Step, first: Outcome, second: Outcome | None, restored: set[str]) -> str:
        parts = list(first.problems)
        if second is not None:
            if second.problems:
                parts += [f"after rolling back {', '.join(step.names(restored))}: {p}" for p in second.problems]
            elif first.problems:
                parts.append(self.rolled_back_text(step, second, restored))
        return f"{step.hook.name}: {'; '.join(parts)}" if parts else ""

    def result(self, steps: list[Step], first: list[Outcome], second: list[Outcome | None],
               restored: set[str]) -> ReloadResult:
        """One failure line per hook that failed, plus the rollbacks that could not be done."""
        lines: list[tuple[list[str], str]] = []  # (certificates concerned, line)
        for step, one, two in zip(steps, first, second, strict=True):
            if line := self.failure_line(step, one, two, restored):
                lines.append((step.names(), line))
        lines += [([name], line) for name, line in self.rollback_errors]
        by_certificate: dict[str, list[str]] = {}
        for names, line in lines:
            log.error("%s", line)
            for name in names:
                by_certificate.setdefault(name, []).append(line)
        return ReloadResult(ok=not lines, failures=[line for _, line in lines], by_certificate=by_certificate,
                            rolled_back=tuple(name for name in self.previous if name in restored))

    def rolled_back_text(self, step: Step, second: Outcome, restored: set[str]) -> str:
        serials = ", ".join(f"{name} to serial {_serial(self.previous.get(name))}" for name in step.names(restored))
        proof = f"served again on {len(second.checks)} endpoint(s)" if second.checks else "no endpoint to check"
        return f"rolled back {serials}; {proof}"

    def save(self, config: Config, first: list[Outcome], second: list[Outcome | None]) -> None:
        latest: dict[str, dict[tuple[str, str], Check]] = {}
        for outcome in [*first, *(o for o in second if o is not None)]:
            for check in outcome.checks:
                latest.setdefault(check.certificate, {})[(check.hook, check.seen.endpoint)] = check
        for name, checks in latest.items():
            try:
                save_results(config, name, list(checks.values()))
            except (OSError, CertkeeperError) as exc:
                log.warning("%s: cannot record verify results: %s", name, exc)


def _info(pem: bytes) -> CertInfo | None:
    try:
        return certs.parse_cert(pem) if pem else None
    except ValueError:
        return None


def _serial(info: CertInfo | None) -> str:
    return format_serial(info.serial) if info else "?"
