"""``certkeeper roll-key NAME``: move a dane certificate to its next key, safely.

The next key is taken only once its TLSA record has been seen on every authoritative server for
twice the record's TTL (RFC 7671 8.1); before then nothing is ordered and the time it can be
used is printed (exit 2). Through the daemon if it runs, else here (the roles as ``renew``).
"""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import control, privsep
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    name = args.name
    try:
        cert = config.certificate(name)
    except KeyError:
        raise ConfigError([f"no [[certificate]] named {name!r} in {config.path}"]) from None
    if not cert.dane:
        raise ConfigError([f"{config.path}: {name}: roll-key needs dane = true (without DANE, `renew --force` "
                           "with reuse_key = false makes a new key)"])
    payload = {"names": [name], "force": True, "roll": True}
    forwarded = control.forward(config, "renew", payload, out)
    if forwarded is not None:
        return forwarded
    verbosity = int(getattr(args, "verbose", 0) or 0)
    return privsep.run_cli_job(config, "renew", {**payload, "progress": verbosity > 0}, privsep.printer(out),
                               verbosity)
