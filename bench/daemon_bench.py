"""Benchmark of ``certkeeper run`` beside Caddy, nginx and certbot, on one private Pebble.

Prints figures; asserts nothing. Run from the repository root:

    python bench/daemon_bench.py [--skip-certbot] [--many 100]

1. time from start with empty state to both certificates obtained (certkeeper, Caddy);
2. idle RSS after start-up with two certificates (certkeeper, Caddy), and the ratio;
3. requests per second of mta-sts.txt over HTTPS with wrk: certkeeper beside nginx
   (one worker process, the same certificate and file), as a ratio;
4. wall time for certkeeper to obtain N (100) certificates at start-up beside
   certbot's time for 10 in a loop (scaled to N), as a ratio.

Needs the Debian packages pebble, pebble-challtestsrv, caddy, wrk and nginx-light
(or nginx), and certbot in a venv (``--certbot /tmp/ck-certbot/bin/certbot``; made
with ``python -m venv /tmp/ck-certbot && /tmp/ck-certbot/bin/pip install certbot``).
Everything listens on 127.0.0.1 high ports and is stopped at the end.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import ssl
import statistics
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
from tests.fixtures.peers import Process, free_port, wait_for_port  # noqa: E402
from tests.fixtures.site import MTA_STS, POLICY  # noqa: E402 - the guide's two hosts, as the tests have them

NAMES = ("mta-sts.example.com", "mail.example.com")
IDLE_SETTLE = 3.0  # seconds after start-up before RSS is read
WRK_SECONDS = 5
WRK_ROUNDS = 5  # interleaved with nginx; the median of each (the machine is shared, single runs are noisy)


def wait_until(done: Callable[[], bool], timeout: float, what: str, proc: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.output()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}" + (f": {proc.output()[-2000:]}" if proc else ""))
        time.sleep(0.02)


def event_loop() -> str:
    """The loop ``certkeeper run`` uses here (``daemon.run_loop``): uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop is not installed)"
    return f"uvloop {uvloop.__version__}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------
# certkeeper


def certkeeper_config(pebble: Pebble, workdir: Path, names: tuple[str, ...], https_port: int, extra: str) -> Path:
    path = workdir / "certkeeper.toml"
    path.write_text(pebble.config_text(workdir, names, tls_listen=[f"127.0.0.1:{https_port}"], extra=extra))
    return path


def start_certkeeper(config: Path, workdir: Path) -> Process:
    return Process("certkeeper", [sys.executable, "-m", "certkeeper", "-c", str(config), "run", "-d"],
                   workdir / "certkeeper.log", cwd=ROOT)


def certkeeper_obtained(workdir: Path, names: tuple[str, ...]) -> Callable[[], bool]:
    return lambda: all((workdir / "ssl" / f"{name}.fullchain.pem").exists() for name in names)


def bench_certkeeper_start(pebble: Pebble, workdir: Path, bind: BindServer) -> tuple[float, float, Process, int]:
    """(seconds to both certificates, idle RSS MB, the running process, its HTTPS port)."""
    https_port = free_port()
    roots = workdir / "pebble-roots.pem"
    roots.write_bytes(b"".join(pebble.issuer_roots()))
    # The MTA-STS id goes to a local BIND, after the daemon fetched its own policy at 127.0.0.1.
    dns = bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{https_port}", mta_sts_fetch_ca=str(roots))
    config = certkeeper_config(pebble, workdir, NAMES, https_port, MTA_STS + dns)
    started = time.monotonic()
    proc = start_certkeeper(config, workdir)
    wait_until(certkeeper_obtained(workdir, NAMES), 120, "certkeeper's two certificates", proc)
    elapsed = time.monotonic() - started
    time.sleep(IDLE_SETTLE)
    return elapsed, rss_mb(proc.popen.pid), proc, https_port


def bench_certkeeper_many(pebble: Pebble, workdir: Path, count: int) -> float:
    names = tuple(f"host{i:03d}.example.org" for i in range(count))
    config = certkeeper_config(pebble, workdir, names, free_port(), "")
    started = time.monotonic()
    proc = start_certkeeper(config, workdir)
    try:
        wait_until(certkeeper_obtained(workdir, names), 1800, f"certkeeper's {count} certificates", proc)
        return time.monotonic() - started
    finally:
        proc.stop()


