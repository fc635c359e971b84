"""``certkeeper dns [DOMAIN] [--check]``: print the records; with --check, 0 all ok, 1 otherwise."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper.core.config import Config
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
        return 0
    lookup = records.resolver_lookup(config)
    rows = [row for d in domains for row in records.check(config, d, lookup)]
    print(records.render_table(rows), file=out)
    # "unmanaged" (a DKIM key made by hand) is reported, not a failure: adopt it or let it be.
    bad = [r for r in rows if r.status not in ("ok", "unmanaged")]
    unmanaged = sum(r.status == "unmanaged" for r in rows)
    print(f"{sum(r.status == 'ok' for r in rows)} ok, {sum(r.status == 'missing' for r in bad)} missing, "
          f"{sum(r.status == 'wrong' for r in bad)} wrong" + (f", {unmanaged} unmanaged" if unmanaged else ""),
          file=out)
    return 0 if not bad else 1
