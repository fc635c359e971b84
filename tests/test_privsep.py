"""Privilege separation (issue 10), tested for real: the suite runs as root in CI.

- the keeper's modules load no network library;
- the protocol refuses anything that is not exactly one of its messages;
- a compromised network worker (this test plays it) is refused install paths, selectors,
  hooks and frames the configuration does not name, and nothing outside the configured
  paths changes;
- the unprivileged user cannot open the mail key, a DKIM key, the account key or the TSIG secret;
- an older version's root-owned state directory is converted in place.

What the running daemon's processes hold (/proc) is checked in tests/test_daemon.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certkeeper import privsep, protocol, sandbox
from certkeeper.core import certs, layout
from certkeeper.core.config import parse
from certkeeper.core.errors import LocalError
from certkeeper.keeper.service import LocalKeeper, Refusal, serve

ROOT = Path(__file__).resolve().parent.parent
NETWORK_LIBRARIES = ("aiohttp", "acme", "josepy", "requests", "dns.resolver")


def as_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the privilege split must be tested for real")
        pytest.skip("needs root (the privilege split drops from root to _certkeeper)")


def unprivileged() -> sandbox.Identity:
    try:
        return sandbox.lookup_user("_certkeeper", None)
    except Exception:  # noqa: BLE001 - said once, clearly
        pytest.fail("no user _certkeeper: scripts/test.sh creates it (useradd)")


def test_the_keepers_modules_load_no_network_library():
    code = ("import sys; import certkeeper.daemon, certkeeper.keeper.service, certkeeper.keeper.status, "
            "certkeeper.keeper.metrics, certkeeper.privsep, certkeeper.commands.run; "
            f"print([m for m in {NETWORK_LIBRARIES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------
# The protocol.


def test_every_message_round_trips():
    samples = [
        protocol.Start("renew", "{}", "/etc/certkeeper.toml", "x = 1", (protocol.Secret("/k", "PEM"),), True, 2),
        protocol.Install("mail", "-----BEGIN CERTIFICATE-----"),
        protocol.HookRan(("rcctl", "restart", "smtpd"), None, "", 0.5),
        protocol.SwitchSigner("example.com", (protocol.SignerKey("example.com", "s1", "ed25519"),)),
        protocol.Exit(0, ""), protocol.Ok(), protocol.Refused("no"),
        protocol.Serve((protocol.ServedSet("m", ("mta-sts.example.com",), "C", "K"),)),
    ]
    for message in samples:
        frame = protocol.render(message)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert protocol.parse(frame[4:]) == message


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b'"Ok"', b"{}", b'{"type": 1}', b'{"type": "Nope"}', b'{"type": "Ok", "x": 1}',
    b'{"type": "Install", "name": "m"}', b'{"type": "Install", "name": 1, "fullchain": ""}',
    b'{"type": "Exit", "code": true, "next": ""}', b'{"type": "Exit", "code": "0", "next": ""}',
    b'{"type": "SwitchSigner", "domain": "d", "keys": [{"domain": "d"}]}', b"[" * 5000,
])
def test_anything_but_a_message_is_a_protocol_error(body):
    with pytest.raises(protocol.ProtocolError):
        protocol.parse(body)


def test_a_huge_length_is_refused_before_reading_the_body():
    a, b = socket.socketpair()
    with a, b:
        a.sendall((1 << 30).to_bytes(4, "big"))  # 1 GiB announced, nothing sent: refused at once
        b.settimeout(5)
        with pytest.raises(protocol.ProtocolError, match="over"):
            protocol.receive(b)


# ---------------------------------------------------------------------------
# A compromised network worker.


@pytest.fixture
def hostile(tmp_path):
    """A keeper of a real configuration, served over a socketpair whose other end is the test."""
    text = f"""
