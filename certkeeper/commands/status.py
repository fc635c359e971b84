"""``certkeeper status [--json] [NAME...]``: from the daemon when it runs, else read here."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from certkeeper import control
from certkeeper.core.config import Config


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    names = list(getattr(args, "names", None) or [])
    as_json = bool(getattr(args, "json", False))
    code = control.forward(config, "status", {"names": names, "json": as_json}, out)
    if code is not None:  # a running daemon answered
        return code
    from certkeeper.keeper.status import collect, render_text

    doc = collect(config, names)
    out.write(json.dumps(doc, indent=2) + "\n" if as_json else render_text(doc))
    return 0
