"""Load on ``certkeeper run``'s listeners (issue 12): prints figures, asserts nothing.

    python bench/listener_load.py [--seconds 30] [--idle 1100] [--half-open 2000] [--sources 50]

The daemon runs on a private Pebble and BIND, on 127.0.0.1 high ports, with a descriptor
limit of 1024 (soft and hard, so that lifting the soft limit does not help: only the caps do).

1. idle flood: ``--idle`` connections to the HTTP port from ``--sources`` addresses
   (127.0.0.2 and up), each reopened as soon as the daemon closes it, for ``--seconds``;
   meanwhile a probe from 127.0.0.1 fetches mta-sts.txt over HTTPS every second, the CLI
   runs ``status`` and a SIGHUP is sent. Prints the probe success rate (>= 98 % expected),
   whether ``status`` answered and the reload was applied, and the daemon's descriptors.
2. half-open TLS: ``--half-open`` TCP connections to the HTTPS port that never send a
   ClientHello, reopened when closed; the daemon's RSS before, at the peak during, and
   a few seconds after they are closed (expected: peak < idle + 64 MB, after near idle).

Everything it starts is stopped at the end; nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join((str(ROOT / "tests" / "loopback_only"), str(ROOT)))
import tests.loopback_only.sitecustomize  # noqa: E402, F401
from tests.fixtures.bind import BindServer, new_bind  # noqa: E402
from tests.fixtures.load import IdleFlood, Probe, open_fds, rss_kib, sources  # noqa: E402
from tests.fixtures.pebble import Pebble, start_pebble  # noqa: E402
from tests.fixtures.peers import Process, free_port, wait_for_port  # noqa: E402
from tests.fixtures.site import MTA_STS, NAMES, POLICY  # noqa: E402

NOFILE = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
          "os.execv(sys.executable, [sys.executable, '-m', 'certkeeper', *sys.argv[1:]])")


def wait_for_log(proc: Process, text: str, timeout: float, after: int = 0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in proc.output()[after:]:
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--half-open", type=int, default=2000)
    parser.add_argument("--sources", type=int, default=50)
    parser.add_argument("--nofile", type=int, default=1024, help="soft and hard RLIMIT_NOFILE of the daemon")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ck-listener-load-"))
    with start_pebble(work / "pebble") as pebble:
        bind = new_bind(work / "bind", zone="example.com")
        try:
            return run(args, work, pebble, bind)
        finally:
            bind.stop()


def run(args: argparse.Namespace, work: Path, pebble: Pebble, bind: BindServer) -> int:
    proc = None
    try:
        https_port = free_port()
        roots = work / "roots.pem"
        roots.write_bytes(b"".join(pebble.issuer_roots()))
        dns = bind.dns_toml(mta_sts_fetch_address=f"127.0.0.1:{https_port}", mta_sts_fetch_ca=str(roots))
        text = pebble.config_text(work, NAMES, http_listen=[f"127.0.0.1:{pebble.http01_port}"],
                                  tls_listen=[f"127.0.0.1:{https_port}"], extra=MTA_STS + dns)
        config = work / "certkeeper.toml"
        config.write_text(text)
        wrapper = NOFILE.format(soft=args.nofile, hard=args.nofile)
        proc = Process("certkeeper", [sys.executable, "-c", wrapper, "-c", str(config), "run", "-d"],
                       work / "daemon.log", cwd=ROOT)
        wait_for_port(https_port, proc=proc)
        if not wait_for_log(proc, "mta-sts.example.com: serving the new certificate", 90):
            print(proc.output()[-3000:])
            return 1
        context = ssl.create_default_context(cadata="".join(r.decode() for r in pebble.issuer_roots()))
        pid = proc.popen.pid
        time.sleep(2)
        print(f"daemon pid {pid}, RLIMIT_NOFILE {args.nofile}:{args.nofile}, "
              f"{args.sources} source addresses from 127.0.0.2; RSS at start {rss_kib(pid) / 1024:.1f} MB")

        # 1. The idle flood.
        flood = IdleFlood(pebble.http01_port, args.idle, sources(args.sources)).start()
        flood.wait_for_live(int(args.idle * 0.4), timeout=30)
        probe = Probe(https_port, context, POLICY, interval=1.0).start()
        started = time.monotonic()
        max_fds = 0
        status_ok = reload_ok = False
        status_seconds = 0.0
        while time.monotonic() - started < args.seconds:
            max_fds = max(max_fds, open_fds(pid))
            if not status_ok and time.monotonic() - started > args.seconds / 3:
                t0 = time.monotonic()
                status = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config), "status"],
                                        capture_output=True, text=True, timeout=120, cwd=ROOT)
                status_seconds = time.monotonic() - t0
                status_ok = status.returncode == 0 and "mta-sts.example.com" in status.stdout
            if not reload_ok and time.monotonic() - started > args.seconds / 2:
                mark = len(proc.output())
                os.kill(pid, signal.SIGHUP)
                reload_ok = wait_for_log(proc, "configuration reloaded", 20, after=mark)
            time.sleep(0.5)
        result = probe.stop()
        stats = flood.stop()
        print(f"idle flood: {args.idle} connections for {args.seconds:.0f} s: client saw at most {stats.peak} open, "
              f"{stats.opened} opened, {stats.closed_by_server} closed by the daemon, {stats.refused} refused")
        print(f"  probe from 127.0.0.1: {result.successes}/{result.attempts} = {100 * result.rate:.1f} % "
              f"succeeded{'; first errors: ' + '; '.join(result.errors[:3]) if result.errors else ''}")
        print(f"  status answered: {status_ok} ({status_seconds:.1f} s); SIGHUP applied: {reload_ok}; "
              f"daemon descriptors at most {max_fds} of {args.nofile}")

        # 2. Half-open TLS connections.
        time.sleep(3)
        idle = rss_kib(pid)
        half = IdleFlood(https_port, args.half_open, sources(args.sources), reopen_delay=0.5).start()
        peak = idle
        started = time.monotonic()
        while time.monotonic() - started < min(args.seconds, 15):
            peak = max(peak, rss_kib(pid))
            time.sleep(0.2)
        half_stats = half.stop()
        time.sleep(5)
        after = rss_kib(pid)
        print(f"half-open TLS: {args.half_open} connections held and reopened for {min(args.seconds, 15):.0f} s "
              f"({half_stats.opened} opened, {half_stats.closed_by_server} closed by the daemon)")
        print(f"  RSS idle {idle / 1024:.1f} MB, peak {peak / 1024:.1f} MB (+{(peak - idle) / 1024:.1f} MB), "
              f"5 s after {after / 1024:.1f} MB (+{(after - idle) / 1024:.1f} MB)")
        log = proc.output()
        print(f"daemon log: {log.count('Traceback')} tracebacks, {log.count('Too many open files')} "
              f"'Too many open files', {len(log.splitlines())} lines")
        return 0
    finally:
        if proc is not None:
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
