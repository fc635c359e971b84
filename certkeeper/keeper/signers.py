"""The DKIM signer's configuration: which key signs for which domain.

This module owns the files certkeeper writes for each signer and the hook
that makes the signer read them. It knows nothing of the key lifecycle: it is
handed the keys that sign now (``SigningKey``) and renders them.

- ``rspamd``: the operator's ``dkim_signing.conf`` (``signer_config``) is never
  written: it names a ``selector_map`` and a ``path_map``, and certkeeper writes
  those two map files (``DOMAIN SELECTOR`` / ``DOMAIN KEYFILE``, one key file per
  selector, so that a new key never goes out under an old selector name,
  rspamd#2809). A map holds one selector per domain, so rspamd signs with one
  key per domain (config.py refuses two algorithms with rspamd). rspamd re-reads
  maps when they change; the hook (reload) makes it immediate.
- ``filter-dkimsign``: the smtpd.conf fragment with a ``dkimsign`` filter, run as
  ``signer_user``/``signer_group`` (the guide's ``_dkimsign``; smtpd runs a
  filter without ``user`` as its own unprivileged user, who cannot read the key).
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

Also here, for the switch to a new key: the key files' owner, group and mode
(``enforce_key_files``, on every run), and the checks before a switch
(``check_before_switch``): the signer's user can read the key, checked as that
user, and the signer's configuration passes the service's own test
(``smtpd -n``, ``rspamadm configtest``).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
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


MAP_HEADER = "# Written by certkeeper: the DKIM {what} of the keys that sign now. Rewritten at each rotation.\n"


def render_rspamd_maps(keys: Sequence[SigningKey]) -> tuple[str, str]:
    """(selector map, path map): ``DOMAIN SELECTOR`` and ``DOMAIN KEYFILE`` lines (rspamd dkim_signing).

    A map gives one value per domain: a domain with two keys is refused (one key per domain with rspamd).
    """
    by_domain: dict[str, SigningKey] = {}
    for key in sorted(keys, key=lambda k: (k.domain, k.selector)):
        if key.domain in by_domain:
            raise LocalError(f"rspamd's selector_map and path_map hold one key per domain, but {key.domain} has "
                             f"{by_domain[key.domain].selector} and {key.selector}: list one algorithm for it, "
                             "or use signer = \"filter-dkimsign\"")
        by_domain[key.domain] = key
    selectors = MAP_HEADER.format(what="selectors") + "".join(f"{d} {k.selector}\n" for d, k in by_domain.items())
    paths = MAP_HEADER.format(what="key files") + "".join(f"{d} {k.key_file}\n" for d, k in by_domain.items())
    return selectors, paths


_UCL_SETTING = re.compile(r"^\s*(selector_map|path_map)\s*(?:=|:)?\s*(\"(?:[^\"\\]|\\.)*\"|[^;\s#]+)\s*;?")


def rspamd_maps(dkim_signing_conf: Path) -> tuple[Path, Path]:
    """(selector_map, path_map) as the operator's dkim_signing.conf names them (LocalError when it does not)."""
    text = _read(dkim_signing_conf)
    if text is None:
        raise LocalError(f"{dkim_signing_conf}: does not exist; create it with the selector_map and path_map lines "
                         "the README shows (certkeeper writes those maps, never this file)")
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = None if line.lstrip().startswith(("#", "//")) else _UCL_SETTING.match(line)
        if match:
            value = match.group(2)
            found[match.group(1)] = value[1:-1].replace('\\"', '"') if value.startswith('"') else value
    maps = []
    for key in ("selector_map", "path_map"):
        value = found.get(key, "")
        if value.startswith("file://"):
            value = value[len("file://"):]
        if not value:
            raise LocalError(f"{dkim_signing_conf}: names no {key}; add {key} = \"/etc/rspamd/dkim_"
                             f"{key.split('_')[0]}s.map\"; (certkeeper writes the map, never this file)")
        if not value.startswith("/"):
            raise LocalError(f"{dkim_signing_conf}: {key} {value!r} is not a local file with an absolute path; "
                             "certkeeper can write only such a map")
        maps.append(Path(value))
    return maps[0], maps[1]


