"""rspamd as a real peer: Debian's rspamd 3.4 (offline, loopback) signs with the key certkeeper
switched to, and dkimpy verifies the signature against the test BIND.

certkeeper writes only the selector_map and path_map the operator's dkim_signing.conf names; the
operator's file (the guide's, with allow_username_mismatch) is never rewritten.

Each failing switch (an unreadable key, a dkim_signing.conf failing ``rspamadm configtest``, a signer
that does not sign with the new key) leaves rspamd up and signing with the old selector, verified by
dkimpy; the new key stays pending, the run fails and the alert goes out.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim as dkimpy
import pytest

from certkeeper import cli
from certkeeper.keeper import signers
from certkeeper.keeper.hooks import direct
from certkeeper.network import rotation
from tests.fixtures.peers import require_binary
from tests.fixtures.rspamd import Rspamd

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
MESSAGE = (b"From: alice@example.test\r\nTo: bob@example.org\r\nSubject: signed by rspamd\r\n"
           b"Date: Wed, 04 Mar 2026 12:00:00 +0000\r\nMessage-ID: <rspamd-1@example.test>\r\n\r\n"
           b"Hello from rspamd.\r\n")
GUIDE_CONF = """# /etc/rspamd/local.d/dkim_signing.conf, as the guide writes it, plus the README's two lines
allow_username_mismatch = true;
selector_map = "{d}/dkim_selectors.map";
path_map = "{d}/dkim_paths.map";
"""


def verified(bind, header: str) -> bool:
    """dkimpy's verdict on MESSAGE with rspamd's header, the key looked up in the test BIND."""
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        values = bind.query(name.decode().rstrip("."), "TXT")
        return values[0].encode() if values else None

    signed = b"DKIM-Signature: " + header.encode() + b"\r\n" + MESSAGE
    return bool(dkimpy.verify(signed, dnsfunc=lookup))


def active(config) -> str:
    (key,) = [k for k in rotation.load_state(config, "example.test").keys if k.state == "active"]
    return key.selector


def test_rspamd_signs_with_the_key_certkeeper_switched_to(bind, rspamd_factory, tmp_path):
    confdir = tmp_path / "rspamd"
    (confdir / "local.d").mkdir(parents=True)
    operators = confdir / "local.d" / "dkim_signing.conf"
    operators.write_text(GUIDE_CONF.format(d=confdir))
    before = operators.read_bytes()
    server = rspamd_factory(confdir)
    server.start()  # before any map exists, as on a host where rspamd runs before certkeeper
    assert server.sign(MESSAGE) is None
    assert server.process is not None
    # What the built-in rspamd hook signals without a service manager: the main process, by its title.
    mains = [pid for pid, argv in direct.processes() if argv[0].startswith("rspamd: main process")]
    assert server.process.popen.pid in mains
    config = bind.config(f"""
[hooks.rspamd]
command = ["kill", "-HUP", "{server.process.popen.pid}"]  # rspamd -f: its main process, as systemd's reload
[[dkim]]
domain = "example.test"
key_dir = "{tmp_path / 'keys'}"
key_owner = ""
signer = "rspamd"
signer_config = "{operators}"
""")
    assert config.dkim[0].signer_user == "_rspamd"  # who reads the key on a real host

    assert rotation.run_due(config, T0, print).errors == ()  # the first key, active at once
    a = active(config)
    assert (confdir / "dkim_selectors.map").read_text().splitlines()[-1] == f"example.test {a}"
    first = server.wait_signing(MESSAGE, a)
    assert "d=example.test;" in first.replace(" ", "") and verified(bind, first)

    for when in (T0 + 88 * DAY, T0 + 90 * DAY):  # the next key: published, then switched to
        assert rotation.run_due(config, when, print).errors == ()
    b = active(config)
    assert b != a
    second = server.wait_signing(MESSAGE, b)  # the hook's SIGHUP made rspamd read the new maps
    assert verified(bind, second)
    assert not verified(bind, second.replace(f"s={b};", f"s={a};"))  # the selector is what verifies
    assert operators.read_bytes() == before  # the operator's dkim_signing.conf, byte for byte
    assert sorted(p.name for p in confdir.iterdir() if p.suffix == ".map") == [
        "dkim_paths.map", "dkim_selectors.map"]
    assert f"example.test {tmp_path / 'keys'}/example.test.{b}.key" in (confdir / "dkim_paths.map").read_text()
    assert signers.rspamd_maps(operators) == (confdir / "dkim_selectors.map", confdir / "dkim_paths.map")


def test_rspamd_switch_is_probed_and_a_broken_config_is_never_loaded(bind, rspamd_factory, tmp_path):
    """``probe = "rspamd://..."``: the switch is verified by a message rspamd signs (/checkv2), the key
    record looked up at the authoritative server. A dkim_signing.conf broken since rspamd started fails
    ``rspamadm configtest`` (run on /etc/rspamd/rspamd.conf with LOCAL_CONFDIR = the test's directory,
    as signer_config is in its local.d): nothing is written, rspamd is not reloaded and keeps signing
    with the old selector, the new key stays pending, the alert goes out."""
    confdir = tmp_path / "rspamd"
    (confdir / "local.d").mkdir(parents=True)
    operators = confdir / "local.d" / "dkim_signing.conf"
    operators.write_text(GUIDE_CONF.format(d=confdir))
    server = rspamd_factory(confdir)
    server.start()
    assert server.process is not None
    config = bind.config(f"""
