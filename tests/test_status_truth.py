"""``status`` tells the truth (issue 11, item 4): the planner, ``renew``, ``status``, ``--json`` and the
metrics read one decision; each case that misled gets a test on real files (a throwaway CA's
certificates, the real state files) and, where it is about the daemon, a real daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certkeeper.cli import main
from certkeeper.core import config, renewal, state
from certkeeper.keeper import status
from certkeeper.keeper.service import LocalKeeper, decide
from certkeeper.keeper.store import CertificateStore
from tests.fixtures.peers import Process, free_port
from tests.fixtures.throwaway_ca import ThrowawayCA

NOW = datetime.now(UTC).replace(microsecond=0)
ROOT = Path(__file__).resolve().parent.parent
ISO = re.compile(r'"(\d{4}-\d\d-\d\dT[^"]*)"')


def write_config(tmp_path: Path, chain: str = "mail.chain.pem", hook_command: str = "/bin/true",
                 ca_bundle: str = "", extra: str = "") -> Path:
    bundle = f'ca_bundle = "{ca_bundle}"\n' if ca_bundle else ""
    path = tmp_path / "certkeeper.toml"
    path.write_text(f"""state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/ck.sock"
pid_file = "{tmp_path}/ck.pid"
{extra}
[acme]
directory = "https://127.0.0.1:{free_port()}/dir"
{bundle}
[http]
listen = ["127.0.0.1:{free_port()}"]
tls_listen = []

[hooks.reload-mta]
command = ["{hook_command}"]