def keys_named(item: DkimConfig) -> dict[str, Path]:
    """selector -> key file, as the signer's current configuration names them for ``item.domain``
    (what signs now, perhaps a key made by hand before certkeeper: the guide's ``selector = "default"``)."""
    path = config_path(item)
    text = _read(path) if path is not None else None
    if text is None:
        return {}
    found: dict[str, Path] = {}
    if item.signer == "filter-dkimsign":
        for selector, key in re.findall(r"-s (\S+) -k ([^\s\"]+)", text):
            found[selector] = Path(key)
        return found
    # rspamd: the guide's own domain block (path and selector of a domain), then certkeeper's maps.
    for key, selector in re.findall(r'path\s*=\s*"([^"]+)";\s*selector\s*=\s*"([^"]+)"', text):
        found[selector] = Path(key.replace("$domain", item.domain).replace("$selector", selector))
    for selector, key in re.findall(r'selector\s*=\s*"([^"]+)";\s*path\s*=\s*"([^"]+)"', text):
        found[selector] = Path(key.replace("$domain", item.domain).replace("$selector", selector))
    try:
        selector_map, path_map = rspamd_maps(path)  # type: ignore[arg-type]
    except LocalError:
        return found
    selectors = _map_entries(selector_map)
    paths = _map_entries(path_map)
    if item.domain in selectors and item.domain in paths:
        found[selectors[item.domain]] = Path(paths[item.domain])
    return found


def _map_entries(path: Path) -> dict[str, str]:
    text = _read(path) or ""
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


def render_dkimsign(keys: Sequence[SigningKey], name: str = FILTER_NAME, user: str = "", group: str = "") -> str:
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
    # smtpd.conf(5): a proc-exec filter runs as `user`/`group`; without them as smtpd's own user.
    account = (f" user {user}" if user else "") + (f" group {group}" if group else "")
    if len(ordered) == 1:
        lines.append(f'filter "{name}" proc-exec "{_dkimsign_command(ordered[0])}"{account}')
    elif ordered:
        members = [f"{name}-{i + 1}" for i in range(len(ordered))]
        for member, key in zip(members, ordered, strict=True):
            lines.append(f'filter "{member}" proc-exec "{_dkimsign_command(key)}"{account}')
        lines.append(f'filter "{name}" chain {{ {", ".join(f"{chr(34)}{m}{chr(34)}" for m in members)} }}')
    return "\n".join(lines) + "\n"


def _dkimsign_command(key: SigningKey) -> str:
    argv = ["filter-dkimsign"]
    if key.signature_algorithm != "rsa-sha256":  # filter-dkimsign(8): -a defaults to rsa-sha256
        argv += ["-a", key.signature_algorithm]
    argv += ["-d", key.domain, "-s", key.selector, "-k", str(key.key_file)]
    return " ".join(argv)


# ---------------------------------------------------------------------------
# Applying (files and the hook).


def rendered(config: Config, item: DkimConfig, keys: Sequence[SigningKey]) -> dict[Path, str]:
    """Every file certkeeper writes for this domain's signer, with its content ({} for signer = "none")."""
    path = config_path(item)
    if item.signer == "none" or path is None:
        return {}
    if item.signer == "rspamd":
        selector_map, path_map = rspamd_maps(path)
        selectors, paths = render_rspamd_maps(keys)
        return {selector_map: selectors, path_map: paths}
    return {path: render_dkimsign(keys, filter_name(config, item), item.signer_user, item.signer_group)}


