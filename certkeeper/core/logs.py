"""Logging set-up for the CLI (stderr) and the daemon (stderr with -d, else syslog).

Messages are single lines. No secret ever reaches a log: key material, EAB HMAC
keys and TSIG secrets are never passed to a logger, and ``SecretFilter`` is a
last line of defence that masks anything that looks like a PEM block.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys

_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)


class SecretFilter(logging.Filter):
    """Masks PEM private keys and values registered with ``register_secret``."""

    secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _PEM.sub("[private key withheld]", message)
        for secret in self.secrets:
            if secret and secret in cleaned:
                cleaned = cleaned.replace(secret, "[secret withheld]")
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def register_secret(value: str) -> None:
    """Never log this string (a TSIG secret, an EAB HMAC key)."""
    if len(value) >= 8:
        SecretFilter.secrets.add(value)


def _level(verbosity: int) -> int:
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


class _CliFormatter(logging.Formatter):
    """'certkeeper: message' for errors, 'certkeeper: warning: message' for warnings."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno == logging.WARNING else ""
        return f"certkeeper: {prefix}{record.getMessage()}"


def setup_cli(verbosity: int) -> None:
    """CLI: warnings and errors (and with -v, progress) to stderr, one line each."""
    _install(logging.StreamHandler(sys.stderr), "certkeeper: %(message)s", _level(verbosity), _CliFormatter())


def setup_daemon(foreground: bool, verbosity: int = 1) -> None:
    """Daemon: stderr with timestamps in the foreground, else syslog facility daemon."""
    if foreground:
        _install(logging.StreamHandler(sys.stderr), "%(asctime)s certkeeper: %(message)s", _level(max(verbosity, 1)))
        return
    address = "/dev/log" if sys.platform.startswith("linux") else "/var/run/log"
    try:
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    _install(handler, "certkeeper[%(process)d]: %(message)s", _level(max(verbosity, 1)))


def _install(handler: logging.Handler, fmt: str, level: int, formatter: logging.Formatter | None = None) -> None:
    handler.setFormatter(formatter or logging.Formatter(fmt))
    handler.addFilter(SecretFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries are chatty at INFO; keep them at WARNING unless debugging.
    for noisy in ("acme", "urllib3", "apscheduler", "aiohttp.access", "josepy"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level > logging.DEBUG else logging.DEBUG)