state_dir = "{tmp_path}/state"
[http]
listen = []
tls_listen = []
[[certificate]]
name = "mail.example.com"
domains = ["mail.example.com"]
key = "{tmp_path}/ssl/private/mail.key"
cert = "{tmp_path}/ssl/mail.crt"
chain = "{tmp_path}/ssl/mail.chain.pem"
fullchain = "{tmp_path}/ssl/mail.fullchain.pem"
hooks = ["smtpd"]
[hooks.smtpd]
command = ["true"]
[[dkim]]
domain = "example.com"
key_dir = "{tmp_path}/dkim"
signer = "none"
algorithms = ["ed25519"]
"""
    config = parse(text, tmp_path / "certkeeper.toml")
    keeper = LocalKeeper(config)
    worker, keeper_end = socket.socketpair()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = serve(keeper_end, keeper, lambda line: None, lambda: datetime.now(UTC))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield config, keeper, worker, thread, outcome
    worker.close()
    thread.join(5)
    keeper_end.close()


def ask(worker: socket.socket, message: object) -> object:
    protocol.send(worker, message)
    worker.settimeout(10)
    return protocol.receive(worker)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("request_", [
    protocol.Install("/etc/passwd", "root::0:0::/:/bin/sh\n"),
    protocol.Install("../../etc/passwd", "x"),
    protocol.Install("mail.example.com", "x"),  # no CSR was made for it in this session
    protocol.MakeCsr("evil.example.net"),
    protocol.Rollback("/etc/passwd"),
    protocol.RunHook("sh", ()),
    protocol.RunHook("smtpd", ("/etc/shadow",)),
    protocol.DkimKey("example.com", "../../../etc/x", "ed25519", True),
    protocol.DkimKey("example.com", "s1", "rsa4096", True),  # not in algorithms
    protocol.DkimKey("evil.example.net", "s1", "ed25519", True),
    protocol.SwitchSigner("example.com", (protocol.SignerKey("example.com", "nokey", "ed25519"),)),
    protocol.DisposeDkimKey("example.com", "a/b", "ed25519"),
    protocol.ZonePublish("example.com", "TXT", 300, ("x",)),  # no zonefile backend configured
    protocol.RunAlert("command", "x"),  # no [alerts] command configured
    protocol.Metrics("x"),  # a listener's message, not a worker's
])
def test_hostile_requests_are_refused_the_run_fails_closed_and_nothing_is_written(hostile, request_, tmp_path):
    config, keeper, worker, thread, outcome = hostile
    passwd = digest(Path("/etc/passwd"))
    reply = ask(worker, request_)
    assert isinstance(reply, protocol.Refused), reply
    thread.join(5)
    assert not thread.is_alive()  # the session ended: the caller kills that worker
    assert isinstance(outcome.get("error"), Refusal)
    assert digest(Path("/etc/passwd")) == passwd
    assert not (tmp_path / "ssl").exists()  # no certificate set, no key
    assert not list((tmp_path / "dkim").glob("*")) if (tmp_path / "dkim").exists() else True
    assert not Path("/etc/x").exists()


@pytest.mark.parametrize("raw", [
    b"\0\0\0\5hello",
    (1 << 30).to_bytes(4, "big"),
    protocol.HEADER.pack(9) + b'{"type":',
])
def test_malformed_frames_end_the_session(hostile, raw):
    config, keeper, worker, thread, outcome = hostile
    worker.sendall(raw)
    if raw.endswith(b'{"type":'):
        worker.shutdown(socket.SHUT_WR)
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), LocalError)


def test_a_proper_dkim_key_request_is_answered_and_the_key_stays_the_keepers(hostile, tmp_path):
    config, keeper, worker, thread, outcome = hostile
    reply = ask(worker, protocol.DkimKey("example.com", "s2026", "ed25519", True))
    assert isinstance(reply, protocol.DkimRecord) and reply.created
    assert reply.record.startswith("v=DKIM1; k=ed25519; p=") and "PRIVATE" not in reply.record
    assert ask(worker, protocol.DkimSelectors("example.com")) == protocol.Names(("s2026",))
    protocol.send(worker, protocol.Exit(0, ""))
    thread.join(5)
    assert outcome["result"].code == 0  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# What the unprivileged user can open.


def test_the_unprivileged_user_cannot_open_any_key_or_secret(tmp_path):
    as_root()
    ident = unprivileged()
    tmp_path.chmod(0o755)
    mail_key = tmp_path / "ssl" / "private" / "mail.key"
    mail_key.parent.mkdir(parents=True)
    mail_key.write_bytes(certs.generate_key("ecdsa-p256"))
    mail_key.chmod(0o600)
    account_key = tmp_path / "acme" / "account.pem"
    account_key.parent.mkdir()
    config = parse(f"""