def apply(config: Config, item: DkimConfig, keys: Sequence[SigningKey], progress: Callable[[str], None],
          force_hook: bool = False) -> bool:
    """Write the signer files that differ; run the hook when one changed (or ``force_hook``).

    ``keys`` are all keys signing now for every [[dkim]] domain sharing this
    signer file. Returns whether a file changed. rspamd's dkim_signing.conf is
    only read (for the map file names), never written.
    """
    changed = False
    for path, text in rendered(config, item, keys).items():
        if _read(path) == text:
            continue
        write_atomic(path, text.encode(), 0o644)
        changed = True
        log.info("%s: wrote the %s configuration (%d key(s))", path, item.signer, len(keys))
        progress(f"wrote {path} ({', '.join(f'{k.domain}/{k.selector}' for k in keys) or 'no keys'})")
    name = hook_name(item)
    if (changed or force_hook) and name and item.signer != "none":
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


# ---------------------------------------------------------------------------
# Key files: owner, group and mode on every run.


def key_owner_ids(item: DkimConfig) -> tuple[int, int]:
    """(uid, gid) of key_owner/key_group (-1: leave as it is); LocalError for a name unknown here."""
    try:
        uid = pwd.getpwnam(item.key_owner).pw_uid if item.key_owner else -1
    except KeyError:
        raise LocalError(f"dkim {item.domain}: key_owner {item.key_owner!r} is no user on this host") from None
    try:
        gid = grp.getgrnam(item.key_group).gr_gid if item.key_group else -1
    except KeyError:
        raise LocalError(f"dkim {item.domain}: key_group {item.key_group!r} is no group on this host") from None
    return uid, gid


