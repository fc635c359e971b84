"""``certkeeper revoke NAME [--reason REASON]``: revoke at the issuing authority, then renew with a fresh key.

Through the daemon if it runs (its worker revokes and renews, holding the
certificate's lock), else here with the same roles as ``renew``: the network
worker revokes with the issuing authority's account key and orders again; the
keeper makes the new key (never the old one, whatever ``reuse_key`` says),
installs the set and runs the hooks.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import control, privsep
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    if args.name not in config.certificate_names():
        raise ConfigError([f"no [[certificate]] named {args.name!r} in {config.path}"])
    payload = {"names": [args.name], "force": True, "revoke": args.reason}
    forwarded = control.forward(config, "renew", payload, out)
    if forwarded is not None:
        return forwarded
    verbosity = int(getattr(args, "verbose", 0) or 0)
    # The revocation line always; the renewal's steps only with -v.
    job = {**payload, "progress": verbosity > 0}
    return privsep.run_cli_job(config, "renew", job, privsep.printer(out), verbosity)
