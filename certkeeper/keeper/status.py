"""``certkeeper status [--json] [NAME...]``: what is served, what happens next, and why.

This module owns the status *document* (``collect``: a plain dict with stable
keys, the ``--json`` output, documented in certkeeper(8)) and its rendering for
a terminal (``render_text``: one table per kind, each with a NEXT ACTION
column, never wider than 80 columns). It reads only: the files on disk, the
per-certificate state, the last verify results, and the DKIM and MTA-STS
modules' ``status_rows``. When a daemon listens on the control socket the
request goes to it instead (``certkeeper.control.forward``), so both show the
same thing.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from certkeeper.core import certs, dkimstate, mtasts_state, renewal, state
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import CertkeeperError, ConfigError
from certkeeper.core.times import parse_iso
from certkeeper.keeper.store import CertificateSet, CertificateStore
from certkeeper.network import verification

SCHEMA_VERSION = 1
WIDTH = 80
LAST_COLUMN = 26  # the NEXT ACTION column gets at least this much when a row is too wide
# Keys of one certificate in the --json document; the order is the documented order.
CERTIFICATE_KEYS = (
    "name", "domains", "status", "serial", "not_before", "not_after", "days_left", "next_renewal",
    "next_renewal_reason", "next_action", "last_attempt", "last_success", "consecutive_failures", "last_error",
    "endpoints", "set_aside", "next_action_at", "backoff_until", "backoff_lifts", "authority", "served_serial",
)
DKIM_COLUMNS = (("DOMAIN", "domain"), ("SELECTOR", "selector"), ("ALG", "algorithm"), ("STATE", "state"),
                ("SINCE", "since"))
DATE_KEYS = {"since"}  # ISO times shown as their date in the tables
MTA_STS_COLUMNS = (("DOMAIN", "domain"), ("MODE", "mode"), ("POLICY ID", "policy_id"), ("STATUS", "status"))


def _iso(when: datetime | None) -> str | None:
    """The one time format of the --json document: UTC, whole seconds, "Z"."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z") if when else None


TIME_KEYS = ("created", "published", "activated", "retired", "revoked", "published_at", "drain_until",
             "next_action_at", "since", "retry_at")


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """Rows from the DKIM and MTA-STS modules in the document's time format; "" means unknown (null)."""
    for key, value in row.items():
        if key in TIME_KEYS:
            row[key] = _iso(parse_iso(value)) if value else None
        elif value == "":
            row[key] = None
    return row


def _short(when: datetime | None) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if when else "-"


# ---------------------------------------------------------------------------
# The document.


