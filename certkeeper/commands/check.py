"""``certkeeper check``: the configuration was read and validated by the CLI before this runs.

What only the host can tell is checked here: the unprivileged ``user``/``group``
exist (an error when run as root, which needs them; a warning otherwise) and
can reach this interpreter and package.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from certkeeper import privsep, sandbox
from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    problems = _host_problems(config)
    if problems and sandbox.privileged():
        raise ConfigError([f"{config.path}: {p}" for p in problems])
    for problem in problems:
        print(f"certkeeper: warning: {config.path}: {problem} (needed when certkeeper runs as root)", file=sys.stderr)
    print(f"{config.path}: configuration OK", file=out)
    return 0


def _host_problems(config: Config) -> list[str]:
    try:
        ident = sandbox.lookup_user(config.user, config.group or None)
    except ConfigError as exc:
        return list(exc.lines)
    problem = privsep.reachable(ident if sandbox.privileged() else None)
    return [problem] if problem else []
