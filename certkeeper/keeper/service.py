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

import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from certkeeper import protocol
from certkeeper.core import certs, dane, dkim, renewal
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import HOOK_DEFAULT_COMMANDS, CertificateConfig, Config, DkimConfig
from certkeeper.core.errors import AcmeError, CertkeeperError, LocalError
from certkeeper.core.files import fsync_dir, write_atomic
from certkeeper.core.state import load_cert_state
from certkeeper.keeper import hooks, signers
from certkeeper.keeper.store import CertificateSet, CertificateStore

if TYPE_CHECKING:
    from certkeeper.network.dns.zonefile import ZonefileBackend

log = logging.getLogger(__name__)

ALERT_TIMEOUT = 30.0  # seconds for one run of [alerts] command
REVEAL_DIR = "revealed"  # key_dir/revealed/: retired DKIM private keys published on purpose (reveal_retired)
# RFC 6376 3.1: a selector is one or more DNS labels.
_SELECTOR = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


class Refusal(LocalError):
    """A request the configuration does not allow: the run that sent it fails closed."""


@dataclass(frozen=True)
class DiskView:
    """The public files of a certificate set (the key never leaves the keeper)."""
    cert: bytes  # b"" when there is none
    chain: bytes
    previous: bytes  # the leaf of the set kept for a rollback


class LocalKeeper:
    """The keeper's powers in this process. Safe to call from several threads."""

    def __init__(self, config: Config, challenges: ChallengeTable | None = None,
                 on_installed: Callable[[CertificateConfig], None] | None = None,
                 store: CertificateStore | None = None) -> None:
        self.config = config
        self.challenges = challenges if challenges is not None else ChallengeTable()
        self.on_installed = on_installed
        self.store = store if store is not None else CertificateStore(config.state_dir)
        self._pending: dict[str, bytes] = {}  # certificate name → the key its last CSR was made for
        self._lock = threading.Lock()

    # -- certificates --------------------------------------------------------------

    def certificate(self, name: str) -> CertificateConfig:
        try:
            return self.config.certificate(name)
        except KeyError:
            raise Refusal(f"no [[certificate]] named {name!r} in {self.config.path}") from None

    def inspect(self, name: str) -> DiskView:
        """Finish an interrupted install, rebuild a lost chain file, then show the public files."""
        cert = self.certificate(name)
        self.store.recover(cert)
        if self.store.repair(cert) and self.on_installed is not None:
            self.on_installed(cert)
        current = self.store.read(cert)
        previous = self.store.read_previous(cert)
        return DiskView(current.cert if current else b"", current.chain if current else b"",
                        previous.cert if previous else b"")

    def plan(self, name: str, force: bool, now: datetime) -> renewal.Decision:
        """The planner's decision from the files on disk and the certificate's state."""
        cert = self.certificate(name)
        on_disk = self.store.read(cert)
        state = load_cert_state(self.config.state_dir, cert.name)
        if not cert.dane:
            self._dispose_next_key(cert)
        return renewal.plan(cert, on_disk, state, now, force=force,
                            settings=renewal.settings_digest(cert, self.config.acme),
                            disk_problem=self.store.check(cert))

    def make_csr(self, name: str, use_next: bool = False) -> bytes:
        """A CSR for the certificate's names, for the key the next ``install`` must match.

        ``reuse_key`` keeps the key on disk while it is of the configured type. A ``dane`` certificate
        never gets a fresh key here: it keeps the current one, or (``use_next``, or its first
        certificate) takes the next key whose TLSA record the network side has published and seen."""
        cert = self.certificate(name)
        current = self.store.read(cert)
        if use_next and not cert.dane:
            raise Refusal(f"{name}: the next key is only kept for a certificate with dane = true")
        reusable = current is not None and _key_type(current.key) == cert.key_type
        if cert.dane and (use_next or current is None):
            key = self._next_key(cert, create=False)
            if key is None:
                raise LocalError(f"{name}: there is no next key to use yet (its TLSA record comes first)")
        elif cert.dane and current is not None and not reusable:
            raise LocalError(f"{name}: the key is {_key_type(current.key) or 'unreadable'}, key_type asks for "
                             f"{cert.key_type}; with dane the change waits for the next key's TLSA record")
        elif current is not None and (cert.reuse_key or cert.dane) and reusable:
            key = current.key
        else:
            key = certs.generate_key(cert.key_type)
        with self._lock:
            self._pending[name] = key
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

    def rollback(self, name: str) -> None:
        cert = self.certificate(name)
        self.store.restore_previous(cert)
        if self.on_installed is not None:
            self.on_installed(cert)

    # -- hooks -----------------------------------------------------------------------

    def run_hook(self, name: str, certificates: Sequence[str] = ()) -> hooks.CommandResult:
        """Run a hook that a certificate or a [[dkim]] signer names, telling it which certificates."""
        used = {h for c in self.config.certificates for h in c.hooks}
        used |= {signers.hook_name(item) for item in self.config.dkim}
        if name not in used or (name not in self.config.hooks and name not in HOOK_DEFAULT_COMMANDS):
            raise Refusal(f"hook {name!r} is not used by any [[certificate]] or [[dkim]] table")
        for certificate in certificates:
            self.certificate(certificate)
        return hooks.hook_for(self.config, name).reload(tuple(certificates))

    def run_alert(self, program: str, data: bytes) -> bool:
        """Run ``[alerts] command`` or ``[alerts] sendmail`` with ``data`` on stdin."""
        argv = {"command": self.config.alerts.command, "sendmail": self.config.alerts.sendmail}.get(program)
        if not argv:
            raise Refusal(f"[alerts] {program} is not configured")
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

        Every key must be a key file of a [[dkim]] domain that shares this signer file."""
        item = self.dkim_item(domain)
        path = signers.config_path(item)
        chosen: list[signers.SigningKey] = []
        for key_domain, selector, algorithm in keys:
            other = self.dkim_item(key_domain)
            if other.signer != item.signer or signers.config_path(other) != path:
                raise Refusal(f"dkim {domain}: {key_domain} does not share its signer file")
            key_path = self.dkim_key_path(key_domain, selector)
            if existing_dkim_key(key_path, algorithm) is None:
                raise Refusal(f"dkim {key_domain}: no key file for selector {selector!r}")
            chosen.append(signers.SigningKey(key_domain, selector, algorithm, key_path))
        signers.apply(self.config, item, chosen, progress, force_hook=True)

    def dispose_dkim_key(self, domain: str, selector: str, algorithm: str,
                         progress: Callable[[str], None]) -> None:
        """Delete a removed selector's private key (first revealing it, with ``reveal_retired``)."""
        item = self.dkim_item(domain)
        path = self.dkim_key_path(domain, selector)
        if item.reveal_retired:
            private = existing_dkim_key(path, algorithm)
            if private is not None:
                target = item.key_dir / REVEAL_DIR / dkim.reveal_name(dkim.key_record_for(private))
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, dkim.private_key_file(private), 0o644)
                progress(f"{domain}: revealed the retired private key as {target}")
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
            progress(f"{domain}: deleted {path}")

    # -- the zone file -------------------------------------------------------------------

    def zone_publish(self, name: str, rtype: str, ttl: int, values: Sequence[str]) -> None:
        from certkeeper.network.dns import RecordSet  # dns.rdata/dns.zone only: no resolver, no socket

        self._zonefile().publish(RecordSet(name, rtype, tuple(values), ttl))

    def zone_remove(self, name: str, rtype: str) -> None:
        self._zonefile().remove(name, rtype)

    def _zonefile(self) -> ZonefileBackend:
        if self.config.dns.backend != "zonefile":
            raise Refusal("[dns] backend is not zonefile")
        from certkeeper.network.dns.zonefile import ZonefileBackend

        return ZonefileBackend(self.config.dns)


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
        except EOFError:
            raise LocalError(f"the {what} ended without a result") from None
        except TimeoutError:
            raise LocalError(f"the {what} sent nothing for {sock.gettimeout():g} s; stopped it") from None
        if isinstance(request, protocol.Line):
            emit(request.text)
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
        protocol.send(sock, reply)


