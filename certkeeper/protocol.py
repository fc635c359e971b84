"""What certkeeper's processes say to each other: every message, rendered and parsed here.

The privileged keeper talks to two kinds of unprivileged process over
socketpairs (see certkeeper(8), PRIVILEGE SEPARATION):

- a **network worker** (one per job) asks the keeper for what only root may do
  (make a key and CSR, install a certificate set, run a hook, roll back, make a
  DKIM key, switch a signer, write the zone file, run the alert command) and
  reports progress lines and its exit;
- the **listener** (ports 80/443 and metrics) is told which challenges to
  answer, which certificates to serve and what to serve at /metrics.

A message is a frozen dataclass. On the wire it is a frame: a 4-byte
big-endian length, then a JSON object ``{"type": NAME, FIELD: VALUE, ...}``.
``parse`` accepts exactly the fields of ``NAME``'s dataclass with exactly their
types (str, int, float, bool, ``X | None``, ``tuple[X, ...]`` and nested
messages), and nothing else: an unknown type, a missing or extra field, a
wrong type, bad JSON or a frame over ``MAX_FRAME`` bytes is a
``ProtocolError``. A length over ``MAX_FRAME`` is refused before a byte of the
body is read, so a hostile peer cannot make the reader allocate.
"""

from __future__ import annotations

import json
import socket
import struct
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from certkeeper.core.errors import LocalError

MAX_FRAME = 4 << 20  # bytes: a configuration file (at most 1 MiB) and a few chains fit easily
HEADER = struct.Struct(">I")


class ProtocolError(LocalError):
    """A frame or message that does not follow this module: the peer is broken or hostile."""


MESSAGES: dict[str, type] = {}
M = TypeVar("M")


def message(cls: type[M]) -> type[M]:
    """Register a message type (a frozen dataclass) with ``parse``, by its class name."""
    MESSAGES[cls.__name__] = cls
    return cls


# ---------------------------------------------------------------------------
# Keeper → network worker, once, first.


@message
@dataclass(frozen=True)
class Secret:
    """The content of a file the worker's user cannot read (account key, TSIG secret, EAB key)."""
    path: str
    data: str


@message
@dataclass(frozen=True)
class Start:
    job: str  # renew | publish | hourly | verify | rotate | dns-check | adopt | fleet-watch
    args: str  # JSON object: the job's arguments
    config_path: str
    config_text: str  # the configuration the keeper runs with
    secrets: tuple[Secret, ...]
    foreground: bool
    verbosity: int


# ---------------------------------------------------------------------------
# Network worker → keeper: requests, each answered by one reply below.


@message
@dataclass(frozen=True)
class Inspect:
    """The public files of a certificate (after finishing an interrupted install)."""
    name: str


@message
@dataclass(frozen=True)
class Plan:
    name: str
    force: bool


@message
@dataclass(frozen=True)
class MakeCsr:
    name: str
    fresh_key: bool = False  # never the key on disk (after a revocation): reuse_key does not apply
    use_next: bool = False  # a dane certificate: the next key (its TLSA record has been seen long enough)


@message
@dataclass(frozen=True)
class DaneKeys:
    """The SPKI digests of a dane certificate's current and next key (the keeper makes a missing next key)."""
    name: str


@message
@dataclass(frozen=True)
class Install:
    name: str
    fullchain: str


@message
@dataclass(frozen=True)
class RunHook:
    hook: str
    certificates: tuple[str, ...]


@message
@dataclass(frozen=True)
class Rollback:
    name: str


@message
@dataclass(frozen=True)
class InstallKept:
    """Install again the set a rollback kept (answered by ``Kept``)."""
    name: str


@message
@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str
    create: bool


@message
@dataclass(frozen=True)
class DkimSelectors:
    domain: str


@message
@dataclass(frozen=True)
class SignerKey:
    domain: str
    selector: str
    algorithm: str


@message
@dataclass(frozen=True)
class SwitchSigner:
    domain: str
    keys: tuple[SignerKey, ...]


@message
@dataclass(frozen=True)
class RestoreSigner:  # a switch failed its probe: the previous signer files back, the hook again (→ Restored)
    domain: str


