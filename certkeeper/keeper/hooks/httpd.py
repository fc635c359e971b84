"""The web server: OpenBSD's httpd (``rcctl reload httpd``, SIGHUP) reloads its configuration and TLS files.

OpenBSD's httpd does not exist on Linux; there ``httpd`` means nginx, the web server
Debian installs for the same role (``systemctl reload nginx``, or ``nginx -s reload``
without systemd). For Apache, set ``[hooks.httpd] command = ["apache2ctl", "graceful"]``.
"""

from __future__ import annotations

from certkeeper.core.config import HOOK_DEFAULT_COMMANDS

NAME = "httpd"
# Its command per service manager (rcctl, systemd, direct), chosen when it runs.
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = HOOK_DEFAULT_COMMANDS[NAME]
# Where a stock OpenBSD set-up serves the certificate; a starting point for ``verify``.
SUGGESTED_VERIFY: tuple[str, ...] = ("https://127.0.0.1:443",)
