"""Reload hooks: how a service picks up a new certificate, and where to check it.

A hook has exactly two things (certmagic keeps its seams this small):

- ``command``: the argv that makes the service load the files now on disk
  (run once per run, after every certificate that uses the hook is in place);
- ``verify``: the endpoints (``smtps://127.0.0.1:465`` ...) where the service
  must then serve the certificate on disk (``certkeeper.network.verification`` probes them).

This package owns the one place certkeeper runs a program (``run_command``,
also used for ``[alerts] command`` and ``sendmail``): argv only, never a shell;
a timeout that kills the command's whole session; stdin, stdout and stderr
through temp files (never a pipe, so a daemon that keeps its output open
cannot hang us); the output reported as one line. One module per service
kind knows its default command for each service manager: ``smtpd``, ``dovecot``,
``httpd``, ``rspamd``, ``relayd``; ``command`` is any argv. Which manager runs
this host is found when a hook runs (``service_manager``): rcctl on OpenBSD,
systemctl where systemd runs (``/run/systemd/system`` exists, sd_booted(3)),
otherwise the service's own command (``certkeeper.keeper.hooks.direct``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

from certkeeper.core.config import Config, HookConfig, hook_config
from certkeeper.core.files import inherited_umask
from certkeeper.keeper.hooks import command, dovecot, httpd, relayd, rspamd, smtpd

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 400  # characters of a command's output kept in a report line
OUTPUT_TAIL = 65536  # bytes of a command's output read back (errors come last)


# The file system root the service manager is looked for under (tests point it at a fake tree).
ROOT = Path("/")
SYSTEMD_RUNTIME = "run/systemd/system"  # sd_booted(3): exists only while systemd is PID 1


def service_manager(root: Path | None = None) -> str:
    """"rcctl" on OpenBSD (or wherever rcctl is on PATH), "systemd" where systemd runs, else "direct"."""
    if sys.platform.startswith("openbsd") or shutil.which("rcctl"):
        return "rcctl"
    if ((root or ROOT) / SYSTEMD_RUNTIME).is_dir():
        return "systemd"
    return "direct"


@dataclass(frozen=True)
class HookKind:
    """What one service module knows: its command per service manager and where it usually serves
    TLS (``certkeeper verify`` suggests those endpoints for a hook that has none)."""

    name: str
    default_commands: dict[str, tuple[str, ...]]
    suggested_verify: tuple[str, ...]

    def default_command(self, manager: str | None = None) -> tuple[str, ...]:
        """The command for ``manager`` (default: this host's); () when the kind has none there."""
        return self.default_commands.get(manager or service_manager(), ())


def _kind(module: ModuleType) -> HookKind:
    return HookKind(module.NAME, module.DEFAULT_COMMANDS, module.SUGGESTED_VERIFY)


KINDS: dict[str, HookKind] = {m.NAME: _kind(m) for m in (smtpd, dovecot, httpd, rspamd, relayd, command)}


@dataclass(frozen=True)
class Hook:
    """A configured hook: the command that reloads, the endpoints that prove it."""

    name: str
    kind: HookKind
    command: tuple[str, ...]
    verify: tuple[str, ...]
    timeout: float
    verify_timeout: float

    def reload(self, certificates: Sequence[str] = ()) -> CommandResult:
        """Run the reload command once; ``certificates`` are named to it in the environment."""
        env = {"CERTKEEPER_HOOK": self.name, "CERTKEEPER_CERTIFICATES": " ".join(certificates)}
        return run_command(self.command, self.timeout, env)


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: it did not run to an end (not found, timed out)
    output: str  # stdout + stderr as one line (the tail when long)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line: what happened, for a log or a failure report."""
        if self.returncode is None:
            status = self.output
        else:
            status = f"exit {self.returncode}" + (f": {self.output}" if self.output else "")
        return f"{' '.join(self.argv)}: {status}"


def hook_for(config: Config, name: str, manager: str | None = None) -> Hook:
    """The hook called ``name``: its [hooks.NAME] table, or the default of a known kind for the
    service manager of this host (or ``manager``)."""
    cfg: HookConfig = hook_config(config, name)
    kind = KINDS.get(name, KINDS["command"])
    command = cfg.command or kind.default_command(manager)
    if not command and kind.default_commands:  # e.g. relayd off OpenBSD: fails as "cannot run", check says so
        command = next(iter(kind.default_commands.values()))
    return Hook(name=name, kind=kind, command=command, verify=cfg.verify,
                timeout=cfg.timeout, verify_timeout=cfg.verify_timeout)


def command_problem(argv: Sequence[str]) -> str:
    """Why ``argv`` cannot be run here (its program missing or not executable), or ""."""
    if not argv:
        return "is empty"
    program = argv[0]
    if "/" not in program:
        return "" if shutil.which(program) else f"{program!r} is not found on PATH"
    if not os.path.isfile(program):
        return f"{program!r} does not exist"
    if not os.access(program, os.X_OK):
        return f"{program!r} is not executable"
    return ""


def run_command(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None,
                stdin: bytes = b"", what: str = "hook command") -> CommandResult:
    """Run ``argv`` (no shell) for at most ``timeout`` seconds; never raises for the command's sake.

    ``stdin`` is given through a temp file too (no pipe: a child the command leaves running
    cannot make us wait); ``what`` names the command in the log line.
    """
    argv = tuple(argv)
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as given:
        given.write(stdin)
        given.seek(0)
        try:
            proc = subprocess.Popen(argv, stdin=given, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True, close_fds=True,
                                    umask=inherited_umask())
        except OSError as exc:
            return CommandResult(argv, None, f"cannot run: {exc.strerror or exc}", time.monotonic() - started)
        try:
            returncode: int | None = proc.wait(timeout)
            note = ""
        except subprocess.TimeoutExpired:
            _kill(proc)
            returncode, note = None, f"killed after {timeout:g}s timeout"
        text = one_line(_tail(out))
    output = f"{note}; output: {text}" if note and text else note or text
    result = CommandResult(argv, returncode, output, time.monotonic() - started)
    log.info("%s %s (%.1fs)", what, result.describe(), result.seconds)
    return result


def one_line(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Whitespace collapsed; the tail kept when long (errors come last)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "..." + flat[-(limit - 3):]


def _tail(out: IO[bytes]) -> str:
    """The last OUTPUT_TAIL bytes the command wrote (a chatty command must not fill our memory)."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - OUTPUT_TAIL))
    return out.read().decode("utf-8", errors="replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the command and whatever it started in its own session (not daemons that left it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
