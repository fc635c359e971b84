"""``certkeeper verify [NAME...]``: 0 when every endpoint serves the file on disk, else 1."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.keeper.store import CertificateStore
    from certkeeper.network.verification import check_certificate, save_results

    store = CertificateStore(config.state_dir)
    failed = False
    for cert in _selected(config, getattr(args, "names", None) or []):
        checks = check_certificate(config, store, cert)
        if not checks:
            print(f"{cert.name}: no verify endpoints; {_suggestion(cert)}", file=out)
            continue
        if checks[0].expected is None:
            print(f"{cert.name}: no certificate installed at {cert.cert}", file=out)
        for check in checks:
            print(check.describe(), file=out)
            failed = failed or not check.ok
        save_results(config, cert.name, checks)
    return 1 if failed else 0


def _suggestion(cert: CertificateConfig) -> str:
    """What to add, from where each hook's service usually serves TLS on OpenBSD."""
    from certkeeper.keeper.hooks import KINDS

    hints = [f"[hooks.{name}] verify = {json.dumps(list(KINDS[name].suggested_verify))}"
             for name in cert.hooks if name in KINDS and KINDS[name].suggested_verify]
    if not cert.hooks:
        return "it has no hooks (add hooks = [...] and a verify list to each [hooks.NAME] table)"
    return "add e.g. " + "; ".join(hints) if hints else "add verify = [...] to its [hooks.NAME] tables"


def _selected(config: Config, names: list[str]) -> list[CertificateConfig]:
    unknown = [n for n in names if n not in config.certificate_names()]
    if unknown:
        raise ConfigError([f"{config.path}: no [[certificate]] named {n!r}" for n in unknown])
    return [c for c in config.certificates if not names or c.name in names]