[[certificate]]
name = "mail.example.com"
domains = ["mail.example.com"]
key = "{tmp_path}/ssl/mail.key"
cert = "{tmp_path}/ssl/mail.crt"
chain = "{tmp_path}/ssl/{chain}"
fullchain = "{tmp_path}/ssl/mail.fullchain.pem"
hooks = ["reload-mta"]
""")
    return path


def install(cfg: config.Config, not_before: datetime, not_after: datetime) -> None:
    CertificateStore(cfg.state_dir).install(cfg.certificate("mail.example.com"),
                                            ThrowawayCA().issue(["mail.example.com"], not_before, not_after))


def row(cfg: config.Config, now: datetime | None = None) -> dict:
    return status.collect(cfg, now=now)["certificates"][0]


def test_import_acme_client_then_status_says_repair_not_renew(tmp_path):
    """import-acme-client names a chain file acme-client never wrote: status said "renew now" while
    renew said "not due until 2030". Now both say the same, and the next run rebuilds the file."""
    ssl_dir = tmp_path / "ssl"
    (ssl_dir / "private").mkdir(parents=True)
    issued = ThrowawayCA().issue(["mail.example.com"], NOW - timedelta(days=10), NOW + timedelta(days=80),
                                 key_type="ecdsa-p384")
    (ssl_dir / "private" / "mail.example.com.key").write_bytes(issued.key)  # as acme-client left them
    (ssl_dir / "mail.example.com.crt").write_bytes(issued.cert)
    (ssl_dir / "mail.example.com.fullchain.pem").write_bytes(issued.fullchain)
    (tmp_path / "acme-client.conf").write_text(f"""authority letsencrypt {{
\tapi url "https://acme-v02.api.letsencrypt.org/directory"
\taccount key "{tmp_path}/acme/privkey.pem"
}}
domain mail.example.com {{
\tdomain key "{ssl_dir}/private/mail.example.com.key" ecdsa
\tdomain certificate "{ssl_dir}/mail.example.com.crt"
\tdomain full chain certificate "{ssl_dir}/mail.example.com.fullchain.pem"
\tsign with letsencrypt
}}
""")
    out = io.StringIO()
    assert main(["import-acme-client", str(tmp_path / "acme-client.conf")], out=out) == 0
    text = out.getvalue()
    assert "mail.example.com.chain.pem\"  # new file" in text
    text = (text.replace('state_dir = "/var/db/certkeeper"', f'state_dir = "{tmp_path}/state"\n'
                         f'control_socket = "{tmp_path}/ck.sock"\npid_file = "{tmp_path}/ck.pid"')
            .replace("https://acme-v02.api.letsencrypt.org/directory", f"https://127.0.0.1:{free_port()}/dir")
            .replace('listen = ["0.0.0.0:80", "[::]:80"]', f'listen = ["127.0.0.1:{free_port()}"]\ntls_listen = []'))
    path = tmp_path / "certkeeper.toml"
    path.write_text(text)
    imported = config.load(path)
    chain = imported.certificate("mail.example.com").chain
    assert not chain.exists()
    before = row(imported)
    assert before["next_action"] == "repair on next run" and before["status"] == "ok"
    assert "rebuilt from the files on disk at the next run, no new order" in before["next_renewal_reason"]
    renew = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "renew"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)  # the keeper and an unprivileged worker
    assert renew.returncode == 2, renew.stdout + renew.stderr
    planned = renew.stdout.split("mail.example.com: not due until ")[1][:16]
    assert chain.read_bytes() == issued.chain  # repaired from the full chain, nothing ordered
    after = row(imported)
    assert after["next_action"] == f"renew {planned}"  # what renew printed


def test_a_retry_time_is_never_in_the_past(tmp_path):
    """After a rolled-back renewal of a certificate that was not due: "failing, retry <the past>"."""
    cfg = config.load(write_config(tmp_path))
    install(cfg, NOW - timedelta(days=10), NOW + timedelta(days=80))
    digest = renewal.certificate_settings(cfg, cfg.certificate("mail.example.com"))
    state.save_cert_state(cfg.state_dir, state.CertState(
        name="mail.example.com", consecutive_failures=1, last_error="reload-mta: the service is down",
        retry_not_before=NOW - timedelta(minutes=30), failed_settings=digest))
    now = row(cfg)
    assert now["status"] == "failing" and not now["next_action"].startswith("retry")
    assert now["next_action_at"] > status._iso(NOW) and now["backoff_until"] is None  # type: ignore[operator]
    # Inside the backoff: the retry time, what lifts it, and the same in the planner the runner uses.
    state.save_cert_state(cfg.state_dir, dataclasses.replace(state.load_cert_state(cfg.state_dir, "mail.example.com"),
                                                             retry_not_before=NOW + timedelta(minutes=90)))
    waiting = row(cfg, NOW)
    assert waiting["next_action"] == f"retry {NOW + timedelta(minutes=90):%Y-%m-%d %H:%M}"
    assert waiting["backoff_until"] == status._iso(NOW + timedelta(minutes=90))
    assert "any of its hooks" in waiting["backoff_lifts"]
    text = status.render_text(status.collect(cfg, now=NOW))
    assert f"backoff until {NOW + timedelta(minutes=90):%Y-%m-%d %H:%M} UTC; ends sooner with a change" in text
    decision = LocalKeeper(cfg).plan("mail.example.com", False, NOW)
    assert (decision.action, decision.when) == ("retry", NOW + timedelta(minutes=90))


@pytest.mark.parametrize("change", ["hook", "ca_bundle"])
def test_a_backoff_lifts_when_the_setting_it_names_changes(tmp_path, change):
    cfg = config.load(write_config(tmp_path))
    install(cfg, NOW - timedelta(days=85), NOW + timedelta(days=5))  # due
    state.save_cert_state(cfg.state_dir, state.CertState(
        name="mail.example.com", consecutive_failures=2, last_error="certificate verify failed",
        retry_not_before=NOW + timedelta(minutes=100),
        failed_settings=renewal.certificate_settings(cfg, cfg.certificate("mail.example.com"))))
    assert row(cfg)["next_action"].startswith("retry ")
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(ThrowawayCA().pem)
    fixed = config.load(write_config(tmp_path, hook_command="/usr/bin/true") if change == "hook"
                        else write_config(tmp_path, ca_bundle=str(bundle)))
    assert row(fixed)["next_action"] == "renew now" and row(fixed)["backoff_until"] is None
    assert decide(fixed, CertificateStore(fixed.state_dir), fixed.certificate("mail.example.com"), NOW).due


def test_json_times_are_whole_seconds_everywhere_and_dkim_since_comes_from_real_rows(tmp_path):
    from certkeeper.network import rotation, verification

    cfg = config.load(write_config(tmp_path, extra=f'[[dkim]]\ndomain = "example.com"\n'
                                                   f'key_dir = "{tmp_path}/dkim"\n'))
    install(cfg, NOW - timedelta(days=10), NOW + timedelta(days=80))
    cert = cfg.certificate("mail.example.com")
    info = verification.on_disk(CertificateStore(cfg.state_dir), cert)
    seen = verification.Observation("smtp+starttls://127.0.0.1:25", info, "", datetime.now(UTC))  # microseconds
    verification.save_results(cfg, cert.name, [verification.Check(cert.name, "reload-mta", info, seen)])
    item = cfg.dkim[0]
    created = datetime(2026, 11, 1, 8, 30, 15, 123456, tzinfo=UTC)
    dkim_state = rotation.DomainState(item.domain)
    dkim_state = dkim_state.with_key(rotation.new_key(dkim_state, item, item.algorithms[0], created))
    rotation.save_state(cfg, dkim_state)
    out = io.StringIO()
    assert main(["--config", str(cfg.path), "status", "--json"], out=out) == 0
    text = out.getvalue()
    times = ISO.findall(text)
    assert len(times) >= 8
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in times), times
    (dkim_row,) = json.loads(text)["dkim"]
    assert dkim_row["state"] == "pending" and dkim_row["since"] == "2026-11-01T08:30:15Z"
    table = io.StringIO()
    main(["--config", str(cfg.path), "status"], out=table)
    assert re.search(r"example\.com\s+\S+\s+\S+\s+pending\s+2026-11-01", table.getvalue()), table.getvalue()


def test_status_piped_into_head_exits_quietly(tmp_path):
    cfg = config.load(write_config(tmp_path))
    install(cfg, NOW - timedelta(days=10), NOW + timedelta(days=80))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line (what `| head -0` does)
    try:
        proc = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(cfg.path), "status"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 0


# ---------------------------------------------------------------------------
# A real daemon.


def test_the_daemon_shows_the_same_decision(tmp_path):
    cfg = config.load(write_config(tmp_path))
    install(cfg, NOW - timedelta(days=10), NOW + timedelta(days=80))
    state.save_cert_state(cfg.state_dir, state.CertState(
        name="mail.example.com", consecutive_failures=1, last_error="reload-mta: the service is down",
        retry_not_before=NOW - timedelta(minutes=5),
        failed_settings=renewal.certificate_settings(cfg, cfg.certificate("mail.example.com"))))
    proc = Process("certkeeper", [sys.executable, "-m", "certkeeper", "-c", str(cfg.path), "run", "-d"],
                   tmp_path / "daemon.log", cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while "mail.example.com: not due until" not in proc.output():  # the start-up check is over
            assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.1)
        answer = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(cfg.path), "status", "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        proc.stop()
    assert answer.returncode == 0, answer.stderr
    doc = json.loads(answer.stdout)
    assert "daemon" in doc  # it came from the daemon
    (cert,) = doc["certificates"]
    assert cert["status"] == "failing" and cert["next_action"].startswith("renew 20")
    assert cert["next_action_at"] > doc["generated_at"]
    assert all(t.endswith("Z") and "." not in t for t in ISO.findall(answer.stdout))
    planned = decide(cfg, CertificateStore(cfg.state_dir), cfg.certificate("mail.example.com"), NOW)
    assert cert["next_action_at"] == status._iso(planned.when)


HOURLY_WORKER = r"""
import json, socket, sys
from datetime import UTC, datetime, timedelta
from certkeeper import protocol as p
sock = socket.socket(fileno=int(sys.argv[1]))
start = p.receive(sock)
with open(json.loads(start.config_text.split("# runs: ")[1].split("\n")[0]), "a") as f:
    f.write(start.job + "\n")
