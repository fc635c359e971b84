"""The keeper: every power that needs root, each checked against the configuration.

This is the one object the unprivileged side can ask for something that only
root may do (acme-client's keyproc, certproc and fileproc in one, without
network code): make a domain key and hand out only its CSR; install a
certificate set for that key; run a hook; roll a set back; make, read and
dispose of DKIM keys; switch a signer; write the zone file; run the alert
command. A request is refused (``Refused``, logged, nothing written) when it
names anything the configuration does not: an unknown certificate, hook,
domain or selector, a certificate that is not for the key the keeper made or
not for the configured names.

``LocalKeeper`` does the work in the calling process: the daemon and the CLI
run it on the root side, and the tests call it directly (the in-process
``Keeper``). ``serve`` answers one network worker over its socketpair with
it (``certkeeper.protocol`` messages), until the worker's ``Exit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from certkeeper import protocol
from certkeeper.core import certs, dane, dkim, renewal
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import HOOK_DEFAULT_COMMANDS, AlertsConfig, CertificateConfig, Config, DkimConfig
from certkeeper.core.errors import AcmeError, CertkeeperError, LocalError
from certkeeper.core.files import fsync_dir, make_dirs, write_atomic
from certkeeper.core.state import load_cert_state
from certkeeper.keeper import hooks, signers
from certkeeper.keeper.store import CertificateSet, CertificateStore

if TYPE_CHECKING:
    from certkeeper.network.dns.zonefile import ZonefileBackend

log = logging.getLogger(__name__)

ALERT_TIMEOUT = 30.0  # seconds for one run of [alerts] command
MAX_LINE = 4000  # characters of one progress line from a worker that reach the log
KEPT_SUFFIX = ".rolled-back.pem"  # STATE/journal/NAME.rolled-back.pem: key + full chain a rollback took off
KEPT_MIN_LEFT = timedelta(days=1)  # a kept certificate with less left is not installed again
REVEAL_DIR = "revealed"  # key_dir/revealed/: retired DKIM private keys published on purpose (reveal_retired)
# RFC 6376 3.1: a selector is one or more DNS labels.
_SELECTOR = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


class Refusal(LocalError):
    """A request the configuration does not allow: the run that sent it fails closed."""


class SignerNotSwitched(LocalError):
    """A DKIM signer switch failed its checks or its hook: the signer keeps its previous files."""


@dataclass(frozen=True)
class DiskView:
    """The public files of a certificate set (the key never leaves the keeper)."""
    cert: bytes  # b"" when there is none
    chain: bytes
    previous: bytes  # the leaf of the set kept for a rollback
    recovered: bool = False  # its services must load the set: an interrupted install was just finished,
    # or an install's hooks have not all run since (the worker that would have run them died)


class LocalKeeper:
    """The keeper's powers in this process. Safe to call from several threads."""

    def __init__(self, config: Config, challenges: ChallengeTable | None = None,
                 on_installed: Callable[[CertificateConfig], None] | None = None,
                 store: CertificateStore | None = None, dry_run: bool = False,
                 on_takeover: Callable[[str], None] | None = None,
                 on_policies: Callable[[], None] | None = None) -> None:
        """``dry_run``: ``renew --dry-run``: an issued chain is checked and never installed; no set is
        written or rolled back, no hook, signer or alert program runs, no DKIM key is made or deleted
        (each such request is a ``Refusal``); challenge records may still be published."""
        self.config = config
        self.dry_run = dry_run
        self.challenges = challenges if challenges is not None else ChallengeTable()
        self.on_installed = on_installed
        self.on_takeover = on_takeover  # [fleet]: the daemon runs its DKIM job when a rotator died
        self.on_policies = on_policies  # [fleet]: the daemon's listener rebuilds its MTA-STS policies
        self.store = store if store is not None else CertificateStore(config.state_dir)
        self._pending: dict[str, bytes] = {}  # certificate name → the key its last CSR was made for
        self._reinstalled: set[str] = set()  # names whose kept set was installed again in this run
        self._lock = threading.Lock()

    # -- certificates --------------------------------------------------------------

    def certificate(self, name: str) -> CertificateConfig:
        try:
            return self.config.certificate(name)
        except KeyError:
            raise Refusal(f"no [[certificate]] named {name!r} in {self.config.path}") from None

    def inspect(self, name: str) -> DiskView:
        """Finish an interrupted install, rebuild a lost chain file, then show the public files, and
        whether the certificate's services still have to load them (``CertificateStore.pending_reload``)."""
        cert = self.certificate(name)
        if self.dry_run:
            current = self.store.read(cert)
            return DiskView(current.cert if current else b"", current.chain if current else b"", b"")
        recovered = self.store.recover(cert)
        if (self.store.repair(cert) or recovered) and self.on_installed is not None:
            self.on_installed(cert)
        current = self.store.read(cert)
        previous = self.store.read_previous(cert)
        with self._lock:
            owed = bool(self.store.pending_reload(cert)) if current is not None else False
        return DiskView(current.cert if current else b"", current.chain if current else b"",
                        previous.cert if previous else b"", recovered or owed)

    def plan(self, name: str, force: bool, now: datetime) -> renewal.Decision:
        """The planner's decision from the files on disk and the certificate's state."""
        cert = self.certificate(name)
        if not cert.dane:
            self._dispose_next_key(cert)
        return decide(self.config, self.store, cert, now, force)

    def make_csr(self, name: str, fresh_key: bool = False, use_next: bool = False) -> bytes:
        """A CSR for the certificate's names, for the key the next ``install`` must match.

        ``reuse_key`` keeps the key on disk while it is of the configured type; ``fresh_key`` (a
        revoked certificate's renewal) never does: a compromised key must not be certified again.
        A ``dane`` certificate never gets an unpublished key here: it keeps the current one, or
        (``use_next``, ``fresh_key``, or its first certificate) takes the next key whose TLSA record
        the network side has published and seen."""
        cert = self.certificate(name)
        current = self.store.read(cert)
        if use_next and not cert.dane:
            raise Refusal(f"{name}: the next key is only kept for a certificate with dane = true")
        reusable = current is not None and _key_type(current.key) == cert.key_type
        if cert.dane and (use_next or fresh_key or current is None):
            key = self._next_key(cert, create=False)
            if key is None:
                raise LocalError(f"{name}: there is no next key to use yet (its TLSA record comes first)")
        elif cert.dane and current is not None and not reusable:
            raise LocalError(f"{name}: the key is {_key_type(current.key) or 'unreadable'}, key_type asks for "
                             f"{cert.key_type}; with dane the change waits for the next key's TLSA record")
        elif current is not None and (cert.reuse_key or cert.dane) and not fresh_key and reusable:
            key = current.key
        else:
            key = certs.generate_key(cert.key_type)
        with self._lock:
            self._pending[name] = key
        if cert.challenge == "http-01":
            with contextlib.suppress(LocalError):  # a listener that cannot start says so at the challenge
                self.challenges.expect()
        return certs.make_csr(key, cert.domains)

    def install(self, name: str, fullchain: bytes) -> certs.CertInfo:
        """Install the issued chain with the key of the last CSR; refused unless it is for that key and names."""
        cert = self.certificate(name)
        with self._lock:
            key = self._pending.get(name)
        if key is None:
            raise Refusal(f"{name}: no CSR was made for this certificate in this run")
        try:  # the CA's mistakes are failed orders, not refusals: the run goes on
            new_set = CertificateSet.from_fullchain(key, fullchain)
            info = certs.parse_cert(new_set.cert)
        except ValueError:
            raise AcmeError("the ACME server sent no PEM certificate") from None
        problem = renewal.files_problem(cert, new_set, info)
        if problem:
            raise AcmeError(f"the issued certificate is unusable: {problem}")
        if self.dry_run:
            with self._lock:
                self._pending.pop(name, None)
            log.info("%s: dry run: serial %x would be installed; nothing written", name, info.serial)
            return info
        self.store.install(cert, new_set)
        with self._lock:
            self._pending.pop(name, None)
        if cert.dane and self._next_key(cert, create=False) == key:  # the next key is now the current one
            next_path = next_key_path(cert)
            next_path.unlink()
            fsync_dir(next_path.parent)
            log.info("%s: the next key is now the current key", name)
        log.info("%s: installed serial %x, valid until %s", name, info.serial, info.not_after)
        if self.on_installed is not None:
            self.on_installed(cert)
        return info

    def _refuse_in_dry_run(self, what: str) -> None:
        if self.dry_run:
            raise Refusal(f"a dry run does not {what}")

    # -- DANE: the next key --------------------------------------------------------------

    def dane_keys(self, name: str, create: bool = True) -> tuple[str, str]:
        """SPKI SHA-256 digests of the current key ("" without one) and of the next key, which is
        made here when it is missing or not of the configured key_type (only the digests leave);
        without ``create`` a missing next key is ""."""
        cert = self.certificate(name)
        if not cert.dane:
            raise Refusal(f"{name}: dane is not set for this certificate")
        current = self.store.read(cert)
        next_key = self._next_key(cert, create=create)
        return (dane.spki_digest(current.key) if current is not None else "",
                dane.spki_digest(next_key) if next_key else "")

    def _dispose_next_key(self, cert: CertificateConfig) -> None:
        """dane was set to false: the next key is not needed any more (a new one is made if it comes back)."""
        path = next_key_path(cert)
        with self._lock:
            if path.exists():
                path.unlink()
                fsync_dir(path.parent)
                log.info("%s: dane is off: deleted the next key %s", cert.name, path)

    def _next_key(self, cert: CertificateConfig, create: bool) -> bytes | None:
        """The next key of a dane certificate (KEY.next: the key's owner, group and mode)."""
        path = next_key_path(cert)
        with self._lock:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = b""
            except OSError as exc:
                raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
            if data and _key_type(data) == cert.key_type:
                return data
            if not create:
                return None
            data = certs.generate_key(cert.key_type)
            uid = _account(cert.key_owner, "user") if cert.key_owner else -1
            gid = _account(cert.key_group, "group") if cert.key_group else -1
            write_atomic(path, data, cert.key_mode, uid, gid)
            log.info("%s: made a new next key %s (%s)", cert.name, path, cert.key_type)
            return data

    def orders_lost(self, why: str) -> list[str]:
        """The worker ended (killed, timed out, refused) between a CSR and its install: each such
        order counts as a failed attempt of its certificate, with the runner's backoff, so a worker
        that dies on every order does not order again at every check. Returns the names."""
        from certkeeper.core.state import load_cert_state, save_cert_state, state_path

        with self._lock:
            names, self._pending = sorted(self._pending), {}
        now = datetime.now(UTC)
        for name in names:
            state = load_cert_state(self.config.state_dir, name)
            state.last_attempt = now
            state.consecutive_failures += 1
            state.last_error = f"the order was lost: {why}"
            state.retry_not_before = renewal.backoff(state.consecutive_failures, None, now)
            state.retry_by_server = False
            state.failed_settings = renewal.certificate_settings(self.config, self.certificate(name))
            save_cert_state(self.config.state_dir, state)
            path = state_path(self.config.state_dir, name)
            owner = path.parent.stat()
            if os.geteuid() == 0:  # the file stays the network worker's, like the directory it is in
                os.chown(path, owner.st_uid, owner.st_gid)
            log.error("%s: %s; next attempt not before %s", name, state.last_error,
                      state.retry_not_before.strftime("%Y-%m-%d %H:%M:%S UTC"))
        return names

    def rollback(self, name: str) -> None:
        """Put the previous set back; the set taken off is kept (once) for ``install_kept``."""
        self._refuse_in_dry_run("roll back")
        cert = self.certificate(name)
        taken_off = self.store.read(cert)
        self.store.restore_previous(cert)
        with self._lock:
            again = name in self._reinstalled
        if taken_off is not None and not again:
            write_atomic(self._kept_path(cert), taken_off.key + taken_off.fullchain, 0o600)
            log.info("%s: kept the rolled-back certificate for the next attempt", name)
        if self.on_installed is not None:
            self.on_installed(cert)

    def _kept_path(self, cert: CertificateConfig) -> Path:
        return self.store.journal_dir / f"{cert.name}{KEPT_SUFFIX}"

    def install_kept(self, name: str) -> certs.CertInfo | None:
        """Install the set a rollback kept, when it still fits the configuration and has more than
        ``KEPT_MIN_LEFT`` left: the next attempt retries install and reload before a new order.
        Used once: the file is removed, and a second rollback of it keeps nothing."""
        self._refuse_in_dry_run("install")
        cert = self.certificate(name)
        path = self._kept_path(cert)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LocalError(f"{path}: cannot read: {exc.strerror}") from None
        path.unlink()
        try:
            key, fullchain = _split_kept(data)
            kept = CertificateSet.from_fullchain(key, fullchain)
            info = certs.parse_cert(kept.cert)
        except ValueError:
            log.warning("%s: %s does not hold a certificate set; ordering a new one", name, path)
            return None
        problem = renewal.files_problem(cert, kept, info)
        if problem or info.not_after - datetime.now(UTC) < KEPT_MIN_LEFT:
            log.info("%s: the kept certificate is not usable (%s); ordering a new one", name,
                     problem or f"valid until {info.not_after:%Y-%m-%d %H:%M} UTC")
            return None
        self.store.install(cert, kept)
        with self._lock:
            self._reinstalled.add(name)
        log.info("%s: installed again the kept serial %x, valid until %s", name, info.serial, info.not_after)
        if self.on_installed is not None:
            self.on_installed(cert)
        return info

    # -- hooks -----------------------------------------------------------------------

    def run_hook(self, name: str, certificates: Sequence[str] = ()) -> hooks.CommandResult:
        """Run a hook that a certificate or a [[dkim]] signer names, telling it which certificates."""
        self._refuse_in_dry_run("run hooks")
        used = {h for c in self.config.certificates for h in c.hooks}
        used |= {signers.hook_name(item) for item in self.config.dkim}
        if name not in used or (name not in self.config.hooks and name not in HOOK_DEFAULT_COMMANDS):
            raise Refusal(f"hook {name!r} is not used by any [[certificate]] or [[dkim]] table")
        for certificate in certificates:
            self.certificate(certificate)
        result = hooks.hook_for(self.config, name).reload(tuple(certificates))
        if result.ok:  # the services of these certificates loaded the sets on disk: the hook is no longer owed
            with self._lock:
                for certificate in certificates:
                    self.store.reloaded(self.certificate(certificate), name)
        return result

    def run_alert(self, program: str, data: bytes) -> bool:
        """Run ``[alerts] command``, ``[alerts] sendmail`` or, when SMTP failed, "sendmail-fallback"
        (``sendmail -t``, or ``[alerts] sendmail``) with ``data`` on stdin. A message for sendmail
        must be addressed to ``[alerts] mail_to`` only."""
        self._refuse_in_dry_run("send alerts")
        alerts = self.config.alerts
        argv = {"command": alerts.command, "sendmail": alerts.sendmail,
                "sendmail-fallback": fallback_sendmail(alerts) if alerts.mail_to else ()}.get(program)
        if not argv:
            raise Refusal(f"[alerts] {program} is not configured")
        if program != "command":
            _check_recipients(data, alerts.mail_to, program)
        result = hooks.run_command(argv, ALERT_TIMEOUT, stdin=data, what=f"[alerts] {program}")
        if not result.ok:
            raise LocalError(f"[alerts] {program}: {result.describe()}")
        return True

    # -- DKIM keys and signers ---------------------------------------------------------

    def dkim_item(self, domain: str) -> DkimConfig:
        for item in self.config.dkim:
            if item.domain == domain:
                return item
        raise Refusal(f"dkim: {domain!r} has no [[dkim]] table in {self.config.path}")

    def dkim_key_path(self, domain: str, selector: str) -> Path:
        item = self.dkim_item(domain)
        if not _SELECTOR.match(selector):
            raise Refusal(f"dkim {domain}: {selector!r} is not a selector")
        return item.key_dir / dkim.key_file_name(domain, selector)

    def dkim_key(self, domain: str, selector: str, algorithm: str, create: bool) -> tuple[str, bool]:
        """The key record of the selector's private key; with ``create``, make the key when it is missing.

        Returns (record, created); ("", False) when there is no key and none was asked for."""
        if create:
            self._refuse_in_dry_run("make DKIM keys")
        item = self.dkim_item(domain)
        path = self.dkim_key_path(domain, selector)
        if create and algorithm not in item.algorithms:
            raise Refusal(f"dkim {domain}: {algorithm!r} is not in algorithms")
        private = existing_dkim_key(path, algorithm)
        created = False
        if private is None:
            if not create:
                return "", False
            private = dkim.generate_private_key(algorithm)
            uid, gid = dkim_owner(item)
            data = dkim.private_key_file(private, raw_ed25519=signers.raw_ed25519(item.signer))
            write_atomic(path, data, item.key_mode, uid, gid)
            created = True
        return dkim.key_record_for(private).render(), created

    def dkim_selectors(self, domain: str) -> tuple[str, ...]:
        """Selectors whose key file is in key_dir (a new key must never take one)."""
        item = self.dkim_item(domain)
        suffix = dkim.key_file_name(domain, "SELECTOR").split("SELECTOR", 1)
        try:
            names = sorted(p.name for p in item.key_dir.iterdir() if p.is_file())
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise LocalError(f"{item.key_dir}: cannot list: {exc.strerror}") from None
        prefix, end = suffix
        return tuple(n[len(prefix):len(n) - len(end)] for n in names
                     if n.startswith(prefix) and n.endswith(end) and len(n) > len(prefix) + len(end))

    def switch_signer(self, domain: str, keys: Sequence[tuple[str, str, str]],
                      progress: Callable[[str], None]) -> None:
        """Write the signer file of ``domain`` with ``keys`` (domain, selector, algorithm) and run its hook.

        Every key must be a key file of a [[dkim]] domain that shares this signer file. First the
        checks (``signers.check_before_switch``: the signer's user can read each key, the service's
        own configuration test passes): a failed check writes nothing (``SignerNotSwitched``). The
        files as they were are kept (``STATE/journal/signer-*.json``) until ``confirm_signer`` or
        ``restore_signer``; a hook that fails puts them back at once and runs the hook again."""
        self._refuse_in_dry_run("switch signers")
        item = self.dkim_item(domain)
        chosen = self._signing_keys(item, keys)
        problems = signers.check_before_switch(self.config, item, chosen, progress=progress)
        if problems:
            raise SignerNotSwitched(f"dkim {domain}: the signer was not switched (it keeps its keys): "
                                    + "; ".join(problems))
        journal = self._signer_journal(item)
        with self._lock:
            if not journal.exists():  # one left by an unconfirmed switch (a crash) holds the older files
                snap = signers.snapshot(self.config, item, chosen)
                write_atomic(journal, json.dumps({"domain": domain, "files": snap}).encode(), 0o600)
        try:
            signers.apply(self.config, item, chosen, progress, force_hook=True)
        except CertkeeperError as exc:
            again = self._restore(item, progress)
            raise SignerNotSwitched(f"dkim {domain}: the signer was not switched: {exc}; {again}") from None

    def restore_signer(self, domain: str, progress: Callable[[str], None]) -> str:
        """Roll an unconfirmed switch back: the signer files as they were, the hook run again.
        Returns what happened, one line (LocalError when the hook fails again)."""
        self._refuse_in_dry_run("switch signers")
        item = self.dkim_item(domain)
        result = self._restore(item, progress)
        if result.startswith("the hook failed"):
            raise LocalError(f"dkim {domain}: {result}")
        return result

    def confirm_signer(self, domain: str) -> None:
        """The switch was verified: the files kept for a rollback are dropped."""
        self._refuse_in_dry_run("switch signers")
        journal = self._signer_journal(self.dkim_item(domain))
        with self._lock:
            if journal.exists():
                journal.unlink()
                fsync_dir(journal.parent)

    def _signing_keys(self, item: DkimConfig, keys: Sequence[tuple[str, str, str]]) -> list[signers.SigningKey]:
        path = signers.config_path(item)
        chosen: list[signers.SigningKey] = []
        for key_domain, selector, algorithm in keys:
            other = self.dkim_item(key_domain)
            if other.signer != item.signer or signers.config_path(other) != path:
                raise Refusal(f"dkim {item.domain}: {key_domain} does not share its signer file")
            key_path = self.dkim_key_path(key_domain, selector)
            if existing_dkim_key(key_path, algorithm) is None:
                raise Refusal(f"dkim {key_domain}: no key file for selector {selector!r}")
            chosen.append(signers.SigningKey(key_domain, selector, algorithm, key_path))
        return chosen

    def _signer_journal(self, item: DkimConfig) -> Path:
        """Where the signer files as they were before an unconfirmed switch are kept (one per signer file)."""
        digest = hashlib.sha256(str(signers.config_path(item)).encode()).hexdigest()[:16]
        return self.store.journal_dir / f"signer-{digest}.json"

    def _restore(self, item: DkimConfig, progress: Callable[[str], None]) -> str:
        journal = self._signer_journal(item)
        with self._lock:
            try:
                data = json.loads(journal.read_text())
                snap = {str(k): (None if v is None else str(v)) for k, v in dict(data["files"]).items()}
            except FileNotFoundError:
                return "no switch to roll back"
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise LocalError(f"{journal}: unreadable ({exc}); restore the signer files by hand") from None
            allowed = {str(p) for p in signers.rendered(self.config, item, [])}
            if not set(snap) <= allowed:
                raise LocalError(f"{journal}: names files that are not the signer's ({', '.join(sorted(snap))}); "
                                 "restore the signer files by hand")
            signers.restore(snap, progress)
            journal.unlink()
            fsync_dir(journal.parent)
        if all(text is None for text in snap.values()):
            return "there was no previous signer configuration to go back to: the new files stay"
        name = signers.hook_name(item)
        if not name:
            return "the previous signer files are back"
        try:
            signers.run_hook(self.config, name, progress)
        except CertkeeperError as exc:
            return f"the hook failed again after the previous signer files were put back: {exc}"
        log.info("dkim %s: the previous signer files are back, hook %s ran", item.domain, name)
        return f"the previous signer files are back and hook {name} ran again"

    def enforce_dkim_keys(self, domain: str, progress: Callable[[str], None]) -> None:
        """Put the configured owner, group and mode back on every key file of the domain (every run)."""
        item = self.dkim_item(domain)
        paths = [self.dkim_key_path(domain, selector) for selector in self.dkim_selectors(domain)]
        signers.enforce_key_files(item, paths, progress)

    def adopt_dkim_key(self, domain: str, selector: str, record: str, progress: Callable[[str], None]) -> str:
        """A key made by hand: find its private key (key_dir, or where the signer's file names it), and when
        it matches the published ``record`` copy it into key_dir; its algorithm, or "" when none matches."""
        item = self.dkim_item(domain)
        target = self.dkim_key_path(domain, selector)
        try:
            public = dkim.parse_key_record(record).public_key
        except ValueError as exc:
            raise Refusal(f"dkim {domain}: not a DKIM key record: {exc}") from None
        named = signers.keys_named(item).get(selector)
        for path in [target] + ([named] if named is not None and named != target else []):
            try:
                candidate = dkim.load_private_key(path.read_bytes())
            except (OSError, ValueError):
                continue
            if dkim.key_record_for(candidate).public_key != public:
                continue
            if not target.exists():
                uid, gid = dkim_owner(item)
                write_atomic(target, dkim.private_key_file(candidate, raw_ed25519=signers.raw_ed25519(item.signer)),
                             item.key_mode, uid, gid)
                progress(f"{domain}: copied the private key of {selector} to {target}")
            return dkim.algorithm_of(candidate)
        return ""

    def dispose_dkim_key(self, domain: str, selector: str, algorithm: str,
                         progress: Callable[[str], None]) -> None:
        """Delete a removed selector's private key (first revealing it, with ``reveal_retired``)."""
        self._refuse_in_dry_run("delete keys")
        item = self.dkim_item(domain)
        path = self.dkim_key_path(domain, selector)
        if item.signer != "none" and signers.keys_named(item).get(selector) == path:
            # The signer's configuration names it now: deleting it would stop signing (a worker that
            # asks for this is broken or hostile; the rotation switches away from a key long before).
            raise Refusal(f"dkim {domain}: selector {selector!r} signs now; its key is not deleted")
        if item.reveal_retired:
            private = existing_dkim_key(path, algorithm)
            if private is not None:
                target = item.key_dir / REVEAL_DIR / dkim.reveal_name(dkim.key_record_for(private))
                make_dirs(target.parent, 0o755)  # not narrowed by certkeeper's umask 077: revealed keys are public
                write_atomic(target, dkim.private_key_file(private), 0o644)
                progress(f"{domain}: revealed the retired private key as {target}")
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
            progress(f"{domain}: deleted {path}")

    # -- the fleet's shared DKIM keys ([fleet]) ---------------------------------------------

    def seal_dkim_key(self, domain: str, selector: str, algorithm: str) -> str:
        """The selector's private key sealed with ``[fleet] secret_file`` (for etcd), never in clear."""
        from certkeeper.keeper import sealing

        item = self.dkim_item(domain)
        if not self.config.fleet.enabled or self.config.fleet.secret_file is None:
            raise Refusal("dkim: no [fleet] table: keys are not shared")
        if algorithm not in item.algorithms:
            raise Refusal(f"dkim {domain}: {algorithm!r} is not in algorithms")
        private = existing_dkim_key(self.dkim_key_path(domain, selector), algorithm)
        if private is None:
            raise Refusal(f"dkim {domain}: no key file for selector {selector!r}")
        key = sealing.fleet_key(self.config.fleet.secret_file)
        return sealing.seal(key, domain, selector, algorithm, dkim.private_key_file(private))

    def install_dkim_key(self, domain: str, selector: str, algorithm: str, sealed: str) -> tuple[str, bool]:
        """Open a key the fleet sealed for this selector and write it to key_dir (owner, mode, the signer's form).

        Returns (record, written); an identical key file already there is left alone."""
        from certkeeper.keeper import sealing

        item = self.dkim_item(domain)
        if not self.config.fleet.enabled or self.config.fleet.secret_file is None:
            raise Refusal("dkim: no [fleet] table: keys are not shared")
        if algorithm not in item.algorithms:
            raise Refusal(f"dkim {domain}: {algorithm!r} is not in algorithms")
        path = self.dkim_key_path(domain, selector)
        key = sealing.fleet_key(self.config.fleet.secret_file)
        try:
            private = dkim.load_private_key(sealing.open_sealed(key, domain, selector, algorithm, sealed))
        except ValueError as exc:
            raise Refusal(f"dkim {domain}: the sealed key of selector {selector} is not a DKIM key ({exc})") from None
        if dkim.algorithm_of(private) != algorithm:
            raise Refusal(f"dkim {domain}: the sealed key of selector {selector} is not {algorithm}")
        record = dkim.key_record_for(private).render()
        try:
            present = existing_dkim_key(path, algorithm)
        except LocalError:
            present = None  # unusable: replaced below
        if present is not None and dkim.key_record_for(present).render() == record:
            return record, False
        uid, gid = dkim_owner(item)
        write_atomic(path, dkim.private_key_file(private, raw_ed25519=signers.raw_ed25519(item.signer)),
                     item.key_mode, uid, gid)
        log.info("dkim %s: installed the fleet's key of selector %s as %s", domain, selector, path)
        return record, True

    # -- the zone file -------------------------------------------------------------------

    def zone_publish(self, name: str, rtype: str, ttl: int, values: Sequence[str]) -> None:
        from certkeeper.network.dns import RecordSet  # dns.rdata/dns.zone only: no resolver, no socket

        self._zonefile().publish(RecordSet(name, rtype, tuple(values), ttl))

    def zone_remove(self, name: str, rtype: str) -> None:
        self._zonefile().remove(name, rtype)

    # -- [fleet]: the fleet-watch worker --------------------------------------------------

    def shared_challenge(self, token: str, key_authorization: str, name: str) -> None:
        """Another fleet host's HTTP-01 token: this host's listener answers it too, only for a name this host
        serves (a [[certificate]]'s or an [[mta_sts]] policy host's) and only as RFC 8555 8.1 builds it."""
        from certkeeper.core.challenges import served_names

        if not self.config.fleet.enabled:
            raise Refusal("no [fleet] table: tokens of other hosts are not answered")
        if name.lower().rstrip(".") not in served_names(self.config):
            raise Refusal(f"HTTP-01 for {name[:80]!r}: not a name of this host's configuration")
        if not key_authorization.startswith(token + ".") or len(key_authorization) > 512:
            raise Refusal("HTTP-01: the key authorization is not TOKEN.THUMBPRINT")
        try:
            self.challenges.add(token, key_authorization, name=name)
        except ValueError as exc:
            raise Refusal(str(exc)) from None

    def takeover(self, leader: str) -> None:
        """The rotator's lease expired without it resigning: the daemon runs its DKIM job at once."""
        if not self.config.fleet.enabled:
            raise Refusal("no [fleet] table")
        if self.on_takeover is not None:
            self.on_takeover(leader[:200])

    def refresh_policies(self) -> None:
        """The publish worker saved the fleet's MX names (``STATE/mta-sts/fleet-mx``): the listener
        rebuilds its policies from the configuration and the state files, so an [[mta_sts]] table without mx
        serves the fleet's union before its id is checked and published. Refused without [fleet], without
        such a table, or when the file is not a list of MX names; nothing to do without a listener (the CLI:
        the daemon rebuilds them at its next publish run)."""
        from certkeeper.core import mtasts_state

        if not self.config.fleet.enabled:
            raise Refusal("no [fleet] table: the policies do not follow the fleet's MX names")
        if not any(m.fleet_mx for m in self.config.mta_sts):
            raise Refusal("no [[mta_sts]] table takes its mx from the fleet")
        try:
            names = mtasts_state.read_fleet_mx(self.config)
        except (OSError, ValueError) as exc:
            raise Refusal(f"{mtasts_state.fleet_mx_path(self.config)}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        log.debug("fleet: the MTA-STS policies list the fleet's MX names %s", ", ".join(names) or "(none yet)")
        if self.on_policies is not None:
            self.on_policies()

    def _zonefile(self) -> ZonefileBackend:
        if self.config.dns.backend != "zonefile":
            raise Refusal("[dns] backend is not zonefile")
        from certkeeper.network.dns.zonefile import ZonefileBackend

        return ZonefileBackend(self.config.dns)


def fallback_sendmail(alerts: AlertsConfig) -> tuple[str, ...]:
    """What mail falls back to when SMTP fails: ``[alerts] sendmail``, else ``sendmail -t`` from PATH
    or the usual places (/usr/sbin, /usr/lib)."""
    if alerts.sendmail:
        return alerts.sendmail
    search = os.pathsep.join(p for p in (os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib") if p)
    return (shutil.which("sendmail", path=search) or "/usr/sbin/sendmail", "-t")


def _split_kept(data: bytes) -> tuple[bytes, bytes]:
    """(key, full chain) from a kept file: the key's PEM block first, then the certificates."""
    end = data.find(b"-----END ")
    stop = data.find(b"-----", end + 9) + 5 if end >= 0 else -1
    if end < 0 or stop < 5 or b"PRIVATE KEY" not in data[:stop]:
        raise ValueError("no private key first")
    return data[:stop] + b"\n", data[stop:].lstrip()


def _check_recipients(data: bytes, mail_to: Sequence[str], program: str) -> None:
    """``sendmail -t`` mails whoever the headers name: only ``[alerts] mail_to`` may be named."""
    from email import message_from_bytes
    from email.utils import getaddresses

    msg = message_from_bytes(data)
    named = {address.lower() for _, address in getaddresses(msg.get_all("To", []) + msg.get_all("Cc", [])
                                                             + msg.get_all("Bcc", []))}
    allowed = {address.lower() for address in mail_to}
    if not named or not named <= allowed:
        raise Refusal(f"[alerts] {program}: the message is not addressed to [alerts] mail_to only")


def decide(config: Config, store: CertificateStore, cert: CertificateConfig, now: datetime,
           force: bool = False) -> renewal.Decision:
    """The one decision about ``cert`` (read-only): what the renew worker plans with, and what
    ``status``, ``--json`` and the metrics show (the reason and time of the next action, the backoff
    and what lifts it)."""
    problem = store.check(cert)
    return renewal.plan(cert, store.read(cert), load_cert_state(config.state_dir, cert.name), now, force=force,
                        settings=renewal.certificate_settings(config, cert), disk_problem=problem,
                        repairable=bool(problem) and store.repairable(cert))


def existing_dkim_key(path: Path, algorithm: str) -> dkim.DkimPrivateKey | None:
    """The private key in ``path``, None when the file does not exist; LocalError when it is not usable."""
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


def dkim_owner(item: DkimConfig) -> tuple[int, int]:
    import grp
    import pwd

    uid = gid = -1
    if item.key_owner:
        try:
            uid = pwd.getpwnam(item.key_owner).pw_uid
        except KeyError:
            raise LocalError(f"dkim {item.domain}: key_owner: no user {item.key_owner!r}") from None
    if item.key_group:
        try:
            gid = grp.getgrnam(item.key_group).gr_gid
        except KeyError:
            raise LocalError(f"dkim {item.domain}: key_group: no group {item.key_group!r}") from None
    return uid, gid


def next_key_path(cert: CertificateConfig) -> Path:
    """Where a dane certificate's next key waits: beside the key, ``KEY.next``."""
    return cert.key.with_name(cert.key.name + ".next")


def _account(name: str, kind: str) -> int:
    import grp
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        raise LocalError(f"no {kind} {name!r} for the next key") from None


def _key_type(pem: bytes) -> str:
    try:
        return certs.key_type_of(pem)
    except LocalError:
        return ""


# ---------------------------------------------------------------------------
# Serving one network worker over its socketpair.


@dataclass
class WorkerResult:
    code: int
    soonest: datetime | None


def serve(sock: socket.socket, keeper: LocalKeeper, emit: Callable[[str], None], now: Callable[[], datetime],
          what: str = "worker") -> WorkerResult:
    """Answer the worker's requests until its ``Exit``; blocking (run it in a thread).

    A refused request, a malformed frame or a message out of place ends the
    session at once (the caller kills the worker): the run fails closed.
    """
    while True:
        try:
            request = protocol.receive(sock)
        except (EOFError, ConnectionError):
            raise LocalError(f"the {what} ended without a result") from None
        except TimeoutError:
            raise LocalError(f"the {what} sent nothing for {sock.gettimeout():g} s; stopped it") from None
        if isinstance(request, protocol.Line):
            emit(request.text[:MAX_LINE])  # a worker cannot flood the log with one message
            continue
        if isinstance(request, protocol.Alive):
            continue
        if isinstance(request, protocol.Exit):
            return WorkerResult(request.code, datetime.fromisoformat(request.next) if request.next else None)
        try:
            reply = answer(keeper, request, emit, now)
        except Refusal as exc:
            log.error("refused a request of the %s: %s: %s", what, type(request).__name__, exc)
            protocol.send(sock, protocol.Refused(str(exc)))
            raise
        except CertkeeperError as exc:  # the work failed (a hook, a file): the worker decides what follows
            reply = protocol.Refused(str(exc))
        try:
            protocol.send(sock, reply)
        except ConnectionError:  # it died while the keeper did the work (which stands: it is on disk)
            raise LocalError(f"the {what} ended without a result") from None


def answer(keeper: LocalKeeper, request: object, emit: Callable[[str], None],
           now: Callable[[], datetime]) -> object:
    """One request → one reply (``Refusal`` for anything the keeper does not do)."""
    p = protocol
    match request:
        case p.Inspect(name=name):
            view = keeper.inspect(name)
            return p.Disk(name, view.cert.decode(), view.chain.decode(), view.previous.decode(), view.recovered)
        case p.Plan(name=name, force=force):
            d = keeper.plan(name, force, now())
            return p.Planned(name, d.due, d.when.isoformat(), d.reason, d.not_after.isoformat() if d.not_after else "",
                             d.action, d.lifts)
        case p.MakeCsr(name=name, fresh_key=fresh_key, use_next=use_next):
            return p.Csr(name, keeper.make_csr(name, fresh_key, use_next).decode())
        case p.DaneKeys(name=name):
            current, next_digest = keeper.dane_keys(name)
            return p.DaneDigests(name, current, next_digest)
        case p.Install(name=name, fullchain=fullchain):
            info = keeper.install(name, fullchain.encode())
            return p.Installed(name, f"{info.serial:x}")
        case p.RunHook(hook=hook, certificates=names):
            result = keeper.run_hook(hook, names)
            return p.HookRan(result.argv, result.returncode, result.output, result.seconds)
        case p.Rollback(name=name):
            keeper.rollback(name)
            return p.Ok()
        case p.InstallKept(name=name):
            installed = keeper.store.read(keeper.certificate(name)) if keeper.install_kept(name) else None
            return p.Kept(name, installed.cert.decode() if installed is not None else "")
        case p.DkimKey(domain=domain, selector=selector, algorithm=algorithm, create=create):
            record, created = keeper.dkim_key(domain, selector, algorithm, create)
            return p.DkimRecord(record, created)
        case p.DkimSelectors(domain=domain):
            return p.Names(keeper.dkim_selectors(domain))
        case p.SwitchSigner(domain=domain, keys=keys):
            keeper.switch_signer(domain, [(k.domain, k.selector, k.algorithm) for k in keys], emit)
            return p.Ok()
        case p.RestoreSigner(domain=domain):
            return p.Restored(keeper.restore_signer(domain, emit))
        case p.ConfirmSigner(domain=domain):
            keeper.confirm_signer(domain)
            return p.Ok()
        case p.EnforceDkimKeys(domain=domain):
            keeper.enforce_dkim_keys(domain, emit)
            return p.Ok()
        case p.AdoptDkimKey(domain=domain, selector=selector, record=record):
            return p.DkimAlgorithm(keeper.adopt_dkim_key(domain, selector, record, emit))
        case p.DisposeDkimKey(domain=domain, selector=selector, algorithm=algorithm):
            keeper.dispose_dkim_key(domain, selector, algorithm, emit)
            return p.Ok()
        case p.SealDkimKey(domain=domain, selector=selector, algorithm=algorithm):
            return p.SealedKey(keeper.seal_dkim_key(domain, selector, algorithm))
        case p.InstallDkimKey(domain=domain, selector=selector, algorithm=algorithm, sealed=sealed):
            record, written = keeper.install_dkim_key(domain, selector, algorithm, sealed)
            return p.DkimRecord(record, written)
        case p.ZonePublish(name=name, rtype=rtype, ttl=ttl, values=values):
            keeper.zone_publish(name, rtype, ttl, values)
            return p.Ok()
        case p.ZoneRemove(name=name, rtype=rtype):
            keeper.zone_remove(name, rtype)
            return p.Ok()
        case p.RunAlert(program=program, data=data):
            keeper.run_alert(program, data.encode())
            return p.Ok()
        case p.Challenge(token=token, key_authorization=key_authorization):
            try:
                keeper.challenges.add(token, key_authorization)
            except ValueError as exc:
                raise Refusal(str(exc)) from None
            return p.Ok()
        case p.Unchallenge(token=token):
            keeper.challenges.remove(token)
            return p.Ok()
        case p.SharedChallenge(token=token, key_authorization=key_authorization, name=name):
            keeper.shared_challenge(token, key_authorization, name)
            return p.Ok()
        case p.Takeover(leader=leader):
            keeper.takeover(leader)
            return p.Ok()
        case p.RefreshPolicies():
            keeper.refresh_policies()
            return p.Ok()
    raise Refusal(f"{type(request).__name__} is not a request the keeper answers")
