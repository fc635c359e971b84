"""certkeeper.network.rotation: the planner on plain data, then whole rotations against a real BIND
(``tests/fixtures/bind.py``) with messages signed and verified by dkimpy through that BIND."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim as dkimpy
import pytest

from certkeeper import cli
from certkeeper.core import dkim
from certkeeper.core.config import DkimConfig
from certkeeper.keeper import signers
from certkeeper.network import rotation
from certkeeper.network.dns import backend_for
from certkeeper.network.rotation import DomainState, KeyState, plan

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
ITEM = DkimConfig(domain="example.test", algorithms=("rsa2048",), rotate_every=90 * DAY, publish_ahead=2 * DAY,
                  retire_after=7 * DAY, remove_after=30 * DAY)
ROOT = Path(__file__).resolve().parent.parent


def key(selector: str, state: str, created: datetime = T0, **kw) -> KeyState:
    return KeyState(selector=selector, algorithm=kw.pop("algorithm", "rsa2048"), state=state, created=created,
                    key_file=f"/k/{selector}.key", **kw)


def kinds(p: rotation.Plan) -> list[tuple[str, str]]:
    return [(a.kind, a.selector or a.algorithm) for a in p.actions]


# -- the planner (pure) ----------------------------------------------------------------


def test_first_key_is_created_at_once_and_activated_as_soon_as_visible():
    assert kinds(plan(DomainState("example.test"), ITEM, T0)) == [("create", "rsa2048")]
    s = DomainState("example.test", (key("a", "pending"),))
    assert kinds(plan(s, ITEM, T0)) == [("generate", "a")]
    s = DomainState("example.test", (key("a", "pending", record="v=DKIM1; p=x"),))
    assert kinds(plan(s, ITEM, T0)) == [("publish", "a")]
    s = DomainState("example.test", (key("a", "pending", record="r", published=T0, visible=T0),))
    assert kinds(plan(s, ITEM, T0)) == [("activate", "a")]  # nothing signs yet: no publish_ahead


def test_rotation_starts_publish_ahead_before_rotate_every_and_waits_publish_ahead():
    active = key("a", "active", record="r", visible=T0, activated=T0)
    p = plan(DomainState("example.test", (active,)), ITEM, T0 + DAY)
    assert p.actions == () and p.next_at == T0 + 88 * DAY
    assert kinds(plan(DomainState("example.test", (active,)), ITEM, T0 + 88 * DAY)) == [("create", "rsa2048")]
    t1 = T0 + 88 * DAY
    pending = key("b", "pending", created=t1, record="r", published=t1, visible=t1)
    s = DomainState("example.test", (active, pending))
    p = plan(s, ITEM, t1 + DAY)
    assert p.actions == () and p.next_at == t1 + 2 * DAY
    assert kinds(plan(s, ITEM, t1 + 2 * DAY)) == [("activate", "b")]
    urgent = DomainState("example.test", (active, rotation.replace(pending, emergency=True)))
    assert kinds(plan(urgent, ITEM, t1)) == [("activate", "b")]


def test_publish_is_retried_until_visible_and_never_activates_before():
    pending = key("b", "pending", record="r", published=T0)
    s = DomainState("example.test", (key("a", "active", activated=T0 - DAY), pending))
    for when in (T0, T0 + 10 * DAY):
        assert kinds(plan(s, ITEM, when)) == [("publish", "b")]


def test_retiring_revoked_removed_follow_their_durations():
    s = DomainState("example.test", (
        key("a", "retiring", activated=T0 - DAY, retired=T0),
        key("b", "active", activated=T0),
        key("c", "revoked", revoked=T0),
        key("d", "removed", removed=T0),
    ))
    assert plan(s, ITEM, T0).next_at == T0 + 7 * DAY
    assert kinds(plan(s, ITEM, T0 + 7 * DAY)) == [("revoke", "a")]
    assert kinds(plan(s, ITEM, T0 + 30 * DAY)) == [("revoke", "a"), ("remove", "c")]


def test_dropped_algorithm_is_retired():
    s = DomainState("example.test", (key("a", "active", activated=T0),
                                     key("e", "active", algorithm="ed25519", activated=T0)))
    assert kinds(plan(s, ITEM, T0)) == [("retire", "e")]


def test_activation_retires_the_key_it_replaces():
    s = DomainState("example.test", (key("a", "active", activated=T0), key("b", "pending", visible=T0)))
    after = rotation.activated(s, "b", T0 + DAY)
    assert after.key("a").state == "retiring" and after.key("a").retired == T0 + DAY
    assert after.key("b").state == "active" and after.key("b").activated == T0 + DAY
    assert [k.selector for k in rotation.signing_keys(after)] == ["b"]


def test_request_rotation_never_reuses_a_selector_and_marks_emergencies():
    s = DomainState("example.test", (key("20260304", "active", activated=T0 - DAY),))
    s1 = rotation.request_rotation(s, ITEM, T0, emergency=False)
    new = s1.current("rsa2048", "pending")
    assert new is not None and new.selector == "20260304-2" and not new.emergency
    assert new.key_file.endswith("/example.test.20260304-2.key")
    s2 = rotation.request_rotation(s1, ITEM, T0, emergency=True)  # one under way: marked, not doubled
    assert len(s2.keys) == 2 and s2.current("rsa2048", "pending").emergency
    s3 = rotation.request_rotation(DomainState("example.test"), ITEM, T0, False, taken=frozenset({"20260304"}))
    assert s3.keys[0].selector == "20260304-2"  # a key file already on disk counts as taken


def test_the_planner_never_overflows_on_huge_durations():
    """config.py refuses durations past ten years; the planner must not die of an OverflowError even so
    (before: rotation.plan raised it for rotate_every = 3000000d and the daemon's DKIM job died)."""
    huge = timedelta(days=3_000_000)
    item = rotation.replace(ITEM, rotate_every=huge, retire_after=huge, remove_after=huge, publish_ahead=huge)
    s = DomainState("example.test", (key("a", "active", record="r", visible=T0, activated=T0),
                                     key("b", "retiring", activated=T0, retired=T0),
                                     key("c", "revoked", revoked=T0),
                                     key("d", "pending", record="r", visible=T0)))
    p = plan(s, item, T0)
    assert p.actions == () and p.next_at == datetime.max.replace(tzinfo=UTC)
    assert plan(s, rotation.replace(item, publish_ahead=2 * DAY), T0).next_at == T0 + 2 * DAY  # d activates


def test_state_json_round_trip():
    s = DomainState("example.test", (key("a", "retiring", record="v=DKIM1; p=", published=T0, visible=T0,
                                         activated=T0, retired=T0 + DAY, emergency=True),))
    assert DomainState.from_json(json.loads(json.dumps(s.to_json()))) == s


# -- real BIND, real keys, dkimpy -----------------------------------------------------------


MESSAGE = (b"From: alice@example.test\r\nTo: bob@example.org\r\nSubject: rotation\r\n"
           b"Date: Wed, 04 Mar 2026 12:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\nhello\r\n")


def dkim_toml(tmp: Path, signer: str = "rspamd", algorithms: str = '["rsa2048"]', fmt: str = "%Y%m%d",
              extra: str = "") -> str:
    if signer == "rspamd":  # the operator's dkim_signing.conf, naming the maps certkeeper writes
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "signer.conf").write_text(f'allow_username_mismatch = true;\nselector_map = "{tmp}/selectors.map";\n'
                                         f'path_map = "{tmp}/paths.map";\n')
    return f"""
[hooks.signer]
command = ["sh", "-c", "echo reload >> {tmp / 'hook.log'}"]
[[dkim]]
domain = "example.test"
algorithms = {algorithms}
selector_format = "{fmt}"
rotate_every = "90d"
publish_ahead = "2d"
retire_after = "7d"
remove_after = "30d"
key_dir = "{tmp / 'keys'}"
key_owner = ""
key_mode = "0440"
signer = "{signer}"
signer_config = "{tmp / 'signer.conf'}"
signer_hook = "signer"
{extra}
"""