state_dir = "{tmp_path}/state"
[acme]
account_key = "{account_key}"
[[dkim]]
domain = "example.com"
key_dir = "{tmp_path}/dkim"
signer = "none"
algorithms = ["ed25519"]
""", tmp_path / "c.toml")
    privsep.account_key(config)  # made by the keeper, as at a worker's start
    keeper = LocalKeeper(config)
    keeper.dkim_key("example.com", "s1", "ed25519", create=True)
    dkim_key = keeper.dkim_key_path("example.com", "s1")
    tsig = tmp_path / "tsig.secret"
    tsig.write_text("c2VjcmV0IHNlY3JldCBzZWNyZXQ=\n")
    tsig.chmod(0o600)
    paths = [mail_key, dkim_key, account_key, tsig]
    code = ("import errno, json, sys\nout = {}\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'rb').close()\n"
            "        out[p] = 'opened'\n    except OSError as exc:\n        out[p] = errno.errorcode[exc.errno]\n"
            "print(json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                            timeout=30, user=ident.uid, group=ident.gid, extra_groups=[], cwd="/",
                            env=privsep.child_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {str(p): "EACCES" for p in paths}


# ---------------------------------------------------------------------------
# The state directory of an older version.


def test_a_root_owned_state_directory_is_converted_in_place(tmp_path):
    as_root()
    ident = unprivileged()
    state = tmp_path / "state"
    (state / "certificates").mkdir(parents=True)
    (state / "certificates" / "mail.json").write_text("{}")
    (state / "journal").mkdir()
    (state / "account.json").write_text("{}")
    (state / "alerts.json").write_text("{}")
    for path in state.rglob("*"):
        os.chown(path, 0, 0)
    config = parse(f'state_dir = "{state}"\n', tmp_path / "c.toml")
    layout.prepare(config, ident)
    assert not (state / "account.json").exists() and (state / "acme" / "account.json").exists()
    assert (state / "alerts" / "alerts.json").exists()
    for entry in layout.ENTRIES:
        st = (state / entry.path).stat()
        want = 0 if entry.role == "keeper" else ident.uid
        assert (st.st_uid, st.st_mode & 0o777) == (want, entry.mode), entry.path
    assert (state / "certificates" / "mail.json").stat().st_uid == ident.uid
    assert (state / "acme" / "account.json").stat().st_uid == ident.uid
    assert state.stat().st_uid == 0 and state.stat().st_mode & 0o777 == 0o711
    layout.prepare(config, ident)  # idempotent


def test_an_unreachable_interpreter_is_one_clear_line(tmp_path, monkeypatch):
    as_root()
    ident = unprivileged()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(sys, "executable", str(private / "python3"))
    (private / "python3").write_text("")
    problem = privsep.reachable(ident)
    assert problem.startswith(f"user {ident.name} cannot reach {private}") and "README" in problem


def test_check_says_how_to_create_a_missing_user(tmp_path, capsys):
    as_root()
    from certkeeper import cli

    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\nuser = "ck-nosuchuser"\n')
    assert cli.main(["-c", str(path), "check"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"certkeeper: {path}: user: no such user 'ck-nosuchuser'")
    assert "useradd -s " in line and "-d /var/empty ck-nosuchuser" in line


def test_the_cli_renews_through_the_same_roles(pebble, tmp_path):
    """`certkeeper renew` as root without a daemon: the worker's files are _certkeeper's, the keys root's."""
    as_root()
    ident = unprivileged()
    path = tmp_path / "certkeeper.toml"
    path.write_text(pebble.config_text(tmp_path, ["cli.example.com"]))
    result = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "renew"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cli.example.com: renewed" in result.stdout
    config = parse(path.read_text(), path)
    cert = config.certificate("cli.example.com")
    assert (cert.key.stat().st_uid, cert.key.stat().st_mode & 0o777) == (0, 0o600)
    assert (config.state_dir / "certificates" / "cli.example.com.json").stat().st_uid == ident.uid
    assert config.acme.account_key.stat().st_uid == 0


