"""``certkeeper mta-sts publish [DOMAIN]``: 0 something changed, 2 nothing to do, 1 a failure."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import privsep
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.core.mtasts_state import known_domains
    from certkeeper.network.mtasts_publish import tlsrpt_domains

    if getattr(args, "action", "publish") != "publish":
        raise ConfigError([f"mta-sts: unknown action {args.action!r}"])
    domain = getattr(args, "domain", None)
    domains: tuple[str, ...] | None = None
    if domain:
        domain = domain.lower().rstrip(".")
        known = {m.domain for m in config.mta_sts} | set(known_domains(config)) | set(tlsrpt_domains(config))
        if domain not in known:
            raise ConfigError([f"{config.path}: {domain!r} has no [[mta_sts]] table and was never published"])
        domains = (domain,)

    return privsep.run_cli_job(config, "publish", {"cli": True, "domains": list(domains or ())},
                               privsep.printer(out), int(getattr(args, "verbose", 0) or 0))
