"""The service's own commands, for a host with neither rcctl nor systemd.

Run as ``python3 -m certkeeper.keeper.hooks.direct ACTION SERVICE`` (the built-in
hooks' "direct" command); exits 0 when done, else 1 with one line on stderr:

- ``restart smtpd``: OpenSMTPD has no reload and 7.4's smtpctl no stop. The
  running smtpd (the parent process; its children carry ``smtpd: NAME`` titles)
  is restarted with the arguments it was started with, less ``-d``/``-F`` (the
  new one detaches, as an init script's would). Its configuration is checked
  first (``smtpd -n``): a broken one leaves the running smtpd alone. Then
  SIGTERM, a bounded wait for it to exit, and the start; the new smtpd must
  answer ``smtpctl show status``. Without a running smtpd it is started with
  its defaults (``/etc/smtpd.conf``).
- ``reload rspamd``: SIGHUP to rspamd's main process (title ``rspamd: main
  process``), as Debian's unit does; rspamd re-reads its configuration and maps.

Processes are found through /proc (Linux), so this module is for Linux hosts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
STOP_WAIT = 15.0  # seconds for the old smtpd to exit before SIGKILL
START_WAIT = 15.0  # seconds for the new smtpd to answer smtpctl
SMTPD_VALUE_OPTIONS = frozenset("DfPT")  # smtpd(8) options that take a value
FOREGROUND_FLAGS = frozenset("dF")


class Failed(Exception):
    """One line for stderr."""


def processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process whose command line can be read (argv as set by the process)."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]
        if argv and argv != [""]:
            yield int(entry.name), argv


def alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def smtpd_parents() -> list[tuple[int, list[str]]]:
    """The running smtpd parent processes: argv[0] is the program, not a ``smtpd: NAME`` title."""
    return [(pid, argv) for pid, argv in processes()
            if os.path.basename(argv[0]) == "smtpd" and not argv[0].startswith("smtpd:")]


def detached(argv: list[str]) -> list[str]:
    """``argv`` without the foreground flags (-d, -F), values of -D/-f/-P/-T kept as they are."""
    out = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith("-") and len(arg) > 1 and arg != "--":
            letters = arg[1:]
            value_at = next((i for i, c in enumerate(letters) if c in SMTPD_VALUE_OPTIONS), None)
            flags = letters if value_at is None else letters[:value_at]
            rest = "" if value_at is None else letters[value_at:]
            kept = "".join(c for c in flags if c not in FOREGROUND_FLAGS) + rest
            if kept:
                out.append("-" + kept)
            if value_at is not None and len(rest) == 1:  # the value is the next argument
                value = next(args, None)
                if value is not None:
                    out.append(value)
        else:
            out.append(arg)
    return out


def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` with its output in a temp file (a daemon keeping it open cannot hang us)."""
    with tempfile.TemporaryFile() as out:
        try:
            code = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   timeout=timeout, start_new_session=True)
        except OSError as exc:
            raise Failed(f"{argv[0]}: cannot run: {exc.strerror or exc}") from None
        except subprocess.TimeoutExpired:
            raise Failed(f"{' '.join(argv)}: did not finish in {timeout:g}s") from None
        out.seek(0)
        text = " ".join(out.read().decode(errors="replace").split())
    return code, text


def restart_smtpd() -> str:
    running = smtpd_parents()
    if len(running) > 1:
        raise Failed(f"more than one smtpd runs (pids {', '.join(str(p) for p, _ in running)}); restart it yourself")
    smtpd = shutil.which("smtpd") or "/usr/sbin/smtpd"
    argv = detached(running[0][1]) if running else [smtpd]
    code, text = _run([*argv, "-n"], 30)
    if code:
        raise Failed(f"{' '.join(argv)} -n: exit {code}: {text} (smtpd left running with its old configuration)")
    if running:
        pid = running[0][0]
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_WAIT
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
    code, text = _run(argv, 60)
    if code:
        raise Failed(f"{' '.join(argv)}: exit {code}: {text}")
    smtpctl = shutil.which("smtpctl")
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if smtpd_parents() and (smtpctl is None or _run([smtpctl, "show", "status"], 10)[0] == 0):
            return f"restarted: {' '.join(argv)}"
        time.sleep(0.05)
    raise Failed(f"{' '.join(argv)}: smtpd is not answering smtpctl after {START_WAIT:g}s")


def reload_rspamd() -> str:
    mains = [pid for pid, argv in processes() if argv[0].startswith("rspamd: main process")]
    if not mains:
        raise Failed("rspamd is not running (no 'rspamd: main process')")
    for pid in mains:
        os.kill(pid, signal.SIGHUP)
    return f"sent SIGHUP to rspamd (pid {', '.join(str(p) for p in mains)})"


ACTIONS = {("restart", "smtpd"): restart_smtpd, ("reload", "rspamd"): reload_rspamd}


def main(argv: list[str]) -> int:
    action = ACTIONS.get((argv[0], argv[1])) if len(argv) == 2 else None
    if action is None:
        print(f"usage: python3 -m certkeeper.keeper.hooks.direct "
              f"{'|'.join(f'{a} {s}' for a, s in ACTIONS)}", file=sys.stderr)
        return 1
    try:
        print(action())
    except Failed as exc:
        print(f"{argv[1]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
