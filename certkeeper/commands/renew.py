"""``certkeeper renew [--force] [--dry-run [--directory URL]] [NAME ...]``: through the daemon if it runs,
else here.

Here, this process is the keeper and forks the same roles as the daemon
(``privsep.run_cli_job``): a network worker orders, the listener answers
HTTP-01 for the time of the orders, this process installs and reloads.
``--dry-run`` orders every selected certificate from the staging directory
(``[acme] staging`` or ``--directory``), checks what it gets, installs
nothing, runs no hook, probes the hooks' verify endpoints and writes no state.
"""

from __future__ import annotations

import argparse
import re
from typing import TextIO

from certkeeper import control, privsep
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    payload: dict[str, object] = {"force": bool(args.force), "names": list(args.names)}
    if getattr(args, "dry_run", False):
        payload.update(dry_run=True, directory=staging_directory(config, getattr(args, "directory", None)))
    elif getattr(args, "directory", None):
        raise ConfigError(["renew: --directory is only for --dry-run (the live directory is [acme] directory)"])
    forwarded = control.forward(config, "renew", payload, out)
    if forwarded is not None:
        return forwarded
    unknown = [n for n in args.names if n not in config.certificate_names()]
    if unknown:
        raise ConfigError([f"no [[certificate]] named {', '.join(repr(n) for n in unknown)} in {config.path}"])
    verbosity = int(getattr(args, "verbose", 0) or 0)
    # Step lines only with -v; the outcome line of each certificate always.
    job = {**payload, "progress": verbosity > 0}
    return privsep.run_cli_job(config, "renew", job, privsep.printer(out), verbosity)


def staging_directory(config: Config, directory: str | None) -> str:
    """The directory of a dry run: ``--directory``, else ``[acme] staging``; never the live one."""
    url = directory or config.acme.staging
    if not url:
        raise ConfigError([f"{config.path}: renew --dry-run needs [acme] staging or --directory URL"])
    if not re.match(r"^https://[^/\s]+", url):
        raise ConfigError([f"renew: --directory: {url!r} is not an https:// URL"])
    return url
