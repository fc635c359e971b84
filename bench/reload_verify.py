"""Time from "files written" to "all endpoints verified" for real smtpd + dovecot on loopback.

    python bench/reload_verify.py [ROUNDS]

Starts OpenSMTPD 7.4 and Dovecot the way tests/fixtures/mailservices.py does
(same lock: only one smtpd per machine), then per round installs a new
certificate set with CertificateStore.install and times reload_and_verify:
the smtpd restart, the dovecot reload and the probes of all four endpoints
(smtp+starttls, smtps, imap+starttls, imaps). Prints figures; asserts nothing.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Loopback only, here and in every Python process started from here (see tests/loopback_only).
os.environ["PYTHONPATH"] = os.pathsep.join((str(ROOT / "tests" / "loopback_only"), str(ROOT)))
import tests.loopback_only.sitecustomize  # noqa: E402, F401
from certkeeper.core.config import Config, HookConfig  # noqa: E402
from certkeeper.keeper.service import LocalKeeper  # noqa: E402
from certkeeper.keeper.store import CertificateStore  # noqa: E402
from certkeeper.network import reload  # noqa: E402
from tests.certfactory import make_set  # noqa: E402
from tests.fixtures.mailservices import MailServices  # noqa: E402

NAME = "mail.example.test"


def main(rounds: int) -> int:
    missing = [b for b in ("smtpd", "dovecot", "doveadm") if not (shutil.which(b) or Path(f"/usr/sbin/{b}").exists())]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="certkeeper-bench-", dir="/tmp"))
    root.chmod(0o755)
    services = MailServices(root, (NAME,))  # dovenull must traverse root: 0755
    try:
        return run_rounds(services, root, rounds)
    finally:
        services.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_rounds(services: MailServices, root: Path, rounds: int) -> int:
    cert = services.certificate_config(NAME)
    store = CertificateStore(root / "state")
    store.install(cert, make_set((NAME,)))
    services.start()
    config = Config(path=root / "certkeeper.toml", state_dir=root / "state", certificates=(cert,), hooks={
        "smtpd": HookConfig("smtpd", services.smtpd_restart(), services.smtpd_urls, 30.0, 30.0),
        "dovecot": HookConfig("dovecot", services.dovecot_reload(), services.dovecot_urls, 30.0, 30.0),
    })
    totals: list[float] = []
    print(f"{'round':>5}  {'total':>8}  {'before':>8}  {'smtpd':>8}  {'dovecot':>8}  result")
    for i in range(1, rounds + 1):
        store.install(cert, make_set((NAME,)))
        marks = Marks()
        written = time.perf_counter()  # files written: install has returned
        result = reload.reload_and_verify(config, LocalKeeper(config, store=store), [cert], marks.add)
        done = time.perf_counter()
        smtpd, dovecot = marks.first("smtpd: reloading", done), marks.first("dovecot: reloading", done)
        totals.append(done - written)
        print(f"{i:>5}  {_ms(done - written)}  {_ms(smtpd - written)}  {_ms(dovecot - smtpd)}  {_ms(done - dovecot)}  "
              f"{'ok' if result.ok else result.failures}")
    print(f"files written -> all {len(services.smtpd_urls + services.dovecot_urls)} endpoints verified, "
          f"{rounds} rounds: min {min(totals) * 1000:.0f}ms, median {statistics.median(totals) * 1000:.0f}ms, "
          f"max {max(totals) * 1000:.0f}ms")
    return 0


class Marks:
    """The progress lines of one run, each with the time it arrived."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def add(self, line: str) -> None:
        self.lines.append((time.perf_counter(), line))

    def first(self, prefix: str, default: float) -> float:
        return next((t for t, line in self.lines if line.startswith(prefix)), default)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:>6.0f}ms"


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
