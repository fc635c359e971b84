"""certkeeper status: --json schema and 80-column tables, on certificates from a throwaway CA."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certkeeper.cli import main
from certkeeper.core import config, renewal, state
from certkeeper.core.errors import ConfigError
from certkeeper.keeper import status
from certkeeper.keeper.store import CertificateStore
from tests.fixtures.throwaway_ca import ThrowawayCA

NOW = datetime.now(UTC).replace(microsecond=0)
LONG = "a-rather-long-certificate-name-for-the-mail-host.example.com"


def write_config(tmp_path: Path, extra: str = '[[dkim]]\ndomain = "example.com"\n') -> Path:
    blocks = []
    for name, domains in (("mail.example.com", ["mail.example.com"]),
                          ("mta-sts.example.com", ["mta-sts.example.com"]),
                          (LONG, [LONG, "smtp.example.com"])):
        blocks.append(f"""
[[certificate]]
name = "{name}"
domains = {json.dumps(domains)}
key = "{tmp_path}/ssl/{name}.key"
cert = "{tmp_path}/ssl/{name}.crt"
chain = "{tmp_path}/ssl/{name}.chain.pem"
fullchain = "{tmp_path}/ssl/{name}.fullchain.pem"
hooks = ["smtpd"]
""")
    path = tmp_path / "certkeeper.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\ncontrol_socket = "{tmp_path}/ck.sock"\n'
                    + extra + "".join(blocks))
    return path


@pytest.fixture
def setup(tmp_path):
    path = write_config(tmp_path)
    cfg = config.load(path)
    store = CertificateStore(cfg.state_dir)
    ca = ThrowawayCA()
    # mail: 90-day certificate issued 10 days ago → renew at 60 days
    store.install(cfg.certificate("mail.example.com"),
                  ca.issue(["mail.example.com"], NOW - timedelta(days=10), NOW + timedelta(days=80)))
    # long name: failing renewals, 5 days left
    store.install(cfg.certificate(LONG),
                  ca.issue([LONG, "smtp.example.com"], NOW - timedelta(days=85), NOW + timedelta(days=5)))
    state.save_cert_state(cfg.state_dir, state.CertState(
        name=LONG, last_attempt=NOW - timedelta(minutes=5), consecutive_failures=3,
        last_error="urn:ietf:params:acme:error:connection: 203.0.113.7: Fetching "
                   "http://smtp.example.com/.well-known/acme-challenge/xyz: Timeout during connect",
        retry_not_before=NOW + timedelta(minutes=95),
        failed_settings=renewal.config_digest(cfg, cfg.certificate(LONG))))  # as the runner records it
    # mta-sts: no files at all
    return path, cfg


def run(path: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--config", str(path), "status", *args], out=out)
    return code, out.getvalue()


def test_json_schema(setup):
    path, cfg = setup
    code, text = run(path, "--json")
    assert code == 0
    doc = json.loads(text)
    assert set(doc) == {"version", "generated_at", "config", "certificates", "dkim", "mta_sts"}
    assert doc["version"] == 1 and doc["config"] == str(path)
    assert isinstance(doc["dkim"], list) and isinstance(doc["mta_sts"], list)
    rows = {row["name"]: row for row in doc["certificates"]}
    assert list(rows) == ["mail.example.com", "mta-sts.example.com", LONG]
    for row in rows.values():
        assert tuple(row) == status.CERTIFICATE_KEYS
        assert isinstance(row["domains"], list) and isinstance(row["endpoints"], list)
        assert isinstance(row["consecutive_failures"], int)

    mail = rows["mail.example.com"]
    assert mail["status"] == "ok" and mail["last_error"] is None
    not_after = datetime.fromisoformat(mail["not_after"])
    assert not_after == NOW + timedelta(days=80)
    assert 79.9 < mail["days_left"] <= 80
    assert datetime.fromisoformat(mail["next_renewal"]) == NOW + timedelta(days=50)  # a third of 90 days left
    assert mail["next_action"] == f"renew {(NOW + timedelta(days=50)):%Y-%m-%d %H:%M}"
    assert "third" in mail["next_renewal_reason"]
    assert int(mail["serial"], 16) > 0

    missing = rows["mta-sts.example.com"]
    assert missing["status"] == "missing" and missing["not_after"] is None and missing["days_left"] is None
    assert missing["next_action"] == "obtain now"

    failing = rows[LONG]
    assert failing["status"] == "failing" and failing["consecutive_failures"] == 3
    assert failing["next_action"] == f"retry {(NOW + timedelta(minutes=95)):%Y-%m-%d %H:%M}"
    assert "Timeout during connect" in failing["last_error"]


def test_names_select_and_unknown_name_is_an_error(setup, capsys):
    path, cfg = setup
    code, text = run(path, "--json", "mail.example.com")
    assert [r["name"] for r in json.loads(text)["certificates"]] == ["mail.example.com"]
    code, text = run(path, "nosuch")
    assert code == 1 and text == ""
    assert capsys.readouterr().err.strip() == f"certkeeper: {path}: no [[certificate]] named 'nosuch'"
    with pytest.raises(ConfigError):
        status.collect(cfg, ["nosuch"])


def test_endpoints_from_the_last_verify(setup):
    from certkeeper.network import verification
    path, cfg = setup
    store = CertificateStore(cfg.state_dir)
    info = verification.on_disk(store, cfg.certificate("mail.example.com"))
    seen = verification.Observation("smtp+starttls://127.0.0.1:25", info, "", NOW)
    verification.save_results(cfg, "mail.example.com", [verification.Check("mail.example.com", "smtpd", info, seen)])
    doc = status.collect(cfg, ["mail.example.com"])
    (endpoint,) = doc["certificates"][0]["endpoints"]
    assert endpoint["ok"] is True and endpoint["endpoint"] == "smtp+starttls://127.0.0.1:25"
    assert tuple(endpoint) == verification.RESULT_KEYS  # the documented keys, in their order
    text = status.render_text(doc)
    assert "smtpd smtp+starttls://127.0.0.1:25: served serial" in text and ", ok," in text


def test_human_output_fits_80_columns_with_every_table(setup, monkeypatch):
    path, cfg = setup
    from certkeeper.network import mtasts_publish, rotation

    def day(text: str) -> datetime:
        return datetime.fromisoformat(f"{text}T00:00:00+00:00")

    # Real rotation state, read by the real rotation.status_rows (no fake rows: they had no next_action
    # and no since, which the real code does).
    keys = tuple(rotation.KeyState(
        selector=selector, algorithm="rsa2048", state=state, created=day(created), key_file=f"/k/{selector}",
        record="v=DKIM1; k=rsa; p=AAAA", published=day(created), visible=day(created), activated=day(activated),
        retired=day(retired) if retired else None)
        for selector, state, created, activated, retired in (
            ("20261125-rsa2048", "active", "2026-11-23", "2026-11-25", ""),
            ("20260827-rsa2048", "retiring", "2026-08-25", "2026-08-27", "2026-11-25")))
    rotation.save_state(cfg, rotation.DomainState("example.com", keys))
    monkeypatch.setattr(mtasts_publish, "status_rows", lambda config: [  # ... and of mtasts_publish's
        {"domain": "example.com", "mode": "enforce", "max_age": 604800, "policy_id": "a" * 32,
         "published_id": "a" * 32, "published_at": "2026-11-20T00:00:00+00:00", "status": "published",
         "drain_until": None, "tlsrpt": ""},
        {"domain": "old.example.com", "mode": "none", "max_age": 86400, "policy_id": "b" * 32,
         "published_id": "b" * 32, "published_at": "2026-11-20T00:00:00+00:00", "status": "draining",
         "drain_until": "2026-12-04T00:00:00+00:00", "tlsrpt": ""},
    ])
    code, text = run(path)
    assert code == 0
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert lines[0] == "Certificates" and "NEXT ACTION" in lines[1]
    assert "DKIM selectors" in lines and "MTA-STS domains" in lines
    for title in ("Certificates", "DKIM selectors", "MTA-STS domains"):
        assert "NEXT ACTION" in lines[lines.index(title) + 1]
    assert any(line.startswith("mail.example.com") and "renew " in line for line in lines)
    assert any(line.startswith("mta-sts.example.com") and "obtain now" in line for line in lines)
    assert any("retry " in line and "failing" in line for line in lines)
    assert "Timeout" in text  # the long error is wrapped, not cut
    # a cell cut to fit its column is repeated in full under its row: nothing the operator needs is lost
    assert f"  name: {LONG}" in lines and f"  policy id: {'a' * 32}" in lines
    # next actions from the rotation schedule (defaults: rotate 90d less publish_ahead 2d, retire 7d),
    # and since when each key is in its state
    assert any(re.search(r"20261125-rsa2048 +rsa2048 +active +2026-11-25 +rotate 2027-02-21$", line) for line in lines)
    assert any(re.search(r"20260827-rsa2048 +rsa2048 +retiring +2026-11-25 +revoke 2026-12-02$", line)
               for line in lines)
    assert any(line.startswith("example.com") and "enforce" in line and line.endswith("none") for line in lines)
    assert any(line.startswith("old.example.com") and "remove record 2026-12-04" in line for line in lines)
    doc = status.collect(config.load(path))
    active = next(row for row in doc["dkim"] if row["state"] == "active")
    assert active["next_action"] == "rotate" and active["since"] == "2026-11-25T00:00:00Z"
    assert active["next_action_at"] == "2027-02-21T00:00:00Z"
    assert doc["mta_sts"][1]["next_action_at"] == "2026-12-04T00:00:00Z"  # one time format throughout


def test_empty_tables_say_so(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\ncontrol_socket = "{tmp_path}/ck.sock"\n')
    code, text = run(path)
    assert code == 0
    assert text.count("none configured") == 3


def test_next_action_is_the_runners_plan_when_a_config_change_lifts_the_backoff(setup):
    path, cfg = setup

    def long_row(c: config.Config) -> dict:
        return next(r for r in status.collect(c)["certificates"] if r["name"] == LONG)

    assert long_row(cfg)["next_action"].startswith("retry ")
    changed = dataclasses.replace(cfg, acme=dataclasses.replace(cfg.acme, profile="shortlived"))
    assert long_row(changed)["next_action"] == "renew now"  # the settings that failed are gone: no wait


def test_json_times_have_one_format_and_unknown_values_are_null(setup, monkeypatch):
    from certkeeper.network import mtasts_publish

    path, cfg = setup
    monkeypatch.setattr(mtasts_publish, "status_rows", lambda config: [
        {"domain": "example.com", "mode": "enforce", "max_age": 604800, "policy_id": "a" * 32,
         "published_id": "a" * 32, "published_at": "2026-11-20T00:00:00.123456+00:00", "status": "published",
         "drain_until": None, "tlsrpt": ""}])
    row = status.collect(cfg)["mta_sts"][0]
    assert row["published_at"] == "2026-11-20T00:00:00Z"
    assert row["tlsrpt"] is None
