"""``certkeeper dns [DOMAIN] [--check]``: print the records; with --check, 0 all ok, 1 otherwise."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper import privsep
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.network import records

    domain = getattr(args, "domain", None)
    configured = records.mail_domains(config)
    if not configured:
        raise ConfigError([f"{config.path}: no mail domain configured ([[mta_sts]], [[dkim]], [tlsrpt] or "
                           "[dns] zone)"])
    if domain and domain.lower().rstrip(".") not in configured:
        raise ConfigError([f"{config.path}: {domain!r} is not a configured mail domain "
                           f"(configured: {', '.join(configured)})"])
    domains = [domain.lower().rstrip(".")] if domain else configured
    if not getattr(args, "check", False):
        out.write(records.render(config, domains))
        dane_names = {c.name for d in domains for c in _dane_certificates(config, d)}
        if dane_names:  # the keys' digests, read here (the daemon or the next check makes a missing next key)
            from datetime import UTC, datetime

            from certkeeper.keeper.service import LocalKeeper
            from certkeeper.network import dane

            keeper = LocalKeeper(config)
            digests = {n: keeper.dane_keys(n, create=False) for n in sorted(dane_names)}
            out.write(dane.render(config, digests, datetime.now(UTC)))
        return 0
    return privsep.run_cli_job(config, "dns-check", {"domains": domains},  # lookups: unprivileged
                               privsep.printer(out), int(getattr(args, "verbose", 0) or 0))


def _dane_certificates(config: Config, domain: str) -> list[CertificateConfig]:
    return [c for c in config.certificates if c.dane and any(d == domain or d.endswith("." + domain)
                                                             for d in c.domains)]
