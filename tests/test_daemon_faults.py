"""Issue 12 against the real daemon (``certkeeper run`` as root: keeper, ``_certkeeper`` workers, listener),
a real Pebble, BIND and Dovecot.

Served equals disk: a kill -9 at each file-system step of an install. The install is the keeper's
(``CertificateStore.install``); to stop it at a chosen step, the daemon runs under a wrapper that adds a
Python audit hook (``sys.addaudithook``, test code only, nothing in certkeeper): at the first matching
file event (the open of a temp file, the link of a ``.prev``, a rename, the journal's removal) the
keeper's thread waits until the test has killed what it wants. Two deaths are covered at each step:
the network worker's (the keeper finishes the install it was asked for; the hooks the worker would
have run are owed) and the keeper's own (the daemon is started again and finds the half-done install).
After each, within 10 s, a TLS handshake with the listener (mta-sts.example.com) and with Dovecot's
imaps port (mail.example.com, reloaded by a hook) shows the serial on disk, and the hooks ran.

SIGHUP is all or nothing: a configuration naming a garbage key file for the listener's certificate, or
with a NUL byte in a path, changes nothing (policy served, published id) and says why in one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from certkeeper.core import certs
from certkeeper.core.config import parse
from certkeeper.keeper.store import CertificateStore
from tests.certfactory import make_set
from tests.fixtures.bind import new_bind
from tests.fixtures.mailservices import MailServices
from tests.fixtures.peers import Process, free_port, process_tree, require_binary, wait_for_port
from tests.fixtures.site import MTA_STS, NAMES, POLICY, TLSRPT

ROOT = Path(__file__).resolve().parent.parent
MAIL, WEB = NAMES  # mail.example.com (Dovecot's), mta-sts.example.com (the listener's)
WITHIN = 10.0  # seconds after a death by which served must equal disk and the hooks must have run

# The daemon's interpreter with an audit hook that stops the keeper's thread at one file event. The
# test writes "EVENT\nPATH-SUFFIX" to CONTROL; the first event whose path ends so (a hook's start: whose
# command line holds it) takes it (one shot), writes CONTROL.paused and waits (at most 2 minutes) until
# the test removes that file.
PAUSING_DAEMON = r"""
import os, runpy, sys, threading, time
CONTROL = sys.argv.pop(1)
local = threading.local()

def text(value):
    return os.fsdecode(os.fspath(value)) if isinstance(value, (str, bytes, os.PathLike)) else ""

def pause(event, args):
    if getattr(local, "busy", False):
        return
    if event == "subprocess.Popen":  # a hook starts: match its command line
        paths = [" ".join(text(a) for a in args[1])]
    elif event in ("open", "os.link", "os.rename", "os.remove"):
        paths = [text(a) for a in args[:2]]
        if not any("certkeeper-new" in p or "/journal/" in p for p in paths):
            return
    else:
        return
    local.busy = True
    try:
        try:
            with open(CONTROL) as f:
                want_event, want = f.read().split("\n", 1)
        except (FileNotFoundError, ValueError):
            return
        if event != want_event or not any(p.endswith(want) or event == "subprocess.Popen" and want in p
                                          for p in paths):
            return
        os.remove(CONTROL)
        with open(CONTROL + ".paused", "w") as f:
            f.write(f"{event} {' '.join(paths)}\n")
        deadline = time.monotonic() + 120
        while os.path.exists(CONTROL + ".paused") and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        local.busy = False

sys.addaudithook(pause)
runpy.run_module("certkeeper", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Step:
    """A file-system step of ``CertificateStore.install`` (or the hook's start after it): the keeper stops
    just before ``event`` on a path ending in ``suffix`` (formatted with the certificate's name, its key
    and full chain file names and its hook)."""
    name: str
    event: str
    suffix: str
    owed: bool  # the hooks are marked owed by then (the marker comes before the journal)
    committed: bool  # the new set is on disk whatever happens once the keeper is there (the journal is written)


STEPS = [
    Step("writing-temp-files", "open", "/.{key}.certkeeper-new", False, False),
    Step("linking-prev", "os.link", "/.{key}.prev.certkeeper-new", False, False),
    Step("marking-hooks-owed", "open", "/journal/.{name}.reload-pending.certkeeper-new", False, False),
    Step("writing-journal", "open", "/journal/.{name}.json.certkeeper-new", True, False),
    Step("renaming-first-file", "os.rename", "/.{key}.certkeeper-new", True, True),
    Step("renaming-last-file", "os.rename", "/.{fullchain}.certkeeper-new", True, True),
    Step("removing-journal", "os.remove", "/journal/{name}.json", True, True),
    Step("starting-hooks", "subprocess.Popen", "{hook} $CERTKEEPER_CERTIFICATES", True, True),  # installed
]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and b"certkeeper" in _cmdline(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


class Site:
    """Pebble, BIND, Dovecot and one daemon at a time, all on loopback; see the module comment."""

    def __init__(self, tmp: Path, mail_root: Path, pebble, bind) -> None:
        self.tmp = tmp
        self.bind = bind
        self.https_port = free_port()
        self.roots = pebble.issuer_roots()
        self.control = tmp / "pause"
        self.hook_runs = tmp / "hook-runs"
        self.mail = MailServices(mail_root, (MAIL,))
        roots_file = tmp / "pebble-roots.pem"
        roots_file.write_bytes(b"".join(self.roots))
        dns = bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{self.https_port}", mta_sts_fetch_ca=str(roots_file))
        mailctl = self.mail.mailctl
        hooks = f"""
[hooks.imap]
command = ["sh", "-c", "echo \\"imap $CERTKEEPER_CERTIFICATES\\" >> {self.hook_runs} && exec {mailctl} dovecot reload"]
verify = ["imaps://127.0.0.1:{self.mail.imaps_port}"]
verify_timeout = 5
[hooks.web]
command = ["sh", "-c", "echo \\"web $CERTKEEPER_CERTIFICATES\\" >> {self.hook_runs}"]
verify = ["https://127.0.0.1:{self.https_port}"]
verify_timeout = 5
"""
        text = pebble.config_text(tmp, NAMES, tls_listen=[f"127.0.0.1:{self.https_port}"],
                                  extra=MTA_STS + TLSRPT + dns + hooks)
        text = text.replace(f'name = "{MAIL}"\n', f'name = "{MAIL}"\nhooks = ["imap"]\n')
        text = text.replace(f'name = "{WEB}"\n', f'name = "{WEB}"\nhooks = ["web"]\n')
        etc = self.mail.etc  # Dovecot reads the mail host's set where the certificate's files are
        for old, new in ((f"{tmp}/ssl/private/{MAIL}.key", f"{etc}/{MAIL}.key"), (f"{tmp}/ssl/{MAIL}.crt",
                         f"{etc}/{MAIL}.crt"), (f"{tmp}/ssl/{MAIL}.chain.pem", f"{etc}/{MAIL}.chain.pem"),
                         (f"{tmp}/ssl/{MAIL}.fullchain.pem", f"{etc}/{MAIL}.fullchain.pem")):
            text = text.replace(old, new)
        self.config_path = tmp / "certkeeper.toml"
        self.config_text = text
        self.config_path.write_text(text)
        self.config = parse(text, self.config_path)
        # Dovecot needs a set before it starts: a throwaway one (the first forced renewal replaces it).
        first = make_set((MAIL,))
        cert = self.config.certificate(MAIL)
        for path, data, mode in ((cert.key, first.key, 0o600), (cert.cert, first.cert, 0o644),
                                 (cert.chain, first.chain, 0o644), (cert.fullchain, first.fullchain, 0o644)):
            path.write_bytes(data)
            path.chmod(mode)
        self.mail.start_dovecot()
        self.proc: Process | None = None
        self.starts = 0

    # -- the daemon ----------------------------------------------------------------------------

    def start(self) -> None:
        self.starts += 1
        self.proc = Process("certkeeper", [sys.executable, "-c", PAUSING_DAEMON, str(self.control), "-c",
                                           str(self.config_path), "run", "-d"],
                            self.tmp / f"daemon-{self.starts}.log", cwd=ROOT)
        wait_for_port(self.https_port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def output(self) -> str:
        assert self.proc is not None
        return self.proc.output()

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc is not None and self.proc.popen.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, f"{text!r} not logged: {self.output()[-3000:]}"
            time.sleep(0.05)

    def cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "certkeeper", "-c", str(self.config_path), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def workers(self) -> list[int]:
        assert self.proc is not None
        return [pid for pid in process_tree(self.proc.popen.pid) if b"certkeeper.worker" in _cmdline(pid)]

    # -- pausing the keeper ----------------------------------------------------------------------

    def pause_at(self, step: Step, name: str) -> None:
        cert = self.config.certificate(name)
        suffix = step.suffix.format(name=name, key=cert.key.name, fullchain=cert.fullchain.name, hook=cert.hooks[0])
        self.control.write_text(f"{step.event}\n{suffix}")

    def wait_paused(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        paused = Path(f"{self.control}.paused")
        while not paused.exists():
            assert time.monotonic() < deadline, f"the keeper never reached the step: {self.output()[-3000:]}"
            time.sleep(0.01)

    def release(self) -> None:
        Path(f"{self.control}.paused").unlink(missing_ok=True)
        self.control.unlink(missing_ok=True)

    # -- what is served, what is on disk -----------------------------------------------------

    def on_disk(self, name: str) -> int:
        return certs.parse_cert(self.config.certificate(name).cert.read_bytes()).serial

    def served(self, name: str) -> int | None:
        """The serial a TLS handshake shows: the listener's for the MTA-STS host, Dovecot's for the mail host."""
        port = self.https_port if name == WEB else self.mail.imaps_port
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the serial is what is compared
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
        except OSError:
            return None
        return certs.parse_der(der).serial if der else None

    def hook_lines(self) -> list[str]:
        return self.hook_runs.read_text().splitlines() if self.hook_runs.exists() else []

    def owed(self) -> dict[str, tuple[str, ...]]:
        store = CertificateStore(self.config.state_dir)
        return {c.name: store.pending_reload(c) for c in self.config.certificates if store.pending_reload(c)}

    def settled(self, hooks_before: int, hooks_expected: dict[str, bool], since: float) -> tuple[bool, str]:
        """Whether, now, both served serials equal the disk's, each certificate's hook ran since the death
        if it had to, and no hook is owed any more; and what was seen."""
        seen = {name: (self.served(name), self.on_disk(name)) for name in NAMES}
        runs = self.hook_lines()[hooks_before:]
        ran = {MAIL: f"imap {MAIL}" in runs, WEB: f"web {WEB}" in runs}
        owed = self.owed()
        ok = all(s == d for s, d in seen.values()) and all(ran[n] for n, want in hooks_expected.items() if want) \
            and not owed
        return ok, f"after {time.monotonic() - since:.1f} s: served/disk {seen}, hook runs {runs}, owed {owed}"

    def wait_settled(self, hooks_before: int, hooks_expected: dict[str, bool], since: float) -> None:
        while True:
            ok, seen = self.settled(hooks_before, hooks_expected, since)
            if ok:
                break
            assert time.monotonic() < since + WITHIN, f"{seen}\n{self.output()[-4000:]}"
            time.sleep(0.1)
        runs = self.hook_lines()[hooks_before:]
        for name, want in hooks_expected.items():  # and none ran that had nothing to reload
            if not want:
                hook = "imap" if name == MAIL else "web"
                assert f"{hook} {name}" not in runs, runs


@pytest.fixture(scope="module")
def site(pebble, tmp_path_factory):
    require_binary("dovecot")
    bind = new_bind(tmp_path_factory.mktemp("bind"), zone="example.com")
    mail_root = Path(tempfile.mkdtemp(prefix="certkeeper-mail-", dir="/tmp"))
    mail_root.chmod(0o755)  # dovenull must traverse base_dir
    s = None
    try:
        s = Site(tmp_path_factory.mktemp("faults"), mail_root, pebble, bind)
        s.start()
        s.wait_for_log(f"{WEB}: renewed")
        s.wait_for_log("web: https://127.0.0.1")  # the start-up renewal's hook ran and was verified
        yield s
    finally:
        if s is not None:
            s.release()
            s.stop()
            s.mail.stop()
        bind.stop()
        shutil.rmtree(mail_root, ignore_errors=True)


def _renew_and_stop_at(site: Site, step: Step, name: str) -> subprocess.Popen[str]:
    site.pause_at(step, name)
    renew = site.cli("renew", "--force", name)
    try:
        site.wait_paused()
    except BaseException:
        renew.kill()
        renew.communicate()
        raise
    return renew


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_a_worker_killed_at_each_step_of_an_install(site, step):
    """The keeper goes on with the install it was asked for; the hooks the dead worker would have run are
    run by a worker of their own; the listener gets the new set. The certificate alternates by step."""
    name = NAMES[STEPS.index(step) % 2]
    old = site.on_disk(name)
    hooks_before = len(site.hook_lines())
    renew = _renew_and_stop_at(site, step, name)
    workers = site.workers()
    assert workers, "no network worker to kill"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    since = time.monotonic()
    site.release()
    out, _ = renew.communicate(timeout=60)
    assert renew.returncode == 1, out
    assert "the renew worker ended without a result" in out and "Traceback" not in out, out
    site.wait_settled(hooks_before, {name: True}, since)
    assert site.on_disk(name) != old  # the keeper finished the install the worker had asked for
    assert site.owed() == {}
    assert "a worker died before the services loaded the certificate on disk" in site.output()


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_the_keeper_killed_at_a_step_of_an_install_and_started_again(site, step):
    """The daemon itself dies (kill -9) mid-install: started again, it finishes an install whose journal
    was written, discards one whose was not, serves what is on disk, and runs the hooks a changed set
    is owed (and the owed reload of an install it discarded reloads the same set)."""
    name = NAMES[1 - STEPS.index(step) % 2]  # the other certificate than the worker's test at this step
    old = site.on_disk(name)
    hooks_before = len(site.hook_lines())
    renew = _renew_and_stop_at(site, step, name)
    assert site.proc is not None
    pids = process_tree(site.proc.popen.pid)
    os.kill(site.proc.popen.pid, signal.SIGKILL)
    site.proc.popen.wait(10)
    _gone(pids)  # the listener and the worker end with the keeper that started them
    site.release()
    out, _ = renew.communicate(timeout=60)
    assert renew.returncode == 1 and "Traceback" not in out, out
    assert bool(site.owed()) == step.owed
    since = time.monotonic()
    site.start()
    site.wait_settled(hooks_before, {name: step.owed, NAMES[1 - NAMES.index(name)]: False}, since)
    assert (site.on_disk(name) != old) == step.committed
    assert site.owed() == {}
    journals = list((site.config.state_dir / "journal").glob("*.json"))
    leftovers = list((site.tmp / "ssl").rglob("*certkeeper-new")) + list(site.mail.etc.glob("*certkeeper-new"))
    assert journals == [] and leftovers == []


# ---------------------------------------------------------------------------
# SIGHUP: all or nothing.


def _published_id(site: Site) -> list[str]:
    return site.bind.query("_mta-sts.example.com", "TXT")


def _policy(site: Site) -> bytes:
    context = ssl.create_default_context(cadata="".join(r.decode() for r in site.roots))
    with socket.create_connection(("127.0.0.1", site.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=WEB) as tls:
        tls.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {WEB}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


def _sighup(site: Site, text: str, expect: str) -> str:
    """Write ``text`` as the configuration, SIGHUP, and wait for the log line containing ``expect``: that line."""
    assert site.proc is not None
    before = site.output().count(expect)
    site.config_path.write_text(text)
    os.kill(site.proc.popen.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while site.output().count(expect) == before:
        assert time.monotonic() < deadline, site.output()[-3000:]
        time.sleep(0.05)
    return [line for line in site.output().splitlines() if expect in line][-1]


def test_sighup_that_names_an_unloadable_file_changes_nothing(site, tmp_path):
    from certkeeper.core.mtasts import Policy, render_txt

    deadline = time.monotonic() + 30
    expected_id = render_txt(Policy.from_config(site.config.mta_sts[0]).policy_id())
    while _published_id(site) != [expected_id]:
        assert time.monotonic() < deadline, site.output()[-3000:]
        time.sleep(0.1)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    web = site.config.certificate(WEB)
    changed_policy = site.config_text.replace('mode = "enforce"', 'mode = "testing"')
    bad_key = changed_policy.replace(f'key = "{web.key}"', f'key = "{garbage}"')
    assert bad_key != changed_policy != site.config_text
    nul = changed_policy.replace(f'cert = "{web.cert}"', f'cert = "{web.cert}\\u0000x"')
    assert nul != changed_policy
    try:
        for text, why in ((bad_key, f"{garbage}: not a PEM private key ([[certificate]] {WEB}, served by the "
                                     "listener)"), (nul, "contains a NUL byte")):
            line = _sighup(site, text, "configuration not reloaded")
            assert why in line, line
            assert _policy(site) == POLICY  # the running policy: nothing switched
            assert site.served(WEB) == site.on_disk(WEB)
            assert _published_id(site) == [expected_id]
            assert "internal error" not in site.output()
        # The fault lines are one each: nothing else was logged as an error by the refused reloads.
        refused = [x for x in site.output().splitlines() if "configuration not reloaded" in x]
        assert len(refused) == 2
        # A good one applies: the new policy is served and its id published.
        _sighup(site, changed_policy, "configuration reloaded")
        deadline = time.monotonic() + 30
        while _policy(site) == POLICY:
            assert time.monotonic() < deadline, site.output()[-3000:]
            time.sleep(0.1)
        assert b"mode: testing" in _policy(site)
    finally:
        site.config_path.write_text(site.config_text)