def dnsfunc(bind):
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        values = bind.query(name.decode().rstrip("."), "TXT")
        return values[0].encode() if values else None
    return lookup


def signer_keys(conf: Path) -> dict[str, Path]:
    """selector → key file, as the rspamd maps (named by dkim_signing.conf) or the dkimsign fragment name them."""
    text = conf.read_text()
    maps = dict(re.findall(r'^(selector_map|path_map) = "([^"]+)";', text, re.MULTILINE))
    if maps:
        def entries(path: str) -> dict[str, str]:
            lines = Path(path).read_text().splitlines() if Path(path).exists() else []
            return dict(line.split(" ", 1) for line in lines if line and not line.startswith("#"))
        selectors, paths = entries(maps["selector_map"]), entries(maps["path_map"])
        return {selectors[domain]: Path(paths[domain]) for domain in selectors}
    return {s: Path(k) for s, k in re.findall(r"-s (\S+) -k ([^\s\"]+)", text)}


def sign(key_file: Path, selector: str, message: bytes = MESSAGE) -> bytes:
    """Sign as the signer would, with the key file the signer config names."""
    private = dkim.load_private_key(key_file.read_bytes())
    if dkim.algorithm_of(private) == "ed25519":
        seed = base64.b64decode(dkim.private_key_file(private, raw_ed25519=True))[:32]
        return dkimpy.sign(message, selector.encode(), b"example.test", base64.b64encode(seed),
                           signature_algorithm=b"ed25519-sha256") + message
    return dkimpy.sign(message, selector.encode(), b"example.test", key_file.read_bytes()) + message


