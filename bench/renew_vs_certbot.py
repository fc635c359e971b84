"""Wall time of `certkeeper renew --force` for one certificate beside certbot's
`certonly --standalone`, both against the same local Pebble. Prints figures; asserts nothing.

    python3 bench/renew_vs_certbot.py [--runs 5]

certbot comes from PyPI into its own venv under /tmp (created on first use); certkeeper is installed
from this checkout into a venv of its own beside it, as the README's production install does (a
non-editable install, byte-compiled, no path hooks of a development checkout), at each run.
Targets: certkeeper <= 0.3 x certbot (issue 2); through the privilege split, where each run starts a
network worker and (for the HTTP-01 challenge) the listener: <= 0.2 x (issue 10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Loopback only, here and in every Python process started from here (see tests/loopback_only).
os.environ["PYTHONPATH"] = os.pathsep.join((str(ROOT / "tests" / "loopback_only"), str(ROOT)))
import tests.loopback_only.sitecustomize  # noqa: E402, F401
from tests.fixtures.pebble import start_pebble  # noqa: E402

CERTBOT_VENV = Path("/tmp/certkeeper-bench-certbot")
CERTKEEPER_VENV = Path("/tmp/certkeeper-bench-certkeeper")


def certbot() -> Path:
    exe = CERTBOT_VENV / "bin" / "certbot"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CERTBOT_VENV)], check=True)
        subprocess.run([str(CERTBOT_VENV / "bin" / "pip"), "install", "-q", "certbot"], check=True)
    return exe


def certkeeper() -> Path:
    """This checkout, installed into its own venv (dependencies once, certkeeper itself each time)."""
    python = CERTKEEPER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CERTKEEPER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
                   check=True)
    # Run as root, the network worker and the listener are _certkeeper: they must reach the interpreter.
    subprocess.run([str(python), str(ROOT / "scripts" / "reachable.py")], check=True)
    return python


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}): {result.stdout[-500:]} {result.stderr[-1500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    certbot_exe = certbot()
    python = certkeeper()
    with tempfile.TemporaryDirectory() as tmp, start_pebble(Path(tmp) / "pebble") as pebble:
        work = Path(tmp)
        work.chmod(0o711)  # run as root, certkeeper's network worker and listener are _certkeeper
        conf = work / "certkeeper.toml"
        conf.write_text(pebble.config_text(work, ["mail.example.com"]))
        ck = [str(python), "-m", "certkeeper", "--config", str(conf), "renew", "--force", "mail.example.com"]
        installed = {"PYTHONPATH": str(ROOT / "tests" / "loopback_only")}  # the venv's certkeeper, not ROOT's
        cb_dir = work / "certbot"
        cb = [str(certbot_exe), "certonly", "--standalone", "--non-interactive", "--agree-tos",
              "-m", "postmaster@example.com", "--server", pebble.directory,
              "--http-01-port", str(pebble.http01_port), "--http-01-address", "127.0.0.1",
              "--config-dir", str(cb_dir / "etc"), "--work-dir", str(cb_dir / "work"),
              "--logs-dir", str(cb_dir / "logs"), "--force-renewal", "-d", "mail.example.com"]
        env = {"REQUESTS_CA_BUNDLE": str(pebble.ca_file)}
        timed(ck, installed, work)  # account registration happens once, as in real life
        timed(cb, env)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.runs):  # alternated: both see the same load on a shared machine
            ours.append(timed(ck, installed, work))
            theirs.append(timed(cb, env))

    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    print(f"certkeeper renew --force, 1 certificate: median {ours_median:.3f} s over {args.runs} runs "
          f"(min {min(ours):.3f}, max {max(ours):.3f})")
    print(f"certbot certonly --standalone:          median {theirs_median:.3f} s over {args.runs} runs "
          f"(min {min(theirs):.3f}, max {max(theirs):.3f})")
    print(f"ratio certkeeper / certbot: {ours_median / theirs_median:.2f} (target <= 0.20 through the split; "
          f"fastest runs: {min(ours) / min(theirs):.2f})")


if __name__ == "__main__":
    main()
