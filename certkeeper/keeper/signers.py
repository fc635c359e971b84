"""The DKIM signer's configuration: which key signs for which domain.

This module owns the one file certkeeper writes for each signer and the hook
that makes the signer read it. It knows nothing of the key lifecycle: it is
handed the keys that sign now (``SigningKey``) and renders them.

- ``rspamd``: the ``dkim_signing`` module's ``domain`` map, one key file per
  selector (``$domain.$selector.key``) so that a new key never goes out under an
  old selector name (rspamd#2809). rspamd re-reads key files by itself but the
  selector map only on reload, so the hook runs when the file changes.
- ``filter-dkimsign``: the smtpd.conf fragment with a ``dkimsign`` filter.
  filter-dkimsign reads its key once at start, so smtpd is restarted. One
  filter-dkimsign process takes one key (``-k``) and one selector (``-s``) and
  signs every message passing the listener (``-d`` may repeat, but only to pick
  d= from the From domain for that one key), so a fragment serves ONE domain:
  one filter per algorithm of that domain, chained (RFC 8463 6 dual signing).
  Chaining filters of several domains would sign every message with every
  domain's key; config.py refuses two domains sharing a fragment. The filter is
  named ``dkimsign``, or ``dkimsign-DOMAIN`` when several domains use
  filter-dkimsign (each fragment for its own listener), so names never clash.
- ``none``: keys are kept and published, but no signer is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from certkeeper.core import dkim
from certkeeper.core.config import HOOK_DEFAULT_COMMANDS, Config, DkimConfig
from certkeeper.core.errors import LocalError, ServiceError
from certkeeper.core.files import write_atomic
from certkeeper.keeper import hooks

log = logging.getLogger(__name__)

DEFAULT_CONFIG = {
    "rspamd": Path("/etc/rspamd/local.d/dkim_signing.conf"),
    "filter-dkimsign": Path("/etc/mail/dkimsign.conf"),
}
# The hook run when signer_hook is not set: rspamd reloads; smtpd must restart to restart its filters.
DEFAULT_HOOK = {"rspamd": "rspamd", "filter-dkimsign": "smtpd"}
FILTER_NAME = "dkimsign"


@dataclass(frozen=True)
class SigningKey:
    """A key the signer uses now."""

    domain: str
    selector: str
    algorithm: str  # config name: rsa2048 ... ed25519
    key_file: Path

    @property
    def signature_algorithm(self) -> str:
        return dkim.SIGNATURE_ALGORITHMS[dkim.ALGORITHMS[self.algorithm][0]]


def config_path(item: DkimConfig) -> Path | None:
    """The file certkeeper owns for this domain's signer (None for signer = "none")."""
    return item.signer_config or DEFAULT_CONFIG.get(item.signer)


def hook_name(item: DkimConfig) -> str:
    return item.signer_hook or DEFAULT_HOOK.get(item.signer, "")


def raw_ed25519(signer: str) -> bool:
    """rspamd loads Ed25519 keys as one base64 line, not PEM (rspamd#2974)."""
    return signer == "rspamd"


# ---------------------------------------------------------------------------
# Rendering (pure).


def filter_name(config: Config, item: DkimConfig) -> str:
    """The smtpd.conf filter name: unique across the fragments of several filter-dkimsign domains."""
    if sum(other.signer == "filter-dkimsign" for other in config.dkim) > 1:
        return f"{FILTER_NAME}-{item.domain}"
    return FILTER_NAME


def render(signer: str, keys: Sequence[SigningKey], name: str = FILTER_NAME) -> str:
    if signer == "rspamd":
        return render_rspamd(keys)
    if signer == "filter-dkimsign":
        return render_dkimsign(keys, name)
    return ""


