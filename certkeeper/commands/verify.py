"""``certkeeper verify [NAME...]``: 0 when every endpoint serves the file on disk, else 1.

The probes run in an unprivileged network worker (``privsep.run_cli_job``)."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from certkeeper import privsep
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    names = list(getattr(args, "names", None) or [])
    unknown = [n for n in names if n not in config.certificate_names()]
    if unknown:
        raise ConfigError([f"{config.path}: no [[certificate]] named {n!r}" for n in unknown])
    suggestions = {c.name: suggestion(c) for c in config.certificates}
    return privsep.run_cli_job(config, "verify", {"names": names, "suggestions": suggestions},
                               privsep.printer(out), int(getattr(args, "verbose", 0) or 0))


def suggestion(cert: CertificateConfig) -> str:
    """What to add, from where each hook's service usually serves TLS on OpenBSD."""
    from certkeeper.keeper.hooks import KINDS

    hints = [f"[hooks.{name}] verify = {json.dumps(list(KINDS[name].suggested_verify))}"
             for name in cert.hooks if name in KINDS and KINDS[name].suggested_verify]
    if not cert.hooks:
        return "it has no hooks (add hooks = [...] and a verify list to each [hooks.NAME] table)"
    return "add e.g. " + "; ".join(hints) if hints else "add verify = [...] to its [hooks.NAME] tables"