def verifies(bind, signed: bytes) -> bool:
    return bool(dkimpy.verify(signed, dnsfunc=dnsfunc(bind)))


def run(config, when: datetime) -> rotation.DueReport:
    lines: list[str] = []
    report = rotation.run_due(config, when, lines.append)
    return report


def states(config) -> dict[str, str]:
    return {k.selector: k.state for k in rotation.load_state(config, "example.test").keys}


def test_full_lifecycle_publish_switch_retire_revoke_remove(bind, tmp_path):
    config = bind.config(dkim_toml(tmp_path))
    conf = tmp_path / "signer.conf"

    report = run(config, T0)  # first key: pending -> active at once
    assert report.errors == () and report.next_due == T0 + 88 * DAY
    (a, a_file), = signer_keys(conf).items()
    assert states(config) == {a: "active"}
    assert a == "20260304" and a_file == tmp_path / "keys" / "example.test.20260304.key"
    assert oct(a_file.stat().st_mode & 0o777) == "0o440"
    assert bind.query(f"{a}._domainkey.example.test", "TXT") == [rotation.load_state(config, "example.test")
                                                                 .key(a).record]
    old_mail = sign(a_file, a)
    assert verifies(bind, old_mail)
    assert (tmp_path / "hook.log").read_text().count("reload") == 1

    t1 = T0 + 88 * DAY  # the next key is published publish_ahead before it signs
    assert run(config, t1).errors == ()
    b = next(s for s, st in states(config).items() if st == "pending")
    assert bind.query(f"{b}._domainkey.example.test", "TXT")[0].startswith("v=DKIM1; k=rsa; p=")
    assert set(signer_keys(conf)) == {a}
    assert run(config, t1 + DAY).errors == () and states(config)[b] == "pending"

    t2 = t1 + 2 * DAY
    assert run(config, t2).errors == ()
    assert states(config) == {a: "retiring", b: "active"}
    assert set(signer_keys(conf)) == {b}
    new_mail = sign(signer_keys(conf)[b], b)
    assert verifies(bind, new_mail) and verifies(bind, old_mail)  # the old selector is still published
    assert (tmp_path / "hook.log").read_text().count("reload") == 2

    t3 = t2 + 7 * DAY
    assert run(config, t3).errors == ()
    assert states(config) == {a: "revoked", b: "active"}
    assert bind.query(f"{a}._domainkey.example.test", "TXT") == ["v=DKIM1; p="]
    assert not verifies(bind, old_mail) and verifies(bind, new_mail)
    assert a_file.exists()

    t4 = t3 + 30 * DAY
    assert run(config, t4).errors == ()
    assert states(config) == {a: "removed", b: "active"}
    assert bind.query(f"{a}._domainkey.example.test", "TXT") == []
    assert not a_file.exists() and not (tmp_path / "keys" / "revealed").exists()

    rows = rotation.status_rows(config)
    assert [(r["selector"], r["state"]) for r in rows] == [(b, "active")]
    assert rows[0]["activated"] == "2026-06-02T12:00:00Z" and rows[0]["created"] == "2026-05-31T12:00:00Z"
    assert rows[0]["next_action"] == "rotate" and rows[0]["next_action_at"] == "2026-08-29T12:00:00Z"