def answer(keeper: LocalKeeper, request: object, emit: Callable[[str], None],
           now: Callable[[], datetime]) -> object:
    """One request → one reply (``Refusal`` for anything the keeper does not do)."""
    p = protocol
    match request:
        case p.Inspect(name=name):
            view = keeper.inspect(name)
            return p.Disk(name, view.cert.decode(), view.chain.decode(), view.previous.decode())
        case p.Plan(name=name, force=force):
            d = keeper.plan(name, force, now())
            return p.Planned(name, d.due, d.when.isoformat(), d.reason, d.not_after.isoformat() if d.not_after else "")
        case p.MakeCsr(name=name, use_next=use_next):
            return p.Csr(name, keeper.make_csr(name, use_next).decode())
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
        case p.DkimKey(domain=domain, selector=selector, algorithm=algorithm, create=create):
            record, created = keeper.dkim_key(domain, selector, algorithm, create)
            return p.DkimRecord(record, created)
        case p.DkimSelectors(domain=domain):
            return p.Names(keeper.dkim_selectors(domain))
        case p.SwitchSigner(domain=domain, keys=keys):
            keeper.switch_signer(domain, [(k.domain, k.selector, k.algorithm) for k in keys], emit)
            return p.Ok()
        case p.DisposeDkimKey(domain=domain, selector=selector, algorithm=algorithm):
            keeper.dispose_dkim_key(domain, selector, algorithm, emit)
            return p.Ok()
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
    raise Refusal(f"{type(request).__name__} is not a request the keeper answers")


def job_args(args: dict[str, object]) -> str:
    return json.dumps(args, sort_keys=True)