# A bounded fuzz of the frame parser (CI): random bytes and random JSON objects, some of them
# almost messages; anything but a ProtocolError (or a message) fails.
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode()),
                 st.builds(lambda name, body: json.dumps({"type": name, **body}).encode(),
                           st.sampled_from(sorted(protocol.MESSAGES)), st.dictionaries(st.text(max_size=12), _json,
                                                                                        max_size=5))))
def test_fuzz_the_frame_parser(body):
    try:
        message = protocol.parse(body)
    except protocol.ProtocolError:
        return
    assert type(message).__name__ in protocol.MESSAGES
    assert protocol.parse(protocol.render(message)[4:]) == message


def test_the_key_the_signer_uses_now_is_never_deleted_for_a_worker(tmp_path):
    """A compromised worker asking to dispose of the active DKIM key is refused: signing would stop."""
    conf = tmp_path / "dkimsign.conf"
    text = f"""
state_dir = "{tmp_path}/state"
[hooks.signer]
command = ["true"]
[[dkim]]
domain = "example.com"
key_dir = "{tmp_path}/dkim"
signer = "filter-dkimsign"
signer_config = "{conf}"
signer_hook = "signer"
key_owner = ""
algorithms = ["ed25519"]
"""
    config = parse(text, tmp_path / "certkeeper.toml")
    keeper = LocalKeeper(config)
    keeper.dkim_key("example.com", "s1", "ed25519", create=True)
    keeper.switch_signer("example.com", [("example.com", "s1", "ed25519")], lambda line: None)
    assert "-s s1 " in conf.read_text()
    with pytest.raises(Refusal, match="signs now"):
        keeper.dispose_dkim_key("example.com", "s1", "ed25519", lambda line: None)
    assert keeper.dkim_key_path("example.com", "s1").exists()


FORKED_WORKER = r"""
import json, os, sys
from pathlib import Path
from certkeeper import privsep, protocol
from certkeeper.core.config import load
from certkeeper.core import layout

path = Path(sys.argv[1])
config = load(path)
layout.prepare(config, privsep.identity(config))
worker = privsep.WorkerProcess(config, path.read_text(), "renew", {"names": None}, True, 0, fork=True)
worker.start()
first = protocol.receive(worker.sock)  # the worker's first request: it has dropped, confined itself
pid = worker.proc.pid
status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
fds = {}
for fd in os.listdir(f"/proc/{pid}/fd"):
    fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
print(json.dumps({"first": type(first).__name__, "forked": type(worker.proc).__name__,
                  "cmdline_same": Path(f"/proc/{pid}/cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes(),
                  "uid": status["Uid"].split(), "gid": status["Gid"].split(), "groups": status["Groups"].split(),
                  "nnp": status["NoNewPrivs"].strip(), "fds": fds}))
worker.kill()
"""


def test_the_clis_worker_is_forked_drops_its_ids_and_keeps_only_its_socket(tmp_path):
    """The CLI forks its worker without exec (a one-shot run is spared an interpreter start): the child
    runs as _certkeeper in every id, no supplementary group, no_new_privs, with only its socket and the
    standard streams of the keeper's descriptors."""
    as_root()
    ident = unprivileged()
    path = tmp_path / "certkeeper.toml"
    path.write_text(f"""state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/ck.sock"
[acme]
directory = "https://127.0.0.1:9/dir"
account_key = "{tmp_path}/acme/account.pem"
[[certificate]]
name = "a.example.com"
key = "{tmp_path}/k"
cert = "{tmp_path}/c"
chain = "{tmp_path}/ch"
fullchain = "{tmp_path}/f"
""")
    (tmp_path / "held-open").write_text("the keeper's file\n")
    script = f"fh = open({str(tmp_path / 'held-open')!r})\n" + FORKED_WORKER  # a descriptor the child must not keep
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=privsep.child_env())
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["first"] == "Inspect" and seen["forked"] == "Forked" and seen["cmdline_same"]
    assert seen["uid"] == [str(ident.uid)] * 4 and seen["gid"] == [str(ident.gid)] * 4
    assert seen["groups"] == [] and seen["nnp"] == "1"
    assert "0" in seen["fds"] and seen["fds"]["0"] == "/dev/null"
    others = {fd: target for fd, target in seen["fds"].items() if fd not in ("0", "1", "2")}
    assert all(target.startswith("socket:") for target in others.values()), others
    assert str(tmp_path / "held-open") not in seen["fds"].values()