soon = datetime.now(UTC) + timedelta(seconds=2)
p.send(sock, p.Exit(0, soon.isoformat()))
"""


async def test_dkim_steps_run_at_their_time_and_rotate_dkim_tells_the_daemon(tmp_path, monkeypatch):
    """A DKIM run names its next step: the daemon runs it then (a date job), not at the next hourly sweep;
    ``schedule-dkim`` (what rotate-dkim sends) plans from a fresh DKIM run."""
    from certkeeper import control, privsep
    from certkeeper import daemon as daemon_module

    runs = tmp_path / "runs.txt"
    runs.write_text("")
    runs.chmod(0o666)
    monkeypatch.setattr(privsep.WorkerProcess, "command", (sys.executable, "-c", HOURLY_WORKER))
    path = write_config(tmp_path, extra=f'# runs: "{runs}"\n[[dkim]]\ndomain = "example.com"\n'
                                        f'key_dir = "{tmp_path}/dkim"\n')
    text = path.read_text()
    d = daemon_module.Daemon(config.parse(text, path), text)
    d.stopping = asyncio.Event()
    d.loop = asyncio.get_running_loop()
    d.bind()
    assert d.control is not None
    await d.control.start()
    d.scheduler = d._start_scheduler()
    try:
        out = io.StringIO()
        code = await asyncio.to_thread(control.forward, d.config, "schedule-dkim", {}, out)
        assert code == 0 and runs.read_text() == "hourly\n"
        job = d.scheduler.get_job("dkim-step")
        assert job is not None and job.next_run_time - datetime.now(UTC) < timedelta(seconds=3)
        assert f"next DKIM run at {job.next_run_time.astimezone(UTC):%Y-%m-%d %H:%M:%S}" in out.getvalue()
        deadline = time.monotonic() + 15
        while runs.read_text().count("hourly") < 2:  # the date job ran the next step at its time
            assert time.monotonic() < deadline, runs.read_text()
            await asyncio.sleep(0.1)
    finally:
        d.scheduler.shutdown(wait=False)
        await d.control.stop()
        d.listener.stop()


def test_a_real_daemon_switches_the_dkim_signer_at_its_time_after_rotate_dkim(tmp_path, bind):
    """rotate-dkim announced a switch time the daemon then missed by up to an hour: now the CLI tells the
    daemon, which runs the activation at visible + publish_ahead (a date job), and status shows it."""
    from certkeeper.network import rotation

    ahead = 12  # seconds of publish_ahead
    path = tmp_path / "certkeeper.toml"
    # The operator's dkim_signing.conf, as the README shows it: certkeeper writes the two maps it names.
    (tmp_path / "signer.conf").write_text(f'selector_map = "{tmp_path}/selectors.map";\n'
                                          f'path_map = "{tmp_path}/paths.map";\n')
    path.write_text(f"""state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/ck.sock"
