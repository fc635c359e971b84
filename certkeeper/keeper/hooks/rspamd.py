"""rspamd: ``rcctl reload rspamd`` re-reads its configuration and maps.

Under systemd ``systemctl reload rspamd`` (SIGHUP to the main process); without a
service manager ``certkeeper.keeper.hooks.direct reload rspamd`` sends SIGHUP to
the process in rspamd's pid file.

rspamd serves no TLS certificate of ours; the hook exists for DKIM signing
configuration changes, so it usually has no ``verify`` endpoints.
"""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "rspamd"
# Its command per service manager (rcctl, systemd, direct), chosen when it runs.
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = ()
