"""Several MX hosts, one DKIM key set: coordination through etcd ([fleet]).

Runs in the network worker (unprivileged), in place of ``rotation.run_due`` and
``rotation.rotate_now`` when ``[fleet]`` is configured. etcd does the
coordination; certkeeper adds no lock of its own:

- **one rotator**: a host campaigns by creating ``PREFIX/leader`` in a
  transaction that succeeds only while the key does not exist
  (``create_revision == 0``), attached to a lease of ``lease_ttl`` seconds that
  it keeps alive while it works, and resigns at the end (the delete and
  ``PREFIX/released`` in one transaction). If it dies the lease expires and
  the key with it: every daemon's fleet-watch worker (``watch``) sees a delete
  that is no resignation and has its daemon run the DKIM job at once, so the
  rotation is taken over within the lease TTL, not at the next hourly run.
- **the rotation state** of each [[dkim]] domain is ``PREFIX/dkim/DOMAIN/state``
  (the JSON of ``rotation.DomainState``). The rotator writes it in transactions
  that compare its mod revision with the one read *and* the leader key's with
  the rotator's own election: a stale writer, or a host that lost its lease,
  cannot win. A rotation interrupted half-way is finished by the next rotator
  from that state, never restarted; every step is idempotent as on one host.
- **shared keys**: the rotator's keeper makes the key and seals it with
  ``[fleet] secret_file`` (``certkeeper.keeper.sealing``); the ciphertext is
  ``PREFIX/dkim/DOMAIN/keys/SELECTOR`` (written only if absent). Every host's
  run installs the keys of the state it does not hold (its keeper opens them)
  and reports in ``PREFIX/hosts/HOST`` (heartbeat, keys held, selectors its
  signer uses). The rotator activates a selector only once every live host
  (heartbeat within ``live_within``) holds it, after its record is visible;
  each host switches its own signer when it sees the selector active; the
  rotator revokes an old selector only once no host seen within
  ``retire_after`` still signs with it.
- ``rotate-dkim --now`` on several hosts at once is one rotation: the request
  is a transaction on the state's revision, and a request that finds a pending
  key joins it.

- **one MTA-STS policy** (``agreed_policies``, in the publish job, every hour): each host reports the ids
  of the policies it serves and its MX names in ``PREFIX/mta-sts/HOST``; an ``[[mta_sts]]`` table without
  ``mx`` lists the union of the live hosts' MX names (``STATE/mta-sts/fleet-mx``; the keeper has the listener
  rebuild its policies before the id is checked), so every host serves the same text; an id is published only while
  every live host serves that policy, and a host that finds it published already does not send it again.

- **HTTP-01 for a name several hosts serve** (``mta-sts.DOMAIN`` behind
  round-robin DNS): the renew worker's ``SharedChallenges`` puts each token in
  ``PREFIX/http01/TOKEN`` on a lease of the order's timeout; every other
  daemon's fleet-watch worker hands it to its keeper, which has its listener
  answer it for a name that host serves (the listener never talks to etcd),
  and acknowledges it; the CA is told to validate once every watching host has.

When etcd cannot be reached nothing changes on this host: it keeps signing with
the keys it has, and no rotation happens until etcd is back.

After each run a snapshot of what the fleet looked like is written to
``STATE/fleet/status.json`` for ``certkeeper status`` (the keeper never talks
to etcd itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from certkeeper.core import dkim, secrets
from certkeeper.core.challenges import ChallengeTable, served_names
from certkeeper.core.config import Config, DkimConfig, FleetConfig
from certkeeper.core.errors import CertkeeperError, LocalError
from certkeeper.core.files import write_atomic, write_json_atomic
from certkeeper.keeper import signers
from certkeeper.network import rotation
from certkeeper.network.dns import RecordSet
from certkeeper.network.dns.propagation import visible_everywhere, wait_until_absent, wait_until_visible
from certkeeper.network.keeper_client import Keeper
from certkeeper.network.rotation import Action, DomainState, DueReport, Progress

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_TIMEOUT = 5.0  # seconds for one etcd request
MAX_CAS_TRIES = 10  # a request for a rotation retried when another writer won the transaction
RELEASED = "released"  # PREFIX/released: the host of the last rotator that resigned (not died)
HTTP01 = "http01"  # PREFIX/http01/TOKEN: an HTTP-01 token every host's listener answers
HTTP01_ACKS = "http01-ack"  # PREFIX/http01-ack/TOKEN/HOST: HOST's fleet-watch worker has seen the token
WATCHERS = "watchers"  # PREFIX/watchers/HOST: HOST's fleet-watch worker runs (on a lease it keeps alive)
ACK_WAIT = 10.0  # seconds an order waits for the other hosts' listeners to have its token
ALIVE_EVERY = 30.0  # seconds: how often the fleet-watch worker tells the keeper it is well
WATCH_RETRY = (1.0, 60.0)  # seconds the fleet-watch worker waits before it reconnects: first, at most
STATUS_FILE = "fleet/status.json"
SIGNING_FILE = "fleet/signing.json"  # which selectors this host's signer uses, per domain


class FleetError(LocalError):
    """etcd cannot be reached, or refused a request."""


class LostLeadership(FleetError):
    """The rotator's lease or the state moved under it: it stops, the next rotator continues."""


# ---------------------------------------------------------------------------
# etcd: an asyncio client (aetcd) on a loop in its own thread, used from plain code.


@dataclass
class Election:
    lease_id: int
    revision: int  # mod revision of PREFIX/leader when this host won