@message
@dataclass(frozen=True)
class ConfirmSigner:  # a switch was verified: the previous files kept for a rollback are dropped (→ Ok)
    domain: str


@message
@dataclass(frozen=True)
class EnforceDkimKeys:
    domain: str


@message
@dataclass(frozen=True)
class AdoptDkimKey:
    domain: str
    selector: str
    record: str  # the key record published for it


@message
@dataclass(frozen=True)
class DisposeDkimKey:
    domain: str
    selector: str
    algorithm: str


@message
@dataclass(frozen=True)
class SealDkimKey:
    """[fleet]: the selector's private key, sealed with secret_file (answered by SealedKey)."""
    domain: str
    selector: str
    algorithm: str


@message
@dataclass(frozen=True)
class InstallDkimKey:
    """[fleet]: open a sealed key and write it as the selector's key file (answered by DkimRecord)."""
    domain: str
    selector: str
    algorithm: str
    sealed: str


@message
@dataclass(frozen=True)
class ZonePublish:
    name: str
    rtype: str
    ttl: int
    values: tuple[str, ...]


@message
@dataclass(frozen=True)
class ZoneRemove:
    name: str
    rtype: str


@message
@dataclass(frozen=True)
class RunAlert:
    program: str  # "command" | "sendmail" ([alerts])
    data: str


@message
@dataclass(frozen=True)
class Challenge:
    token: str
    key_authorization: str


@message
@dataclass(frozen=True)
class Unchallenge:
    token: str


@message
@dataclass(frozen=True)
class SharedChallenge:
    """[fleet]: another host's HTTP-01 token (the fleet-watch worker), answered here only for a name this
    host serves (answered by Ok)."""
    token: str
    key_authorization: str
    name: str


@message
@dataclass(frozen=True)
class Takeover:
    """[fleet]: the rotator's lease expired without it resigning: the daemon runs the DKIM job now (Ok)."""
    leader: str


@message
@dataclass(frozen=True)
class RefreshPolicies:
    """[fleet]: the publish job saved the fleet's MX names (STATE/mta-sts/fleet-mx): the listener rebuilds the
    MTA-STS policies it serves before the job checks them (Ok)."""
    pass


# Notifications (no reply).


@message
@dataclass(frozen=True)
class Line:
    text: str


@message
@dataclass(frozen=True)
class Alive:
    """A long-running worker (fleet-watch) is well; no reply (the keeper's idle timeout starts again)."""
    pass


@message
@dataclass(frozen=True)
class Exit:
    code: int
    next: str  # ISO 8601 time of the soonest next run, or ""


# ---------------------------------------------------------------------------
# Keeper → network worker: replies.


@message
@dataclass(frozen=True)
class Ok:
    pass


@message
@dataclass(frozen=True)
class Refused:
    reason: str


@message
@dataclass(frozen=True)
class Disk:
    name: str
    cert: str  # PEM, "" when none
    chain: str
    previous: str  # the leaf of the set kept for a rollback, "" when none
    recovered: bool  # an interrupted install was just finished


@message
@dataclass(frozen=True)
class Planned:
    name: str
    due: bool
    when: str
    reason: str
    not_after: str  # "" when nothing is on disk
    action: str = ""  # renewal.Decision.action
    lifts: str = ""  # renewal.Decision.lifts


@message
@dataclass(frozen=True)
class Csr:
    name: str
    csr: str


@message
@dataclass(frozen=True)
class DaneDigests:
    name: str
    current: str  # "" when there is no certificate set yet
    next: str


@message
@dataclass(frozen=True)
class Installed:
    name: str
    serial: str


@message
@dataclass(frozen=True)
class Kept:
    name: str
    cert: str  # the leaf installed again; "" when no usable set was kept


@message
@dataclass(frozen=True)
class HookRan:
    argv: tuple[str, ...]
    returncode: int | None
    output: str
    seconds: float


@message
@dataclass(frozen=True)
class DkimRecord:
    record: str  # "" when there is no key and none was asked for
    created: bool


@message
@dataclass(frozen=True)
class DkimAlgorithm:
    algorithm: str  # "" when no private key matches


