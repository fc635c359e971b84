"""Secret files handed over by the keeper: the ACME account key, the EAB key, the TSIG secret.

The network worker's user cannot read those files (they are root's, 0600).
The keeper reads them and sends their content in the worker's ``Start``
message; the worker puts them here, and the code that needs one
(``network.issuer``, ``network.dns.rfc2136``) asks ``read`` instead of opening
the file. Run in one process (tests, ``LocalKeeper``), nothing is handed over
and ``read`` opens the file as before.
"""

from __future__ import annotations

from pathlib import Path

from certkeeper.core.logs import register_secret

_handed: dict[str, bytes] = {}


def hand_over(files: dict[str, bytes]) -> None:
    """Keep the content of these files for ``read``; each one is also masked in the logs."""
    for path, data in files.items():
        _handed[str(Path(path))] = data
        text = data.decode("utf-8", errors="replace").strip()
        if text and "PRIVATE KEY" not in text:  # a PEM key is never logged anyway; a short secret might be
            register_secret(text)


def handed(path: Path) -> bool:
    return str(path) in _handed


def read(path: Path) -> bytes:
    """The handed-over content of ``path``, else the file itself (``OSError`` as ``open`` raises it)."""
    data = _handed.get(str(path))
    return data if data is not None else path.read_bytes()