[alerts]
command = ["sh", "-c", "cat >> {tmp_path / 'alerts.log'}"]
[hooks.rspamd]
command = ["kill", "-HUP", "{server.process.popen.pid}"]
[[dkim]]
domain = "example.test"
key_dir = "{tmp_path / 'keys'}"
key_owner = ""
signer = "rspamd"
signer_config = "{operators}"
probe = "rspamd://127.0.0.1:{server.normal_port}"
""")
    lines: list[str] = []
    assert rotation.run_due(config, T0, lines.append).errors == ()
    a = active(config)
    assert any(f"is signed with {a} and verifies against the authoritative DNS" in line for line in lines), lines

    operators.write_text(GUIDE_CONF.format(d=confdir) + "domain {\n")  # an edit since rspamd started
    assert rotation.run_due(config, T0 + 88 * DAY, print).errors == ()
    (error,) = rotation.run_due(config, T0 + 90 * DAY, print).errors
    assert "rspamadm configtest: exit 1" in error and "the service is up" in error
    assert active(config) == a
    states = {k.selector: k.state for k in rotation.load_state(config, "example.test").keys}
    (b,) = [s for s, st in states.items() if st == "pending"]
    assert (confdir / "dkim_selectors.map").read_text().splitlines()[-1] == f"example.test {a}"
    assert verified(bind, server.wait_signing(MESSAGE, a))  # still signing with the old selector
    alert = (tmp_path / "alerts.log").read_text()
    assert "DKIM signer switch for example.test failed" in alert and "rspamadm configtest" in alert
    (row,) = [r for r in rotation.status_rows(config) if r["selector"] == b]
    assert "rspamadm configtest" in row["switch_error"]


# rspamd notices a rewritten map file by itself at once (libev's stat watcher uses inotify), so a hook
# that does not reload it is no failure on a host like this one. The failure cases share one rspamd
# that notices nothing until it is reloaded, as where inotify is unavailable (the watch limit reached,
# a file system that sends no events): libev without inotify (LIBEV_FLAGS: the epoll backend, and
# EVFLAG_NOINOTIFY) falls back to polling, and the maps are polled once an hour.
EVBACKEND_EPOLL, EVFLAG_NOINOTIFY = 0x4, 0x100000
DEAF_OPTIONS = "map_watch_interval = 1h;\nmap_file_watch_multiplier = 1.0;\n"


@pytest.fixture(scope="module")
def deaf_rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    """One rspamd for the module's failure cases; it reads changed maps only when it gets SIGHUP."""
    require_binary("rspamd")
    confdir = tmp_path_factory.mktemp("rspamd-deaf")
    (confdir / "local.d").mkdir()
    (confdir / "local.d" / "dkim_signing.conf").write_text(GUIDE_CONF.format(d=confdir))
    server = Rspamd(confdir, DEAF_OPTIONS, {"LIBEV_FLAGS": str(EVBACKEND_EPOLL | EVFLAG_NOINOTIFY)})
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def deaf_config(bind, server: Rspamd, tmp: Path, hook: str = "rspamd", probe: bool = True):
    """The [[dkim]] table signing through ``server``: hook "rspamd" reloads it (SIGHUP), "noop" does not."""
    assert server.process is not None
    return bind.config(f"""
[alerts]
command = ["sh", "-c", "cat >> {tmp / 'alerts.log'}"]
[hooks.rspamd]
command = ["kill", "-HUP", "{server.process.popen.pid}"]
[hooks.noop]
command = ["true"]
[[dkim]]
domain = "example.test"
key_dir = "{tmp / 'keys'}"
key_owner = ""
signer = "rspamd"
signer_config = "{server.local_confdir / 'local.d' / 'dkim_signing.conf'}"
signer_hook = "{hook}"
probe = "{f'rspamd://127.0.0.1:{server.normal_port}' if probe else ''}"
""")