def test_switch_waits_for_every_authoritative_server(bind, bind_factory, tmp_path):
    lagging = bind_factory(dynamic=False, name="lagging")  # its own copy of the zone: never hears of updates
    extra = dkim_toml(tmp_path)
    config = bind.config(extra)
    assert run(config, T0).errors == ()
    (a, _), = signer_keys(tmp_path / "signer.conf").items()
    both = bind.config(extra, check_servers=[bind.server, lagging.server], propagation_timeout=0.5)

    t1 = T0 + 88 * DAY
    for when in (t1, t1 + 2 * DAY, t1 + 30 * DAY):
        report = run(both, when)
        assert len(report.errors) == 1 and lagging.server in report.errors[0]
        assert report.next_due == when + rotation.RETRY_AFTER
        assert set(signer_keys(tmp_path / "signer.conf")) == {a}
        assert rotation.load_state(both, "example.test").key(a).state == "active"
    b = next(s for s, st in states(both).items() if st == "pending")
    assert bind.query(f"{b}._domainkey.example.test", "TXT")  # published on the primary all along
    assert (tmp_path / "hook.log").read_text().count("reload") == 1

    later = t1 + 30 * DAY  # the lagging server is no longer asked: visible now, switch publish_ahead later
    assert run(config, later).errors == () and states(config)[b] == "pending"
    assert run(config, later + 2 * DAY).errors == () and states(config) == {a: "retiring", b: "active"}