class Etcd:
    """A synchronous handle on the cluster; ``close()`` always (a ``with`` block)."""

    def __init__(self, fleet: FleetConfig) -> None:
        self.fleet = fleet
        self.prefix = fleet.prefix.rstrip("/")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="etcd", daemon=True)
        self.thread.start()
        self.client: Any = None
        self.election: Election | None = None
        self.lost = threading.Event()
        self._keepalive: asyncio.Task[None] | None = None
        try:
            self.client = self._call(self._connect(), REQUEST_TIMEOUT * (len(fleet.endpoints) + 1))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    # -- plumbing --------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = REQUEST_TIMEOUT * 2) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 1)
        except CertkeeperError:
            raise
        except Exception as exc:  # noqa: BLE001 - gRPC, aetcd and timeouts: one line
            raise FleetError(f"etcd: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None

    async def _connect(self) -> Any:
        problems: list[str] = []
        for endpoint in self.fleet.endpoints:
            client = _client(self.fleet, endpoint)
            try:
                await asyncio.wait_for(client.get(self.key("hosts")), REQUEST_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - try the next member
                problems.append(f"{endpoint}: {type(exc).__name__}")
                await _quiet_close(client)
                continue
            return client
        raise FleetError("etcd unreachable (" + "; ".join(problems) + ")")

    def close(self) -> None:
        if self.client is not None:
            try:
                self._call(self._close(), REQUEST_TIMEOUT)
            except FleetError as exc:
                log.debug("fleet: closing: %s", exc)
            self.client = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(REQUEST_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()

    async def _close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.election is not None:
            try:  # resign: the next host need not wait for the lease to expire
                # PREFIX/released, in the same revision as the delete, tells the watchers this rotator
                # resigned (nothing to take over), where a lease that expires means it died.
                t, leader = self.client.transactions, self.key("leader")
                await self.client.transaction(
                    compare=[t.mod(leader) == self.election.revision],
                    success=[t.delete(leader), t.put(self.key(RELEASED), self.fleet.host.encode())], failure=[])
                await self.client.revoke_lease(self.election.lease_id)
            except Exception as exc:  # noqa: BLE001 - it expires anyway
                log.debug("fleet: revoking the lease: %s", exc)
            self.election = None
        await _quiet_close(self.client)

    # -- keys and values ---------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes | None, int]:
        """(value, mod revision); (None, 0) when absent."""
        got = self._call(self.client.get(key))
        return (None, 0) if got is None else (got.value, got.mod_revision)

    def get_prefix(self, key: bytes) -> list[tuple[bytes, bytes]]:
        got = self._call(self.client.get_prefix(key + b"/"))
        return [(kv.key, kv.value) for kv in got]

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        self._call(self.client.put(key, value, lease=lease))

    def grant(self, ttl: int) -> int:
        """A lease of ``ttl`` seconds; its id."""
        return int(self._call(self.client.lease(ttl)).id)

    def revoke(self, lease: int) -> None:
        """End the lease (and delete every key on it)."""
        self._call(self.client.revoke_lease(lease))

    def delete(self, key: bytes) -> None:
        self._call(self.client.delete(key))

    def put_if_absent(self, key: bytes, value: bytes) -> bytes:
        """Write ``value`` unless the key exists; the value the key holds afterwards."""
        t = self.client.transactions
        ok, responses = self._call(self.client.transaction(
            compare=[t.create(key) == 0], success=[t.put(key, value)], failure=[t.get(key)]))
        if ok:
            return value
        return bytes(responses[0][0][0]) if responses and responses[0] else value

    def swap(self, key: bytes, value: bytes, revision: int, as_leader: bool) -> int | None:
        """Write ``value`` only if the key's mod revision is still ``revision`` (0: absent) and, ``as_leader``,
        this host still holds the election; the key's new mod revision, None when another writer won."""
        t = self.client.transactions
        compare = [t.create(key) == 0] if revision == 0 else [t.mod(key) == revision]
        if as_leader:
            if self.election is None or self.lost.is_set():
                raise LostLeadership("fleet: this host is no longer the rotator")
            compare.append(t.mod(self.key("leader")) == self.election.revision)
        ok, responses = self._call(self.client.transaction(
            compare=compare, success=[t.put(key, value), t.get(key)], failure=[]))
        if not ok:
            return None
        return int(responses[1][0][1].mod_revision)

    # -- the election ---------------------------------------------------------------

    def campaign(self, host: str) -> str:
        """Become the rotator if nobody is; the rotator's name. ``leader`` says whether this run won (a key
        still held by an earlier run of this host that died is not this run's: it waits for its lease too)."""
        ttl = self.fleet.lease_ttl

        async def run() -> str:
            lease = await self.client.lease(ttl)
            t = self.client.transactions
            leader = self.key("leader")
            ok, responses = await self.client.transaction(
                compare=[t.create(leader) == 0], success=[t.put(leader, host.encode(), lease=lease.id), t.get(leader)],
                failure=[t.get(leader)])
            if not ok:
                await self.client.revoke_lease(lease.id)
                held = responses[0][0][0] if responses and responses[0] else b""
                return bytes(held).decode(errors="replace")
            self.election = Election(lease.id, int(responses[1][0][1].mod_revision))
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive(lease.id, ttl))
            return host

        return self._call(run())

    async def _keep_alive(self, lease_id: int, ttl: int) -> None:
        while True:
            await asyncio.sleep(max(ttl / 3, 0.5))
            try:
                reply = await asyncio.wait_for(self.client.refresh_lease(lease_id), REQUEST_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the lease may still be alive; the swaps will tell
                log.warning("fleet: keeping the rotator's lease alive failed: %s", type(exc).__name__)
                continue
            if reply is None or reply.TTL <= 0:
                log.warning("fleet: the rotator's lease expired; another host takes over")
                self.lost.set()
                return

    @property
    def leader(self) -> bool:
        return self.election is not None and not self.lost.is_set()


def _client(fleet: FleetConfig, endpoint: str) -> Any:
    import aetcd  # the [fleet] extra

    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    target = f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"
    credentials = None
    if parts.scheme == "https":
        import grpc

        def read(path: Path | None) -> bytes | None:
            return secrets.read(path) if path is not None else None

        credentials = grpc.ssl_channel_credentials(read(fleet.ca), read(fleet.key), read(fleet.cert))
    password = secrets.read(fleet.password_file).decode().strip() if fleet.password_file else None

    class Client(aetcd.Client):
        """aetcd's client on one endpoint, over TLS when it is https://."""

        async def connect(self) -> None:
            if self._connected.is_set():
                return
            from aetcd import rpc, watcher

            # A subchannel pool of its own: a member that was down a moment ago is tried again at once,
            # not after the backoff another channel of this process left on the shared subchannel.
            options = [("grpc.use_local_subchannel_pool", 1)]
            self.channel = (rpc.secure_channel(target, credentials, options=options) if credentials is not None
                            else rpc.insecure_channel(target, options=options))
            if fleet.username:
                self.auth_stub = rpc.AuthStub(self.channel)
                reply = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=fleet.username, password=password), timeout=REQUEST_TIMEOUT)
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=REQUEST_TIMEOUT,
                                            metadata=self.metadata)
            self._connected.set()

    return Client(timeout=REQUEST_TIMEOUT)


async def _quiet_close(client: Any) -> None:
    try:
        await client.close()
    except Exception as exc:  # noqa: BLE001 - closing a channel that never opened
        log.debug("fleet: closing a client: %s", exc)


# ---------------------------------------------------------------------------
# What each host does on every run: take the keys, follow the active selectors, report.


@dataclass
class HostReport:
    host: str
    heartbeat: datetime
    keys: dict[str, list[str]] = field(default_factory=dict)  # domain → selectors held (the state's key)
    signing: dict[str, list[str]] = field(default_factory=dict)  # domain → selectors the signer uses
    failed: list[str] = field(default_factory=list)  # signer switches that failed in this run (not in etcd)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "heartbeat": self.heartbeat.isoformat(), "keys": self.keys,
                "signing": self.signing}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostReport:
        return cls(str(data["host"]), datetime.fromisoformat(data["heartbeat"]),
                   {str(k): [str(s) for s in v] for k, v in dict(data.get("keys", {})).items()},
                   {str(k): [str(s) for s in v] for k, v in dict(data.get("signing", {})).items()})


def load_domain(etcd: Etcd, domain: str) -> tuple[DomainState, int]:
    value, revision = etcd.get(etcd.key("dkim", domain, "state"))
    if value is None:
        return DomainState(domain), 0
    try:
        return DomainState.from_json(json.loads(value)), revision
    except (ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"fleet: {etcd.key('dkim', domain, 'state').decode()}: unreadable state ({exc})") from None


def hosts(etcd: Etcd) -> dict[str, HostReport]:
    found: dict[str, HostReport] = {}
    for key, value in etcd.get_prefix(etcd.key("hosts")):
        try:
            report = HostReport.from_json(json.loads(value))
        except (ValueError, KeyError, TypeError):
            log.warning("fleet: %s: not a host report; ignored", key.decode(errors="replace"))
            continue
        found[report.host] = report
    return found


def sync(config: Config, etcd: Etcd, keeper: Keeper, now: datetime, progress: Progress) -> HostReport:
    """Install the fleet's keys this host lacks, switch its signer to the active selectors, report."""
    report = HostReport(config.fleet.host, now)
    signing = _load_signing(config)
    wanted: dict[str, list[rotation.KeyState]] = {}
    for item in config.dkim:
        state, revision = load_domain(etcd, item.domain)
        if revision == 0:
            state = _adopt(config, etcd, item, keeper, progress)
        rotation.save_state(config, state)  # the local mirror: status reads it
        held = _take_keys(etcd, item, state, keeper, progress)
        report.keys[item.domain] = held
        active = [k for k in state.keys if k.state == "active"]
        if active and all(k.selector in held for k in active):
            wanted[item.domain] = active
        elif active:
            progress(f"{item.domain}: the fleet's active key is not installed here; the signer keeps its keys")
        for key in state.keys:
            if key.state == "removed" and key.selector in _local_selectors(keeper, item):
                keeper.dispose_dkim_key(item.domain, key.selector, key.algorithm, progress)
    for group in _signer_groups(config):
        if not all(i.domain in wanted for i in group):
            continue
        chosen = {i.domain: sorted(k.selector for k in wanted[i.domain]) for i in group}
        if all(signing.get(d) == s for d, s in chosen.items()):
            continue
        unseen = [k.selector for i in group for k in wanted[i.domain]
                  if k.selector not in signing.get(i.domain, []) and not visible_everywhere(
                      config, RecordSet(dkim.record_name(k.selector, i.domain), "TXT", (k.record,), config.dns.ttl))]
        if unseen:  # verified as on one host: never sign with a key some authoritative server does not answer
            progress(f"{group[0].domain}: selector {', '.join(unseen)} is not answered by every authoritative "
                     "server yet; the signer keeps its keys")
            continue
        keys = [(i.domain, k.selector, k.algorithm) for i in group for k in wanted[i.domain]]
        try:  # checked, probed, rolled back on failure, as on one host; tried again at the next run
            rotation.switch_verified(config, group[0], keys, keeper, progress, signing.get(group[0].domain, []))
        except rotation.SignerSwitchFailed as exc:
            report.failed.append(f"{group[0].domain}: {exc}")
            continue
        signing.update(chosen)
        _save_signing(config, signing)
        for domain, selectors in chosen.items():
            progress(f"{domain}: the signer uses the fleet's selector {', '.join(selectors)}")
    report.signing = {i.domain: signing.get(i.domain, []) for i in config.dkim}
    etcd.put(etcd.key("hosts", report.host), json.dumps(report.to_json(), sort_keys=True).encode())
    return report


def _adopt(config: Config, etcd: Etcd, item: DkimConfig, keeper: Keeper, progress: Progress) -> DomainState:
    """The fleet has no state for the domain yet: a host that rotated on its own until now brings its keys
    (sealed) and its state, so that its active key becomes the fleet's; the first host to do so wins."""
    local = rotation.load_state(config, item.domain)
    if not local.keys:
        return local
    for key in local.keys:
        if key.record and key.state in ("pending", "active", "retiring") and \
                key.selector in keeper.dkim_selectors(item.domain):
            sealed = keeper.seal_dkim_key(item.domain, key.selector, key.algorithm)
            etcd.put_if_absent(etcd.key("dkim", item.domain, "keys", key.selector), sealed.encode())
    data = json.dumps(local.to_json(), sort_keys=True).encode()
    if etcd.swap(etcd.key("dkim", item.domain, "state"), data, 0, as_leader=False) is not None:
        progress(f"{item.domain}: this host's DKIM keys and rotation state are now the fleet's")
        return local
    return load_domain(etcd, item.domain)[0]


def _take_keys(etcd: Etcd, item: DkimConfig, state: DomainState, keeper: Keeper, progress: Progress) -> list[str]:
    held: list[str] = []
    for key in state.keys:
        if not key.record or key.state not in ("pending", "active", "retiring"):
            continue
        if key.algorithm not in item.algorithms:  # the keeper would refuse it: this host's config differs
            log.error("fleet: dkim %s: the fleet's selector %s is %s, not in this host's algorithms",
                      item.domain, key.selector, key.algorithm)
            continue
        try:
            record, _ = keeper.dkim_key(item.domain, key.selector, key.algorithm, create=False)
        except LocalError:
            record = ""  # an unusable file under that name: the fleet's key replaces it
        if record != key.record:
            sealed, _ = etcd.get(etcd.key("dkim", item.domain, "keys", key.selector))
            if sealed is None:
                log.warning("fleet: dkim %s: no sealed key for selector %s in etcd", item.domain, key.selector)
                continue
            try:
                record, _ = keeper.install_dkim_key(item.domain, key.selector, key.algorithm, sealed.decode())
            except LocalError as exc:
                log.error("fleet: %s", exc)
                continue
            if record != key.record:
                log.error("fleet: dkim %s: the sealed key of %s is not the published one", item.domain, key.selector)
                continue
            progress(f"{item.domain}: installed the fleet's key for selector {key.selector}")
        held.append(key.selector)
    return held


def _local_selectors(keeper: Keeper, item: DkimConfig) -> tuple[str, ...]:
    return keeper.dkim_selectors(item.domain)


def _signer_groups(config: Config) -> list[list[DkimConfig]]:
    """[[dkim]] domains grouped by the signer file they share."""
    groups: dict[tuple[str, str], list[DkimConfig]] = {}
    for item in config.dkim:
        if item.signer == "none":
            continue
        groups.setdefault((item.signer, str(signers.config_path(item))), []).append(item)
    return list(groups.values())


def _load_signing(config: Config) -> dict[str, list[str]]:
    try:
        data = json.loads((config.state_dir / SIGNING_FILE).read_text())
        return {str(k): [str(s) for s in v] for k, v in dict(data).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _save_signing(config: Config, signing: dict[str, list[str]]) -> None:
    path = config.state_dir / SIGNING_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, (json.dumps(signing, sort_keys=True) + "\n").encode(), 0o600)


# ---------------------------------------------------------------------------
# The rotator's steps: rotation's, with the state in etcd and the gates of a fleet.


@dataclass
class _Fleet:
    run: rotation._Run
    etcd: Etcd
    revision: int
    reports: dict[str, HostReport]

    def save(self, state: DomainState) -> DomainState:
        new = self.etcd.swap(self.etcd.key("dkim", state.domain, "state"),
                             json.dumps(state.to_json(), sort_keys=True).encode(), self.revision, as_leader=True)
        if new is None:
            raise LostLeadership(f"fleet: dkim {state.domain}: the state changed under the rotator; re-reading it")
        self.revision = new
        rotation.save_state(self.run.config, state)
        return state


def rotate_domain(config: Config, item: DkimConfig, etcd: Etcd, keeper: Keeper, now: datetime,
                  progress: Progress, me: HostReport) -> datetime | None:
    """The rotator: every due step of one domain whose gates are open; when the next one falls due."""
    run = rotation._Run(config, item, now, progress, keeper)
    next_at: datetime | None = None
    for _ in range(8 * (len(item.algorithms) + 4)):
        state, revision = load_domain(etcd, item.domain)
        if any(a.kind == "activate" and a.selector not in me.keys.get(item.domain, [])
               for a in rotation.plan(state, item, now).actions):
            me = sync(config, etcd, keeper, now, progress)  # this host's own report: it made the key meanwhile
        reports = hosts(etcd)
        reports[me.host] = me
        fleet = _Fleet(run, etcd, revision, reports)
        planned = rotation.plan(state, item, now)
        next_at = planned.next_at
        due = [a for a in planned.actions if a not in run.done]
        gates = {a: _gate(fleet, state, a) for a in due}
        for action in (a for a in due if gates[a]):
            run.done.add(action)
            run.say(f"{action.kind} {action.selector} waits: {gates[action]}")
            next_at = min(next_at or now + rotation.RETRY_AFTER, now + rotation.RETRY_AFTER)
        due = [a for a in due if not gates[a]]
        if not due:
            break
        run.done.add(due[0])
        FLEET_STEPS[due[0].kind](fleet, state, due[0])
    return next_at


def _gate(fleet: _Fleet, state: DomainState, action: Action) -> str:
    """Why ``action`` must wait for other hosts ("" when it need not)."""
    domain = state.domain
    keeping = [r for r in fleet.reports.values() if domain in r.keys]  # hosts with a [[dkim]] table for it
    live = [r for r in keeping if fleet.run.now - r.heartbeat <= fleet.run.config.fleet.live_within]
    if action.kind == "activate":
        lacking = sorted(r.host for r in live if action.selector not in r.keys.get(domain, []))
        return f"{', '.join(lacking)} not yet holding the key" if lacking else ""
    if action.kind == "revoke":
        recent = [r for r in keeping if fleet.run.now - r.heartbeat <= fleet.run.item.retire_after]
        still = sorted(r.host for r in recent if action.selector in r.signing.get(domain, []))
        return f"{', '.join(still)} still signing with it" if still else ""
    return ""


