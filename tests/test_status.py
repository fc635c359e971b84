"""certkeeper status: --json schema and 80-column tables, on certificates from a throwaway CA."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certkeeper.cli import main
from certkeeper.core import config, mtasts, renewal, state
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
        failed_settings=renewal.certificate_settings(cfg, cfg.certificate(LONG))))  # as the runner records it
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


T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def dkim_block(tmp_path: Path) -> str:
    # The operator's dkim_signing.conf, as the README shows it: certkeeper writes the two maps it names.
    (tmp_path / "signer.conf").write_text(f'selector_map = "{tmp_path}/selectors.map";\n'
                                          f'path_map = "{tmp_path}/paths.map";\n')
    return f"""
[hooks.signer]
command = ["true"]
[[dkim]]
domain = "example.test"
algorithms = ["rsa2048"]
rotate_every = "90d"
publish_ahead = "2d"
retire_after = "7d"
key_dir = "{tmp_path / 'keys'}"
key_owner = ""
signer = "rspamd"
signer_config = "{tmp_path / 'signer.conf'}"
signer_hook = "signer"
[[mta_sts]]
domain = "example.com"
mode = "enforce"
mx = ["mail.example.com"]
"""


def real_state(cfg: config.Config) -> None:
    """DKIM and MTA-STS state as certkeeper itself writes it: the rotation executor against a real BIND
    (one key retired, its successor active), and the MTA-STS history publish_all records."""
    from certkeeper.core import mtasts, mtasts_state
    from certkeeper.network import rotation

    for when in (T0, T0 + 88 * DAY, T0 + 90 * DAY):  # first key; its successor published; the switch
        assert rotation.run_due(cfg, when, lambda line: None).errors == ()
    published = mtasts_state.DomainState("example.com").with_published(
        mtasts.Policy.from_config(cfg.mta_sts[0]), T0)
    mtasts_state.save_state(cfg, published)
    old = mtasts_state.DomainState("old.example.com").with_published(
        mtasts.Policy(mode="enforce", mx=("mail.example.com",), max_age=86400), T0)
    mtasts_state.save_state(cfg, old.with_published(mtasts_state.drain_policy(old), T0 + 10 * DAY))


def test_human_output_fits_80_columns_with_every_table(setup, bind, tmp_path):
    path = write_config(tmp_path, extra=dkim_block(tmp_path) + bind.dns_toml())
    cfg = config.load(path)
    real_state(cfg)
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
    policy_id = mtasts.Policy.from_config(cfg.mta_sts[0]).policy_id()
    assert f"  name: {LONG}" in lines and f"  policy id: {policy_id}" in lines
    # what the planner will do: the next key is made publish_ahead before rotate_every is up
    # (activated 2026-06-02 + 90d - 2d), the retired key is revoked retire_after after it retired
    assert any("20260531" in line and "active" in line and "rotate 2026-08-29" in line for line in lines)
    assert any("20260304" in line and "retiring" in line and "revoke 2026-06-09" in line for line in lines)
    assert "2026-08-31" not in text  # activated + rotate_every: a date certkeeper never acts on
    assert any(line.startswith("example.com") and "enforce" in line and line.endswith("none") for line in lines)
    assert any(line.startswith("old.example.com") and "remove record 2026-03-15" in line for line in lines)
    doc = status.collect(cfg)
    rows = {row["selector"]: row for row in doc["dkim"]}
    assert set(rows) == {"20260304", "20260531"}
    assert rows["20260531"]["next_action"] == "rotate"
    assert rows["20260531"]["next_action_at"] == "2026-08-29T12:00:00Z"
    assert rows["20260531"]["since"] == "2026-06-02T12:00:00Z"  # when it became active (T0 + 90 days)
    assert rows["20260304"]["next_action"] == "revoke"
    assert rows["20260304"]["next_action_at"] == "2026-06-09T12:00:00Z"
    assert doc["mta_sts"][1]["next_action_at"] == "2026-03-15T12:00:00Z"  # one time format throughout


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


def test_json_times_have_one_format_and_unknown_values_are_null(tmp_path):
    from certkeeper.core import mtasts_state

    path = write_config(tmp_path, extra='[[mta_sts]]\ndomain = "example.com"\nmx = ["mail.example.com"]\n')
    cfg = config.load(path)
    published_at = datetime(2026, 11, 20, 0, 0, 0, 123456, tzinfo=UTC)  # publish_all records microseconds
    mtasts_state.save_state(cfg, mtasts_state.DomainState("example.com").with_published(
        mtasts.Policy.from_config(cfg.mta_sts[0]), published_at))
    row = status.collect(cfg)["mta_sts"][0]
    assert row["published_at"] == "2026-11-20T00:00:00Z"
    assert row["tlsrpt"] is None  # no TLSRPT record: "" in the state, null in the document