pid_file = "{tmp_path}/ck.pid"
[http]
listen = ["127.0.0.1:{free_port()}"]
tls_listen = []
[hooks.signer]
command = ["sh", "-c", "echo reload >> {tmp_path / 'hook.log'}"]
[[dkim]]
domain = "example.test"
algorithms = ["ed25519"]
publish_ahead = "{ahead}s"
key_dir = "{tmp_path / 'keys'}"
key_owner = ""
key_mode = "0440"
signer = "rspamd"
signer_config = "{tmp_path / 'signer.conf'}"
signer_hook = "signer"
""" + bind.dns_toml())
    cfg = config.load(path)

    def keys() -> dict[str, rotation.KeyState]:
        return {k.selector: k for k in rotation.load_state(cfg, "example.test").keys}

    proc = Process("certkeeper", [sys.executable, "-m", "certkeeper", "-c", str(path), "run", "-d"],
                   tmp_path / "daemon.log", cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not any(k.state == "active" for k in keys().values()):  # the first key, at start-up
            assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.2)
        (first,) = keys()
        rotated = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "rotate-dkim"],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "daemon: next DKIM run at " in rotated.stdout
        (second,) = set(keys()) - {first}
        switch_at = keys()[second].visible + timedelta(seconds=ahead)  # type: ignore[operator]
        while keys()[second].state != "active":
            assert proc.popen.poll() is None and time.monotonic() < deadline + 60, proc.output()[-3000:]
            time.sleep(0.2)
        answer = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "status", "--json"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        proc.stop()
    activated = keys()[second].activated
    assert activated is not None and switch_at <= activated < switch_at + timedelta(seconds=10)
    assert "next DKIM step at" in proc.output()
    assert f"example.test {second}" in (tmp_path / "selectors.map").read_text()
    rows = {r["selector"]: r for r in json.loads(answer.stdout)["dkim"]}
    assert rows[second]["state"] == "active" and rows[second]["since"] == status._iso(activated)
    assert rows[first]["state"] == "retiring" and rows[first]["since"] is not None
