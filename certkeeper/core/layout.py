"""Every file under ``state_dir``, and the role that owns it.

The state directory is shared by the three roles (certkeeper(8), PRIVILEGE
SEPARATION). What each may write follows from who owns it:

==========================  ========  =====  =============================================
path under state_dir        owner     mode   what
==========================  ========  =====  =============================================
``.`` (state_dir)           keeper    0711   root's; the roles may pass through, not list it
``journal/NAME.json``       keeper    0700   install journals (``keeper.store``); ``NAME.reload-pending``: hooks owed
``certificates/NAME.json``  network   0700   per-certificate state: backoff, ARI, attempts
``locks/NAME.lock``         network   0700   one renewal of a certificate at a time
``verify/NAME.json``        network   0700   the last verification of each endpoint
``acme/account.json``       network   0700   ACME account URLs; ``acme/ca-bundle[.NAME].pem`` per authority
``dkim/DOMAIN.json``        network   0700   DKIM rotation state (no key: keys are in key_dir)
``mta-sts/DOMAIN.json``     network   0700   MTA-STS publication history (the listener reads it)
``mta-sts/fleet-mx``        network   0700   [fleet]: the fleet's MX names, the mx of a policy without one
``alerts/alerts.json``      network   0700   alert episodes
``dns/manual.json``         network   0700   records asked of the operator (manual backend)
``fleet/status.json``       network   0700   [fleet]: the fleet as last seen in etcd; this host's signing selectors
``dane/NAME.json``          network   0700   DANE: since when the next key's TLSA is seen
``listener/``               listener  0700   where a handed-over key passes on its way into ssl
==========================  ========  =====  =============================================

"network" and "listener" are the configured ``user``/``group`` (when certkeeper
runs as root; otherwise every role is the user that runs it). Keys, certificate
sets, signer files and the zone file live where the configuration says, and
only the keeper writes them. ``prepare`` makes the directories with these owners
and modes and converts a directory an older version left to root alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from certkeeper.core.config import Config
    from certkeeper.sandbox import Identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    path: str  # a directory under state_dir
    role: str  # "keeper" | "network" | "listener"
    mode: int
    what: str


ENTRIES = (
    Entry("journal", "keeper", 0o700, "install journals"),
    Entry("certificates", "network", 0o700, "per-certificate state"),
    Entry("locks", "network", 0o700, "renewal locks"),
    Entry("verify", "network", 0o700, "last verification results"),
    Entry("acme", "network", 0o700, "ACME account URLs and the CA bundle"),
    Entry("dkim", "network", 0o700, "DKIM rotation state"),
    Entry("mta-sts", "network", 0o700, "MTA-STS publication history"),
    Entry("alerts", "network", 0o700, "alert episodes"),
    Entry("dns", "network", 0o700, "manual DNS records"),
    Entry("fleet", "network", 0o700, "the fleet as last seen in etcd"),
    Entry("dane", "network", 0o700, "DANE next-key visibility"),
    Entry("listener", "listener", 0o700, "the listener's scratch directory"),
)

# Files of older versions at the top of state_dir, and where they live now.
MOVED = {"account.json": "acme/account.json", "ca-bundle.pem": "acme/ca-bundle.pem",
         "alerts.json": "alerts/alerts.json"}


def path(state_dir: Path, role_dir: str, name: str = "") -> Path:
    """``state_dir/role_dir/name``; ``role_dir`` must be one of ``ENTRIES``."""
    if role_dir not in {e.path for e in ENTRIES}:
        raise ValueError(f"{role_dir!r} is not a state directory of certkeeper")
    return state_dir / role_dir / name if name else state_dir / role_dir


def prepare(config: Config, identity: Identity | None) -> None:
    """Make every directory with its owner and mode; move older files in; give the roles theirs.

    ``identity`` is the unprivileged user (None: everything stays the caller's).
    Idempotent and cheap when nothing needs changing."""
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    if identity is not None:
        os.chown(state_dir, 0, 0)
    os.chmod(state_dir, 0o711)
    for old, new in MOVED.items():
        source, target = state_dir / old, state_dir / new
        if source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(source, target)
            log.info("moved %s to %s", source, target)
    for entry in ENTRIES:
        directory = state_dir / entry.path
        directory.mkdir(exist_ok=True, mode=entry.mode)
        if identity is None:
            continue
        uid, gid = (0, 0) if entry.role == "keeper" else (identity.uid, identity.gid)
        _own_tree(directory, uid, gid, entry.mode)


def _own_tree(directory: Path, uid: int, gid: int, mode: int) -> None:
    """``directory`` and what is in it owned by uid:gid (a root-owned tree of an older version is converted)."""
    st = directory.lstat()
    if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (uid, gid, mode):
        os.chown(directory, uid, gid, follow_symlinks=False)
        os.chmod(directory, mode)
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            item = os.path.join(root, name)
            info = os.lstat(item)
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.chown(item, uid, gid, follow_symlinks=False)
