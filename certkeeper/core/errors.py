"""The few error classes certkeeper raises, split by whose mistake it is.

Every error carries a one-line message meant for the operator: the CLI prints
``certkeeper: MESSAGE`` and exits non-zero, never a traceback (h11 splits local
from remote protocol errors the same way).

- ``ConfigError``: the configuration is wrong; fix the file and run again.
- ``LocalError``: something on this host is wrong (file permissions, a missing
  binary, a full disk); fix the host and run again.
- ``RemoteError`` and its subclasses: a peer (the ACME server, a DNS server, a
  mail service) refused or failed; usually worth retrying later with backoff.
"""

from __future__ import annotations


class CertkeeperError(Exception):
    """Base class; ``str(err)`` is a single line fit for a log or a terminal."""

    def __str__(self) -> str:
        text = super().__str__()
        return " ".join(text.split())  # never more than one line


class ConfigError(CertkeeperError):
    """The configuration file is invalid.

    ``lines`` holds every problem found, each already formatted as
    ``FILE: KEY: message`` so the CLI can print one per line.
    """

    def __init__(self, lines: list[str]) -> None:
        self.lines = [_cut(" ".join(line.split())) for line in lines]
        super().__init__("; ".join(self.lines))


MAX_LINE = 500  # an error line quoting a huge value from a file stays readable


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


class LocalError(CertkeeperError):
    """A problem on this host: files, permissions, missing programs."""


class RemoteError(CertkeeperError):
    """A peer failed or refused. ``retry_after`` (seconds) is set when the
    peer said when to come back (ACME ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AcmeError(RemoteError):
    """The ACME server answered with an error document or was unreachable.

    The message names the RFC 8555 error type and detail, e.g.
    ``urn:ietf:params:acme:error:rateLimited: too many certificates``;
    ``code`` is the error type's last part ("rateLimited"), "" when not an ACME problem;
    ``ca_side`` is true when the fault lies with the CA (a fallback authority may succeed).
    """

    def __init__(self, message: str, retry_after: float | None = None, code: str = "",
                 ca_side: bool = False) -> None:
        super().__init__(message, retry_after)
        self.code = code
        self.ca_side = ca_side  # the CA is in trouble (5xx, timeout, rate limit): another CA may do


class DNSError(RemoteError):
    """A DNS server refused an update or did not answer as expected."""


class ServiceError(RemoteError):
    """A reload hook failed or a service did not serve the expected certificate."""
