"""``certkeeper rotate-dkim [DOMAIN] [--now]``: start a rotation and run it as far as it is due.

DNS work runs in an unprivileged network worker; this process (the keeper) makes the keys and
switches the signer (``privsep.run_cli_job``)."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import privsep
from certkeeper.core.config import Config


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.network.rotation import selected_items

    selected_items(config, getattr(args, "domain", None))  # an unknown domain is a one-line error here

    return privsep.run_cli_job(config, "rotate", {"domain": getattr(args, "domain", None),
                                                  "now": bool(getattr(args, "now", False))},
                               privsep.printer(out), int(getattr(args, "verbose", 0) or 0))
