"""Per-certificate renewal state kept in the state directory.

``STATE/certificates/NAME.json`` records what the last attempts did, so that
backoff and ARI timing survive a restart and ``status``/metrics can show them.
Times are aware UTC datetimes. Writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from certkeeper.core.files import write_json_atomic


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


def _path(state_dir: Path, name: str) -> Path:
    return state_dir / "certificates" / f"{name}.json"


def load_cert_state(state_dir: Path, name: str) -> CertState:
    try:
        raw: dict[str, Any] = json.loads(_path(state_dir, name).read_text())
    except (OSError, ValueError):
        return CertState(name=name)
    known = {f.name for f in fields(CertState)}
    values = {k: v for k, v in raw.items() if k in known}
    for key in _TIME_FIELDS & values.keys():
        values[key] = datetime.fromisoformat(values[key]) if values[key] else None
    values["name"] = name
    return CertState(**values)


def save_cert_state(state_dir: Path, st: CertState) -> None:
    data = asdict(st)
    for key in _TIME_FIELDS:
        data[key] = data[key].isoformat() if data[key] else None
    write_json_atomic(_path(state_dir, st.name), data)
