"""Pending HTTP-01 challenges: token → key authorization, shared by the issuer
(which adds and removes entries) and the web listener (which only reads).

No I/O here. The table is safe to use from the issuer's worker threads and the
event loop at once. RFC 8555 8.3: the token is base64url; anything else is
never stored, so a request path can never select something that is not a token.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from certkeeper.core.config import Config

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # RFC 8555 8.3: base64url, no padding


class ChallengeTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}

    def add(self, token: str, key_authorization: str, name: str = "") -> None:
        """``name``: the identifier the token is for (a fleet shares it with the other hosts)."""
        if not _TOKEN.match(token):
            raise ValueError(f"not an ACME token: {token[:40]!r}")
        with self._lock:
            self._answers[token] = key_authorization

    def remove(self, token: str) -> None:
        with self._lock:
            self._answers.pop(token, None)

    def expect(self) -> None:
        """An order that answers HTTP-01 is about to be placed: a table with a listener to start
        may start it now, so that its binding overlaps the order. Here, nothing to do."""

    def get(self, token: str) -> str | None:
        with self._lock:
            return self._answers.get(token)

    def tokens(self) -> list[str]:
        with self._lock:
            return list(self._answers)

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)


def served_names(config: Config) -> frozenset[str]:
    """The names this host may answer another fleet host's HTTP-01 token for: its [[certificate]]s' names
    and each [[mta_sts]] domain's policy host (behind round-robin DNS, the CA may ask any of the hosts)."""
    names = {d.lower() for c in config.certificates for d in c.domains}
    names |= {f"mta-sts.{m.domain}".lower() for m in config.mta_sts}
    return frozenset(names)
