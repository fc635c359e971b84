"""OpenSMTPD: re-reads its certificates only when it starts.

SIGHUP makes smtpd exit and ``smtpctl`` has no reload (nor, in 7.4, a stop), so
the default restarts it: ``rcctl restart smtpd`` on OpenBSD, ``systemctl restart
opensmtpd`` under systemd (Debian's unit name), and otherwise
``certkeeper.keeper.hooks.direct restart smtpd`` (check, SIGTERM, start again with
the same arguments). The listeners are gone for a moment, which is why the
verifier keeps retrying for ``verify_timeout``. smtpd refuses a key that the
group may write or others may read ("insecure permissions"), so a wrong
``key_mode`` shows up here as a hook failure and is rolled back.
"""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "smtpd"
# Its command per service manager (rcctl, systemd, direct), chosen when it runs.
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = (
    "smtp+starttls://127.0.0.1:25", "smtp+starttls://127.0.0.1:587", "smtps://127.0.0.1:465",
)