def collect(config: Config, names: list[str] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The status document (``--json``); ``names`` limits the certificates listed."""
    now = now or datetime.now(UTC)
    store = CertificateStore(config.state_dir)
    return {
        "version": SCHEMA_VERSION,
        "generated_at": _iso(now),
        "config": str(config.path),
        "certificates": [certificate_status(config, store, cert, now) for cert in select(config, names)],
        "dkim": dkim_rows(config),
        "mta_sts": mta_sts_rows(config),
        **({"fleet": fleet_status(config, now)} if config.fleet.enabled else {}),
        **({"dane": dane_rows(config)} if any(c.dane for c in config.certificates) else {}),
    }


def select(config: Config, names: list[str] | None) -> list[CertificateConfig]:
    if not names:
        return list(config.certificates)
    unknown = [n for n in names if n not in config.certificate_names()]
    if unknown:
        raise ConfigError([f"{config.path}: no [[certificate]] named {n!r}" for n in unknown])
    return [config.certificate(n) for n in names]


def certificate_status(config: Config, store: CertificateStore, cert: CertificateConfig,
                       now: datetime) -> dict[str, Any]:
    on_disk = store.read(cert)
    info = _info(on_disk)
    st = state.load_cert_state(config.state_dir, cert.name)
    decision = _plan(config, store, cert, now)
    due, when, why = decision.due, decision.when, decision.reason
    status = _status(on_disk, info, st, due, now)
    backoff = decision.action == "retry"
    row: dict[str, Any] = {
        "name": cert.name,
        "domains": list(cert.domains),
        "status": status,
        "serial": f"{info.serial:X}" if info else None,
        "not_before": _iso(info.not_before) if info else None,
        "not_after": _iso(info.not_after) if info else None,
        "days_left": round((info.not_after - now).total_seconds() / 86400, 2) if info else None,
        "next_renewal": _iso(when),
        "next_renewal_reason": why,
        "next_action": _next_action(status, decision),
        "last_attempt": _iso(st.last_attempt),
        "last_success": _iso(st.last_success),
        "consecutive_failures": st.consecutive_failures,
        "last_error": st.last_error or None,
        "endpoints": _endpoints(config, cert.name),
        # Unreadable state files and install journals of this certificate, moved aside for the operator.
        "set_aside": [str(p) for p in state.set_aside_files(config.state_dir, cert.name)
                      + store.set_aside_journals(cert)],
        "next_action_at": _iso(when),
        "backoff_until": _iso(when) if backoff else None,
        "backoff_lifts": decision.lifts if backoff else None,
        # The authority that issued the certificate on disk (one from before authorities: the default).
        "authority": (st.authority or config.default_authority) if info else None,
    }
    # What the services served at the last verification, beside ``serial`` (on disk now): the one serial
    # every endpoint answered with, or None (never checked, or they disagree).
    served = {ep.get("serial") for ep in row["endpoints"]}
    row["served_serial"] = served.pop() if len(served) == 1 else None
    return {key: row[key] for key in CERTIFICATE_KEYS}


def _info(on_disk: CertificateSet | None) -> certs.CertInfo | None:
    return on_disk.info() if on_disk else None


def _plan(config: Config, store: CertificateStore, cert: CertificateConfig, now: datetime) -> renewal.Decision:
    """The runner's own decision (``keeper.service.decide``: the same planner, digest and files), so a
    backoff that a config change has lifted shows as lifted here too."""
    from certkeeper.keeper.service import decide

    return decide(config, store, cert, now)


def _status(on_disk: CertificateSet | None, info: certs.CertInfo | None, st: state.CertState, due: bool,
            now: datetime) -> str:
    """missing | expired | failing | due | ok."""
    if on_disk is None or info is None:
        return "missing"
    if info.not_after <= now:
        return "expired"
    if st.consecutive_failures:
        return "failing"
    return "due" if due else "ok"


def _next_action(status: str, decision: renewal.Decision) -> str:
    """From the decision alone: a retry time is the backoff's, and never in the past."""
    if decision.action == "retry":
        return f"retry {_short(decision.when)}"
    if status == "missing":
        return "obtain now"
    if decision.action == "repair":
        return "repair on next run"
    if decision.due:
        return "renew now"
    return f"renew {_short(decision.when)}"


def _endpoints(config: Config, name: str) -> list[dict[str, Any]]:
    """The last verification, its times in the document's format (whole seconds)."""
    rows = verification.last_results(config, name)
    for row in rows:
        for key in ("checked_at", "not_after"):
            row[key] = _iso(parse_iso(row.get(key))) if row.get(key) else None
    return rows


def _rows(config: Config, status_rows: Callable[[Config], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    try:
        return [_normalise(dict(row)) for row in status_rows(config)]
    except CertkeeperError as exc:
        return [{"error": str(exc), "next_action": "see the error"}]


def _add_set_aside(rows: list[dict[str, Any]], copies: Callable[[str], list[Any]]) -> None:
    """``set_aside``: the domain's state files moved aside as unreadable (an empty list when none)."""
    for row in rows:
        domain = row.get("domain")
        row["set_aside"] = [str(p) for p in copies(domain)] if isinstance(domain, str) else []


def dkim_rows(config: Config) -> list[dict[str, Any]]:
    """``dkimstate.status_rows`` plus ``next_action`` and ``next_action_at`` from the [[dkim]] timings."""
    rows = _rows(config, dkimstate.status_rows)
    _add_set_aside(rows, lambda domain: dkimstate.set_aside_files(config, domain))
    timing = {item.domain: item for item in config.dkim}
    since_of = {"pending": "created", "active": "activated", "retiring": "retired", "revoked": "revoked"}
    for row in rows:
        if row.get("domain") in timing and "since" not in row:  # when the key entered its state
            row["since"] = _iso(parse_iso(row.get(since_of.get(str(row.get("state")), ""))))
        if "next_action" in row or row.get("domain") not in timing:
            continue
        item = timing[row["domain"]]
        steps = {  # state → (what happens next, the time it is counted from, the delay)
            "pending": ("activate", "created", item.publish_ahead),  # once DNS answers, publish_ahead later
            "active": ("rotate", "activated", item.rotate_every),
            "retiring": ("revoke", "retired", item.retire_after),
            "revoked": ("remove record", "revoked", item.remove_after),
        }
        action, since, delay = steps.get(row.get("state", ""), ("create key", "", None))
        start = parse_iso(row.get(since)) if since else None
        row["since"] = _iso(start)  # when the key entered its state
        row["next_action"] = action
        row["next_action_at"] = _iso(start + delay) if start and delay is not None else None
    return rows


def mta_sts_rows(config: Config) -> list[dict[str, Any]]:
    """``mtasts_state.status_rows`` plus ``next_action`` and ``next_action_at``."""
    rows = _rows(config, mtasts_state.status_rows)
    _add_set_aside(rows, lambda domain: mtasts_state.set_aside_files(config, domain))
    now = _iso(datetime.now(UTC)) or ""
    for row in rows:
        if "next_action" in row:
            continue
        status = row.get("status")
        row["next_action"] = {"pending": "publish id", "draining": "remove record"}.get(str(status), "none")
        row["next_action_at"] = row.get("drain_until") if status == "draining" else None
        retry = row.get("retry_at")
        if row.get("error") and status == "pending":  # a failed publication: when it is tried again
            row["next_action"] = "retry publish"
            row["next_action_at"] = retry if retry and retry > now else None  # never in the past: at once
    return rows


FLEET_FILE = "fleet/status.json"  # written by the network worker after each [fleet] run (network.fleet)


def fleet_status(config: Config, now: datetime) -> dict[str, Any]:
    """[fleet]: the fleet as this host last saw it in etcd (the keeper never talks to etcd): the rotator,
    every host with its last heartbeat, whether it counts as live, the DKIM keys it holds and signs with."""
    import json

    try:
        data = json.loads((config.state_dir / FLEET_FILE).read_text())
        hosts = [h for h in data.get("hosts", []) if isinstance(h, dict)]
    except (OSError, ValueError, AttributeError):
        return {"host": config.fleet.host, "as_of": None, "leader": None, "hosts": []}
    rows = []
    for h in hosts:
        beat = parse_iso(h.get("heartbeat"))
        rows.append({"host": str(h.get("host")), "last_heartbeat": _iso(beat),
                     "live": beat is not None and now - beat <= config.fleet.live_within,
                     "keys": h.get("keys", {}), "signing": h.get("signing", {})})
    return {"host": config.fleet.host, "as_of": _iso(parse_iso(data.get("at"))), "leader": data.get("leader"),
            "hosts": rows}


def _fleet_lines(fleet: dict[str, Any]) -> list[str]:
    title = (f"Fleet (etcd; as of {str(fleet['as_of'])[:16].replace('T', ' ')}, rotator {fleet['leader'] or '-'})"
             if fleet["as_of"] else "Fleet (etcd; not reached yet)")
    if not fleet["hosts"]:
        return [title, "  no host seen"]
    domains = {d for h in fleet["hosts"] for part in ("keys", "signing") for d in h[part]}

    def keys(by_domain: dict[str, list[str]]) -> str:  # the domain is named only when there are several
        return " ".join((f"{d}:" if len(domains) > 1 else "") + ",".join(s)
                        for d, s in sorted(by_domain.items()) if s) or "-"

    rows = []
    for h in fleet["hosts"]:
        role = "rotator" if h["host"] == fleet["leader"] else "" if h["live"] else "gone"
        rows.append([h["host"], str(h["last_heartbeat"] or "-")[:16].replace("T", " "), role or "-",
                     keys(h["signing"]), keys(h["keys"])])
    return table(title, ["HOST", "LAST HEARTBEAT", "ROLE", "SIGNS WITH", "HAS KEYS"], rows)


def dane_rows(config: Config) -> list[dict[str, Any]]:
    """Per DANE host (``_PORT._tcp.HOST``): the current and next key's digests (from the key files,
    read here), what every authoritative server answered at the network worker's last check, and
    from when the next key may be used."""
    from certkeeper.core import dane
    from certkeeper.keeper.service import next_key_path

    rows = []
    store = CertificateStore(config.state_dir)
    ttl = config.dane.ttl or config.dns.ttl
    for cert in (c for c in config.certificates if c.dane):
        current = store.read(cert)
        try:
            upcoming = next_key_path(cert).read_bytes()
        except OSError:
            upcoming = b""
        try:
            current_digest = dane.spki_digest(current.key) if current else None
            next_digest = dane.spki_digest(upcoming) if upcoming else None
        except ValueError:
            current_digest = next_digest = None
        st = dane.load_state(config.state_dir, cert.name)
        usable = dane.next_key_usable_at(st, next_digest or "", ttl)
        for host in dane.tlsa_names(config.dane.ports, cert.domains):
            rows.append({
                "host": host, "certificate": cert.name, "current_key": current_digest, "next_key": next_digest,
                "dns": [dane.digest_of_value(v) for v in st.dns], "dns_checked": _iso(st.checked),
                "next_key_usable_at": _iso(usable),
            })
    return rows


def _dane_lines(rows: list[dict[str, Any]]) -> list[str]:
    cells, details = [], []
    for row in rows:
        dns = row["dns"]
        in_dns = ("current" if row["current_key"] in dns else "") + (" next" if row["next_key"] in dns else "")
        usable = str(row["next_key_usable_at"] or "not yet seen")[:16].replace("T", " ")
        cells.append([row["host"], (row["current_key"] or "-")[:12], (row["next_key"] or "-")[:12],
                      in_dns.strip() or "-", f"next key from {usable}"])
        details.append([f"DNS (checked {str(row['dns_checked'] or '-')[:16].replace('T', ' ')}): "
                        + (", ".join(d[:12] for d in dns) or "nothing")])
    return table("DANE hosts", ["HOST", "CURRENT", "NEXT", "IN DNS", "NEXT ACTION"], cells, details)


# ---------------------------------------------------------------------------
# Human output: one table per kind, at most 80 columns.


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "~"


def table(title: str, headers: list[str], rows: list[list[str]], details: list[list[str]] | None = None) -> list[str]:
    """Columns sized to their content, the widest cut first until the row fits 80 columns with the last
    (NEXT ACTION) column. A cell cut short to fit is repeated in full on a line of its own under its
    row, so nothing is lost."""
    last = min(max(len(r[-1]) for r in [headers, *rows]), LAST_COLUMN)
    widths = _fit([max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers) - 1)],
                  [len(h) for h in headers[:-1]], WIDTH - last - 2 * (len(headers) - 1))
    last = WIDTH - sum(widths) - 2 * len(widths)
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths, strict=True)) + "  " + headers[-1]]
    for i, row in enumerate(rows):
        cells = [_cell(c, w).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append(("  ".join(cells) + "  " + _cell(row[-1], last)).rstrip()[:WIDTH])
        overflow = [f"{header.lower()}: {cell}" for header, cell, width in zip(headers, row, [*widths, last],
                                                                                 strict=True) if len(cell) > width]
        for detail in overflow + (details[i] if details else []):
            lines += textwrap.wrap(detail, WIDTH, initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return lines


def _fit(widths: list[int], floors: list[int], budget: int) -> list[int]:
    """Narrow the widest column (never below its header) one character at a time until they fit ``budget``."""
    widths = list(widths)
    while sum(widths) > budget:
        narrowable = [j for j in range(len(widths)) if widths[j] > floors[j]]
        if not narrowable:
            break
        i = max(narrowable, key=lambda j: widths[j])
        widths[i] -= 1
    return widths


def _certificate_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["Certificates", "  none configured"]
    cells, details = [], []
    for row in rows:
        days = f"{row['days_left']:.1f}" if row["days_left"] is not None else "-"
        not_after = row["not_after"][:10] if row["not_after"] else "-"
        cells.append([row["name"], row["status"], not_after, days, row["next_action"]])
        extra = [f"domains: {', '.join(row['domains'])}", f"why: {row['next_renewal_reason']}"]
        if row["backoff_lifts"]:
            extra.append(f"backoff until {_short(parse_iso(row['backoff_until']))} UTC; ends sooner with "
                         f"{row['backoff_lifts'].removeprefix('its time, or ')}")
        if row.get("authority"):
            extra.append(f"issued by: {row['authority']}")
        if row["last_error"] and row["last_error"] not in row["next_renewal_reason"]:
            extra.append(f"last error ({row['consecutive_failures']} failures): {row['last_error']}")
        extra += [f"set aside as unreadable (read, then remove): {path}" for path in row["set_aside"]]
        for ep in row["endpoints"]:
            seen = f"serial {ep.get('serial')}" if ep.get("serial") else "nothing"
            verdict = "ok" if ep.get("ok") else f"MISMATCH ({ep.get('error') or 'differs from disk'})"
            if ep.get("serial") and row["serial"] and ep.get("serial") != row["serial"]:
                verdict = f"MISMATCH (disk has serial {row['serial']} now)"  # the disk changed since the check
            extra.append(f"{ep.get('hook', '')} {ep.get('endpoint', '')}: served {seen}, {verdict}, "
                         f"checked {str(ep.get('checked_at') or '-')[:16].replace('T', ' ')}")
        details.append(extra)
    return table("Certificates", ["NAME", "STATUS", "NOT AFTER", "DAYS", "NEXT ACTION (UTC)"], cells, details)


def _generic_lines(title: str, columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return [title, "  none configured"]
    cells, details = [], []
    seen: set[str] = set()  # a domain's set-aside file is named once, under its first row
    for row in rows:
        cells.append([_column_value(row, key) for _, key in columns] + [_describe_next(row)])
        fresh = [path for path in row.get("set_aside") or [] if path not in seen]
        seen.update(fresh)
        details.append(([f"error: {row['error']}"] if row.get("error") else [])
                       + ([f"mx from the fleet: {', '.join(row['fleet_mx'])}"] if row.get("fleet_mx") else [])
                       + ([f"signer switch failed, rolled back: {row['switch_error']}"]
                          if row.get("switch_error") else [])
                       + [f"set aside as unreadable (read, then remove): {path}" for path in fresh])
    return table(title, [h for h, _ in columns] + ["NEXT ACTION"], cells, details)


def _column_value(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return str(value)[:10] if key in DATE_KEYS else str(value)


def _describe_next(row: dict[str, Any]) -> str:
    action = str(row.get("next_action") or "-")
    at = row.get("next_action_at")
    return f"{action} {str(at)[:10]}" if at else action


def render_text(doc: dict[str, Any]) -> str:
    lines = _certificate_lines(doc["certificates"])
    lines += [""] + _generic_lines("DKIM selectors", DKIM_COLUMNS, doc["dkim"])
    lines += [""] + _generic_lines("MTA-STS domains", MTA_STS_COLUMNS, doc["mta_sts"])
    if "fleet" in doc:
        lines += [""] + _fleet_lines(doc["fleet"])
    if doc.get("dane"):
        lines += [""] + _dane_lines(doc["dane"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The command.


