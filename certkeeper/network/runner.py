"""One renewal run: plan → order → files on disk → hooks → verification.

``Renewer.renew`` is what both ``certkeeper renew`` and the daemon call. It is
blocking (run it in a worker thread from asyncio) and safe to call from
several threads and processes: two renewals of the same certificate never run
at once (a per-name lock, in-process and ``flock`` on ``STATE/locks/NAME.lock``;
the second one re-plans after the first and finds nothing due).
Due certificates are ordered concurrently, at most ``[acme] concurrency`` at a
time, so one slow order does not hold up the rest.

A failed order or install never touches the working set on disk (the store
writes new sets crash-safely); failures are recorded in the per-certificate
state with a backoff that survives restarts.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from certkeeper.core import certs, dane, renewal
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import REVOCATION_REASONS, CertificateConfig, Config
from certkeeper.core.errors import AcmeError, CertkeeperError, LocalError, RemoteError, ServiceError
from certkeeper.core.state import CertState, load_cert_state, save_cert_state
from certkeeper.keeper.store import CertificateStore
from certkeeper.network.issuer import Issuer, ari_cert_id
from certkeeper.network.keeper_client import Keeper

if TYPE_CHECKING:
    from certkeeper.network.dane import Dane, KeyPlan
    from certkeeper.network.dns.challenge import Dns01Records

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
EXIT_RENEWED, EXIT_ERROR, EXIT_UNCHANGED = 0, 1, 2


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "renewed" | "not-due" | "failed"
    detail: str
    next_renewal: datetime | None = None
    not_after: datetime | None = None


@dataclass
class RenewReport:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """acme-client's codes: 0 something renewed, 2 nothing was due, 1 an error."""
        if any(o.status == "failed" for o in self.outcomes):
            return EXIT_ERROR
        if any(o.status == "renewed" for o in self.outcomes):
            return EXIT_RENEWED
        return EXIT_UNCHANGED


