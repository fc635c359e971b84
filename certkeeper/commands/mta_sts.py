"""``certkeeper mta-sts publish [DOMAIN]``: 0 something changed, 2 nothing to do, 1 a failure."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.core.mtasts_state import known_domains
    from certkeeper.network.mtasts_publish import publish_all, tlsrpt_domains

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

    def progress(line: str) -> None:
        print(line, file=out, flush=True)

    outcomes = publish_all(config, progress, domains=domains)
    for o in outcomes:
        sep = ": " if o.status == "failed" else " "
        print(f"{o.record}: {o.status}{sep + o.detail if o.detail else ''}", file=out)
    if not outcomes:
        print("nothing to publish: no [[mta_sts]] table and no [tlsrpt] rua", file=out)
    if any(o.status == "failed" for o in outcomes):
        return 1
    return 0 if any(o.changed for o in outcomes) else 2
