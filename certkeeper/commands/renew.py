"""``certkeeper renew [--force] [NAME ...]``: through the daemon if it runs, else here.

Here, this process is the keeper and forks the same roles as the daemon
(``privsep.run_cli_job``): a network worker orders, the listener answers
HTTP-01 for the time of the orders, this process installs and reloads.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import control, privsep
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    forwarded = control.forward(config, "renew", {"force": bool(args.force), "names": list(args.names)}, out)
    if forwarded is not None:
        return forwarded
    unknown = [n for n in args.names if n not in config.certificate_names()]
    if unknown:
        raise ConfigError([f"no [[certificate]] named {', '.join(repr(n) for n in unknown)} in {config.path}"])
    verbosity = int(getattr(args, "verbose", 0) or 0)
    # Step lines only with -v; the outcome line of each certificate always.
    job = {"names": list(args.names), "force": bool(args.force), "progress": verbosity > 0}
    return privsep.run_cli_job(config, "renew", job, privsep.printer(out), verbosity)
