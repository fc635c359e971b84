"""``certkeeper check``: the configuration was read and validated by the CLI before this runs.

What the file alone cannot say is checked here, on this host:

- every hook that will run (a certificate's, a DKIM signer's, any [hooks.NAME]
  table) has a command that exists and is executable (for a built-in hook: the
  command of this host's service manager); a hook a certificate uses without
  ``verify`` endpoints is a warning: its reloads go unchecked;
- a ``[[dkim]]`` table with a signer but no ``probe`` is a warning: its key
  switches are not checked end to end (a signed message);
- the unprivileged ``user``/``group`` exist and can reach this interpreter and
  package (an error when run as root, which needs them; a warning otherwise);
- every file the daemon would read is usable (``keeper.preflight``, what a SIGHUP
  checks before it switches): the listener's certificate and key pairs, account
  keys, EAB, TSIG and fleet files, CA bundles; alert and reload programs exist.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from certkeeper.core.config import Config
from certkeeper.core.errors import ConfigError


def main(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from certkeeper import sandbox
    from certkeeper.keeper import preflight

    errors, warnings = hook_problems(config)
    warnings += dkim_warnings(config)
    errors += preflight.file_problems(config)
    problems = [f"{config.path}: {p}" for p in _host_problems(config)]
    if sandbox.privileged():
        errors += problems
    else:
        warnings += [f"{p} (needed when certkeeper runs as root)" for p in problems]
    for line in warnings:
        print(f"certkeeper: warning: {line}", file=sys.stderr)
    if errors:
        raise ConfigError(errors)
    print(f"{config.path}: configuration OK", file=out)
    return 0


def _host_problems(config: Config) -> list[str]:
    from certkeeper import privsep, sandbox

    try:
        ident = sandbox.lookup_user(config.user, config.group or None)
    except ConfigError as exc:
        return list(exc.lines)
    problem = privsep.reachable(ident if sandbox.privileged() else None)
    return [problem] if problem else []


PROBE_EXAMPLES = {"filter-dkimsign": "smtp://127.0.0.1:25", "rspamd": "rspamd://127.0.0.1:11333"}


def dkim_warnings(config: Config) -> list[str]:
    """One line per ``[[dkim]]`` table whose signer switches cannot be verified end to end (no ``probe``)."""
    return [f"{config.path}: dkim[{n}].probe: none for {item.domain}: a switch to a new key is not checked to "
            f"sign with it (add probe = \"{PROBE_EXAMPLES.get(item.signer, 'smtp://127.0.0.1:25')}\")"
            for n, item in enumerate(config.dkim, 1) if item.signer != "none" and not item.probe]


def hook_problems(config: Config, manager: str | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings), one line each, for the hooks of ``config`` on this host (or ``manager``)."""
    from certkeeper.keeper import signers
    from certkeeper.keeper.hooks import command_problem, hook_for, service_manager

    manager = manager or service_manager()
    used_by_certificates = [name for cert in config.certificates for name in cert.hooks]
    used = dict.fromkeys([*used_by_certificates, *(signers.hook_name(d) for d in config.dkim), *config.hooks])
    errors: list[str] = []
    warnings: list[str] = []
    for name in used:
        if not name:
            continue
        hook = hook_for(config, name, manager)
        problem = command_problem(hook.command)
        if problem:
            configured = name in config.hooks and config.hooks[name].command
            source = "" if configured else f" (the built-in {name} command where the service manager is {manager})"
            errors.append(f"{config.path}: hooks.{name}.command: {problem}{source}")
        if name in used_by_certificates and not hook.verify:
            warnings.append(f"{config.path}: hooks.{name}: no verify endpoints: a reload is not checked to serve "
                            "the new certificate (add verify = [\"smtps://127.0.0.1:465\", ...])")
    return errors, warnings
