"""Dovecot: ``doveadm reload`` re-reads the configuration (``ssl_cert = <FILE``).

Under systemd: ``systemctl reload dovecot`` (Debian's unit runs ``doveadm reload``).

Connections already open keep the old certificate; new ones get the new one,
which is what the verifier checks.
"""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "dovecot"
# Its command per service manager (rcctl, systemd, direct), chosen when it runs.
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = ("imaps://127.0.0.1:993", "imap+starttls://127.0.0.1:143")
