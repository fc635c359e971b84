"""``certkeeper run [-d]``: the long-running service (certkeeper.daemon)."""

from __future__ import annotations

import argparse
import signal
from typing import TextIO

from certkeeper.core.config import Config
from certkeeper.core.errors import CertkeeperError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper import daemon
    from certkeeper.core import logs

    foreground = bool(getattr(args, "foreground", False))
    verbosity = max(int(getattr(args, "verbose", 0) or 0), 1)
    text, config = daemon.read_config(config.path)  # the exact text, handed to every worker
    service = daemon.Daemon(config, text, foreground, verbosity)
    if foreground:
        service.bind()
    else:
        ready = daemon.detach()  # the terminal waits for ready(): a bind error still reaches it
        try:
            service.bind()
        except CertkeeperError as exc:
            ready(f"certkeeper: {exc}")
            return 1
        ready("")
    logs.setup_daemon(foreground, verbosity)
    # Whoever reads the pid file may signal at once: SIGTERM/SIGINT wait (blocked) until the daemon's
    # own handlers are in place (Daemon.run), so they always stop it cleanly and remove the file.
    signal.pthread_sigmask(signal.SIG_BLOCK, daemon.STOP_SIGNALS)
    daemon.write_pid_file(config.pid_file)
    try:
        return daemon.run_loop(service.run())
    finally:
        daemon.remove_pid_file(config.pid_file)
