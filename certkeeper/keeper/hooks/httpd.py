"""OpenBSD httpd: ``rcctl reload httpd`` (SIGHUP) reloads the configuration and its TLS files."""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "httpd"
DEFAULT_COMMAND: tuple[str, ...] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = ("https://127.0.0.1:443",)
