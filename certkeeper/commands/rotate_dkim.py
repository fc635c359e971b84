"""``certkeeper rotate-dkim [DOMAIN] [--now]``: start a rotation and run it as far as it is due.

``--adopt SELECTOR [DOMAIN]`` takes over a key made by hand instead (``rotation.adopt``); DOMAIN may
be left out when one [[dkim]] domain is configured. DNS work runs in an unprivileged network
worker; this process (the keeper) makes, copies and reads the keys and switches the signer
(``privsep.run_cli_job``). A running daemon is then told (``schedule-dkim`` on the control
socket) so that it runs the next step at its time.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import control, privsep
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.network.rotation import selected_items

    domain = getattr(args, "domain", None)
    items = selected_items(config, domain)  # an unknown domain is a one-line error here
    verbosity = int(getattr(args, "verbose", 0) or 0)
    selector = getattr(args, "adopt", None)
    if selector:
        if len(items) > 1:
            raise ConfigError([f"{config.path}: rotate-dkim --adopt {selector}: name the domain "
                               f"({', '.join(i.domain for i in items)})"])
        if getattr(args, "now", False):
            raise ConfigError([f"{config.path}: rotate-dkim: --adopt and --now do not go together"])
        job, job_args = "adopt", {"domain": items[0].domain, "selector": selector.lower()}
    else:
        job, job_args = "rotate", {"domain": domain, "now": bool(getattr(args, "now", False))}
    code = privsep.run_cli_job(config, job, job_args, privsep.printer(out), verbosity)
    # A running daemon plans the next step (e.g. the switch to the new selector) at its exact time.
    if control.forward(config, "schedule-dkim", {}, out) is None and code == 0:
        out.write("no daemon is running: the next step waits for `certkeeper run` "
                  "or another `certkeeper rotate-dkim` after its time\n")
    return code
