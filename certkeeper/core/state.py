"""Per-certificate renewal state kept in the state directory.

``STATE/certificates/NAME.json`` records what the last attempts did, so that
backoff and ARI timing survive a restart and ``status``/metrics can show them.
Times are aware UTC datetimes. Writes are atomic (temp file, fsync, rename).

A file that cannot be read, is not JSON, or holds JSON of another shape (``[]``,
a string where a date belongs) is moved aside as ``NAME.json.corrupt-TIMESTAMP``
and named in one log line (``files.set_aside``); that certificate starts from a
fresh state, with ``last_error`` saying so, and no other certificate notices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from certkeeper.core.files import set_aside, set_aside_copies, write_json_atomic


@dataclass
class CertState:
    name: str
    last_attempt: datetime | None = None
    last_success: datetime | None = None
    consecutive_failures: int = 0
    last_error: str = ""
    retry_not_before: datetime | None = None  # backoff / Retry-After
    retry_by_server: bool = False  # retry_not_before came from the server's Retry-After
    failed_settings: str = ""  # renewal.settings_digest() of the configuration that failed
    ari_renewal_time: datetime | None = None  # chosen in the server's suggested window (RFC 9773)
    ari_checked: datetime | None = None
    ari_next_check: datetime | None = None  # the server's Retry-After for renewalInfo
    ari_cert: str = ""  # SHA-256 fingerprint of the leaf the ARI fields above belong to
    next_renewal: datetime | None = None  # when the planner wants to renew next
    next_renewal_reason: str = ""
    authority: str = ""  # the authority that issued the certificate on disk ("" before any)
    # Backoff per authority: name -> [consecutive failures, ISO time before which it is not asked again].
    authority_backoff: dict[str, list[Any]] = field(default_factory=dict)

    def authority_retry(self, name: str) -> datetime | None:
        entry = self.authority_backoff.get(name)
        try:
            return datetime.fromisoformat(entry[1]) if entry and entry[1] else None
        except (TypeError, ValueError, IndexError):
            return None

    def authority_failures(self, name: str) -> int:
        entry = self.authority_backoff.get(name)
        return int(entry[0]) if entry and isinstance(entry[0], int) else 0


_TIME_FIELDS = {f.name for f in fields(CertState) if str(f.type).startswith("datetime")}
_KINDS: dict[str, type] = {
    f.name: {"int": int, "str": str, "bool": bool}.get(str(f.type), dict if str(f.type).startswith("dict") else object)
    for f in fields(CertState) if f.name not in _TIME_FIELDS}


def state_path(state_dir: Path, name: str) -> Path:
    """``STATE/certificates/NAME.json`` (the network worker's; see ``core.layout``)."""
    return _path(state_dir, name)


def _path(state_dir: Path, name: str) -> Path:
    return state_dir / "certificates" / f"{name}.json"


def load_cert_state(state_dir: Path, name: str) -> CertState:
    """The certificate's state; a fresh one when there is none, or when the file is unreadable (then
    moved aside, see the module comment)."""
    path = _path(state_dir, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return CertState(name=name)
    except (OSError, UnicodeDecodeError) as exc:
        return _set_aside(path, name, getattr(exc, "strerror", None) or str(exc))
    try:
        return _from_json(json.loads(text), name)
    except (ValueError, TypeError) as exc:
        return _set_aside(path, name, str(exc))


def _from_json(raw: Any, name: str) -> CertState:
    if not isinstance(raw, dict):
        raise TypeError(f"a JSON {type(raw).__name__}, not an object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TIME_FIELDS:
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{key}: {value!r} is not a time")
            when = datetime.fromisoformat(value) if value else None
            if when is not None and when.tzinfo is None:
                raise ValueError(f"{key}: {value!r} has no time zone")
            values[key] = when
        elif key in _KINDS:
            kind = _KINDS[key]
            if kind is not object and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise TypeError(f"{key}: {value!r} is not {kind.__name__}")
            values[key] = value
    if values.get("consecutive_failures", 0) < 0:
        raise ValueError("consecutive_failures is negative")
    values["name"] = name
    return CertState(**values)


def _set_aside(path: Path, name: str, why: str) -> CertState:
    moved = set_aside(path, why)
    where = f"moved aside to {moved.name}" if moved else "could not be moved aside"
    return CertState(name=name, last_error=f"{path} was unreadable ({why[:120]}); {where}; starting afresh")


def set_aside_files(state_dir: Path, name: str) -> list[Path]:
    """Copies of this certificate's state file that were set aside as unreadable."""
    return set_aside_copies(_path(state_dir, name))


def save_cert_state(state_dir: Path, st: CertState) -> None:
    data = asdict(st)
    for key in _TIME_FIELDS:
        data[key] = data[key].isoformat() if data[key] else None
    write_json_atomic(_path(state_dir, st.name), data)
