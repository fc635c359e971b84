"""Several MX hosts, one DKIM key set: coordination through etcd ([fleet]).

Runs in the network worker (unprivileged), in place of ``rotation.run_due`` and
``rotation.rotate_now`` when ``[fleet]`` is configured. etcd does the
coordination; certkeeper adds no lock of its own:

- **one rotator**: a host campaigns by creating ``PREFIX/leader`` in a
  transaction that succeeds only while the key does not exist
  (``create_revision == 0``), attached to a lease of ``lease_ttl`` seconds that
  it keeps alive while it works. If it dies the lease expires and the key with
  it: the next host to run takes over.
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

When etcd cannot be reached nothing changes on this host: it keeps signing with
the keys it has, and no rotation happens until etcd is back.

After each run a snapshot of what the fleet looked like is written to
``STATE/fleet/status.json`` for ``certkeeper status`` (the keeper never talks
to etcd itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from certkeeper.core import dkim, secrets
from certkeeper.core.config import Config, DkimConfig, FleetConfig
from certkeeper.core.errors import CertkeeperError, LocalError
from certkeeper.core.files import write_atomic
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

    def put(self, key: bytes, value: bytes) -> None:
        self._call(self.client.put(key, value))

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


def agreed_policies(config: Config, progress: Progress, now: datetime) -> tuple[str, ...]:
    """The MTA-STS and TLSRPT domains this host may publish for: each host writes the ids of the policies it
    serves to ``PREFIX/mta-sts/HOST``; a domain whose policy another live host serves differently (a config
    rolled out to some hosts only) is held back, so senders never see an id flip between hosts' policies.
    None while etcd cannot be reached: the records stay as they are."""
    from certkeeper.core import mtasts_state
    from certkeeper.core.mtasts import Policy
    from certkeeper.network.mtasts_publish import tlsrpt_domains

    host = config.fleet.host
    ids: dict[str, str | None] = {d: None for d in mtasts_state.known_domains(config)}  # withdrawn here
    ids.update({m.domain: Policy.from_config(m).policy_id() for m in config.mta_sts})
    try:
        with Etcd(config.fleet) as etcd:
            mine = {"host": host, "at": now.isoformat(), "ids": ids}
            etcd.put(etcd.key("mta-sts", host), json.dumps(mine, sort_keys=True).encode())
            others = []
            for _, value in etcd.get_prefix(etcd.key("mta-sts")):
                try:
                    other = json.loads(value)
                    if other["host"] != host and now - datetime.fromisoformat(other["at"]) \
                            <= config.fleet.live_within:
                        others.append(other)
                except (ValueError, KeyError, TypeError):
                    continue
    except FleetError as exc:
        progress(f"fleet: {exc}; MTA-STS and TLSRPT records are left as they are until etcd is back")
        return ()
    held: set[str] = set()
    for domain, policy_id in sorted(ids.items()):
        differ = sorted(f"{o['host']} serves id={o['ids'][domain] or 'none'}" for o in others
                        if isinstance(o.get("ids"), dict) and domain in o["ids"] and o["ids"][domain] != policy_id)
        if differ:  # its TLSRPT record waits with it
            progress(f"_mta-sts.{domain}: not published: this host serves id={policy_id or 'none'}, "
                     f"{'; '.join(differ)}; make [[mta_sts]] the same on every host")
            held.add(domain)
    return tuple(d for d in sorted(set(ids) | set(tlsrpt_domains(config))) if d not in held)


# ---------------------------------------------------------------------------
# The snapshot ``certkeeper status`` shows.


def write_status(config: Config, etcd: Etcd, leader: str, now: datetime) -> None:
    seen = hosts(etcd)
    snapshot = {
        "at": now.astimezone(UTC).isoformat(), "host": config.fleet.host, "leader": leader,
        "hosts": [seen[h].to_json() for h in sorted(seen)],
    }
    path = config.state_dir / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, (json.dumps(snapshot, indent=1, sort_keys=True) + "\n").encode(), 0o600)


def read_status(config: Config) -> dict[str, Any] | None:
    """The last snapshot (None without [fleet] or before the first run)."""
    if not config.fleet.enabled:
        return None
    try:
        data = json.loads((config.state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