@message
@dataclass(frozen=True)
class SealedKey:
    sealed: str  # "v1:" + base64 AEAD ciphertext (certkeeper.keeper.sealing)


@message
@dataclass(frozen=True)
class Names:
    names: tuple[str, ...]


@message
@dataclass(frozen=True)
class Restored:
    what: str  # one line: what the rollback did


# ---------------------------------------------------------------------------
# Keeper → listener (each answered by Ok, Served or Refused) and its first answer.


@message
@dataclass(frozen=True)
class ListenerStart:
    config_path: str
    config_text: str
    foreground: bool
    verbosity: int
    http_only: bool  # the CLI's: HTTP-01 on [http] listen for the time of the orders, no HTTPS, no metrics


@message
@dataclass(frozen=True)
class Bound:
    addresses: tuple[str, ...]  # "http 127.0.0.1:80", ...


@message
@dataclass(frozen=True)
class ServedSet:
    name: str
    domains: tuple[str, ...]
    fullchain: str
    key: str


@message
@dataclass(frozen=True)
class Serve:
    """The complete list of certificates the listener serves over HTTPS (the [[mta_sts]] hosts')."""
    sets: tuple[ServedSet, ...]


@message
@dataclass(frozen=True)
class Served:
    names: tuple[str, ...]


@message
@dataclass(frozen=True)
class Reconfigure:
    config_text: str


@message
@dataclass(frozen=True)
class Metrics:
    text: str


@message
@dataclass(frozen=True)
class Stop:
    pass


# ---------------------------------------------------------------------------
# Render and parse.


def render(msg: object) -> bytes:
    """One frame: length, then the JSON object."""
    name = type(msg).__name__
    if MESSAGES.get(name) is not type(msg):
        raise ProtocolError(f"not a protocol message: {name}")
    body = json.dumps({"type": name, **_to_json(msg)}, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"{name} message of {len(body)} bytes is over {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def _to_json(msg: object) -> dict[str, Any]:
    return {f.name: _value_to_json(getattr(msg, f.name)) for f in fields(msg)}  # type: ignore[arg-type]


def _value_to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_value_to_json(v) for v in value]
    if type(value).__name__ in MESSAGES:
        return _to_json(value)
    return value


def parse(body: bytes) -> object:
    """A frame's body as a message; anything else is a ``ProtocolError``."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError("a frame that is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("a frame without a message type")
    cls = MESSAGES.get(data.pop("type"))
    if cls is None:
        raise ProtocolError("an unknown message type")
    return _build(cls, data)


def _build(cls: type, data: Any) -> object:
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__}: not an object")
    hints = _hints(cls)
    if set(data) != set(hints):
        raise ProtocolError(f"{cls.__name__}: fields {sorted(data)} are not {sorted(hints)}")
    return cls(**{name: _check(cls.__name__, name, hint, data[name]) for name, hint in hints.items()})


def _check(where: str, name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}.{name}: not a list")
        (item,) = (a for a in typing.get_args(hint) if a is not Ellipsis)
        return tuple(_check(where, name, item, v) for v in value)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if isinstance(hint, type) and hint.__name__ in MESSAGES:
        return _build(hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not hint:  # bool is not an int here, an int is not a str
        raise ProtocolError(f"{where}.{name}: not a {getattr(hint, '__name__', hint)}")
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ---------------------------------------------------------------------------
# Frames over a socket.


def send(sock: socket.socket, msg: object) -> None:
    sock.sendall(render(msg))


def receive(sock: socket.socket) -> object:
    """The next message; ``EOFError`` when the peer closed between frames."""
    header = _read_exactly(sock, HEADER.size, eof_ok=True)
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes is over {MAX_FRAME}")
    return parse(_read_exactly(sock, length, eof_ok=False))


def _read_exactly(sock: socket.socket, size: int, eof_ok: bool) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            if eof_ok and left == size:
                raise EOFError
            raise ProtocolError("the peer closed the connection inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def expect(msg: object, kind: type[M]) -> M:
    """A reply of type ``kind``; ``Refused`` becomes a LocalError with its reason."""
    if isinstance(msg, Refused):
        raise LocalError(msg.reason)
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg
