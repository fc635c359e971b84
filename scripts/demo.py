"""A demo of the main job on an embedded default, no root needed: high ports on 127.0.0.1.

It starts a local ACME server (Pebble, as in the tests) and a local DNS server
(BIND with the zone example.com, taking TSIG-signed updates), writes a config and
a state directory under ./demo-state/, runs the daemon (`certkeeper run -d`),
waits until it has obtained the certificates for mail.example.com and
mta-sts.example.com and published the `_mta-sts` id and TLSRPT record, shows
`certkeeper status`, fetches mta-sts.txt over HTTPS (SNI, verified against
Pebble's root), renews through the control socket, and stops everything. With
--keep-running the daemon stays up until Ctrl-C. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Loopback only, here and in every Python process started from here (see tests/loopback_only).
os.environ["PYTHONPATH"] = os.pathsep.join((str(ROOT / "tests" / "loopback_only"), str(ROOT)))
import tests.loopback_only.sitecustomize  # noqa: E402, F401
from tests.fixtures.bind import BindServer, new_bind  # noqa: E402
from tests.fixtures.pebble import Pebble, start_pebble  # noqa: E402
from tests.fixtures.peers import free_port  # noqa: E402

POLICY = """
[[mta_sts]]
domain = "example.com"
mode = "testing"
mx = ["mail.example.com"]
max_age = 86400
certificate = "mta-sts.example.com"

[tlsrpt]
rua = ["mailto:tlsrpt@example.com"]
"""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def certkeeper(conf: Path, *args: str) -> int:
    return subprocess.call([sys.executable, "-m", "certkeeper", "--config", str(conf), *args], cwd=ROOT)


def fetch_policy(port: int, ca: bytes) -> str:
    context = ssl.create_default_context(cadata=ca.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    conn.sock = context.wrap_socket(__import__("socket").create_connection(("127.0.0.1", port), timeout=5),
                                    server_hostname="mta-sts.example.com")
    conn.request("GET", "/.well-known/mta-sts.txt", headers={"Host": "mta-sts.example.com"})
    response = conn.getresponse()
    body = response.read().decode()
    return f"HTTP {response.status} {response.getheader('Content-Type')}\n{body}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(ROOT / "demo-state"), help="config and state directory")
    parser.add_argument("--keep-running", action="store_true", help="leave the daemon up until Ctrl-C")
    args = parser.parse_args()
    base = Path(args.dir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp, start_pebble(_reachable(Path(tmp)) / "pebble") as pebble:
        step(f"Pebble (a local ACME server) at {pebble.directory}; HTTP-01 on 127.0.0.1:{pebble.http01_port}")
        bind = new_bind(Path(tmp) / "bind", zone="example.com")
        try:
            step(f"BIND (a local DNS server) with the zone example.com at {bind.server}")
            conf, https_port = write_config(base, pebble, bind)
            print(f"config: {conf}\nstate:  {base / 'state'}")
            step("certkeeper check")
            if certkeeper(conf, "check") != 0:
                return 1
            return run_daemon(base, conf, pebble, bind, https_port, args.keep_running)
        finally:
            bind.stop()


def write_config(base: Path, pebble: Pebble, bind: BindServer) -> tuple[Path, int]:
    """The two certificates, the policy, TLSRPT, and [dns] for the local BIND; returns (path, HTTPS port)."""
    https_port = free_port()
    roots = base / "pebble-roots.pem"
    roots.write_bytes(b"".join(pebble.issuer_roots()))
    # The daemon checks its own policy at 127.0.0.1 (SNI mta-sts.example.com) before publishing the id.
    dns = bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{https_port}", mta_sts_fetch_ca=str(roots))
    conf = base / "certkeeper.toml"
    conf.write_text(pebble.config_text(base, ["mail.example.com", "mta-sts.example.com"],
                                       tls_listen=[f"127.0.0.1:{https_port}"], extra=POLICY + dns))
    return conf, https_port


def wait_until(done: Callable[[], bool], daemon: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if daemon.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_daemon(base: Path, conf: Path, pebble: Pebble, bind: BindServer, https_port: int, keep_running: bool) -> int:
    step("certkeeper run -d (the daemon: HTTP-01 listener, mta-sts.txt over HTTPS, scheduler)")
    log_path = base / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "certkeeper", "--config", str(conf), "run", "-d"],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        fullchains = [base / "ssl" / f"{n}.fullchain.pem" for n in ("mail.example.com", "mta-sts.example.com")]
        if not wait_until(lambda: all(p.exists() for p in fullchains), daemon):
            print(log_path.read_text())
            return 1
        wait_until(lambda: bool(bind.query("_mta-sts.example.com", "TXT")), daemon, timeout=30)
        print(log_path.read_text().rstrip())
        step("certkeeper status")
        certkeeper(conf, "status")
        step("the records the daemon published, as BIND answers them")
        for name in ("_mta-sts.example.com", "_smtp._tls.example.com"):
            print(f"{name} TXT {bind.query(name, 'TXT')}")
        step(f"GET https://mta-sts.example.com:{https_port}/.well-known/mta-sts.txt (trusting only Pebble's root)")
        print(fetch_policy(https_port, b"".join(pebble.issuer_roots())))
        step("certkeeper renew --force (carried out by the daemon through its control socket)")
        certkeeper(conf, "renew", "--force")
        if keep_running:
            step("daemon running; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                daemon.wait()
    finally:
        step("stopping the daemon (SIGTERM)")
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        print(f"exit code {daemon.returncode}; files under {base}")
    return 0 if daemon.returncode == 0 else 1


def _reachable(directory: Path) -> Path:
    """Run as root, certkeeper's network worker is _certkeeper: it must reach Pebble's CA file in here."""
    directory.chmod(0o711)
    return directory


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