def first_deaf_key(bind, server: Rspamd, tmp: Path, when: datetime) -> str:
    """The first key, switched to at once with the reloading hook and not probed (rspamd's reload
    starts new workers while the old ones still answer); rspamd signs with it, verified."""
    config = deaf_config(bind, server, tmp, probe=False)
    assert rotation.run_due(config, when, print).errors == ()
    a = active(config)
    assert verified(bind, server.wait_signing(MESSAGE, a))
    return a


def assert_rspamd_kept(bind, server: Rspamd, config, tmp: Path, old: str, why: str) -> str:
    """rspamd is up and signs with ``old`` (verified), the new key is pending with the switch error in
    ``status``, the maps name ``old``, the alert went out. The new selector."""
    assert server.process is not None and server.process.popen.poll() is None
    header = server.sign(MESSAGE)
    assert header is not None and f"s={old};" in header.replace(" ", "") and verified(bind, header)
    states = {k.selector: k.state for k in rotation.load_state(config, "example.test").keys}
    (new,) = [s for s, st in states.items() if st == "pending"]
    assert states[old] == "active"
    maps = server.local_confdir / "dkim_selectors.map"
    assert maps.read_text().splitlines()[-1] == f"example.test {old}"
    alert = (tmp / "alerts.log").read_text()
    assert "DKIM signer switch for example.test failed" in alert and why in alert, alert
    assert f"keeps its previous configuration ({old})" in alert
    (row,) = [r for r in rotation.status_rows(config) if r["selector"] == new]
    assert row["next_action"] == "activate" and why in row["switch_error"]
    assert not list((config.state_dir / "journal").glob("signer-*.json"))  # nothing left to roll back
    return new


def test_rspamd_never_switches_to_a_key_its_user_cannot_read(bind, deaf_rspamd, tmp_path):
    """The check as ``_rspamd`` (signer_user) fails: nothing is written, rspamd is not reloaded."""
    a = first_deaf_key(bind, deaf_rspamd, tmp_path, T0)
    config = deaf_config(bind, deaf_rspamd, tmp_path)
    assert rotation.run_due(config, T0 + 88 * DAY, print).errors == ()
    maps = (deaf_rspamd.local_confdir / "dkim_selectors.map").stat().st_mtime_ns
    (tmp_path / "keys").chmod(0o700)  # key_dir made root's alone: _rspamd cannot reach the new key
    try:
        report = rotation.run_due(config, T0 + 90 * DAY, print)
        (error,) = report.errors
        assert "_rspamd:_rspamd cannot read it: Permission denied" in error and "the service is up" in error
        assert (deaf_rspamd.local_confdir / "dkim_selectors.map").stat().st_mtime_ns == maps  # nothing written
        b = assert_rspamd_kept(bind, deaf_rspamd, config, tmp_path, a, "Permission denied")
        assert report.next_due == T0 + 90 * DAY + timedelta(minutes=15)  # the retry waits for the backoff
        assert rotation.run_due(config, T0 + 90 * DAY + timedelta(minutes=5), print).errors == ()
        assert active(config) == a
        assert {k.selector: k.state for k in rotation.load_state(config, "example.test").keys}[b] == "pending"
    finally:
        (tmp_path / "keys").chmod(0o755)


def test_rspamd_that_does_not_sign_with_the_new_key_is_rolled_back(bind, deaf_rspamd, tmp_path):
    """The maps are written and the hook runs, but it does not reload rspamd: the probe's message is
    signed with the old selector, the maps are put back, ``rotate-dkim`` exits 1."""
    a = first_deaf_key(bind, deaf_rspamd, tmp_path, T0 + 7 * DAY)  # not the other test's selector
    config = deaf_config(bind, deaf_rspamd, tmp_path, hook="noop")
    out = io.StringIO()
    assert cli.main(["rotate-dkim", "--now", "-c", str(config.path)], out=out) == 1, out.getvalue()
    b = assert_rspamd_kept(bind, deaf_rspamd, config, tmp_path, a, "signed with s=" + a)
    assert f"wanted {b}, signed with s={a}" in out.getvalue()
    assert "the previous signer files are back and hook noop ran again" in out.getvalue()
    assert "the service is up" in out.getvalue()
    assert f"example.test {tmp_path / 'keys'}/example.test.{a}.key" in (
        deaf_rspamd.local_confdir / "dkim_paths.map").read_text()
