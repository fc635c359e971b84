"""``certkeeper rotate-dkim [DOMAIN] [--now]``: start a rotation and run it as far as it is due.

``--adopt SELECTOR [DOMAIN]`` takes over a key made by hand instead (``rotation.adopt``); DOMAIN may
be left out when one [[dkim]] domain is configured.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from certkeeper.core.config import Config
from certkeeper.core.errors import CertkeeperError, ConfigError

log = logging.getLogger(__name__)


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.network import rotation

    items = rotation.selected_items(config, getattr(args, "domain", None))
    emergency = bool(getattr(args, "now", False))
    now = datetime.now(UTC)

    def progress(line: str) -> None:
        print(line, file=out, flush=True)

    selector = getattr(args, "adopt", None)
    if selector:
        if len(items) > 1:
            raise ConfigError([f"{config.path}: rotate-dkim --adopt {selector}: name the domain "
                               f"({', '.join(i.domain for i in items)})"])
        if emergency:
            raise ConfigError([f"{config.path}: rotate-dkim: --adopt and --now do not go together"])
        rotation.adopt(config, items[0], selector.lower(), now, progress)
        return 0

    failed = False
    for item in items:
        try:
            rotation.rotate_now(config, item, now, emergency, progress)
        except CertkeeperError as exc:
            log.debug("dkim %s: %s", item.domain, exc)  # the CLI's stderr shows it once, below
            print(f"certkeeper: {item.domain}: {exc}", file=sys.stderr, flush=True)
            failed = True
    return 1 if failed else 0
