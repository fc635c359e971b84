"""``certkeeper import-acme-client [FILE]``: print the converted file; warnings to stderr."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


def main(args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper.core.acmeclient import convert, load

    source = str(getattr(args, "file", None) or "/etc/acme-client.conf")
    result = convert(load(source), source)
    for warning in result.warnings:
        print(f"certkeeper: warning: {warning}", file=sys.stderr)
    out.write(result.toml)
    return 0