# ---------------------------------------------------------------------------
# Caddy


def bench_caddy_start(pebble: Pebble, workdir: Path) -> tuple[float, float]:
    caddy = shutil.which("caddy")
    if caddy is None:
        raise RuntimeError("caddy is not installed (apt-get install caddy)")
    https_port = free_port()
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(f"""{{
    admin off
    http_port {pebble.http01_port}
    https_port {https_port}
    storage file_system {{
        root {workdir}/storage
    }}
    acme_ca {pebble.directory}
    acme_ca_root {pebble.ca_file}
    email postmaster@example.com
    ocsp_stapling off
}}

{", ".join(NAMES)} {{
    tls {{
        issuer acme {{
            disable_tlsalpn_challenge
        }}
    }}
    respond /.well-known/mta-sts.txt `{POLICY.decode()}` 200
}}
""")
    env = {"HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data"), "XDG_CONFIG_HOME": str(workdir / "cfg")}
    started = time.monotonic()
    proc = Process("caddy", [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                   workdir / "caddy.log", env=env)
    try:
        def obtained() -> bool:
            return all(glob.glob(f"{workdir}/storage/certificates/*/{name}/{name}.crt") for name in NAMES)

        wait_until(obtained, 120, "Caddy's two certificates", proc)
        elapsed = time.monotonic() - started
        time.sleep(IDLE_SETTLE)
        return elapsed, rss_mb(proc.popen.pid)
    finally:
        proc.stop()


# ---------------------------------------------------------------------------
# wrk against certkeeper and nginx


def fetch_policy(port: int) -> bytes:
    """One GET of mta-sts.txt (SNI and Host mta-sts.example.com), to check what wrk will measure."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="mta-sts.example.com") as tls:
            tls.sendall(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.com\r\n"
                        b"Connection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    return answer


def wrk_rps(port: int) -> tuple[float, str]:
    """Requests/s for mta-sts.txt at 127.0.0.1:port with Host mta-sts.example.com; and the error summary."""
    answer = fetch_policy(port)
    if not answer.startswith(b"HTTP/1.1 200") or not answer.endswith(POLICY):
        raise RuntimeError(f"127.0.0.1:{port} does not serve the policy: {answer[:300]!r}")
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{WRK_SECONDS}s", "-H", "Host: mta-sts.example.com",
         f"https://127.0.0.1:{port}/.well-known/mta-sts.txt"],
        capture_output=True, text=True, timeout=WRK_SECONDS + 60).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = "; ".join(line.strip() for line in out.splitlines() if "Non-2xx" in line or "errors" in line)
    return (float(match.group(1)) if match else 0.0), errors


def start_nginx(workdir: Path, cert_dir: Path) -> tuple[Process, int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    docroot = workdir / "www" / ".well-known"
    docroot.mkdir(parents=True)
    for directory in (workdir, workdir / "www", docroot):
        directory.chmod(0o755)
    (docroot / "mta-sts.txt").write_bytes(POLICY)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp; proxy_temp_path {workdir}/tmp; fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp; scgi_temp_path {workdir}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name mta-sts.example.com;
        ssl_certificate {cert_dir}/mta-sts.example.com.fullchain.pem;
        ssl_certificate_key {cert_dir}/private/mta-sts.example.com.key;
        location = /.well-known/mta-sts.txt {{
            root {workdir}/www;
            default_type text/plain;
        }}
    }}
}}
""")
    (workdir / "tmp").mkdir()
    proc = Process("nginx", [nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                   workdir / "nginx.log")
    wait_for_port(port, proc=proc)
    return proc, port


# ---------------------------------------------------------------------------
# certbot


def bench_certbot(pebble: Pebble, workdir: Path, certbot: str, count: int) -> float:
    env = {"REQUESTS_CA_BUNDLE": str(pebble.ca_file)}
    started = time.monotonic()
    for i in range(count):
        argv = [certbot, "certonly", "--standalone", "--non-interactive", "--agree-tos",
                "--register-unsafely-without-email", "--server", pebble.directory,
                "--http-01-port", str(pebble.http01_port), "--http-01-address", "127.0.0.1",
                "--config-dir", str(workdir / "etc"), "--work-dir", str(workdir / "work"),
                "--logs-dir", str(workdir / "logs"), "-d", f"certbot{i:02d}.example.org"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        if result.returncode != 0:
            raise RuntimeError(f"certbot failed: {result.stderr[-1500:]}")
    return time.monotonic() - started


# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=100, help="certificates for the start-up bench (default 100)")
    parser.add_argument("--certbot-runs", type=int, default=10)
    parser.add_argument("--certbot", default="/tmp/ck-certbot/bin/certbot")
    parser.add_argument("--skip-certbot", action="store_true")
    parser.add_argument("--skip-caddy", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ck-bench-"))
    work.chmod(0o755)  # nginx's worker process runs as another user
    print(f"work directory: {work}")
    print(f"certkeeper event loop: {event_loop()}")
    with start_pebble(work / "pebble") as pebble:
        bind = new_bind(work / "bind", zone="example.com")
        try:
            run_all(pebble, work, args, bind)
        finally:
            bind.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run_all(pebble: Pebble, work: Path, args: argparse.Namespace, bind: BindServer) -> None:
    ck_dir = work / "certkeeper"
    ck_dir.mkdir()
    ck_time, ck_rss, ck_proc, ck_port = bench_certkeeper_start(pebble, ck_dir, bind)
    try:
        print(f"start to both certificates: certkeeper {ck_time:6.2f} s")
        print(f"idle RSS, two certificates: certkeeper {ck_rss:6.1f} MB")
        ng_proc, ng_port = start_nginx(work / "nginx", ck_dir / "ssl")
        try:
            # Interleaved rounds, median of each: the machine is shared, single runs are noisy.
            rounds = [(wrk_rps(ck_port), wrk_rps(ng_port)) for _ in range(WRK_ROUNDS)]
        finally:
            ng_proc.stop()
        ck_rps = statistics.median(ck for (ck, _), _ in rounds)
        ng_rps = statistics.median(ng for _, (ng, _) in rounds)
        errors = "; ".join(sorted({e for (_, e1), (_, e2) in rounds for e in (e1, e2) if e}))
        print(f"mta-sts.txt over HTTPS:     certkeeper {ck_rps:8.0f} req/s (median of {WRK_ROUNDS})")
        print(f"mta-sts.txt over HTTPS:     nginx      {ng_rps:8.0f} req/s (median of {WRK_ROUNDS}, "
              f"1 worker process) {errors}")
        print(f"  ratio certkeeper/nginx: {ck_rps / ng_rps if ng_rps else float('nan'):.2f} (target >= 0.3)")
    finally:
        ck_proc.stop()
    if not args.skip_caddy:
        caddy_dir = work / "caddy"
        caddy_dir.mkdir()
        caddy_time, caddy_rss = bench_caddy_start(pebble, caddy_dir)
        print(f"start to both certificates: Caddy      {caddy_time:6.2f} s"
              f"   (certkeeper/Caddy {ck_time / caddy_time:.2f})")
        print(f"idle RSS, two certificates: Caddy      {caddy_rss:6.1f} MB"
              f"  (certkeeper/Caddy {ck_rss / caddy_rss:.2f}, target <= 1.5)")
    many_dir = work / "many"
    many_dir.mkdir()
    many = bench_certkeeper_many(pebble, many_dir, args.many)
    print(f"{args.many} certificates at start-up: certkeeper {many:7.2f} s")
    if not args.skip_certbot:
        certbot_dir = work / "certbot"
        certbot_dir.mkdir()
        runs = args.certbot_runs
        certbot_time = bench_certbot(pebble, certbot_dir, args.certbot, runs)
        scaled = certbot_time * args.many / runs
        print(f"certbot, {runs} in a loop: {certbot_time:7.2f} s, scaled to {args.many}: {scaled:7.2f} s")
        print(f"  ratio certbot/certkeeper: {scaled / many:.1f} x (target >= 10)")


if __name__ == "__main__":
    sys.exit(main())