def _create(f: _Fleet, state: DomainState, action: Action) -> None:
    run = f.run
    taken = rotation.taken_selectors(run.config, run.item, state, run.now, run.keeper)
    sealed = {k.decode().rsplit("/", 1)[-1] for k, _ in f.etcd.get_prefix(f.etcd.key("dkim", run.item.domain, "keys"))}
    key = rotation.new_key(state, run.item, action.algorithm, run.now, taken | frozenset(sealed))
    f.save(state.with_key(key))
    run.say(f"new {key.algorithm} key, selector {key.selector} (pending)")


def _generate(f: _Fleet, state: DomainState, action: Action) -> None:
    run, item = f.run, f.run.item
    key = state.key(action.selector)
    where = f.etcd.key("dkim", item.domain, "keys", key.selector)
    existing, _ = f.etcd.get(where)
    if existing is None:
        record, created = run.keeper.dkim_key(item.domain, key.selector, key.algorithm, create=True)
        sealed = run.keeper.seal_dkim_key(item.domain, key.selector, key.algorithm)
        existing = f.etcd.put_if_absent(where, sealed.encode())
        run.say(f"{'wrote' if created else 'reusing'} {key.key_file}; its sealed copy is in etcd")
    record, _ = run.keeper.install_dkim_key(item.domain, key.selector, key.algorithm, existing.decode())
    rotation._crash_point("generate")
    f.save(state.with_key(replace(key, record=record)))


def _publish(f: _Fleet, state: DomainState, action: Action) -> None:
    run = f.run
    key = state.key(action.selector)
    rrset = rotation._record_set(run, key.selector, key.record)
    if key.published is not None and visible_everywhere(run.config, rrset):
        run.say(f"{rrset.name} TXT was published by an earlier rotator; not sent again")
    else:
        rotation._backend(run).publish(rrset)
        run.say(f"published {rrset.name} TXT ({key.algorithm})")
    if key.published is None:
        key = replace(key, published=run.now)
        state = f.save(state.with_key(key))
    rotation._crash_point("publish")
    wait_until_visible(run.config, rrset, run.progress)
    f.save(state.with_key(replace(key, visible=run.now)))
    run.say(f"{rrset.name} is answered by every authoritative server")


def _activate(f: _Fleet, state: DomainState, action: Action) -> None:
    run = f.run
    key = state.key(action.selector)
    rotation._ensure_visible(run, key)
    f.save(rotation.activated(state, action.selector, run.now))
    rotation._crash_point("activate")
    run.say(f"selector {action.selector} is active: every host switches its signer to it")


def _retire(f: _Fleet, state: DomainState, action: Action) -> None:
    key = state.key(action.selector)
    f.save(state.with_key(replace(key, state="retiring", retired=f.run.now)))
    f.run.say(f"selector {key.selector} is retiring: {key.algorithm} is no longer in algorithms")


def _revoke(f: _Fleet, state: DomainState, action: Action) -> None:
    run = f.run
    key = state.key(action.selector)
    rrset = rotation._record_set(run, key.selector, dkim.REVOKED.render())
    rotation._backend(run).publish(rrset)
    rotation._crash_point("revoke")
    wait_until_visible(run.config, rrset, run.progress)
    f.save(state.with_key(replace(key, state="revoked", revoked=run.now)))
    run.say(f"selector {key.selector} is revoked ({rrset.name} TXT \"{dkim.REVOKED.render()}\")")


def _remove(f: _Fleet, state: DomainState, action: Action) -> None:
    run = f.run
    key = state.key(action.selector)
    name = dkim.record_name(key.selector, run.item.domain)
    rotation._backend(run).remove(name, "TXT")
    rotation._crash_point("remove")
    wait_until_absent(run.config, name, "TXT", run.progress)
    f.save(state.with_key(replace(key, state="removed", removed=run.now)))
    f.etcd.delete(f.etcd.key("dkim", run.item.domain, "keys", key.selector))
    run.say(f"selector {key.selector} is removed from DNS; every host deletes its private key")


FLEET_STEPS: dict[str, Callable[[_Fleet, DomainState, Action], None]] = {
    "create": _create, "generate": _generate, "publish": _publish, "activate": _activate,
    "retire": _retire, "revoke": _revoke, "remove": _remove,
}


# ---------------------------------------------------------------------------
# Entry points: the daemon's hourly job and rotate-dkim.


def run_due(config: Config, now: datetime, progress: Progress, keeper: Keeper) -> DueReport:
    """Every host: take the fleet's keys, follow its signer, report; the rotator also runs the due steps."""
    errors: list[str] = []
    wake: list[datetime] = []
    try:
        with Etcd(config.fleet) as etcd:
            me = sync(config, etcd, keeper, now, progress)
            leader = etcd.campaign(config.fleet.host)
            if not etcd.leader:
                log.info("fleet: %s is the rotator", leader)
            else:
                for item in config.dkim:
                    try:
                        at = rotate_domain(config, item, etcd, keeper, now, progress, me)
                    except (CertkeeperError, OSError) as exc:
                        log.error("dkim %s: %s", item.domain, exc)
                        errors.append(f"{item.domain}: {exc}")
                        wake.append(now + rotation.RETRY_AFTER)
                        continue
                    if at is not None:
                        wake.append(at)
                me = sync(config, etcd, keeper, now, progress)  # the rotator's own signer follows at once
            write_status(config, etcd, leader, now)
            if me.failed:
                errors += me.failed
                wake.append(now + rotation.RETRY_AFTER)
    except FleetError as exc:
        log.error("fleet: %s; this host keeps signing with the keys it has, no rotation until etcd is back", exc)
        errors.append(str(exc))
        wake.append(now + rotation.RETRY_AFTER)
    return DueReport(tuple(errors), min(wake) if wake else None)


