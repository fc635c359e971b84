"""The network side's handle on the keeper: ``Keeper`` (what it may ask) and ``PipeKeeper``.

Code that runs unprivileged (``runner``, ``reload``, ``rotation``, the zone
file backend, alerts) never touches a key, a certificate set, a signer file or
a hook itself: it asks a ``Keeper``. In production that is a ``PipeKeeper``,
which sends each request to the keeper over the worker's socketpair
(``certkeeper.protocol``) and waits for the reply; in one process (tests) it
is ``certkeeper.keeper.service.LocalKeeper`` itself. Both have the same
methods; a refused request raises ``LocalError`` with the keeper's reason.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from certkeeper import protocol
from certkeeper.core import certs, renewal
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config
from certkeeper.keeper.hooks import CommandResult
from certkeeper.keeper.service import DiskView

R = TypeVar("R")


class Keeper(Protocol):
    """What the unprivileged side may ask of the keeper (see ``certkeeper.keeper.service``)."""

    config: Config
    challenges: ChallengeTable

    def inspect(self, name: str) -> DiskView: ...
    def plan(self, name: str, force: bool, now: datetime) -> renewal.Decision: ...
    def make_csr(self, name: str, fresh_key: bool = False, use_next: bool = False) -> bytes: ...
    def dane_keys(self, name: str) -> tuple[str, str]: ...
    def install(self, name: str, fullchain: bytes) -> certs.CertInfo: ...
    def rollback(self, name: str) -> None: ...
    def install_kept(self, name: str) -> certs.CertInfo | None: ...
    def run_hook(self, name: str, certificates: Sequence[str] = ()) -> CommandResult: ...
    def run_alert(self, program: str, data: bytes) -> bool: ...
    def dkim_key(self, domain: str, selector: str, algorithm: str, create: bool) -> tuple[str, bool]: ...
    def dkim_selectors(self, domain: str) -> tuple[str, ...]: ...
    def switch_signer(self, domain: str, keys: Sequence[tuple[str, str, str]],
                      progress: Callable[[str], None]) -> None: ...
    def restore_signer(self, domain: str, progress: Callable[[str], None]) -> str: ...
    def confirm_signer(self, domain: str) -> None: ...
    def enforce_dkim_keys(self, domain: str, progress: Callable[[str], None]) -> None: ...
    def adopt_dkim_key(self, domain: str, selector: str, record: str, progress: Callable[[str], None]) -> str: ...
    def dispose_dkim_key(self, domain: str, selector: str, algorithm: str,
                         progress: Callable[[str], None]) -> None: ...
    def seal_dkim_key(self, domain: str, selector: str, algorithm: str) -> str: ...
    def install_dkim_key(self, domain: str, selector: str, algorithm: str, sealed: str) -> tuple[str, bool]: ...
    def zone_publish(self, name: str, rtype: str, ttl: int, values: Sequence[str]) -> None: ...
    def zone_remove(self, name: str, rtype: str) -> None: ...
    def shared_challenge(self, token: str, key_authorization: str, name: str) -> None: ...
    def takeover(self, leader: str) -> None: ...
    def refresh_policies(self) -> None: ...


class PipeKeeper:
    """A ``Keeper`` at the other end of a socketpair; safe to use from several threads."""

    def __init__(self, config: Config, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self._lock = threading.Lock()
        self.challenges: ChallengeTable = RelayedChallenges(self)

    def call(self, request: object, kind: type[R]) -> R:
        with self._lock:
            protocol.send(self.sock, request)
            return protocol.expect(protocol.receive(self.sock), kind)

    def notify(self, message: object) -> None:
        with self._lock:
            protocol.send(self.sock, message)

    def inspect(self, name: str) -> DiskView:
        disk = self.call(protocol.Inspect(name), protocol.Disk)
        return DiskView(disk.cert.encode(), disk.chain.encode(), disk.previous.encode(), disk.recovered)

    def plan(self, name: str, force: bool, now: datetime) -> renewal.Decision:
        p = self.call(protocol.Plan(name, force), protocol.Planned)
        return renewal.Decision(p.name, p.due, datetime.fromisoformat(p.when), p.reason,
                                datetime.fromisoformat(p.not_after) if p.not_after else None, p.action, p.lifts)

    def make_csr(self, name: str, fresh_key: bool = False, use_next: bool = False) -> bytes:
        return self.call(protocol.MakeCsr(name, fresh_key, use_next), protocol.Csr).csr.encode()

    def dane_keys(self, name: str) -> tuple[str, str]:
        reply = self.call(protocol.DaneKeys(name), protocol.DaneDigests)
        return reply.current, reply.next

    def install(self, name: str, fullchain: bytes) -> certs.CertInfo:
        self.call(protocol.Install(name, fullchain.decode()), protocol.Installed)
        return certs.parse_cert(fullchain)

    def rollback(self, name: str) -> None:
        self.call(protocol.Rollback(name), protocol.Ok)

    def install_kept(self, name: str) -> certs.CertInfo | None:
        kept = self.call(protocol.InstallKept(name), protocol.Kept)
        return certs.parse_cert(kept.cert.encode()) if kept.cert else None

    def run_hook(self, name: str, certificates: Sequence[str] = ()) -> CommandResult:
        ran = self.call(protocol.RunHook(name, tuple(certificates)), protocol.HookRan)
        return CommandResult(ran.argv, ran.returncode, ran.output, ran.seconds)

    def run_alert(self, program: str, data: bytes) -> bool:
        self.call(protocol.RunAlert(program, data.decode("utf-8", errors="replace")), protocol.Ok)
        return True

    def dkim_key(self, domain: str, selector: str, algorithm: str, create: bool) -> tuple[str, bool]:
        got = self.call(protocol.DkimKey(domain, selector, algorithm, create), protocol.DkimRecord)
        return got.record, got.created

    def dkim_selectors(self, domain: str) -> tuple[str, ...]:
        return self.call(protocol.DkimSelectors(domain), protocol.Names).names

    def switch_signer(self, domain: str, keys: Sequence[tuple[str, str, str]],
                      progress: Callable[[str], None]) -> None:
        refs = tuple(protocol.SignerKey(d, s, a) for d, s, a in keys)
        self.call(protocol.SwitchSigner(domain, refs), protocol.Ok)  # the keeper's lines reach the log

    def restore_signer(self, domain: str, progress: Callable[[str], None]) -> str:
        return self.call(protocol.RestoreSigner(domain), protocol.Restored).what

    def confirm_signer(self, domain: str) -> None:
        self.call(protocol.ConfirmSigner(domain), protocol.Ok)

    def enforce_dkim_keys(self, domain: str, progress: Callable[[str], None]) -> None:
        self.call(protocol.EnforceDkimKeys(domain), protocol.Ok)

    def adopt_dkim_key(self, domain: str, selector: str, record: str, progress: Callable[[str], None]) -> str:
        return self.call(protocol.AdoptDkimKey(domain, selector, record), protocol.DkimAlgorithm).algorithm

    def dispose_dkim_key(self, domain: str, selector: str, algorithm: str,
                         progress: Callable[[str], None]) -> None:
        self.call(protocol.DisposeDkimKey(domain, selector, algorithm), protocol.Ok)

    def seal_dkim_key(self, domain: str, selector: str, algorithm: str) -> str:
        return self.call(protocol.SealDkimKey(domain, selector, algorithm), protocol.SealedKey).sealed

    def install_dkim_key(self, domain: str, selector: str, algorithm: str, sealed: str) -> tuple[str, bool]:
        got = self.call(protocol.InstallDkimKey(domain, selector, algorithm, sealed), protocol.DkimRecord)
        return got.record, got.created

    def zone_publish(self, name: str, rtype: str, ttl: int, values: Sequence[str]) -> None:
        self.call(protocol.ZonePublish(name, rtype, ttl, tuple(values)), protocol.Ok)

    def zone_remove(self, name: str, rtype: str) -> None:
        self.call(protocol.ZoneRemove(name, rtype), protocol.Ok)

    def shared_challenge(self, token: str, key_authorization: str, name: str) -> None:
        self.call(protocol.SharedChallenge(token, key_authorization, name), protocol.Ok)

    def takeover(self, leader: str) -> None:
        self.call(protocol.Takeover(leader), protocol.Ok)

    def refresh_policies(self) -> None:
        self.call(protocol.RefreshPolicies(), protocol.Ok)


class RelayedChallenges(ChallengeTable):
    """The worker's challenge table: each token also goes to the keeper, which has the listener answer it."""

    def __init__(self, keeper: PipeKeeper) -> None:
        super().__init__()
        self._keeper = keeper

    def add(self, token: str, key_authorization: str, name: str = "") -> None:
        super().add(token, key_authorization)  # validates the token
        self._keeper.call(protocol.Challenge(token, key_authorization), protocol.Ok)

    def remove(self, token: str) -> None:
        super().remove(token)
        self._keeper.call(protocol.Unchallenge(token), protocol.Ok)