class Renewer:
    def __init__(self, config: Config, challenges: ChallengeTable | None = None,
                 store: CertificateStore | None = None,
                 on_installed: Callable[[CertificateConfig], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 keeper: Keeper | None = None, dry_run: str = "") -> None:
        """``keeper`` does what needs root (keys, files, hooks): the worker's pipe in production;
        by default a ``LocalKeeper`` in this process, with ``challenges``, ``store`` and ``on_installed``.

        ``dry_run``: the staging directory of ``renew --dry-run``: every selected certificate is
        ordered there, the keeper checks the chain and installs nothing, no hook runs, the hooks'
        verify endpoints are probed, and no state file is written."""
        self.config = config
        self.dry_run = dry_run
        if keeper is None:
            from certkeeper.keeper.service import LocalKeeper

            keeper = LocalKeeper(config, challenges, on_installed, store, dry_run=bool(dry_run))
        self.keeper = keeper
        self.challenges = keeper.challenges
        self.clock = clock
        # One Issuer (account) per authority; ``issuer`` is the default one. A dry run sends every
        # order to the staging directory, with the default authority's account, and caches nothing.
        self.issuers = {name: Issuer(config.authority(name), config.state_dir, self.challenges, name)
                        for name in config.authorities}
        if dry_run:
            staging = Issuer(dataclasses.replace(config.acme, directory=dry_run), config.state_dir, self.challenges)
            staging.remember_account = False
            self.issuers = dict.fromkeys(config.authorities, staging)
        self.issuer = self.issuers[config.default_authority]
        self._dns01: Dns01Records | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._before: dict[str, CertState] = {}  # state before this run's attempt, for a rollback
        self._recovered: set[str] = set()  # certificates whose interrupted install the keeper finished
        self._locks_guard = threading.Lock()
        self._dane_side: Dane | None = None
        self._roll = False

    # -- planning ----------------------------------------------------------------------

    def select(self, names: Sequence[str] | None) -> list[CertificateConfig]:
        if not names:
            return list(self.config.certificates)
        known = {c.name: c for c in self.config.certificates}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise LocalError(f"no [[certificate]] named {', '.join(repr(n) for n in unknown)} in {self.config.path}")
        return [known[n] for n in dict.fromkeys(names)]

    def decide(self, cert: CertificateConfig, force: bool = False) -> renewal.Decision:
        """Refresh ARI when it is time, then the keeper plans from the files on disk and the state."""
        view = self.keeper.inspect(cert.name)  # finishes an interrupted install, rebuilds a lost chain
        if view.recovered:  # a set installed before a crash: its services have not loaded it yet
            with self._locks_guard:
                self._recovered.add(cert.name)
        now = self.clock()
        if view.cert and not force:
            self._refresh_ari(cert, view.cert, load_cert_state(self.config.state_dir, cert.name), now)
        return self.keeper.plan(cert.name, force, now)

    def _refresh_ari(self, cert: CertificateConfig, cert_pem: bytes, state: CertState, now: datetime) -> None:
        """RFC 9773: ask for the suggested window when the last answer's Retry-After has passed."""
        try:
            info = certs.parse_cert(cert_pem)
        except ValueError:
            return
        if info.not_after <= now or (state.ari_cert == info.fingerprint and state.ari_next_check
                                     and state.ari_next_check > now):
            return
        issuer = self.issuers.get(self._issued_by(state))
        if issuer is None:  # its authority is no longer configured: no one to ask (RFC 9773 4: only the issuer)
            return
        try:
            window = issuer.renewal_window(cert_pem)
        except (RemoteError, LocalError) as exc:
            log.warning("%s: renewal information unavailable: %s", cert.name, exc)
            state.ari_next_check = now + timedelta(hours=1)  # do not ask again on every run
            state.ari_cert = info.fingerprint
            save_cert_state(self.config.state_dir, state)
            return
        if window is None:  # the server has no ARI: ask again in a day in case it gains it
            state.ari_cert, state.ari_renewal_time = info.fingerprint, None
            state.ari_next_check = now + timedelta(days=1)
        else:
            state.ari_cert = info.fingerprint
            state.ari_renewal_time = renewal.point_in_window(window.start, window.end, info.serial)
            state.ari_next_check = now + timedelta(seconds=window.retry_after)
        state.ari_checked = now
        save_cert_state(self.config.state_dir, state)

    # -- renewing ----------------------------------------------------------------------

    def renew(self, names: Sequence[str] | None = None, force: bool = False, progress: Progress | None = None,
              serve_challenges: Callable[[], AbstractContextManager[object]] | None = None,
              fresh_key: bool = False, roll: bool = False) -> RenewReport:
        """Renew what is due (everything selected, with ``force``); one outcome per certificate.

        ``roll`` (``certkeeper roll-key``): a dane certificate changes to its next key, once that key's
        TLSA record has been seen for 2 x TTL; before then nothing is ordered and the outcome says when.

        ``serve_challenges`` starts an HTTP-01 listener for the duration of the
        orders (the CLI's; the daemon's listener is always up and passes None).
        ``fresh_key`` orders with a new key whatever ``reuse_key`` says, and without ``replaces``.
        """
        progress = progress or (lambda line: None)
        selected = self.select(names)
        if self.dry_run:
            return self._dry_run(selected, progress, serve_challenges)
        self._roll = roll
        force = force or roll
        decisions = {c.name: self.decide(c, force) for c in selected}
        due = [c for c in selected if decisions[c.name].due]
        for cert in selected:  # a dane certificate's next key is published and watched before it is due
            if cert.dane and cert not in due:
                self._dane_maintain(cert, progress)
            elif not cert.dane and dane.load_state(self.config.state_dir, cert.name).names:
                self._dane_withdraw(cert, progress)
        report = RenewReport()
        if due:
            with (serve_challenges or nullcontext)():
                workers = min(self.config.acme.concurrency, len(due))
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="renew") as pool:
                    outcomes = dict(zip([c.name for c in due],
                                        pool.map(lambda c: self._renew_locked(c, force, progress, fresh_key), due),
                                        strict=True))
        else:
            outcomes = {}
        renewed = [c for c in due if outcomes[c.name].status == "renewed"]
        # An install a crash interrupted was finished by the keeper (store.recover), or an install's hooks
        # never ran (the worker that would have run them died): what is on disk is not what the services
        # loaded, so its hooks run and verify it as after a renewal.
        recovered = [c for c in selected if c.name in self._recovered and c not in renewed]
        for cert in recovered:
            progress(f"{cert.name}: its services have not loaded the certificate on disk (an install was "
                     "interrupted); reloading them")
        failures = self._reload(renewed + recovered, progress)
        self._recovered.difference_update(c.name for c in recovered)
        for cert in selected:
            outcome = outcomes.get(cert.name) or _not_due(decisions[cert.name])
            if cert.name in failures:
                outcome = Outcome(cert.name, "failed", failures[cert.name], outcome.next_renewal, outcome.not_after)
            report.outcomes.append(outcome)
        return report

    def _dry_run(self, selected: list[CertificateConfig], progress: Progress,
                 serve_challenges: Callable[[], AbstractContextManager[object]] | None) -> RenewReport:
        """Order each certificate from the staging directory; check it; probe the verify endpoints."""
        from certkeeper.network.verification import check_certificate

        report = RenewReport()
        with (serve_challenges or nullcontext)():
            for cert in selected:
                progress(f"{cert.name}: dry run against {self.dry_run}")
                try:
                    fullchain, _ = self._obtain(cert, progress, load_cert_state(self.config.state_dir, cert.name), True)
                    info = self.keeper.install(cert.name, fullchain)
                except CertkeeperError as exc:
                    report.outcomes.append(Outcome(cert.name, "failed", f"dry run: {exc}"))
                    continue
                lines = [f"dry run: {self.dry_run} issued serial {info.serial:x}, valid until "
                         f"{info.not_after:%Y-%m-%d %H:%M} UTC; nothing installed, no hook run"]
                bad = []
                for check in check_certificate(self.config, self.keeper, cert):  # probes only, saved nowhere
                    progress(check.describe())
                    if check.seen.cert is None:
                        bad.append(check.describe())
                if bad:
                    report.outcomes.append(Outcome(cert.name, "failed", "; ".join([*lines, *bad])))
                else:
                    report.outcomes.append(Outcome(cert.name, "renewed", lines[0], None, info.not_after))
        return report

    def revoke(self, name: str, reason: str, progress: Progress | None = None) -> bool:
        """Revoke the certificate on disk at the authority that issued it (RFC 8555 7.6, with that
        account's key); False when it was already revoked. Renew it with ``fresh_key`` next."""
        progress = progress or (lambda line: None)
        (cert,) = self.select([name])
        current = self.keeper.inspect(cert.name).cert
        if not current:
            raise LocalError(f"{name}: there is no certificate on disk to revoke")
        authority = self._issued_by(load_cert_state(self.config.state_dir, name))
        issuer = self.issuers.get(authority)
        if issuer is None:
            raise LocalError(f"{name}: it was issued by authority {authority!r}, which is no longer configured")
        done = issuer.revoke(current, REVOCATION_REASONS[reason])
        serial = certs.parse_cert(current).serial
        line = f"{name}: serial {serial:x} {'revoked' if done else 'was already revoked'} at {authority} ({reason})"
        log.warning("%s", line)
        progress(line)
        return done

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _renew_locked(self, cert: CertificateConfig, force: bool, progress: Progress,
                      fresh_key: bool = False) -> Outcome:
        with self._lock(cert.name), _file_lock(self.config.state_dir / "locks" / f"{cert.name}.lock"):
            decision = self.decide(cert, force)  # another run may have renewed it meanwhile
            if not decision.due:
                return _not_due(decision)
            return self._renew_one(cert, decision, progress, fresh_key)

    def _issued_by(self, state: CertState) -> str:
        """The authority that issued the certificate on disk (one from before authorities: the default)."""
        return state.authority or self.config.default_authority

    def _renew_one(self, cert: CertificateConfig, decision: renewal.Decision, progress: Progress,
                   fresh_key: bool = False) -> Outcome:
        state = load_cert_state(self.config.state_dir, cert.name)
        now = self.clock()
        state.last_attempt = now
        self._before[cert.name] = dataclasses.replace(state)  # restored if a reload rolls back
        progress(f"{cert.name}: renewing ({decision.reason})")
        try:
            held = None if cert.dane else self._dane_hold(cert, now)
            if held is not None:
                return held
            plan = self._dane_plan(cert, progress, now) if cert.dane else None
            if plan is not None and not plan.use_next and (self._roll or plan.new_type):
                when = (f"{plan.usable_at:%Y-%m-%d %H:%M:%S} UTC" if plan.usable_at
                        else "once it is seen on every server")
                again = "run roll-key again then" if self._roll else "the key_type change waits for it"
                return Outcome(cert.name, "not-due", f"the next key's TLSA record is usable from {when}; "
                               f"nothing ordered ({again})", plan.usable_at)
            # Issued before a rollback: installed and reloaded again, no new order (never for a revocation,
            # nor on a DANE host, whose TLSA records may have moved on since).
            info = None if fresh_key or cert.dane else self.keeper.install_kept(cert.name)
            if info is not None:
                progress(f"{cert.name}: installing again serial {info.serial:x}, issued before the rollback "
                         "(no new order)")
                authority = self._issued_by(state)
            else:
                fullchain, authority = self._obtain(cert, progress, state, decision.reason == "forced", fresh_key,
                                                    use_next=bool(plan and plan.use_next and plan.current))
                if cert.dane:
                    self._dane().check_before_install(cert, fullchain)
                info = self.keeper.install(cert.name, fullchain)
                if plan is not None and plan.use_next:  # the next key is in use: publish a new next key
                    self._dane().switched(cert, plan.current, self.clock())
        except CertkeeperError as exc:
            return self._failed(cert, state, exc, now)
        state.authority = authority
        state.last_success, state.consecutive_failures, state.last_error = now, 0, ""
        state.retry_not_before, state.retry_by_server, state.failed_settings = None, False, ""
        # RFC 9773: ask for the new certificate's window a few hours from now, not at once.
        state.ari_cert, state.ari_renewal_time = info.fingerprint, None
        state.ari_next_check = now + timedelta(hours=6)
        next_time, why = renewal.renewal_time(info, state)
        state.next_renewal, state.next_renewal_reason = next_time, why
        save_cert_state(self.config.state_dir, state)
        log.info("%s: new certificate serial %x, valid until %s", cert.name, info.serial, info.not_after)
        detail = f"valid until {info.not_after:%Y-%m-%d %H:%M} UTC"
        if len(self.config.authorities) > 1:
            detail += f", from {authority}"
        if plan is not None and plan.current and not plan.use_next and not cert.reuse_key:
            when = f"{plan.usable_at:%Y-%m-%d %H:%M:%S} UTC" if plan.usable_at else "once it is seen everywhere"
            detail += f"; kept the current key (the next key's TLSA record is usable from {when})"
        return Outcome(cert.name, "renewed", detail, next_time, info.not_after)

    # -- DANE --------------------------------------------------------------------------

    def _dane(self) -> Dane:
        if self._dane_side is None:
            from certkeeper.network.dane import Dane  # DNS libraries only for a certificate with dane

            self._dane_side = Dane(self.config, self.keeper, lambda line: log.info("%s", line))
        return self._dane_side

    def _dane_plan(self, cert: CertificateConfig, progress: Progress, now: datetime) -> KeyPlan:
        """Publish the TLSA records and choose the key: the next one only once its record has been
        seen everywhere for 2 x TTL (RFC 7671 8.1); otherwise the current one, and say so."""
        view = self.keeper.inspect(cert.name)
        key_type = dane.public_key_type(view.cert) if view.cert else ""
        new_type = bool(key_type) and key_type != cert.key_type
        want_change = not cert.reuse_key or self._roll or new_type
        plan = dataclasses.replace(self._dane().maintain(cert, now, want_change), new_type=new_type)
        if plan.current and want_change and not plan.use_next:
            when = f"{plan.usable_at:%Y-%m-%d %H:%M:%S} UTC" if plan.usable_at else "once its TLSA record is seen"
            progress(f"{cert.name}: keeping the current key: the next key's TLSA record is usable from {when}")
        elif plan.current and plan.use_next:
            progress(f"{cert.name}: switching to the next key ({plan.next[:16]}…), its TLSA record usable since "
                     f"{plan.usable_at:%Y-%m-%d %H:%M:%S} UTC")
        return plan

    def _dane_withdraw(self, cert: CertificateConfig, progress: Progress) -> None:
        try:
            self._dane().withdraw(cert, self.clock())
        except CertkeeperError as exc:
            progress(f"{cert.name}: withdrawing the TLSA records: {exc}")
            log.warning("%s: withdrawing the TLSA records: %s", cert.name, exc)

    def _dane_hold(self, cert: CertificateConfig, now: datetime) -> Outcome | None:
        """After ``dane = false``: no new key until the records are gone from every server and from caches."""
        state = dane.load_state(self.config.state_dir, cert.name)
        if not state.names:
            return None
        ttl = self.config.dane.ttl or self.config.dns.ttl
        if state.withdrawn is None:
            self._dane_withdraw(cert, lambda line: log.info("%s", line))
            state = dane.load_state(self.config.state_dir, cert.name)
        after = dane.key_change_allowed_after(state, ttl)
        if after is not None and now >= after:  # caches have forgotten the records: nothing left to guard
            dane.save_state(self.config.state_dir, dane.DaneState(cert.name))
            return None
        on_disk = self.keeper.inspect(cert.name).cert
        if cert.reuse_key and on_disk and dane.public_key_type(on_disk) == cert.key_type:
            return None  # the key stays anyway
        when = f"{after:%Y-%m-%d %H:%M:%S} UTC" if after else "once every server has dropped them"
        return Outcome(cert.name, "not-due", f"dane is off; the withdrawn TLSA records may still be cached: "
                       f"a new key only from {when}", after)

    def _dane_maintain(self, cert: CertificateConfig, progress: Progress) -> None:
        try:
            self._dane().maintain(cert, self.clock(), want_change=False)
        except CertkeeperError as exc:
            progress(f"{cert.name}: TLSA records: {exc}")
            log.warning("%s: TLSA records: %s", cert.name, exc)

    def _obtain(self, cert: CertificateConfig, progress: Progress, state: CertState,
                force: bool = False, fresh_key: bool = False, use_next: bool = False) -> tuple[bytes, str]:
        """Order with a CSR from the keeper (which keeps the key): (the issued full chain, the authority).

        The certificate's authority first, then each fallback in turn, but only after a failure on
        the CA's side (``AcmeError.ca_side``: 5xx, timeout, rate limit, serverInternal); a failure on
        ours (a challenge not reachable) would fail the same way at the next CA. An authority in its
        own backoff is skipped unless forced or every one is."""
        # Revoked, or a dry run (the staging directory never saw it): it replaces nothing.
        current = None if fresh_key or self.dry_run else self.keeper.inspect(cert.name).cert
        csr = self.keeper.make_csr(cert.name, fresh_key=fresh_key, use_next=use_next)
        now = self.clock()
        chain = list(cert.authorities)
        ready = [n for n in chain if force or not (r := state.authority_retry(n)) or r <= now]
        tried = ready or chain
        for name in chain:
            if name not in tried:
                log.info("%s: not asking %s before %s (its backoff)", cert.name, name, state.authority_retry(name))
        failures: list[tuple[str, AcmeError]] = []
        for i, name in enumerate(tried):
            try:
                fullchain = self._order(cert, name, csr, current, state, progress)
            except AcmeError as exc:
                failures.append((name, exc))
                self._authority_failed(state, name, exc, now)
                if exc.ca_side and i + 1 < len(tried):
                    log.warning("%s: authority %s failed on its side (%s); asking %s", cert.name, name, exc,
                                tried[i + 1])
                    progress(f"{cert.name}: {name} failed ({exc}); trying {tried[i + 1]}")
                    continue
                raise self._chain_error(failures, chain, state, now) from None
            state.authority_backoff.pop(name, None)
            return fullchain, name
        raise AssertionError("unreachable")

    def _order(self, cert: CertificateConfig, name: str, csr: bytes, current: bytes | None, state: CertState,
               progress: Progress) -> bytes:
        issuer = self.issuers[name]
        replaces = ""
        if current and name == self._issued_by(state):  # RFC 9773 5: only the issuer knows the old one
            try:
                replaces = ari_cert_id(current) if self._server_has_ari(issuer) else ""
            except ValueError:
                replaces = ""
        profile = cert.profile or issuer.config.profile
        dns01 = self._dns01_records() if cert.challenge == "dns-01" else None
        try:
            issued = issuer.issue(cert.domains, csr, profile=profile, replaces=replaces, progress=progress,
                                  dns01=dns01)
        except AcmeError as exc:
            if not replaces or (exc.code != "alreadyReplaced" and "alreadyReplaced" not in str(exc)):
                raise
            # RFC 9773 5: the old certificate was already replaced (by another order): order without it.
            log.info("%s: %s says the certificate was already replaced; ordering without replaces", cert.name, name)
            issued = issuer.issue(cert.domains, csr, profile=profile, progress=progress, dns01=dns01)
        return issued.fullchain

    def _dns01_records(self) -> Dns01Records:
        """DNS-01 through the configured backend (the zone file written by the keeper)."""
        with self._locks_guard:
            if self._dns01 is None:
                from certkeeper.network.dns import backend_for
                from certkeeper.network.dns.challenge import Dns01Records

                self._dns01 = Dns01Records(self.config, backend_for(self.config, keeper=self.keeper))
            return self._dns01

    @staticmethod
    def _authority_failed(state: CertState, name: str, exc: AcmeError, now: datetime) -> None:
        failures = state.authority_failures(name) + 1
        retry_after = now + timedelta(seconds=exc.retry_after) if exc.retry_after else None
        state.authority_backoff[name] = [failures, renewal.backoff(failures, retry_after, now).isoformat()]

    @staticmethod
    def _chain_error(failures: list[tuple[str, AcmeError]], chain: list[str], state: CertState,
                     now: datetime) -> AcmeError:
        """One error for the run; with several authorities, each one's reason and the earliest time
        any of them may be asked again as the Retry-After."""
        name, last = failures[-1]
        if len(failures) == 1 and len(chain) == 1:
            return last
        times = [t for t in (state.authority_retry(n) for n in chain) if t is not None]
        soonest = min(times) if times and all(state.authority_retry(n) for n in chain) else None
        retry = max(0.0, (soonest - now).total_seconds()) if soonest else last.retry_after
        text = "; ".join(f"{n}: {e}" for n, e in failures)
        return AcmeError(text, retry_after=retry or None, code=last.code, ca_side=last.ca_side)

    @staticmethod
    def _server_has_ari(issuer: Issuer) -> bool:
        try:
            issuer.client().directory["renewalInfo"]
        except KeyError:
            return False
        return True

    def _failed(self, cert: CertificateConfig, state: CertState, exc: CertkeeperError, now: datetime) -> Outcome:
        state.consecutive_failures += 1
        state.last_error = str(exc)
        retry_after = None
        if isinstance(exc, RemoteError) and exc.retry_after:
            retry_after = now + timedelta(seconds=exc.retry_after)
        state.retry_not_before = renewal.backoff(state.consecutive_failures, retry_after, now)
        state.retry_by_server = retry_after is not None and retry_after >= state.retry_not_before
        state.failed_settings = renewal.certificate_settings(self.config, cert)
        save_cert_state(self.config.state_dir, state)
        log.error("%s: renewal failed: %s", cert.name, exc)  # the outcome line tells the CLI user
        return Outcome(cert.name, "failed", str(exc), state.retry_not_before)

    def _reload(self, renewed: list[CertificateConfig], progress: Progress) -> dict[str, str]:
        """Run each hook once for the renewed certificates; name → failure."""
        if not renewed or not any(c.hooks for c in renewed):
            return {}
        from certkeeper.network import reload

        result = reload.reload_and_verify(self.config, self.keeper, renewed, progress)
        failed = {name: "; ".join(lines) for name, lines in result.by_certificate.items() if lines}
        for name in result.rolled_back:
            # The old set is back on disk: this renewal did not stick. Count it as a failed
            # attempt (with backoff) so the next check does not order again at once.
            state = load_cert_state(self.config.state_dir, name)
            before = self._before.get(name)
            if before is not None:  # the attempt counts on top of the failures before it
                state.last_success, state.consecutive_failures = before.last_success, before.consecutive_failures
                state.authority = before.authority  # the old certificate is back: so is its issuer (ARI)
            self._failed(self.config.certificate(name), state,
                         ServiceError(failed.get(name, "the new certificate was rolled back")), self.clock())
        return failed


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` across processes (the daemon's workers, a CLI run)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _not_due(decision: renewal.Decision) -> Outcome:
    return Outcome(decision.name, "not-due", decision.reason, decision.when, decision.not_after)


def format_outcome(outcome: Outcome) -> str:
    """The one line per certificate that ``renew`` prints."""
    if outcome.status == "renewed":
        return f"{outcome.name}: renewed, {outcome.detail}"
    if outcome.status == "failed":
        return f"{outcome.name}: failed: {outcome.detail}"
    when = f"{outcome.next_renewal:%Y-%m-%d %H:%M} UTC" if outcome.next_renewal else "unknown"
    return f"{outcome.name}: not due until {when} ({outcome.detail})"