def rotate_now(config: Config, item: DkimConfig, now: datetime, emergency: bool, progress: Progress,
               keeper: Keeper) -> None:
    """``rotate-dkim [--now]`` in a fleet: ask for one rotation (a request that finds one under way joins it);
    the rotator (this host if it wins the election) carries it out."""
    with Etcd(config.fleet) as etcd:
        key = etcd.key("dkim", item.domain, "state")
        for _ in range(MAX_CAS_TRIES):
            state, revision = load_domain(etcd, item.domain)
            new = rotation.request_rotation(state, item, now, emergency,
                                            rotation.taken_selectors(config, item, state, now, keeper))
            if new == state:
                progress(f"{item.domain}: a rotation is already under way for the fleet; joined it")
                break
            if etcd.swap(key, json.dumps(new.to_json(), sort_keys=True).encode(), revision, as_leader=False):
                for k in new.keys:
                    if k.selector not in state.selectors:
                        progress(f"{item.domain}: new {k.algorithm} key, selector {k.selector} (pending"
                                 + (", emergency: publish_ahead skipped)" if emergency else ")"))
                break
        else:
            raise FleetError(f"fleet: dkim {item.domain}: the state kept changing; try again")
        me = sync(config, etcd, keeper, now, progress)
        leader = etcd.campaign(config.fleet.host)
        if etcd.leader:
            rotate_domain(config, item, etcd, keeper, now, progress, me)
            me = sync(config, etcd, keeper, now, progress)
        else:
            progress(f"{item.domain}: the rotator {leader} carries the rotation out")
        write_status(config, etcd, leader, now)
    if me.failed:  # this host's signer switch failed and was rolled back: rotate-dkim exits 1
        raise rotation.SignerSwitchFailed("; ".join(me.failed))


# ---------------------------------------------------------------------------
# One MTA-STS policy: an id is published only when every live host serves that policy.


def agreed_policies(config: Config, progress: Progress, now: datetime, keeper: Keeper | None = None) -> tuple[str, ...]:
    """The MTA-STS and TLSRPT domains this host may publish for: each host writes the ids of the policies it
    serves and its MX names (``[fleet] mx``) to ``PREFIX/mta-sts/HOST``; a domain whose policy another live host
    serves differently (a config rolled out to some hosts only) is held back, so senders never see an id flip
    between hosts' policies, and so is a policy whose mx does not cover every live host's MX names (senders in
    enforce mode would refuse that host). An [[mta_sts]] table without mx lists the union of the live hosts' MX
    names (``STATE/mta-sts/fleet-mx``, ``mtasts_state.configured_policy``): ``keeper`` has the listener serve
    that policy before its id is checked, so every host serves the same text and one id is published. None
    while etcd cannot be reached: the records stay as they are."""
    from certkeeper.core import mtasts_state
    from certkeeper.network.mtasts_publish import tlsrpt_domains

    host = config.fleet.host
    try:
        with Etcd(config.fleet) as etcd:
            others = []
            for _, value in etcd.get_prefix(etcd.key("mta-sts")):
                try:
                    other = json.loads(value)
                    if other["host"] != host and now - datetime.fromisoformat(other["at"]) \
                            <= config.fleet.live_within:
                        others.append(other)
                except (ValueError, KeyError, TypeError):
                    continue
            fleet_mx = {host: list(config.fleet.mx)}  # every live host's MX names: each policy's mx must cover them
            fleet_mx.update({str(o["host"]): [str(n) for n in o.get("mx") or []] for o in others})
            if any(m.fleet_mx for m in config.mta_sts):
                _follow_fleet_mx(config, fleet_mx, keeper, progress)
            policies = {m.domain: mtasts_state.configured_policy(config, m) for m in config.mta_sts}
            ids: dict[str, str | None] = {d: None for d in mtasts_state.known_domains(config)}  # withdrawn here
            ids.update({d: p.policy_id() for d, p in policies.items()})
            mine = {"host": host, "at": now.isoformat(), "ids": ids, "mx": list(config.fleet.mx)}
            etcd.put(etcd.key("mta-sts", host), json.dumps(mine, sort_keys=True).encode())
    except FleetError as exc:
        progress(f"fleet: {exc}; MTA-STS and TLSRPT records are left as they are until etcd is back")
        return ()
    held: set[str] = set()
    for m in config.mta_sts:
        if m.mode == "none":
            continue
        outside = sorted(f"{n} ({h})" for h, names in fleet_mx.items() for n in names
                         if not any(_covers(pattern, n) for pattern in policies[m.domain].mx))
        if outside:  # senders in enforce mode would refuse to deliver to that host: keep the id as it is
            progress(f"_mta-sts.{m.domain}: not published: its mx does not cover {', '.join(outside)}, an MX host "
                     "of the fleet; list every host's MX name in [[mta_sts]] mx on every host")
            held.add(m.domain)
    for domain, policy_id in sorted(ids.items()):
        differ = sorted(f"{o['host']} serves id={o['ids'][domain] or 'none'}" for o in others
                        if isinstance(o.get("ids"), dict) and domain in o["ids"] and o["ids"][domain] != policy_id)
        if differ:  # its TLSRPT record waits with it
            progress(f"_mta-sts.{domain}: not published: this host serves id={policy_id or 'none'}, "
                     f"{'; '.join(differ)}; make [[mta_sts]] the same on every host")
            held.add(domain)
    return tuple(d for d in sorted(set(ids) | set(tlsrpt_domains(config))) if d not in held)