def enforce_key_files(item: DkimConfig, paths: Sequence[Path], progress: Callable[[str], None]) -> list[Path]:
    """Give every existing key file in ``paths`` the configured owner, group and mode; return those changed.

    Run on every run, not only when a key is written: a key chowned or chmodded by hand (or a
    key_group changed in the config) is put back, so the signer can read it at its next start.
    """
    uid, gid = key_owner_ids(item)
    changed: list[Path] = []
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if not path.is_file() or path.is_symlink():
            raise LocalError(f"{path}: is not a regular file; certkeeper leaves it alone")
        want_uid = st.st_uid if uid == -1 else uid
        want_gid = st.st_gid if gid == -1 else gid
        if (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (want_uid, want_gid, item.key_mode):
            continue
        try:
            os.chown(path, want_uid, want_gid, follow_symlinks=False)
            os.chmod(path, item.key_mode)
        except OSError as exc:
            raise LocalError(f"{path}: cannot set owner {item.key_owner or st.st_uid}:{item.key_group or st.st_gid} "
                             f"mode {item.key_mode:04o}: {exc.strerror}") from None
        log.info("%s: owner %d:%d mode %04o (was %d:%d %04o)", path, want_uid, want_gid, item.key_mode,
                 st.st_uid, st.st_gid, st.st_mode & 0o7777)
        progress(f"{path}: set owner {item.key_owner or want_uid}:{item.key_group or want_gid} "
                 f"mode {item.key_mode:04o}")
        changed.append(path)
    return changed


# ---------------------------------------------------------------------------
# Before a switch: can the signer read the key, does the service accept its new configuration.

SMTPD_CONFIGS = (Path("/etc/mail/smtpd.conf"), Path("/etc/smtpd.conf"))  # OpenBSD, Debian
RSPAMD_CONFIG = Path("/etc/rspamd/rspamd.conf")
CONFIG_TEST_TIMEOUT = 60.0  # seconds for smtpd -n / rspamadm configtest


def readable_as(path: Path, user: str, group: str, user_groups: bool = False) -> str:
    """Why ``user`` (with ``group``) cannot read ``path``, or "": checked as that user.

    ``cat`` is run with the user's ids (the kernel sets them between fork and exec, so this
    is safe in the daemon's threaded keeper) and reads the file, so directory search
    permissions count as they will for the signer. ``user_groups`` adds the user's
    supplementary groups (rspamd calls initgroups); smtpd runs a filter with its one group only.
    """
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return f"signer_user {user!r} is no user on this host"
    try:
        gid = grp.getgrnam(group).gr_gid if group else account.pw_gid
    except KeyError:
        return f"signer_group {group!r} is no group on this host"
    groups = sorted(set(os.getgrouplist(user, gid))) if user_groups else [gid]
    try:
        done = subprocess.run(["cat", "--", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, user=account.pw_uid, group=gid, extra_groups=groups,
                              cwd="/", timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path}: the check as {user} could not run: {exc}"
    if done.returncode == 0:
        return ""
    said = done.stderr.decode("utf-8", "replace").strip().splitlines()
    reason = said[-1].rsplit(": ", 1)[-1] if said else f"the check as {user} failed"
    return f"{path}: {user}:{group or account.pw_gid} cannot read it: {reason}"


def smtpd_config_test(fragment: Path, text: str, smtpd_conf: Path | None = None) -> str:
    """Why ``smtpd -n`` refuses smtpd.conf with ``text`` in place of ``fragment``, or "".

    smtpd.conf is copied with its ``include "FRAGMENT"`` line pointing at a temp file holding
    ``text``, so nothing is written where smtpd reads before the test passes.
    """
    conf = smtpd_conf or next((p for p in SMTPD_CONFIGS if p.exists()), SMTPD_CONFIGS[-1])
    original = _read(conf)
    if original is None:
        return f"{conf}: does not exist"
    include = re.compile(r'^(\s*include\s+)"' + re.escape(str(fragment)) + r'"', re.MULTILINE)
    if not include.search(original):
        return f"{conf}: does not include {fragment} (add: include \"{fragment}\")"
    smtpd = shutil.which("smtpd") or "/usr/sbin/smtpd"
    with tempfile.TemporaryDirectory(prefix="certkeeper-smtpd-") as tmp:
        candidate = Path(tmp) / fragment.name
        candidate.write_text(text)
        test_conf = Path(tmp) / "smtpd.conf"
        test_conf.write_text(include.sub(lambda m: f'{m.group(1)}"{candidate}"', original))
        return _config_test([smtpd, "-n", "-f", str(test_conf)], f"smtpd -n with the new {fragment.name}")


def rspamd_config_test(rspamd_conf: Path | None = None, variables: dict[str, str] | None = None) -> str:
    """Why ``rspamadm configtest`` refuses rspamd's configuration, or "" (``variables``: --var NAME=VALUE)."""
    rspamadm = shutil.which("rspamadm") or "/usr/bin/rspamadm"
    argv = [rspamadm, *(f"--var={k}={v}" for k, v in (variables or {}).items()), "configtest",
            "-c", str(rspamd_conf or RSPAMD_CONFIG)]
    return _config_test(argv, "rspamadm configtest")


def _config_test(argv: list[str], what: str) -> str:
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=CONFIG_TEST_TIMEOUT)
    except OSError as exc:
        return f"{what}: cannot run {argv[0]}: {exc.strerror or exc}"
    except subprocess.TimeoutExpired:
        return f"{what}: no answer in {CONFIG_TEST_TIMEOUT:g}s"
    if result.returncode == 0:
        return ""
    output = hooks.one_line(result.stdout + " " + result.stderr)
    return f"{what}: exit {result.returncode}: {output}"


def service_test(item: DkimConfig, smtpd_conf: Path | None = None, rspamd_conf: Path | None = None,
                 rspamd_variables: dict[str, str] | None = None) -> tuple[Path | None, dict[str, str], str]:
    """(the service's configuration to test, rspamadm variables, why it is not tested).

    ``signer_service_config`` (or the arguments) is always tested. Without it the system's default
    is tested when it exists and reads certkeeper's file: smtpd.conf (/etc/mail/smtpd.conf, then
    /etc/smtpd.conf) must include the fragment; rspamd.conf (/etc/rspamd/rspamd.conf) is tested with
    LOCAL_CONFDIR = the directory above signer_config's ``local.d``/``override.d``. Otherwise the
    path is None and the reason says which key to set."""
    path = config_path(item)
    if item.signer == "filter-dkimsign":
        given = smtpd_conf or item.signer_service_config
        if given is not None:
            return given, {}, ""
        default = next((p for p in SMTPD_CONFIGS if p.exists()), None)
        if default is None:
            return None, {}, f"no {' or '.join(map(str, SMTPD_CONFIGS))}"
        text = _read(default) or ""
        if path is None or not re.search(r'^\s*include\s+"' + re.escape(str(path)) + '"', text, re.MULTILINE):
            return None, {}, f"{default} does not include {path}"
        return default, {}, ""
    variables = dict(rspamd_variables or {})
    if path is not None and path.parent.name in ("local.d", "override.d"):
        variables.setdefault("LOCAL_CONFDIR", str(path.parent.parent))
    given = rspamd_conf or item.signer_service_config
    if given is not None:
        return given, variables, ""
    if not RSPAMD_CONFIG.exists():
        return None, {}, f"no {RSPAMD_CONFIG}"
    if "LOCAL_CONFDIR" not in variables:
        return None, {}, f"{path} is not in a local.d or override.d directory that {RSPAMD_CONFIG} reads"
    return RSPAMD_CONFIG, variables, ""


def check_before_switch(config: Config, item: DkimConfig, keys: Sequence[SigningKey],
                        smtpd_conf: Path | None = None, rspamd_conf: Path | None = None,
                        rspamd_variables: dict[str, str] | None = None,
                        progress: Callable[[str], None] | None = None) -> list[str]:
    """Problems that would break signing if ``keys`` became the signing keys now; [] when none.

    Each key file must be readable by signer_user/signer_group (checked as them), and the signer's
    configuration with the new files must pass the service's own test (``service_test`` says which
    file; a test it cannot place is skipped with a warning through ``progress``). Nothing is written.
    """
    if item.signer == "none":
        return []
    problems = []
    if item.signer_user and os.geteuid() != 0:
        _note(progress, f"dkim {item.domain}: not root: the key cannot be opened as {item.signer_user} to check it")
    elif item.signer_user:
        for key in keys:
            if key.domain == item.domain:
                problem = readable_as(key.key_file, item.signer_user, item.signer_group,
                                      user_groups=item.signer == "rspamd")
                if problem:
                    problems.append(problem)
    try:
        files = rendered(config, item, keys)
    except LocalError as exc:
        return [*problems, str(exc)]
    target, variables, why = service_test(item, smtpd_conf, rspamd_conf, rspamd_variables)
    if target is None:
        _note(progress, f"dkim {item.domain}: the {item.signer} configuration is not tested before the switch "
                        f"({why}); set signer_service_config")
        return problems
    if item.signer == "filter-dkimsign":
        (fragment, text), = files.items()
        problem = smtpd_config_test(fragment, text, target)
    else:
        problem = rspamd_config_test(target, variables)
    return [*problems, problem] if problem else problems


def _note(progress: Callable[[str], None] | None, text: str) -> None:
    log.warning("%s", text)
    if progress is not None:
        progress(text)


# ---------------------------------------------------------------------------
# The previous configuration, kept by the keeper until a switch is confirmed or rolled back.


def snapshot(config: Config, item: DkimConfig, keys: Sequence[SigningKey]) -> dict[str, str | None]:
    """The signer files ``rendered`` would write, with their content now (None: the file does not exist)."""
    return {str(path): _read(path) for path in rendered(config, item, keys)}


def restore(snap: dict[str, str | None], progress: Callable[[str], None]) -> bool:
    """Put the files of ``snapshot`` back as they were; whether one changed.

    A file that did not exist before the switch is left as it is: there is no previous signer
    configuration to go back to, and removing a fragment smtpd.conf includes would stop smtpd."""
    changed = False
    for name, text in snap.items():
        path = Path(name)
        if text is None:
            progress(f"{path} did not exist before the switch; it stays (nothing to go back to)")
            continue
        if _read(path) == text:
            continue
        write_atomic(path, text.encode(), 0o644)
        progress(f"restored {path} as it was before the switch")
        changed = True
    return changed
