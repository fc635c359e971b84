"""A demo of the main job on an embedded default, no root needed: high ports on 127.0.0.1.

It starts a local ACME server (Pebble, as in the tests), writes a config and a
state directory under ./demo-state/, runs the daemon (`certkeeper run -d`), waits
until it has obtained the certificates for mail.example.com and
mta-sts.example.com, shows `certkeeper status`, fetches mta-sts.txt over HTTPS
(SNI, verified against Pebble's root), renews through the control socket, and
stops everything. With --keep-running the daemon stays up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.pebble import start_pebble  # noqa: E402
from tests.fixtures.peers import free_port  # noqa: E402

POLICY = """
[[mta_sts]]
domain = "example.com"
mode = "testing"
mx = ["mail.example.com"]
max_age = 86400
certificate = "mta-sts.example.com"
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
    with tempfile.TemporaryDirectory() as tmp, start_pebble(Path(tmp) / "pebble") as pebble:
        step(f"Pebble (a local ACME server) at {pebble.directory}; HTTP-01 on 127.0.0.1:{pebble.http01_port}")
        https_port = free_port()
        conf = base / "certkeeper.toml"
        conf.write_text(pebble.config_text(base, ["mail.example.com", "mta-sts.example.com"],
                                           tls_listen=[f"127.0.0.1:{https_port}"], extra=POLICY))
        print(f"config: {conf}\nstate:  {base / 'state'}")
        step("certkeeper check")
        if certkeeper(conf, "check") != 0:
            return 1
        step("certkeeper run -d (the daemon: HTTP-01 listener, mta-sts.txt over HTTPS, scheduler)")
        log = open(base / "daemon.log", "wb")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen([sys.executable, "-m", "certkeeper", "--config", str(conf), "run", "-d"],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            fullchains = [base / "ssl" / f"{n}.fullchain.pem" for n in ("mail.example.com", "mta-sts.example.com")]
            deadline = time.monotonic() + 60
            while not all(p.exists() for p in fullchains) and time.monotonic() < deadline:
                if daemon.poll() is not None:
                    print((base / "daemon.log").read_text())
                    return 1
                time.sleep(0.1)
            time.sleep(0.5)
            print((base / "daemon.log").read_text().rstrip())
            step("certkeeper status")
            certkeeper(conf, "status")
            step(f"GET https://mta-sts.example.com:{https_port}/.well-known/mta-sts.txt (trusting only Pebble's root)")
            print(fetch_policy(https_port, b"".join(pebble.issuer_roots())))
            step("certkeeper renew --force (carried out by the daemon through its control socket)")
            certkeeper(conf, "renew", "--force")
            if args.keep_running:
                step("daemon running; Ctrl-C to stop")
                try:
                    daemon.wait()
                except KeyboardInterrupt:
                    pass
        finally:
            step("stopping the daemon (SIGTERM)")
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            log.close()
            print(f"exit code {daemon.returncode}; files under {base}")
    return 0 if daemon.returncode == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
