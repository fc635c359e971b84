"""``certkeeper renew [--force] [NAME ...]``: through the daemon if it runs, else here."""

from __future__ import annotations

import argparse
import threading
from typing import TextIO

from certkeeper import control
from certkeeper.core.config import Config


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    forwarded = control.forward(config, "renew", {"force": bool(args.force), "names": list(args.names)}, out)
    if forwarded is not None:
        return forwarded
    from certkeeper.core.challenges import ChallengeTable
    from certkeeper.listener import standalone
    from certkeeper.network.alerts import Alerter
    from certkeeper.network.runner import Renewer, format_outcome

    challenges = ChallengeTable()
    renewer = Renewer(config, challenges)
    printing = threading.Lock()  # progress comes from several order threads

    def progress(line: str) -> None:  # step lines: shown with -v; the outcome lines below always
        if getattr(args, "verbose", 0):
            with printing:
                print(line, file=out, flush=True)

    report = renewer.renew(args.names, force=args.force, progress=progress,
                           serve_challenges=lambda: standalone.serving(config, challenges))
    for outcome in report.outcomes:
        print(format_outcome(outcome), file=out, flush=True)
    Alerter(config).after_renewal(report.outcomes)  # [alerts] works without the daemon too
    return report.exit_code
