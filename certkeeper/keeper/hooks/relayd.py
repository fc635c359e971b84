"""relayd: ``rcctl reload relayd`` re-reads relayd.conf and the keypairs of its TLS relays.

relayd is OpenBSD's only: on another host its ``command`` must be set.
"""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "relayd"
# Its command per service manager (rcctl, systemd, direct), chosen when it runs.
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = ("https://127.0.0.1:443",)
