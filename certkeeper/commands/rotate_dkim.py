"""``certkeeper rotate-dkim [DOMAIN] [--now]``: start a rotation and run it as far as it is due.

``--adopt SELECTOR [DOMAIN]`` takes over a key made by hand instead (``rotation.adopt``); DOMAIN may
be left out when one [[dkim]] domain is configured. DNS work runs in an unprivileged network
worker; this process (the keeper) makes, copies and reads the keys and switches the signer
(``privsep.run_cli_job``).
"""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import privsep
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
        return privsep.run_cli_job(config, "adopt", {"domain": items[0].domain, "selector": selector.lower()},
                                   privsep.printer(out), verbosity)
    return privsep.run_cli_job(config, "rotate", {"domain": domain, "now": bool(getattr(args, "now", False))},
                               privsep.printer(out), verbosity)