def _follow_fleet_mx(config: Config, fleet_mx: dict[str, list[str]], keeper: Keeper | None,
                     progress: Progress) -> None:
    """Save the union of the live hosts' MX names for the policies without mx, and have the keeper make the
    listener serve them (every run: a listener that missed a change, say after ``mta-sts publish`` from the
    command line, catches up). A name that is no mx pattern (RFC 8461 3.2) is left out, with one line."""
    from certkeeper.core import mtasts_state

    union: list[str] = []
    for name in sorted({n for names in fleet_mx.values() for n in names}):
        try:
            union += mtasts_state.fleet_mx_names([name])
        except ValueError as exc:
            progress(f"fleet: an MX name reported to the fleet is left out of the MTA-STS policies: {exc}")
    try:
        changed = mtasts_state.save_fleet_mx(config, tuple(union))
    except (ValueError, LocalError) as exc:
        progress(f"fleet: the fleet's MX names: {exc}; the MTA-STS policies keep the names they list")
        return
    if changed:
        progress(f"fleet: the MTA-STS policies without mx now list the fleet's MX names {', '.join(union)}")
    if keeper is not None:
        try:
            keeper.refresh_policies()
        except CertkeeperError as exc:
            progress(f"fleet: the listener did not take the new MTA-STS policies: {exc}")