def render_rspamd(keys: Sequence[SigningKey]) -> str:
    """``local.d/dkim_signing.conf``: a ``domain`` block per mail domain (rspamd dkim_signing docs)."""
    lines = [
        "# Written by certkeeper: the DKIM keys that sign now. Rewritten at each key rotation;",
        "# keep other dkim_signing options in override.d/dkim_signing.conf.",
        "domain {",
    ]
    for domain in sorted({k.domain for k in keys}):
        mine = sorted((k for k in keys if k.domain == domain), key=lambda k: k.selector)
        lines.append(f"  {_ucl(domain)} {{")
        if len(mine) == 1:
            lines += [f"    path = {_ucl(str(mine[0].key_file))};", f"    selector = {_ucl(mine[0].selector)};"]
        else:  # one signature per key (e.g. RSA and Ed25519 side by side, RFC 8463 6)
            lines.append("    selectors [")
            for key in mine:
                lines += ["      {", f"        path = {_ucl(str(key.key_file))};",
                          f"        selector = {_ucl(key.selector)};", "      },"]
            lines.append("    ]")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dkimsign(keys: Sequence[SigningKey], name: str = FILTER_NAME) -> str:
    """The smtpd.conf fragment defining filter ``name`` (smtpd.conf(5) filter, filter-dkimsign(8))."""
    lines = [
        "# Written by certkeeper: the DKIM keys that sign now. Rewritten at each key rotation.",
        f'# Include it from smtpd.conf and attach filter "{name}" to the listener for outgoing mail.',
    ]
    domains = sorted({k.domain for k in keys})
    if len(domains) > 1:
        # filter-dkimsign(8): one -k and one -s per process; every message through the chain would be
        # signed by every domain's key.
        raise LocalError(f"filter-dkimsign cannot sign for {' and '.join(domains)} from one smtpd.conf fragment "
                         "(one key and selector per filter): give each [[dkim]] domain its own signer_config "
                         "and listener, or use signer = \"rspamd\"")
    ordered = sorted(keys, key=lambda k: k.algorithm)
    if len(ordered) == 1:
        lines.append(f'filter "{name}" proc-exec "{_dkimsign_command(ordered[0])}"')
    elif ordered:
        members = [f"{name}-{i + 1}" for i in range(len(ordered))]
        for member, key in zip(members, ordered, strict=True):
            lines.append(f'filter "{member}" proc-exec "{_dkimsign_command(key)}"')
        lines.append(f'filter "{name}" chain {{ {", ".join(f"{chr(34)}{m}{chr(34)}" for m in members)} }}')
    return "\n".join(lines) + "\n"


def _dkimsign_command(key: SigningKey) -> str:
    argv = ["filter-dkimsign"]
    if key.signature_algorithm != "rsa-sha256":  # filter-dkimsign(8): -a defaults to rsa-sha256
        argv += ["-a", key.signature_algorithm]
    argv += ["-d", key.domain, "-s", key.selector, "-k", str(key.key_file)]
    return " ".join(argv)


def _ucl(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------
# Applying (files and the hook).


def apply(config: Config, item: DkimConfig, keys: Sequence[SigningKey], progress: Callable[[str], None],
          force_hook: bool = False) -> bool:
    """Write the signer file when it differs; run the hook when it changed (or ``force_hook``).

    ``keys`` are all keys signing now for every [[dkim]] domain sharing this
    signer file. Returns whether the file changed.
    """
    path = config_path(item)
    if item.signer == "none" or path is None:
        return False
    text = render(item.signer, keys, filter_name(config, item))
    changed = _read(path) != text
    if changed:
        write_atomic(path, text.encode(), 0o644)
        log.info("%s: wrote the %s configuration (%d key(s))", path, item.signer, len(keys))
        progress(f"wrote {path} ({', '.join(f'{k.domain}/{k.selector}' for k in keys) or 'no keys'})")
    name = hook_name(item)
    if (changed or force_hook) and name:
        run_hook(config, name, progress)
    return changed


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalError(f"{path}: cannot read: {exc.strerror}") from None


def run_hook(config: Config, name: str, progress: Callable[[str], None]) -> None:
    """Run the named hook (a [hooks.NAME] table or a built-in default) once; ServiceError when it fails."""
    if name not in config.hooks and name not in HOOK_DEFAULT_COMMANDS:
        raise LocalError(f"{config.path}: hook {name!r} is not configured")
    hook = hooks.hook_for(config, name)
    progress(f"running hook {name}: {' '.join(hook.command)}")
    result = hook.reload()
    if not result.ok:
        raise ServiceError(f"hook {name}: {result.describe()}")
