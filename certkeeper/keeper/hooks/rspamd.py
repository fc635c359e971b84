"""rspamd: ``rcctl reload rspamd`` re-reads its configuration and maps.

rspamd serves no TLS certificate of ours; the hook exists for DKIM signing
configuration changes, so it usually has no ``verify`` endpoints.
"""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "rspamd"
DEFAULT_COMMAND: tuple[str, ...] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = ()
