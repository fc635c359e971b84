"""``certkeeper check``: the configuration was read and validated by the CLI before this runs."""

from __future__ import annotations

import argparse
from typing import TextIO

from certkeeper.core.config import Config


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    print(f"{config.path}: configuration OK", file=out)
    return 0