def crash_run(config_path: Path, when: datetime, step: str) -> subprocess.CompletedProcess[str]:
    """run_due in a child process that SIGKILLs itself right after ``step``'s side effect."""
    code = ("import sys; from datetime import datetime; from certkeeper.core import config; "
            "from certkeeper.network import rotation; "
            "rotation.run_due(config.load(sys.argv[1]), datetime.fromisoformat(sys.argv[2]), print)")
    env = {**os.environ, rotation.CRASH_ENV: f"dkim-{step}"}
    return subprocess.run([sys.executable, "-c", code, str(config_path), when.isoformat()], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def assert_consistent(bind, config, tmp_path: Path) -> None:
    """Every key published is the key on disk; exactly the active keys sign; they verify."""
    state = rotation.load_state(config, "example.test")
    for k in state.keys:
        if k.state in ("pending", "active"):
            private = dkim.load_private_key(Path(k.key_file).read_bytes())
            assert dkim.key_record_for(private).render() == k.record
        if k.state in ("pending", "active", "retiring"):
            assert bind.query(f"{k.selector}._domainkey.example.test", "TXT") == [k.record]
    signing = signer_keys(tmp_path / "signer.conf")
    assert set(signing) == {k.selector for k in state.keys if k.state == "active"}
    for selector, path in signing.items():
        assert verifies(bind, sign(path, selector))
    assert not list((tmp_path / "keys").glob(".*"))  # no temp file left


@pytest.mark.parametrize("step, expect", [
    ("generate", {"state": "pending", "record": ""}),  # key file written, not yet recorded
    ("publish", {"state": "pending", "visible": None}),  # record sent, propagation not yet confirmed
    ("activate", {"state": "pending"}),  # signer file written and hook run, state not yet saved
])
def test_kill_9_during_first_rotation_resumes_at_that_step(bind, tmp_path, step, expect):
    config = bind.config(dkim_toml(tmp_path, algorithms='["ed25519"]'))
    done = crash_run(config.path, T0, step)
    assert done.returncode == -9, done.stderr
    (k,) = rotation.load_state(config, "example.test").keys
    for field, value in expect.items():
        assert getattr(k, field) == value, field
    assert Path(k.key_file).exists()

    assert run(config, T0).errors == ()
    (again,) = rotation.load_state(config, "example.test").keys
    assert again.selector == k.selector and again.state == "active"
    assert_consistent(bind, config, tmp_path)
    assert (tmp_path / "hook.log").read_text().count("reload") == (2 if step == "activate" else 1)


@pytest.mark.parametrize("step", ["activate", "revoke", "remove"])
def test_kill_9_during_later_steps_resumes_at_that_step(bind, tmp_path, step):
    config = bind.config(dkim_toml(tmp_path, algorithms='["ed25519"]'))
    t1, t2 = T0 + 88 * DAY, T0 + 90 * DAY
    at = {"activate": t2, "revoke": t2 + 7 * DAY, "remove": t2 + 37 * DAY}[step]
    for when in (T0, t1, t2, t2 + 7 * DAY, t2 + 37 * DAY):
        if when >= at:
            break
        assert run(config, when).errors == ()
    before = states(config)
    done = crash_run(config.path, at, step)
    assert done.returncode == -9, done.stderr
    assert states(config) == before  # the side effect happened, the state was not saved
    assert run(config, at).errors == ()
    after = states(config)
    want = {"activate": ["retiring", "active"], "revoke": ["revoked", "active"], "remove": ["removed", "active"]}
    assert sorted(after.values(), key=["retiring", "revoked", "removed", "active"].index) == want[step]
    assert_consistent(bind, config, tmp_path)
    old = next(s for s, st in after.items() if st != "active")
    old_file = tmp_path / "keys" / f"example.test.{old}.key"
    if step == "remove":
        assert bind.query(f"{old}._domainkey.example.test", "TXT") == [] and not old_file.exists()
    if step == "revoke":
        assert bind.query(f"{old}._domainkey.example.test", "TXT") == ["v=DKIM1; p="]


def test_rotate_dkim_now_goes_pending_to_active_with_both_selectors_verifying(bind, tmp_path):
    config = bind.config(dkim_toml(tmp_path))
    conf_path = str(config.path)
    out = io.StringIO()
    assert cli.main(["rotate-dkim", "-c", conf_path, "example.test"], out=out) == 0
    (a, a_file), = signer_keys(tmp_path / "signer.conf").items()
    first_mail = sign(a_file, a)
    assert "(pending)" in out.getvalue() and f"selector {a} is active" in out.getvalue()

    out = io.StringIO()
    assert cli.main(["rotate-dkim", "--now", "-c", conf_path], out=out) == 0
    text = out.getvalue()
    (b, b_file), = signer_keys(tmp_path / "signer.conf").items()
    assert b == f"{a}-2"  # same day: the selector is never reused
    for line in (f"new rsa2048 key, selector {b} (pending, emergency", f"published {b}._domainkey.example.test",
                 "is answered by every authoritative server", f"selector {b} is active", f"selector {a} is retiring"):
        assert line in text, text
    assert verifies(bind, first_mail) and verifies(bind, sign(b_file, b))
    rows = {r["selector"]: r for r in rotation.status_rows(config)}
    assert rows[a]["state"] == "retiring" and rows[b]["state"] == "active"
    assert rows[a]["retired"] == rows[b]["activated"] is not None
    assert rows[a]["next_action"] == "revoke" and rows[b]["next_action"] == "rotate"

    out = io.StringIO()  # without --now: published now, switched publish_ahead later by the daemon
    assert cli.main(["rotate-dkim", "-c", conf_path], out=out) == 0
    assert "becomes active at" in out.getvalue()
    assert "no daemon is running: the next step waits for `certkeeper run`" in out.getvalue()  # never implied
    rows = {r["state"]: r for r in rotation.status_rows(config)}
    assert sorted(rows) == ["active", "pending", "retiring"]
    assert rows["pending"]["next_action"] == "activate" and rows["active"]["next_action"] == "retire"
    assert rows["active"]["next_action_at"] == rows["pending"]["next_action_at"] is not None
    assert set(signer_keys(tmp_path / "signer.conf")) == {b}


def test_rotate_dkim_reports_errors_with_exit_1(bind, tmp_path, capsys):
    config = bind.config(dkim_toml(tmp_path), propagation_timeout=0.3, check_servers=["127.0.0.1:9"])
    assert cli.main(["rotate-dkim", "--now", "-c", str(config.path)], out=io.StringIO()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkeeper: example.test: ")
    assert not (tmp_path / "selectors.map").exists()  # the signer was not switched
    assert cli.main(["rotate-dkim", "-c", str(config.path), "example.org"], out=io.StringIO()) == 1
    assert "'example.org' has no [[dkim]] table" in capsys.readouterr().err


def test_ed25519_and_rsa_side_by_side_verify(bind, tmp_path):
    # Two keys per domain: filter-dkimsign chains one filter per key (rspamd's maps hold one key per domain).
    config = bind.config(dkim_toml(tmp_path, signer="filter-dkimsign", algorithms='["rsa2048", "ed25519"]',
                                   fmt="%Y%m%d-{alg}"))
    assert run(config, T0).errors == ()
    keys = signer_keys(tmp_path / "signer.conf")
    assert set(keys) == {"20260304-rsa2048", "20260304-ed25519"}
    assert 'filter "dkimsign" chain {' in (tmp_path / "signer.conf").read_text()
    assert keys["20260304-ed25519"].read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PEM for filter-dkimsign
    for selector, path in keys.items():
        signed = sign(path, selector)
        assert verifies(bind, signed), selector
    ed_signed = sign(keys["20260304-ed25519"], "20260304-ed25519")
    assert b"a=ed25519-sha256" in ed_signed


def test_filter_dkimsign_fragment_follows_the_rotation(bind, tmp_path):
    config = bind.config(dkim_toml(tmp_path, signer="filter-dkimsign"))
    assert run(config, T0).errors == ()
    fragment = tmp_path / "signer.conf"
    (a, a_file), = signer_keys(fragment).items()
    assert f'filter "dkimsign" proc-exec "filter-dkimsign -d example.test -s {a} -k {a_file}" user _dkimsign ' \
           'group _dkimsign' in fragment.read_text().splitlines()
    assert a_file.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    for when in (T0 + 88 * DAY, T0 + 90 * DAY):
        assert run(config, when).errors == ()
    (b, b_file), = signer_keys(fragment).items()
    assert b != a and f"-s {b} -k {b_file}" in fragment.read_text()
    assert verifies(bind, sign(b_file, b))
    assert (tmp_path / "hook.log").read_text().count("reload") == 2  # smtpd restarted at each switch


def test_reveal_retired_publishes_the_old_private_key(bind, tmp_path):
    config = bind.config(dkim_toml(tmp_path, algorithms='["ed25519"]', extra="reveal_retired = true"))
    for when in (T0, T0 + 88 * DAY, T0 + 90 * DAY):
        assert run(config, when).errors == ()
    old = next(k for k in rotation.load_state(config, "example.test").keys if k.state == "retiring")
    for when in (T0 + 97 * DAY, T0 + 127 * DAY):
        assert run(config, when).errors == ()
    revealed = tmp_path / "keys" / "revealed" / dkim.reveal_name(dkim.parse_key_record(old.record))
    private = dkim.load_private_key(revealed.read_bytes())
    assert dkim.key_record_for(private).render() == old.record
    assert oct(revealed.stat().st_mode & 0o777) == "0o644"
    assert not Path(old.key_file).exists()


def test_status_rows_without_keys(tmp_path):
    from certkeeper.core import config as ck_config

    config = ck_config.parse(f'state_dir = "{tmp_path}"\n' + dkim_toml(tmp_path), tmp_path / "c.toml")
    assert rotation.status_rows(config) == [{
        "domain": "example.test", "selector": None, "algorithm": "rsa2048", "state": "none", "created": None,
        "activated": None, "retired": None, "revoked": None, "next_action": "create key", "next_action_at": None}]
    assert rotation.next_due(config, T0) == T0
    assert signers.config_path(config.dkim[0]) == tmp_path / "signer.conf"


def test_pending_key_whose_file_vanished_is_replaced_not_used(bind, tmp_path):
    config = bind.config(dkim_toml(tmp_path, algorithms='["ed25519"]'))
    for when in (T0, T0 + 88 * DAY):
        assert run(config, when).errors == ()
    pending = rotation.load_state(config, "example.test").current("ed25519", "pending")
    Path(pending.key_file).unlink()
    assert run(config, T0 + 90 * DAY).errors == ()
    after = rotation.load_state(config, "example.test")
    assert after.key(pending.selector).state == "retiring"
    fresh = after.current("ed25519", "pending")
    assert fresh is not None and fresh.selector != pending.selector and fresh.visible is not None
    assert pending.selector not in signer_keys(tmp_path / "signer.conf")
    assert_consistent(bind, config, tmp_path)


def test_selector_made_by_hand_in_dns_is_never_taken(bind_factory, tmp_path):
    hand = '"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"'
    today = datetime.now(UTC).strftime("%Y%m%d")  # what the CLI's selector would be
    server = bind_factory(records=f"20260304._domainkey 300 IN TXT {hand}\n"  # the guide's keys, not in key_dir
                                  f"{today}._domainkey 300 IN CNAME key.provider.example.")
    config = server.config(dkim_toml(tmp_path))
    assert run(config, T0).errors == ()
    (a, _), = signer_keys(tmp_path / "signer.conf").items()
    assert a == "20260304-2" and states(config) == {a: "active"}
    assert server.query("20260304._domainkey.example.test", "TXT") == [hand.strip('"')]  # left alone
    out = io.StringIO()  # the CLI path chooses around it too
    assert cli.main(["rotate-dkim", "--now", "-c", str(config.path)], out=out) == 0
    assert set(signer_keys(tmp_path / "signer.conf")) == {f"{today}-2"}
    assert server.query(f"{today}._domainkey.example.test", "CNAME") == ["key.provider.example."]


def test_a_key_file_in_key_dir_is_never_reused_when_the_state_is_lost(bind, tmp_path):
    """The state file is gone and DNS no longer has the record, but the key file is still in key_dir:
    its selector must not be taken again (the new key would overwrite or silently reuse that file)."""
    config = bind.config(dkim_toml(tmp_path))
    assert run(config, T0).errors == ()
    (old,) = rotation.load_state(config, "example.test").keys
    old_file = Path(old.key_file)
    old_bytes = old_file.read_bytes()
    backend_for(config).remove(f"{old.selector}._domainkey.example.test", "TXT")
    rotation.state_path(config, "example.test").unlink()
    assert run(config, T0).errors == ()  # the same day: the selector format gives the same name first
    (new,) = rotation.load_state(config, "example.test").keys
    assert new.selector != old.selector and new.selector == f"{old.selector}-2"
    assert old_file.read_bytes() == old_bytes
    assert Path(new.key_file).exists() and Path(new.key_file) != old_file


def test_revoke_and_remove_wait_for_every_authoritative_server(bind, bind_factory, tmp_path):
    extra = dkim_toml(tmp_path, algorithms='["ed25519"]', extra="reveal_retired = true")
    config = bind.config(extra)
    t2 = T0 + 90 * DAY
    for when in (T0, T0 + 88 * DAY, t2):
        assert run(config, when).errors == ()
    a = next(s for s, st in states(config).items() if st == "retiring")
    a_file = tmp_path / "keys" / f"example.test.{a}.key"
    old_record = rotation.load_state(config, "example.test").key(a).record

    # A server that still hands out the old key: the key is not "revoked" until it answers p=.
    stale = bind_factory(key=bind.key, dynamic=False, name="stale", records=f'{a}._domainkey IN TXT "{old_record}"')
    both = bind.config(extra, check_servers=[bind.server, stale.server], propagation_timeout=0.3)
    report = run(both, t2 + 7 * DAY)
    assert len(report.errors) == 1 and stale.server in report.errors[0]
    assert states(both)[a] == "retiring" and bind.query(f"{a}._domainkey.example.test", "TXT") == ["v=DKIM1; p="]
    assert run(config, t2 + 7 * DAY).errors == () and states(config)[a] == "revoked"

    # Still published somewhere: the private key is neither deleted nor revealed, the record not "removed".
    report = run(both, t2 + 37 * DAY)
    assert len(report.errors) == 1 and stale.server in report.errors[0]
    assert states(both)[a] == "revoked" and a_file.exists() and not (tmp_path / "keys" / "revealed").exists()
    assert run(config, t2 + 37 * DAY).errors == () and states(config)[a] == "removed"
    assert not a_file.exists() and (tmp_path / "keys" / "revealed").is_dir()


def test_switch_checks_the_record_again_and_republishes_it(bind, tmp_path):
    config = bind.config(dkim_toml(tmp_path))
    t1 = T0 + 88 * DAY
    for when in (T0, t1):
        assert run(config, when).errors == ()
    b = next(s for s, st in states(config).items() if st == "pending")
    backend_for(config).remove(f"{b}._domainkey.example.test", "TXT")  # someone edited the zone meanwhile
    assert run(config, t1 + 2 * DAY).errors == () and states(config)[b] == "active"
    assert_consistent(bind, config, tmp_path)


# -- real signing by OpenSMTPD's filter-dkimsign --------------------------------------------------

FILTER_DKIMSIGN = Path("/usr/libexec/opensmtpd/filter-dkimsign")


@contextlib.contextmanager
def smtpd_with_fragment(fragment: Path, tmp: Path) -> Iterator[tuple[int, list[bytes]]]:
    """smtpd on 127.0.0.1:PORT with certkeeper's fragment attached to its listener, relaying every
    message to an aiosmtpd sink; yields (port, the messages the sink received)."""
    from aiosmtpd.controller import Controller

    from tests.fixtures.mailservices import SMTPD_LOCK, require_smtpd_74
    from tests.fixtures.peers import Process, free_port, require_binary, wait_for_port

    require_smtpd_74()
    if not FILTER_DKIMSIGN.exists():
        require_binary("filter-dkimsign")  # skips, or fails under CI (apt-get install opensmtpd-filter-dkimsign)
    received: list[bytes] = []

    class Sink:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            received.append(envelope.original_content or envelope.content)
            return "250 OK"

    sink = Controller(Sink(), hostname="127.0.0.1", port=free_port())
    port = free_port()
    conf = tmp / "smtpd.conf"
    conf.write_text(f'include "{fragment}"\nlisten on 127.0.0.1 port {port} filter "{signers.FILTER_NAME}"\n'
                    f'action "out" relay host smtp://127.0.0.1:{sink.port}\n'
                    'match from local for any action "out"\n')
    lock = os.open(SMTPD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # one smtpd per machine (compiled-in queue)
    fcntl.flock(lock, fcntl.LOCK_EX)
    sink.start()
    proc = Process("smtpd-dkimsign", [require_binary("smtpd"), "-d", "-f", str(conf)], tmp / "smtpd.log")
    try:
        wait_for_port(port, proc=proc)
        yield port, received
    finally:
        proc.stop()
        sink.stop()
        os.close(lock)


def send_and_receive(port: int, received: list[bytes], message: bytes = MESSAGE) -> bytes:
    import smtplib
    import time

    # smtpd's queue (/var/spool/smtpd) is the machine's: a message an earlier run left queued is relayed
    # to this sink too, so wait for this one (a Message-ID of its own), not for the first to arrive.
    mine = f"<{os.urandom(8).hex()}@example.test>".encode()
    message = message.replace(b"<1@example.test>", mine)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("alice@example.test", ["bob@example.org"], message)
    deadline = time.monotonic() + 20
    while not any(mine in m for m in received) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = [m for m in received if mine in m]
    received.clear()
    assert found, "smtpd did not relay the message"
    return found[0].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_filter_dkimsign_in_smtpd_signs_with_the_active_key(bind, open_dir):
    tmp_path = open_dir
    # Defaults: the fragment runs the filter as _dkimsign:_dkimsign and key_group follows signer_group.
    config = bind.config(dkim_toml(tmp_path, signer="filter-dkimsign").replace('key_group = ""\n', ""))
    assert run(config, T0).errors == ()
    (a, _), = signer_keys(tmp_path / "signer.conf").items()
    with smtpd_with_fragment(tmp_path / "signer.conf", tmp_path) as (port, received):
        signed = send_and_receive(port, received)
    assert f"s={a};".encode() in signed.replace(b" ", b"") and verifies(bind, signed)

    for when in (T0 + 88 * DAY, T0 + 90 * DAY):  # rotated: smtpd (restarted) signs with the new key only
        assert run(config, when).errors == ()
    (b, _), = signer_keys(tmp_path / "signer.conf").items()
    with smtpd_with_fragment(tmp_path / "signer.conf", tmp_path) as (port, received):
        signed = send_and_receive(port, received)
    assert signed.count(b"DKIM-Signature:") == 1 and f"s={b};".encode() in signed.replace(b" ", b"")
    assert verifies(bind, signed)
