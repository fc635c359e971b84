"""Before the daemon switches to a new configuration (SIGHUP): is everything it names usable here?

A configuration that parses can still name what fails only later, halfway through applying it. So
before anything switches, the keeper (root, no network) checks what it and the other roles would
read or run, one line per problem, each naming the file or command and the key it comes from:

- the certificate and key files of every certificate the listener serves (the [[mta_sts]] hosts'):
  when both exist they must load together as a TLS server's pair (as the listener loads them); a
  missing file is fine (the certificate is obtained), and so is a pair the running configuration
  already serves from the same files (a set whose files do not load is the renewal's to replace);
- each authority's ``account_key`` (when it exists: a private key), ``eab_hmac_key_file`` (base64url)
  and ``ca_bundle`` (certificates); ``[dns] tsig_secret_file`` (a base64 secret, bare or in a BIND
  ``key`` clause) and ``mta_sts_fetch_ca``; ``[fleet]``'s ``ca``, ``cert`` with ``key``,
  ``password_file`` and ``secret_file``;
- every hook command, ``[alerts] command`` and ``sendmail``, ``[dns] reload_command``: the program
  exists and is executable (what ``certkeeper check`` says of hooks);
- as root: ``user`` and ``group`` exist and can reach this interpreter and package.

Secrets are read to see that they parse and are never logged.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from certkeeper.core import certs
from certkeeper.core.config import CertificateConfig, Config
from certkeeper.core.errors import LocalError
from certkeeper.keeper.hooks import command_problem

_TSIG_CLAUSE = re.compile(r'secret\s+"([^"]+)"')  # as certkeeper.network.dns.rfc2136 reads it
MAX_FILE = 1 << 20  # bytes read of any one file here


def problems(config: Config, running: Config | None = None) -> list[str]:
    """One line per thing ``config`` names that cannot be used on this host; [] when all can."""
    return file_problems(config, running) + _commands(config)


def file_problems(config: Config, running: Config | None = None) -> list[str]:
    """The files of ``problems`` (and the alert and reload programs, which ``check`` does not name otherwise)."""
    found: list[str] = []
    served = {(c.name, c.key, c.fullchain) for c in running.listener_certificates()} if running else set()
    for cert in config.listener_certificates():
        if (cert.name, cert.key, cert.fullchain) not in served:
            found += _served_pair(cert)
    for name in config.authorities:
        acme = config.authority(name)
        where = "[acme]" if name == config.default_authority else f"[authority.{name}]"
        found += _account_key(acme.account_key, f"{where} account_key")
        if acme.eab_hmac_key_file is not None:
            found += _secret(acme.eab_hmac_key_file, f"{where} eab_hmac_key_file", _base64url)
        if acme.ca_bundle is not None:
            found += _ca_file(acme.ca_bundle, f"{where} ca_bundle")
    dns = config.dns
    if dns.tsig_secret_file is not None:
        found += _secret(dns.tsig_secret_file, "[dns] tsig_secret_file", _tsig)
    if dns.mta_sts_fetch_ca is not None:
        found += _ca_file(dns.mta_sts_fetch_ca, "[dns] mta_sts_fetch_ca")
    fleet = config.fleet
    if fleet.enabled:
        if fleet.ca is not None:
            found += _ca_file(fleet.ca, "[fleet] ca")
        if fleet.cert is not None and fleet.key is not None:
            found += _pair(fleet.cert, fleet.key, "[fleet] cert and key", missing_ok=False)
        if fleet.password_file is not None:
            found += _secret(fleet.password_file, "[fleet] password_file", lambda data: "")
        if fleet.secret_file is not None:
            from certkeeper.keeper import sealing

            try:
                sealing.fleet_key(fleet.secret_file)
            except LocalError as exc:
                found.append(str(exc))
    named: list[tuple[str, Sequence[str]]] = [("[alerts] command", config.alerts.command),
                                              ("[alerts] sendmail", config.alerts.sendmail),
                                              ("[dns] reload_command", config.dns.reload_command)]
    for where, argv in named:
        problem = command_problem(argv) if argv else ""
        if problem:
            found.append(f"{config.path}: {where}: {problem}")
    return found


def _served_pair(cert: CertificateConfig) -> list[str]:
    return _pair(cert.fullchain, cert.key, f"[[certificate]] {cert.name}, served by the listener",
                 missing_ok=True)


def _pair(certfile: Path, keyfile: Path, where: str, missing_ok: bool) -> list[str]:
    """Whether ``certfile`` and ``keyfile`` load as one TLS server's certificate and key."""
    missing = [p for p in (certfile, keyfile) if not p.exists() and not p.is_symlink()]
    if missing:
        return [] if missing_ok else [f"{missing[0]}: does not exist ({where})"]
    try:
        key, chain = _read(keyfile), _read(certfile)
    except OSError as exc:
        return [f"{exc.filename}: cannot read ({where}): {exc.strerror or exc}"]
    try:
        certs.load_private_key(key)
    except (ValueError, TypeError, LocalError):
        return [f"{keyfile}: not a PEM private key ({where})"]
    if not certs.PEM_CERT.search(chain):
        return [f"{certfile}: holds no PEM certificate ({where})"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        return [f"{keyfile}: does not load with {certfile} ({where}): {str(reason).lower().replace('_', ' ')}"]
    return []


def _read(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(MAX_FILE)


def _account_key(path: Path, where: str) -> list[str]:
    if not path.exists() and not path.is_symlink():
        return []  # made at its first use
    try:
        certs.load_private_key(_read(path))
    except OSError as exc:
        return [f"{path}: cannot read ({where}): {exc.strerror or exc}"]
    except (ValueError, TypeError, LocalError):
        return [f"{path}: not a PEM private key ({where})"]
    return []


def _secret(path: Path, where: str, check: Callable[[bytes], str]) -> list[str]:
    try:
        data = _read(path)
    except OSError as exc:
        return [f"{path}: cannot read ({where}): {exc.strerror or exc}"]
    problem = check(data)
    return [f"{path}: {problem} ({where})"] if problem else []


def _base64url(data: bytes) -> str:
    text = data.decode("ascii", errors="replace").strip()
    try:
        if not text or not base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)):
            raise ValueError
    except (binascii.Error, ValueError):
        return "does not hold a base64url key"
    return ""


def _tsig(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    match = _TSIG_CLAUSE.search(text)
    secret = (match.group(1) if match else text).strip()
    try:
        if not secret or not base64.b64decode(secret, validate=True):
            raise ValueError
    except (binascii.Error, ValueError):
        return "does not hold a base64 TSIG secret"
    return ""


def _ca_file(path: Path, where: str) -> list[str]:
    try:
        data = _read(path)
    except OSError as exc:
        return [f"{path}: cannot read ({where}): {exc.strerror or exc}"]
    if not certs.PEM_CERT.search(data):
        return [f"{path}: holds no PEM certificate ({where})"]
    try:
        ssl.create_default_context(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        return [f"{path}: does not load as CA certificates ({where}): {exc}"]
    return []


def _commands(config: Config) -> list[str]:
    from certkeeper import sandbox
    from certkeeper.commands import check

    found, _ = check.hook_problems(config)
    if sandbox.privileged():
        found += [f"{config.path}: {p}" for p in check._host_problems(config)]
    return found
