"""Issue 12, item 3: one bad file never stops the rest. A state or journal file that cannot be read
(not JSON, JSON of another shape, a directory in its place) is moved aside as NAME.corrupt-TIMESTAMP,
named in one log line and in `certkeeper status`; only its own certificate or domain starts over."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certkeeper.core import mtasts_state, state
from certkeeper.core.config import Config, parse
from certkeeper.core.mtasts import Policy
from certkeeper.keeper.store import CertificateStore
from certkeeper.listener.web import Site
from certkeeper.network import rotation
from certkeeper.network.alerts import Alerter
from tests.certfactory import make_set
from tests.test_store import cert_config

ROOT = Path(__file__).resolve().parent.parent
BAD_STATE = [
    ("not-json", "{not json"),
    ("array", "[]"),
    ("string", '"a string"'),
    ("number-as-date", '{"last_attempt": 5}'),
    ("word-as-date", '{"last_success": "yesterday"}'),
    ("naive-date", '{"retry_not_before": "2030-01-01T00:00:00"}'),
    ("string-as-count", '{"consecutive_failures": "3"}'),
    ("bool-as-count", '{"consecutive_failures": true}'),
    ("list-as-text", '{"last_error": ["x"]}'),
    ("binary", b"\xff\xfe\x00garbage"),
]


def one_moved_aside(path: Path) -> Path:
    assert not path.exists()
    [moved] = path.parent.glob(f"{path.name}.corrupt-*")
    return moved


def aside_lines(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{path}: unreadable")]


@pytest.mark.parametrize("label, content", BAD_STATE, ids=[b[0] for b in BAD_STATE])
def test_a_bad_certificate_state_is_set_aside_and_named(tmp_path, caplog, label, content):
    path = tmp_path / "certificates" / "a.example.com.json"
    path.parent.mkdir()
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    st = state.load_cert_state(tmp_path, "a.example.com")
    assert st.consecutive_failures == 0 and st.last_attempt is None and st.retry_not_before is None
    moved = one_moved_aside(path)
    assert moved.read_bytes() == path_content(content)
    assert st.last_error.startswith(f"{path} was unreadable (") and moved.name in st.last_error
    [line] = aside_lines(caplog, path)
    assert line.endswith(f"moved aside to {moved.name}") and "\n" not in line
    assert state.set_aside_files(tmp_path, "a.example.com") == [moved]
    # The next save makes a sound file again; the set-aside copy stays for the operator.
    state.save_cert_state(tmp_path, st)
    assert state.load_cert_state(tmp_path, "a.example.com").last_error == st.last_error


def path_content(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content


def test_a_directory_in_place_of_the_state_file_is_set_aside(tmp_path, caplog):
    path = tmp_path / "certificates" / "a.example.com.json"
    path.mkdir(parents=True)
    st = state.load_cert_state(tmp_path, "a.example.com")
    assert one_moved_aside(path).is_dir() and "was unreadable" in st.last_error
    assert len(aside_lines(caplog, path)) == 1


def test_sound_state_is_read_as_before(tmp_path):
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    state.save_cert_state(tmp_path, state.CertState("a.example.com", last_attempt=when, consecutive_failures=2,
                                                    last_error="boom", retry_by_server=True))
    st = state.load_cert_state(tmp_path, "a.example.com")
    assert (st.last_attempt, st.consecutive_failures, st.last_error, st.retry_by_server) == (when, 2, "boom", True)
    assert state.set_aside_files(tmp_path, "a.example.com") == []


# ---------------------------------------------------------------------------
# The install journal.


@pytest.mark.parametrize("journal", [
    "{broken", "[]", '"x"', '{"key": 5}',
    '{"key": ["/tmp/x", "/etc/passwd"], "cert": ["a", "b"], "chain": ["a", "b"], "fullchain": ["a", "b"]}',
])
def test_an_unreadable_journal_is_set_aside_and_no_file_it_names_is_touched(tmp_path, caplog, journal):
    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    installed = make_set()
    store.install(cfg, installed)
    path = tmp_path / "state" / "journal" / "mail.example.com.json"
    path.write_text(journal)
    store.recover(cfg)  # raised "unreadable install journal" before, for every check of every certificate
    moved = one_moved_aside(path)
    assert store.read(cfg) == installed
    assert store.set_aside_journals(cfg) == [moved]
    [line] = aside_lines(caplog, path)
    assert "mail.example.com: install journal" in line


def test_a_sound_journal_still_finishes_the_install(tmp_path):
    from certkeeper.core.files import temp_path, write_temp

    cfg = cert_config(tmp_path)
    store = CertificateStore(tmp_path / "state")
    store.install(cfg, make_set())
    new = make_set()
    entries = {}
    for role in ("key", "cert", "chain", "fullchain"):
        final = getattr(cfg, role)
        write_temp(final, new.content(role))
        entries[role] = [str(temp_path(final)), str(final)]
    path = tmp_path / "state" / "journal" / "mail.example.com.json"
    path.write_text(json.dumps(entries))
    store.recover(cfg)
    assert store.read(cfg) == new and not path.exists() and store.set_aside_journals(cfg) == []


# ---------------------------------------------------------------------------
# MTA-STS, DKIM and alert state.


def mta_sts_config(tmp_path: Path, configured: bool = True) -> Config:
    certs = "".join(f'[[certificate]]\nname = "{n}"\nkey = "{tmp_path}/{n}.key"\ncert = "{tmp_path}/{n}.crt"\n'
                    f'chain = "{tmp_path}/{n}.chain"\nfullchain = "{tmp_path}/{n}.full"\n'
                    for n in ("mta-sts.example.com", "mta-sts.example.org"))
    table = '[[mta_sts]]\ndomain = "example.com"\nmode = "enforce"\nmx = ["mail.example.com"]\n'
    return parse(f'state_dir = "{tmp_path}/state"\n{certs}' + (table if configured else ""), tmp_path / "ck.toml")


@pytest.mark.parametrize("content", ["{x", "[]", '{"policies": "no"}', '{"policies": [{"policy_id": 1}]}',
                                     '{"policies": [{"policy_id": "a", "mode": "none", "max_age": 1, "text": "x",'
                                     ' "published_at": "2026-01-01T00:00:00+00:00"}]}'])
def test_a_withdrawn_domains_bad_state_does_not_stop_the_start(tmp_path, caplog, content):
    config = mta_sts_config(tmp_path)
    good = mtasts_state.DomainState("example.org").with_published(
        Policy(mode="none", mx=(), max_age=86400), datetime(2026, 1, 1, tzinfo=UTC))
    mtasts_state.save_state(config, good)  # withdrawn, still draining: must keep being served
    bad = mtasts_state.state_path(config, "example.net")
    bad.write_text(content)
    site = Site.from_config(config)  # what the daemon builds at start; it raised before
    assert set(site.policies) == {"mta-sts.example.com", "mta-sts.example.org"}
    moved = one_moved_aside(bad)
    assert mtasts_state.set_aside_files(config, "example.net") == [moved]
    assert len(aside_lines(caplog, bad)) == 1


def test_a_bad_dkim_state_starts_only_its_domain_over(tmp_path, caplog):
    config = parse(f'state_dir = "{tmp_path}/state"\n' + "".join(
        f'[[dkim]]\ndomain = "{d}"\nkey_dir = "{tmp_path}/keys"\nkey_owner = ""\nkey_group = ""\n'
        for d in ("example.com", "example.org")), tmp_path / "ck.toml")
    key = rotation.KeyState(selector="s1", algorithm="rsa2048", state="active",
                            created=datetime(2026, 1, 1, tzinfo=UTC), key_file=str(tmp_path / "keys/s1.key"))
    rotation.save_state(config, rotation.DomainState("example.org", (key,)))
    for content in ("[]", '{"domain": "example.com", "keys": [{"selector": "s"}]}',
                    '{"domain": "example.com", "keys": [{"selector": "s", "algorithm": "rsa2048", "state": "active",'
                    ' "created": "2026-01-01T00:00:00", "key_file": "k"}]}'):
        bad = rotation.state_path(config, "example.com")
        bad.write_text(content)
        assert rotation.load_state(config, "example.com") == rotation.DomainState("example.com")
        assert not bad.exists()
    assert rotation.load_state(config, "example.org").keys == (key,)
    assert len(rotation.set_aside_files(config, "example.com")) == 3
    rows = rotation.status_rows(config)
    assert {r["domain"] for r in rows} == {"example.com", "example.org"}
    assert [r["selector"] for r in rows if r["domain"] == "example.org"] == ["s1"]
    assert len([r for r in caplog.records if "DKIM state of example.com" in r.getMessage()]) == 3


def test_bad_alert_episodes_are_set_aside_and_the_sound_ones_kept(tmp_path, caplog):
    config = parse(f'state_dir = "{tmp_path}/state"\n[alerts]\ncommand = ["true"]\n', tmp_path / "ck.toml")
    path = tmp_path / "state" / "alerts" / "alerts.json"
    path.parent.mkdir(parents=True)
    sound = {"what": "renewal of a", "since": "2026-01-01T00:00:00Z", "attempts": 2, "notified": True}
    path.write_text(json.dumps({"failures": {"cert:a": sound, "cert:b": "garbage"}, "expiry": {"c": ["x"]}}))
    sent: list[str] = []
    alerter = Alerter(config, send=lambda alert: sent.append(alert.subject) or True)
    assert alerter.failed("cert:a", "renewal of a", "again") is False  # the episode went on: no second alert
    assert alerter.failed("cert:b", "renewal of b", "boom") is True  # b starts over
    moved = one_moved_aside_or_resaved(path)
    assert json.loads(moved.read_text())["failures"]["cert:b"] == "garbage"
    data = json.loads(path.read_text())
    assert data["failures"]["cert:a"]["attempts"] == 3 and set(data["failures"]) == {"cert:a", "cert:b"}
    for content in ("[]", '"x"', "{nope", '{"failures": []}'):
        path.write_text(content)
        assert alerter.failed("cert:c", "renewal of c", "boom") in (True, False)
        assert json.loads(path.read_text())["failures"]["cert:c"]["attempts"] >= 1
    assert len(list(path.parent.glob("alerts.json.corrupt-*"))) >= 2
    assert all("\n" not in r.getMessage() for r in caplog.records)


def one_moved_aside_or_resaved(path: Path) -> Path:
    """The alert file is written again at once; its bad copy is beside it."""
    [moved] = path.parent.glob(f"{path.name}.corrupt-*")
    return moved


# ---------------------------------------------------------------------------
# The real CLI: status shows it; a renewal of the other certificate goes on.


def test_status_names_the_file_and_the_other_certificates_are_untouched(tmp_path):
    config_path = tmp_path / "ck.toml"
    certs = "".join(f'[[certificate]]\nname = "{n}"\nkey = "{tmp_path}/{n}.key"\ncert = "{tmp_path}/{n}.crt"\n'
                    f'chain = "{tmp_path}/{n}.chain"\nfullchain = "{tmp_path}/{n}.full"\n'
                    for n in ("a.example.com", "b.example.com"))
    config_path.write_text(f'state_dir = "{tmp_path}/state"\ncontrol_socket = "{tmp_path}/ck.sock"\n{certs}')
    config = parse(config_path.read_text(), config_path)
    state.save_cert_state(config.state_dir, state.CertState("b.example.com", consecutive_failures=1,
                                                            last_error="the CA said no"))
    bad = config.state_dir / "certificates" / "a.example.com.json"
    bad.write_text("[]")

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config_path), "status", *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    done = status("--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)["certificates"]}
    moved = one_moved_aside(bad)
    assert rows["a.example.com"]["set_aside"] == [str(moved)]
    assert rows["b.example.com"]["set_aside"] == [] and rows["b.example.com"]["last_error"] == "the CA said no"
    assert f"{bad}: unreadable" in done.stderr and done.stderr.count("\n") == 1
    text = status().stdout
    squeezed = "".join(text.split())  # a long path is wrapped at 80 columns
    assert "".join(f"set aside as unreadable (read, then remove): {moved}".split()) in squeezed
    assert "b.example.com" in text and "the CA said no" in text


def test_renew_goes_on_for_every_certificate_when_one_state_file_is_bad(pebble, tmp_path):
    names = ("a.example.com", "b.example.com")
    text = pebble.config_text(tmp_path, names)
    config_path = tmp_path / "ck.toml"
    config_path.write_text(text)
    config = parse(text, config_path)
    bad = config.state_dir / "certificates" / "a.example.com.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"last_attempt": "not a date", "consecutive_failures": []}')
    done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config_path), "renew"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in names:
        assert f"{name}: renewed" in done.stdout
        assert config.certificate(name).cert.exists()
    moved = one_moved_aside_or_resaved(bad)
    assert json.loads(bad.read_text())["last_success"]  # a sound file again, with the renewal in it
    assert moved.read_text().startswith('{"last_attempt": "not a date"')
    assert sum(f"{bad}: unreadable" in line for line in done.stderr.splitlines()) == 1
    assert "internal error" not in done.stdout + done.stderr and "Traceback" not in done.stderr


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)
