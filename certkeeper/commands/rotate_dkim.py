"""``certkeeper rotate-dkim [DOMAIN] [--now]``: start a rotation and run it as far as it is due.

DNS work runs in an unprivileged network worker; this process (the keeper) makes the keys and
switches the signer (``privsep.run_cli_job``). A running daemon is then told (``schedule-dkim``
on the control socket) so that it runs the next step at its time."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import control, privsep
from certkeeper.core.config import Config


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.network.rotation import selected_items

    selected_items(config, getattr(args, "domain", None))  # an unknown domain is a one-line error here

    code = privsep.run_cli_job(config, "rotate", {"domain": getattr(args, "domain", None),
                                                  "now": bool(getattr(args, "now", False))},
                               privsep.printer(out), int(getattr(args, "verbose", 0) or 0))
    # A running daemon plans the next step (e.g. the switch to the new selector) at its exact time.
    if control.forward(config, "schedule-dkim", {}, out) is None and code == 0:
        out.write("no daemon is running: the next step waits for `certkeeper run` "
                  "or another `certkeeper rotate-dkim` after its time\n")
    return code