def _covers(pattern: str, name: str) -> bool:
    """RFC 8461 4.1: an mx pattern matches the name, or with "*." any name one label below its rest."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in name and name.split(".", 1)[1] == pattern[2:]
    return pattern == name


# ---------------------------------------------------------------------------
# HTTP-01 for a name several hosts serve, and the takeover of a rotator that died: the fleet-watch job.


class SharedChallenges(ChallengeTable):
    """The renew worker's challenge table in a fleet. Each HTTP-01 token goes to this host's keeper (its
    listener answers it) as on one host, and to ``PREFIX/http01/TOKEN`` (name, key authorization, host) on a
    lease of the order's timeout, so that the CA may ask any host behind a round-robin name: every other host's
    fleet-watch worker hands the token to its keeper, which has its listener answer it (for a name that host
    serves). ``add`` returns once each watching host has acknowledged the token (at most ``ACK_WAIT``), so the
    CA is told to validate only then. When etcd cannot be reached the order goes on with this host's
    listener alone; one host's failing CA or etcd never stops another host's orders. ``close()`` at the end."""

    def __init__(self, config: Config, local: ChallengeTable) -> None:
        super().__init__()
        self.config = config
        self.local = local
        self.ttl = int(max(config.authority(n).order_timeout for n in config.authorities)) + 60
        self._etcd: Etcd | None = None
        self._unreachable = False
        self._leases: dict[str, int] = {}
        self._connecting = threading.Lock()

    def _connected(self) -> Etcd | None:
        with self._connecting:
            if self._etcd is None and not self._unreachable:
                try:
                    self._etcd = Etcd(self.config.fleet)
                except FleetError as exc:
                    self._unreachable = True
                    log.warning("fleet: %s; HTTP-01 tokens are answered by this host only", exc)
            return self._etcd

    def add(self, token: str, key_authorization: str, name: str = "") -> None:
        self.local.add(token, key_authorization, name=name)
        super().add(token, key_authorization, name=name)
        etcd = self._connected()
        if etcd is None:
            return
        host = self.config.fleet.host
        value = json.dumps({"name": name, "key_authorization": key_authorization, "host": host}, sort_keys=True)
        try:
            lease = etcd.grant(self.ttl)
            self._leases[token] = lease
            etcd.put(etcd.key(HTTP01, token), value.encode(), lease=lease)
            missing = wait_for_acks(etcd, token, host, ACK_WAIT)
        except FleetError as exc:
            log.warning("fleet: HTTP-01 for %s: the token is answered by this host only: %s", name, exc)
            return
        if missing:
            log.warning("fleet: HTTP-01 for %s: %s did not acknowledge the token within %g s", name,
                        ", ".join(missing), ACK_WAIT)

    def remove(self, token: str) -> None:
        super().remove(token)
        lease = self._leases.pop(token, None)
        if lease is not None and self._etcd is not None:
            try:
                self._etcd.revoke(lease)  # the token's key and every host's acknowledgement go with it
            except FleetError as exc:
                log.warning("fleet: withdrawing an HTTP-01 token: %s (its lease ends it)", exc)
        self.local.remove(token)

    def close(self) -> None:
        for token in self.tokens():
            self.remove(token)
        if self._etcd is not None:
            self._etcd.close()
            self._etcd = None


def wait_for_acks(etcd: Etcd, token: str, host: str, timeout: float) -> list[str]:
    """Wait until every other host whose fleet-watch worker runs has seen ``token``; the hosts that did not."""
    deadline = time.monotonic() + timeout
    while True:
        watching = {k.rsplit(b"/", 1)[-1].decode(errors="replace") for k, _ in etcd.get_prefix(etcd.key(WATCHERS))}
        acked = {k.rsplit(b"/", 1)[-1].decode(errors="replace")
                 for k, _ in etcd.get_prefix(etcd.key(HTTP01_ACKS, token))}
        missing = sorted(watching - acked - {host})
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def watch(config: Config, keeper: Keeper, progress: Progress, alive: Callable[[], None],
          stop: threading.Event | None = None) -> None:
    """The daemon's fleet-watch worker: until ``stop`` (or its process is killed), answer the other hosts'
    HTTP-01 tokens for the names this host serves, and have the daemon run its DKIM job as soon as a rotator's
    lease expires without it resigning (it died: the rotation is taken over within the lease TTL, not at the
    next hourly run). etcd unreachable: tried again, with a growing pause; ``alive`` is called meanwhile."""
    stop = stop or threading.Event()
    pause = WATCH_RETRY[0]
    while not stop.is_set():
        try:
            with Etcd(config.fleet) as etcd:
                pause = WATCH_RETRY[0]
                _Watcher(config, etcd, keeper, progress, alive, stop).run()
        except FleetError as exc:
            log.warning("fleet watch: %s; again in %g s", exc, pause)
        deadline = time.monotonic() + pause
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(min(ALIVE_EVERY, max(deadline - time.monotonic(), 0.0)))
            alive()
        pause = min(pause * 2, WATCH_RETRY[1])


class _Watcher:
    def __init__(self, config: Config, etcd: Etcd, keeper: Keeper, progress: Progress, alive: Callable[[], None],
                 stop: threading.Event) -> None:
        self.config, self.etcd, self.keeper, self.progress, self.alive, self.stop = \
            config, etcd, keeper, progress, alive, stop
        self.host = config.fleet.host
        self.names = served_names(config)
        self.events: queue.Queue[Any] = queue.Queue()
        self.answered: set[str] = set()  # tokens this host's listener answers for another host
        self.tasks: list[asyncio.Task[None]] = []
        self.watches: list[Any] = []
        self.lease = 0

    def run(self) -> None:
        try:
            initial = self.etcd._call(self._start())
            for kv in initial:
                self._token(kv.key, kv.value, kv.lease)
            said = time.monotonic()
            while not self.stop.is_set():
                if time.monotonic() - said >= ALIVE_EVERY:
                    self.alive()
                    said = time.monotonic()
                try:
                    event = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(event, BaseException):
                    raise FleetError(f"etcd: the watch ended: {type(event).__name__}: {event}"[:240])
                self._event(event)
        finally:
            for token in sorted(self.answered):
                self.keeper.challenges.remove(token)
            self.answered.clear()
            with contextlib.suppress(FleetError):
                self.etcd._call(self._end(), REQUEST_TIMEOUT)

    async def _end(self) -> None:
        for task in self.tasks:
            task.cancel()
        for w in self.watches:
            with contextlib.suppress(Exception):
                await w.cancel()
        if self.lease:  # the other hosts' orders stop waiting for this host at once
            with contextlib.suppress(Exception):
                await self.etcd.client.revoke_lease(self.lease)

    async def _start(self) -> Any:
        client, ttl = self.etcd.client, self.config.fleet.lease_ttl
        lease = await client.lease(ttl)
        self.lease = lease.id
        await client.put(self.etcd.key(WATCHERS, self.host), self.host.encode(), lease=lease.id)
        tokens = await client.get_prefix(self.etcd.key(HTTP01) + b"/")
        after = int(tokens.header.revision) + 1  # nothing between this read and the watches is missed
        self.watches = [await client.watch_prefix(self.etcd.key(HTTP01) + b"/", start_revision=after),
                        await client.watch(self.etcd.key("leader"), start_revision=after, prev_kv=True)]
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._pump(w)) for w in self.watches]
        self.tasks.append(loop.create_task(self._keep(lease.id, ttl)))
        return list(tokens)

    async def _pump(self, watch: Any) -> None:
        try:
            async for event in watch:
                self.events.put(event)
        except Exception as exc:  # noqa: BLE001 - the member went away: the watcher reconnects
            self.events.put(exc)
            return
        self.events.put(FleetError("the watch was cancelled"))

    async def _keep(self, lease: int, ttl: int) -> None:
        while True:
            await asyncio.sleep(max(ttl / 3, 0.5))
            try:
                reply = await asyncio.wait_for(self.etcd.client.refresh_lease(lease), REQUEST_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - reconnect
                self.events.put(exc)
                return
            if reply is None or reply.TTL <= 0:
                self.events.put(FleetError("the fleet-watch lease expired"))
                return

    def _event(self, event: Any) -> None:
        key = bytes(event.kv.key)
        if key == self.etcd.key("leader"):
            if event.kind != "DELETE":
                return
            _, released = self.etcd.get(self.etcd.key(RELEASED))
            if released == event.kv.mod_revision:
                return  # the rotator resigned after its run: nothing to take over
            leader = bytes(event.prev_kv.value).decode(errors="replace") if event.prev_kv is not None else "?"
            self.progress(f"fleet: the rotator {leader} is gone (its lease expired); running the DKIM job here "
                          "to take its work over")
            self.keeper.takeover(leader)
        elif event.kind == "PUT":
            self._token(key, event.kv.value, event.kv.lease)
        else:
            token = key.rsplit(b"/", 1)[-1].decode(errors="replace")
            if token in self.answered:
                self.answered.discard(token)
                self.keeper.challenges.remove(token)

    def _token(self, key: bytes, value: bytes, lease: int) -> None:
        token = bytes(key).rsplit(b"/", 1)[-1].decode(errors="replace")
        try:
            data = json.loads(value)
            name, key_authorization, host = str(data["name"]), str(data["key_authorization"]), str(data["host"])
        except (ValueError, KeyError, TypeError):
            log.warning("fleet: %s: not an HTTP-01 token; ignored", bytes(key).decode(errors="replace"))
            return
        if host == self.host:
            return  # this host's own order: its listener has the token already
        served = name.lower().rstrip(".") in self.names
        if served:
            self.keeper.shared_challenge(token, key_authorization, name)
            self.answered.add(token)
            self.progress(f"fleet: answering HTTP-01 for {name} (an order of {host})")
        try:  # on the token's lease: the acknowledgement goes with the token
            self.etcd.put(self.etcd.key(HTTP01_ACKS, token, self.host), b"served" if served else b"not served",
                          lease=lease or None)
        except FleetError as exc:
            log.warning("fleet: acknowledging an HTTP-01 token: %s", exc)


# ---------------------------------------------------------------------------
# The snapshot ``certkeeper status`` shows.


def write_status(config: Config, etcd: Etcd, leader: str, now: datetime) -> None:
    seen = hosts(etcd)
    snapshot = {
        "at": now.astimezone(UTC).isoformat(), "host": config.fleet.host, "leader": leader,
        "hosts": [seen[h].to_json() for h in sorted(seen)],
    }
    write_json_atomic(config.state_dir / STATUS_FILE, snapshot)


def read_status(config: Config) -> dict[str, Any] | None:
    """The last snapshot (None without [fleet] or before the first run)."""
    if not config.fleet.enabled:
        return None
    try:
        data = json.loads((config.state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

