"""The configuration file: TOML in, frozen dataclasses out.

This module owns every configuration key, its default and its validation.
Nothing downstream re-checks a value that was accepted here. Every problem is
reported as one line naming the file, the key and the value, e.g.::

    certkeeper: etc/certkeeper.toml: certificate[1].key_type: 'rsa1024' is not one of ...

Array-of-table entries are numbered from 1 (``certificate[1]`` is the first
``[[certificate]]`` in the file), as a person counts them. Unknown keys are
errors: a typo must never pass silently.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from certkeeper.core.errors import ConfigError

DEFAULT_PATH = Path("/etc/certkeeper.toml")
MAX_SIZE = 1024 * 1024  # bytes: a configuration file is a few KiB; anything this big is a mistake
MAX_DEPTH = 16  # nested arrays and tables: the deepest valid key is three levels down

KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384")
DKIM_ALGORITHMS = ("rsa2048", "rsa3072", "rsa4096", "ed25519")
DKIM_SIGNERS = ("rspamd", "filter-dkimsign", "none")
# The user and group each signer reads its keys as, unless signer_user/signer_group say otherwise.
DKIM_SIGNER_ACCOUNTS = {"rspamd": "_rspamd", "filter-dkimsign": "_dkimsign", "none": ""}
MTA_STS_MODES = ("enforce", "testing", "none")
DNS_BACKENDS = ("rfc2136", "zonefile", "manual")
CHALLENGES = ("http-01", "dns-01")
# `certkeeper revoke --reason`: RFC 5280 5.3.1 CRLReason codes an ACME revocation may carry (those
# Let's Encrypt accepts).
REVOCATION_REASONS = {"unspecified": 0, "keyCompromise": 1, "affiliationChanged": 3, "superseded": 4,
                      "cessationOfOperation": 5}
DEFAULT_AUTHORITY = "acme"  # the name the [acme] table stands for
# certkeeper.core.dane computes "2 1 1" too; the renewal does not publish the CA's key yet, so only
# "3 1 1" (the key certkeeper rolls with a next key) is accepted here.
DANE_USAGES = ("3 1 1",)
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5")
# Hook kinds with a built-in default command, one per service manager; which manager runs the host
# is found at run time (certkeeper.keeper.hooks.service_manager): "rcctl" (OpenBSD), "systemd" (Debian's
# unit names) or "direct" (the service's own command, for a host with neither). smtpd re-reads
# certificates only on restart and has no reload of its own; "direct" restarts it through
# certkeeper.keeper.hooks.direct. OpenBSD's httpd does not exist on Linux: there "httpd" means nginx
# (Debian's unit `nginx`, or `nginx -s reload`); for Apache, set command = ["apache2ctl", "graceful"].
# relayd is OpenBSD's only: elsewhere its command must be set, which `certkeeper check` reports.
SERVICE_MANAGERS = ("rcctl", "systemd", "direct")
_DIRECT = (sys.executable, "-m", "certkeeper.keeper.hooks.direct")
HOOK_DEFAULT_COMMANDS: dict[str, dict[str, tuple[str, ...]]] = {
    "smtpd": {"rcctl": ("rcctl", "restart", "smtpd"), "systemd": ("systemctl", "restart", "opensmtpd"),
              "direct": (*_DIRECT, "restart", "smtpd")},
    "dovecot": {"rcctl": ("doveadm", "reload"), "systemd": ("systemctl", "reload", "dovecot"),
                "direct": ("doveadm", "reload")},
    "httpd": {"rcctl": ("rcctl", "reload", "httpd"), "systemd": ("systemctl", "reload", "nginx"),
              "direct": ("nginx", "-s", "reload")},
    "rspamd": {"rcctl": ("rcctl", "reload", "rspamd"), "systemd": ("systemctl", "reload", "rspamd"),
               "direct": (*_DIRECT, "reload", "rspamd")},
    "relayd": {"rcctl": ("rcctl", "reload", "relayd")},
}
# Where a built-in hook's service listens in the guide's set-up: checked after each reload when the
# [hooks.NAME] table does not set `verify` (an explicit `verify = []` turns the check off).
HOOK_DEFAULT_VERIFY: dict[str, tuple[str, ...]] = {
    "smtpd": ("smtp+starttls://127.0.0.1:25",),
    "dovecot": ("imaps://127.0.0.1:993",),
}
VERIFY_SCHEMES = ("smtp+starttls", "smtps", "imap+starttls", "imaps", "https")
RFC8461_MAX_AGE = 31557600  # RFC 8461 3.2: max_age is at most 31557600 seconds

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DURATION = re.compile(r"([0-9]+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = timedelta(days=3650)  # ten years: anything longer is a typo, and overflows date arithmetic


# ---------------------------------------------------------------------------
# The values. Frozen: once built they are valid and never change.


@dataclass(frozen=True)
class AcmeConfig:
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    staging: str = ""  # the authority's staging directory, for ``renew --dry-run``
    contact: tuple[str, ...] = ()
    account_key: Path = Path("/etc/acme/letsencrypt-privkey.pem")
    account_key_type: str = "ecdsa-p256"  # only used when the key is created
    ca_bundle: Path | None = None
    profile: str = ""
    concurrency: int = 4
    eab_kid: str = ""
    eab_hmac_key_file: Path | None = None  # base64url HMAC key; never logged
    timeout: float = 30.0  # seconds per HTTP request to the ACME server
    order_timeout: float = 300.0  # seconds for one whole order


@dataclass(frozen=True)
class HttpConfig:
    listen: tuple[str, ...] = ("0.0.0.0:80", "[::]:80")
    tls_listen: tuple[str, ...] = ("0.0.0.0:443", "[::]:443")
    max_connections: int = 512  # open connections over all listeners (lowered to fit RLIMIT_NOFILE)
    max_connections_per_address: int = 32  # per source address (IPv6: per /64)
    max_handshakes: int = 128  # TLS connections still in their handshake


@dataclass(frozen=True)
class CertificateConfig:
    name: str
    domains: tuple[str, ...]
    key_type: str
    key: Path
    cert: Path
    chain: Path
    fullchain: Path
    key_owner: str = ""  # "" keeps the owner of the process (root)
    key_group: str = ""
    key_mode: int = 0o600
    cert_owner: str = ""
    cert_group: str = ""
    cert_mode: int = 0o644
    reuse_key: bool = False
    profile: str = ""  # overrides [acme] profile for this certificate
    hooks: tuple[str, ...] = ()
    authority: str = DEFAULT_AUTHORITY  # the [authority.NAME] (or [acme]) asked first
    fallback: tuple[str, ...] = ()  # asked in turn when the one before fails on the CA's side
    challenge: str = "http-01"

    @property
    def authorities(self) -> tuple[str, ...]:
        """The authorities an order goes to, in order."""
        return (self.authority, *self.fallback)
    dane: bool = False  # TLSA records for the current and the next key ([dane])


@dataclass(frozen=True)
class HookConfig:
    name: str
    command: tuple[str, ...]  # () for a built-in kind: the host's default, found at run time
    verify: tuple[str, ...] = ()
    timeout: float = 60.0  # seconds the command may run
    verify_timeout: float = 30.0  # seconds to keep retrying the endpoints


@dataclass(frozen=True)
class MtaStsConfig:
    domain: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    certificate: str
    # [fleet] and no mx: the policy's mx lines are the fleet's live hosts' MX names ([fleet] mx), their union as
    # last seen in etcd (core.mtasts_state.configured_policy); mx is () here then.
    fleet_mx: bool = False

    @property
    def host(self) -> str:
        return f"mta-sts.{self.domain}"


@dataclass(frozen=True)
class DnsConfig:
    backend: str = "manual"
    zone: str = ""
    server: str = ""  # "host:port" of the primary that accepts RFC 2136 updates
    tsig_key_name: str = ""
    tsig_algorithm: str = "hmac-sha256"
    tsig_secret_file: Path | None = None
    ttl: int = 300
    check_servers: tuple[str, ...] = ()
    resolver: str = ""
    zonefile: Path | None = None  # zonefile backend: the include file certkeeper owns
    reload_command: tuple[str, ...] = ()  # zonefile backend: e.g. rndc reload ZONE
    propagation_timeout: float = 600.0
    propagation_interval: float = 2.0
    # Where `mta-sts publish` fetches https://mta-sts.DOMAIN/... to check the policy is served before
    # publishing its id: "addr:port" instead of resolving the name (SNI and Host stay the name), and a
    # CA file to trust instead of the system's. Both for tests and split-horizon set-ups.
    mta_sts_fetch_address: str = ""
    mta_sts_fetch_ca: Path | None = None


@dataclass(frozen=True)
class DaneConfig:
    """TLSA records for the ``dane = true`` certificates (RFC 6698, 7671, 7672)."""

    ports: tuple[int, ...] = (25,)
    usage: str = "3 1 1"  # or "2 1 1" (DANE-TA: the CA's key; breaks when the CA changes intermediates)
    ttl: int = 0  # the TLSA records' TTL; 0 = [dns] ttl
    resolver: str = ""  # "host:port" of a DNSSEC-validating resolver for `dns --check` (default: [dns] resolver)
    # Where `dns --check` connects to each port instead of resolving the name ("addr"; tests, split horizon).
    check_address: str = ""


@dataclass(frozen=True)
class TlsRptConfig:
    rua: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # default: every [[mta_sts]] domain


@dataclass(frozen=True)
class DmarcConfig:
    policy: str = "reject"
    subdomain_policy: str = "reject"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    # RFC 7489 6.3; "" / None leave the tag out (its default applies: r, r, 100, 0; fo=1 with ruf).
    aspf: str = ""
    adkim: str = ""
    pct: int | None = None
    fo: str = ""


@dataclass(frozen=True)
class RecordsConfig:
    """Facts about the host that only the operator knows, for ``certkeeper dns``."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()  # default: the first [[certificate]]'s name
    caa_issuer: str = ""  # default: derived from [acme] directory


@dataclass(frozen=True)
class DkimConfig:
    domain: str
    algorithms: tuple[str, ...] = ("rsa2048",)
    selector_format: str = "%Y%m%d"
    rotate_every: timedelta = timedelta(days=90)
    publish_ahead: timedelta = timedelta(days=2)
    retire_after: timedelta = timedelta(days=7)
    remove_after: timedelta = timedelta(days=30)  # revoked record kept this long
    key_dir: Path = Path("/etc/mail/dkim")
    key_owner: str = "root"
    key_group: str = "_rspamd"  # default: signer_group
    key_mode: int = 0o440
    signer: str = "rspamd"
    signer_config: Path | None = None  # rspamd dkim_signing.conf / smtpd.conf fragment
    signer_hook: str = ""  # hook run after the signer config changes
    # The account the signer reads the key as: filter-dkimsign's `user`/`group` in the smtpd.conf
    # fragment (the guide's _dkimsign), rspamd's own user (_rspamd); "" for signer = "none".
    signer_user: str = "_rspamd"
    signer_group: str = "_rspamd"
    reveal_retired: bool = False
    # The service's own configuration test before a switch: smtpd.conf (smtpd -n) for filter-dkimsign,
    # rspamd.conf (rspamadm configtest) for rspamd; None: the system's default when it reads signer_config.
    signer_service_config: Path | None = None
    # After a switch: a message through this endpoint must come back signed with the new selector
    # ("smtp://HOST:PORT" or "rspamd://HOST:PORT"; "": the switch is not probed).
    probe: str = ""
    probe_sink: str = "127.0.0.1:10500"  # where the worker receives the MTA's copy (smtp:// probes)
    probe_recipient: str = "dkim-probe@certkeeper.invalid"  # the smtpd.conf rule relays it to probe_sink


@dataclass(frozen=True)
class AlertsConfig:
    mail_to: tuple[str, ...] = ()
    mail_from: str = ""
    smtp: str = "127.0.0.1:25"
    sendmail: tuple[str, ...] = ()  # e.g. ["/usr/sbin/sendmail", "-t"]; overrides smtp
    command: tuple[str, ...] = ()
    expiry_warning_days: int = 7


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # off unless set


@dataclass(frozen=True)
class FleetConfig:
    """[fleet]: several MX hosts coordinated through etcd (certkeeper.network.fleet). Off when backend is ""."""
    backend: str = ""  # "etcd"
    endpoints: tuple[str, ...] = ()
    prefix: str = "/certkeeper"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str = ""
    password_file: Path | None = None
    host: str = ""  # this host's name; default the first [[certificate]]'s name
    secret_file: Path | None = None  # the fleet's shared key: seals DKIM private keys in etcd
    lease_ttl: int = 15  # seconds: the rotator's lease; another host takes over this soon after it dies
    live_within: timedelta = timedelta(hours=3)  # a host whose heartbeat is older is not waited for
    mx: tuple[str, ...] = ()  # this host's MX name(s), reported to the fleet; default (host,)

    @property
    def enabled(self) -> bool:
        return bool(self.backend)


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path = Path("/var/db/certkeeper")
    control_socket: Path = Path("/var/run/certkeeper.sock")
    pid_file: Path = Path("/var/run/certkeeper.pid")
    # The unprivileged user (and group; "" = the user's own) of the network worker and the listener.
    user: str = "_certkeeper"
    group: str = ""
    acme: AcmeConfig = field(default_factory=AcmeConfig)  # the default authority
    http: HttpConfig = field(default_factory=HttpConfig)
    certificates: tuple[CertificateConfig, ...] = ()
    hooks: dict[str, HookConfig] = field(default_factory=dict)
    mta_sts: tuple[MtaStsConfig, ...] = ()
    dns: DnsConfig = field(default_factory=DnsConfig)
    dane: DaneConfig = field(default_factory=DaneConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    dmarc: DmarcConfig = field(default_factory=DmarcConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    dkim: tuple[DkimConfig, ...] = ()
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    # Every ACME authority by name: [acme] is the one named "acme", then each [authority.NAME].
    authorities: dict[str, AcmeConfig] = field(default_factory=lambda: {DEFAULT_AUTHORITY: AcmeConfig()})
    default_authority: str = DEFAULT_AUTHORITY  # the one ``acme`` is; certificates without ``authority`` use it

    def authority(self, name: str) -> AcmeConfig:
        """The [authority.NAME] table (``acme`` for the default one)."""
        return self.acme if name == self.default_authority else self.authorities[name]

    def chain(self, cert: CertificateConfig) -> tuple[tuple[str, AcmeConfig], ...]:
        """The certificate's authority, then its fallbacks: (name, table)."""
        return tuple((name, self.authority(name)) for name in cert.authorities)

    def certificate(self, name: str) -> CertificateConfig:
        for cert in self.certificates:
            if cert.name == name:
                return cert
        raise KeyError(name)

    def certificate_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.certificates)

    def host_names(self) -> frozenset[str]:
        """Every DNS name of every certificate (HTTP-01 can be asked for any of them)."""
        return frozenset(d for c in self.certificates for d in c.domains)

    def listener_certificates(self) -> tuple[CertificateConfig, ...]:
        """The certificates the listener serves over HTTPS and holds the keys of: the [[mta_sts]] hosts'
        (and any other for an ``mta-sts.`` name, which a domain being withdrawn still needs)."""
        wanted = {m.certificate for m in self.mta_sts}
        return tuple(c for c in self.certificates
                     if c.name in wanted or any(d.startswith("mta-sts.") for d in c.domains))

    def redirect_names(self) -> frozenset[str]:
        """The names whose plain HTTP requests are redirected to HTTPS: those the listener serves."""
        return frozenset(d for c in self.listener_certificates() for d in c.domains)


# ---------------------------------------------------------------------------
# Reading and validating.


def load(path: Path | str) -> Config:
    """Read and validate the file; raise ConfigError listing every problem."""
    path = Path(path)
    return parse(read_text(path), path)


def read_text(path: Path) -> str:
    """The configuration file's text, read the one way every reader of it uses (the CLI, the daemon at
    start and SIGHUP, a job's worker): at most ``MAX_SIZE``, bytes that are not UTF-8 replaced."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SIZE + 1)  # never more: /dev/zero or a huge file is refused, not read
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_SIZE:
        raise ConfigError([f"{path}: is larger than {MAX_SIZE // 1024} KiB; not a certkeeper configuration"])
    return raw.decode("utf-8", errors="replace")


def parse(text: str, path: Path | str = "<config>") -> Config:
    path = Path(path)
    if len(text) > MAX_SIZE:
        raise ConfigError([f"{path}: is larger than {MAX_SIZE // 1024} KiB; not a certkeeper configuration"])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ConfigError([f"{path}: {str(exc).split(';')[0]}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: arrays or tables nested more than {MAX_DEPTH} deep"]) from None
    problems = _shape_problems(data)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    reader = _Reader(str(path))
    config = reader.config(data)
    if reader.errors:
        raise ConfigError(reader.errors)
    assert config is not None
    return config


def _shape_problems(data: dict[str, Any]) -> list[str]:
    """What no key may hold, checked over the whole document before the keys are read: nesting deeper
    than ``MAX_DEPTH``, and NUL bytes in any key or string (a path with one is cut short by the
    operating system; a command or name with one breaks later). One line per problem, iteratively."""
    problems: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(f"{where}: arrays or tables nested more than {MAX_DEPTH} deep")
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                if "\0" in key:
                    problems.append(f"{_join(where, _show(key))}: a key may not contain a NUL byte")
                    continue
                stack.append((_join(where, key), item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i + 1}]", item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and "\0" in value:
            problems.append(f"{where}: {value!r} contains a NUL byte")
    return sorted(problems)


class _Reader:
    """Walks the TOML document, collecting one error line per problem."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.filename}: {key}: {message}")

    # -- generic typed getters ------------------------------------------------

    def table(self, data: dict[str, Any], where: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                self.error(_join(where, key), f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def get(self, data: dict[str, Any], where: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in data:
            return default
        value = data[key]
        if kind is int and isinstance(value, bool):  # TOML true is not a number
            self.error(_join(where, key), f"{value!r} is not an integer")
            return default
        if not isinstance(value, kind):
            self.error(_join(where, key), f"{_show(value)} is not {_kind_name(kind)}")
            return default
        return value

    def string(self, data: dict[str, Any], where: str, key: str, default: str = "") -> str:
        return str(self.get(data, where, key, str, default))

    def strings(self, data: dict[str, Any], where: str, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(data, where, key, list, None)
        if value is None:
            return default
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{_join(where, key)}[{i + 1}]", f"{_show(item)} is not a string")
            else:
                out.append(item)
        return tuple(out)

    def choice(self, data: dict[str, Any], where: str, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(data, where, key, default)
        if value not in choices:
            self.error(_join(where, key), f"{value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def integer(self, data: dict[str, Any], where: str, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(data, where, key, int, default)
        if not lo <= value <= hi:
            self.error(_join(where, key), f"{value} is out of range {lo}..{hi}")
            return default
        return int(value)

    def number(self, data: dict[str, Any], where: str, key: str, default: float, lo: float, hi: float) -> float:
        value = self.get(data, where, key, (int, float), default)
        if isinstance(value, bool) or not lo <= value <= hi:
            self.error(_join(where, key), f"{value!r} is out of range {lo:g}..{hi:g}")
            return default
        return float(value)

    def boolean(self, data: dict[str, Any], where: str, key: str, default: bool) -> bool:
        return bool(self.get(data, where, key, bool, default))

    def path(self, data: dict[str, Any], where: str, key: str, default: Path | None) -> Path | None:
        value = self.get(data, where, key, str, None)
        if value is None or value == "":
            return default
        if not value.startswith("/"):
            self.error(_join(where, key), f"{value!r} is a relative path; use an absolute one")
            return default
        return Path(value)

    def required_path(self, data: dict[str, Any], where: str, key: str, default: Path) -> Path:
        result = self.path(data, where, key, default)
        return default if result is None else result

    def mode(self, data: dict[str, Any], where: str, key: str, default: int) -> int:
        value = self.get(data, where, key, (str, int), None)
        if value is None:
            return default
        # A string only: the integer 600 is six hundred, and TOML's 0o600 arrives as 384; either would
        # silently set another mode than the operator meant.
        if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
            mode = int(value, 8)
            if mode & 0o7000:
                self.error(_join(where, key), f"{value!r} sets the setuid, setgid or sticky bit; certificates "
                                              "and keys need none of them")
                return default
            if mode & 0o002:
                self.error(_join(where, key), f"{value!r} lets anyone write the file")
                return default
            return mode
        self.error(_join(where, key), f"{_show(value)} is not a file mode in quotes, such as \"0600\"")
        return default

    def user(self, data: dict[str, Any], where: str, key: str, default: str = "") -> str:
        """A user name that exists here (found now, not after the CA has issued); "" keeps the process's.

        Only a name the file sets is looked up here: a default that this host lacks is reported
        where it is used, naming the key to set."""
        name = self.string(data, where, key, default)
        if key in data and name and not _known(pwd.getpwnam, name):
            self.error(_join(where, key), f"{name!r} is not a user on this host")
        return name

    def group(self, data: dict[str, Any], where: str, key: str, default: str = "") -> str:
        name = self.string(data, where, key, default)
        if key in data and name and not _known(grp.getgrnam, name):
            self.error(_join(where, key), f"{name!r} is not a group on this host")
        return name

    def duration(self, data: dict[str, Any], where: str, key: str, default: timedelta) -> timedelta:
        value = self.get(data, where, key, (str, int), None)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            seconds = value
        elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
            digits = match.group(1).lstrip("0") or "0"  # int() refuses more than 4300 digits
            seconds = int(digits) * _DURATION_UNITS[match.group(2)] if len(digits) <= 15 else 10**20
        else:
            self.error(_join(where, key), f"{_show(value)} is not a duration such as \"90d\", \"12h\" or \"30m\"")
            return default
        if seconds > MAX_DURATION.total_seconds():
            self.error(_join(where, key), f"{_show(value)} is longer than {MAX_DURATION.days}d (ten years)")
            return default
        return timedelta(seconds=seconds)

    def domain(self, where: str, value: str, wildcard: bool = False) -> str | None:
        problem = domain_problem(value, wildcard=wildcard)
        if problem:
            self.error(where, f"{value!r} {problem}")
            return None
        return value.lower().rstrip(".")

    def address(self, where: str, value: str) -> None:
        problem = address_problem(value)
        if problem:
            self.error(where, f"{value!r} {problem}")

    # -- sections ------------------------------------------------------------

    def config(self, data: dict[str, Any]) -> Config | None:
        top = {
            "state_dir", "control_socket", "pid_file", "user", "group", "acme", "http", "certificate", "hooks",
            "mta_sts", "dns", "dane", "tlsrpt", "dmarc", "records", "dkim", "alerts", "metrics", "fleet", "authority",
        }
        self.table(data, "", top)
        state_dir = self.required_path(data, "", "state_dir", Config.state_dir)
        control_socket = self.required_path(data, "", "control_socket", Config.control_socket)
        pid_file = self.required_path(data, "", "pid_file", Config.pid_file)
        user = self.account_name(data, "user", Config.user)
        group = self.account_name(data, "group", Config.group)
        authorities = self.authorities(data)
        default = DEFAULT_AUTHORITY if DEFAULT_AUTHORITY in authorities else next(iter(authorities))
        acme = authorities[default]
        http = self.http(self.section(data, "http"))
        certificates = tuple(self.certificates(data, default))
        hooks = self.hooks(self.section(data, "hooks"))
        mta_sts = tuple(self.mta_sts_list(data, certificates))
        dns = self.dns(self.section(data, "dns"))
        dane = self.dane(self.section(data, "dane"), certificates, dns)
        tlsrpt = self.tlsrpt(self.section(data, "tlsrpt"))
        dmarc = self.dmarc(self.section(data, "dmarc"))
        records = self.records(self.section(data, "records"))
        self.dane_with_mta_sts(certificates, mta_sts, records)
        dkim = tuple(self.dkim_list(data))
        alerts = self.alerts(self.section(data, "alerts"))
        metrics = self.metrics(self.section(data, "metrics"))
        fleet = self.fleet(self.section(data, "fleet"), certificates) if "fleet" in data else FleetConfig()
        self.cross_check(certificates, hooks, dkim)
        self.check_authorities(certificates, authorities, dns)
        return Config(
            path=Path(self.filename), state_dir=state_dir, control_socket=control_socket, pid_file=pid_file,
            user=user, group=group, acme=acme, http=http, certificates=certificates, hooks=hooks, mta_sts=mta_sts,
            dns=dns, dane=dane, tlsrpt=tlsrpt, dmarc=dmarc, records=records, dkim=dkim, alerts=alerts, metrics=metrics,
            fleet=fleet, authorities=authorities, default_authority=default,
        )

    def account_name(self, data: dict[str, Any], key: str, default: str) -> str:
        """A user or group name (POSIX portable: letters, digits, '_', '-', '.'; not starting with '-')."""
        value = self.string(data, "", key, default)
        if value != default and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}", value):
            self.error(key, f"{value!r} is not a user or group name")
            return default
        if key == "user" and value in ("root", "0"):
            self.error(key, "must not be root: the network worker and the listener run as this user")
            return default
        return value

    def section(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.error(key, f"must be a table ([{key}]), not {_kind_name(type(value))}")
            return {}
        return value

    def array_of_tables(self, data: dict[str, Any], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
        value = data.get(key, [])
        if not isinstance(value, list):
            self.error(key, f"must be an array of tables ([[{key}]])")
            return
        for i, item in enumerate(value):
            where = f"{key}[{i + 1}]"
            if not isinstance(item, dict):
                self.error(where, "must be a table")
                continue
            yield where, item

    def authorities(self, data: dict[str, Any]) -> dict[str, AcmeConfig]:
        """[acme] (the authority named "acme") and every [authority.NAME], in the file's order."""
        tables = self.section(data, "authority")
        out: dict[str, AcmeConfig] = {}
        if "acme" in data:
            if DEFAULT_AUTHORITY in tables:
                self.error("acme", f"[acme] is the authority named {DEFAULT_AUTHORITY!r}: it cannot stand beside "
                                   f"[authority.{DEFAULT_AUTHORITY}]; move its keys into one of them")
            out[DEFAULT_AUTHORITY] = self.acme(self.section(data, "acme"))
        for name, item in tables.items():
            w = f"authority.{name}"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                self.error(w, f"{name!r} may hold only letters, digits, '.', '_' and '-'")
                continue
            if not isinstance(item, dict):
                self.error(w, f"must be a table ([{w}])")
                continue
            if name not in out:
                out[name] = self.acme(item, w)
        return out or {DEFAULT_AUTHORITY: self.acme({})}

    def check_authorities(self, certificates: tuple[CertificateConfig, ...], authorities: dict[str, AcmeConfig],
                          dns: DnsConfig) -> None:
        known = ", ".join(authorities)
        for i, cert in enumerate(certificates):
            w = f"certificate[{i + 1}]"
            if cert.authority not in authorities:
                self.error(f"{w}.authority", f"{cert.authority!r} is not a configured authority ({known})")
            for j, name in enumerate(cert.fallback):
                if name not in authorities:
                    self.error(f"{w}.fallback[{j + 1}]", f"{name!r} is not a configured authority ({known})")
                elif name in cert.authorities[:j + 1]:
                    self.error(f"{w}.fallback[{j + 1}]", f"{name!r} is already asked before")
            if cert.challenge == "dns-01" and dns.backend == "manual":
                self.error(f"{w}.challenge", "\"dns-01\" needs [dns] backend \"rfc2136\" or \"zonefile\"")
            if cert.challenge == "dns-01" and dns.zone and not all(
                    _in_zone(d, dns.zone) for d in cert.domains):
                outside = next(d for d in cert.domains if not _in_zone(d, dns.zone))
                self.error(f"{w}.domains", f"{outside!r} is outside [dns] zone {dns.zone!r}, so dns-01 cannot "
                                           "publish its record")

    def acme(self, data: dict[str, Any], w: str = "acme") -> AcmeConfig:
        self.table(data, w, {
            "directory", "contact", "account_key", "account_key_type", "ca_bundle", "profile", "concurrency",
            "eab_kid", "eab_hmac_key_file", "timeout", "order_timeout", "staging",
        })
        directory = self.string(data, w, "directory", AcmeConfig.directory)
        if not re.match(r"^https://[^/\s]+", directory):
            self.error(f"{w}.directory", f"{directory!r} is not an https:// URL")
        staging = self.string(data, w, "staging")
        if staging and not re.match(r"^https://[^/\s]+", staging):
            self.error(f"{w}.staging", f"{staging!r} is not an https:// URL")
        contact = self.strings(data, w, "contact")
        for i, item in enumerate(contact):
            if not re.match(r"^mailto:[^@\s]+@[^@\s]+$", item):
                self.error(f"{w}.contact[{i + 1}]", f"{item!r} is not a mailto: URL")
        profile = self.string(data, w, "profile")
        if profile and not re.fullmatch(r"[A-Za-z0-9._-]+", profile):
            self.error(f"{w}.profile", f"{profile!r} is not a profile name")
        return AcmeConfig(
            directory=directory,
            staging=staging,
            contact=contact,
            account_key=self.required_path(data, w, "account_key", AcmeConfig.account_key),
            account_key_type=self.choice(data, w, "account_key_type", KEY_TYPES, AcmeConfig.account_key_type),
            ca_bundle=self.path(data, w, "ca_bundle", None),
            profile=profile,
            concurrency=self.integer(data, w, "concurrency", 4, 1, 64),
            eab_kid=self.string(data, w, "eab_kid"),
            eab_hmac_key_file=self.path(data, w, "eab_hmac_key_file", None),
            timeout=self.number(data, w, "timeout", 30.0, 1, 600),
            order_timeout=self.number(data, w, "order_timeout", 300.0, 1, 86400),
        )

    def http(self, data: dict[str, Any]) -> HttpConfig:
        w = "http"
        self.table(data, w, {"listen", "tls_listen", "max_connections", "max_connections_per_address",
                             "max_handshakes"})
        listen = self.strings(data, w, "listen", HttpConfig.listen)
        tls_listen = self.strings(data, w, "tls_listen", HttpConfig.tls_listen)
        for key, values in (("listen", listen), ("tls_listen", tls_listen)):
            for i, value in enumerate(values):
                self.address(f"{w}.{key}[{i + 1}]", value)
        total = self.integer(data, w, "max_connections", HttpConfig.max_connections, 1, 1_000_000)
        per_address = self.integer(data, w, "max_connections_per_address", HttpConfig.max_connections_per_address,
                                   1, 1_000_000)
        handshakes = self.integer(data, w, "max_handshakes", HttpConfig.max_handshakes, 1, 1_000_000)
        return HttpConfig(listen=listen, tls_listen=tls_listen, max_connections=total,
                          max_connections_per_address=per_address, max_handshakes=handshakes)

    def certificates(self, data: dict[str, Any], authority: str = DEFAULT_AUTHORITY) -> Iterator[CertificateConfig]:
        seen: dict[str, str] = {}
        for w, item in self.array_of_tables(data, "certificate"):
            self.table(item, w, {
                "name", "domains", "key_type", "key", "cert", "chain", "fullchain", "key_owner", "key_group",
                "key_mode", "cert_owner", "cert_group", "cert_mode", "reuse_key", "profile", "hooks", "authority",
                "fallback", "challenge", "dane",
            })
            # A bad name is reported and the rest of the table still checked: every problem, one pass.
            name = self.string(item, w, "name")
            valid_name = False
            if not name:
                self.error(f"{w}.name", "is required")
            elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                self.error(f"{w}.name", f"{name!r} may hold only letters, digits, '.', '_' and '-'")
            elif name in seen:
                self.error(f"{w}.name", f"{name!r} is already used by {seen[name]}")
            else:
                seen[name], valid_name = w, True
            domains_raw = self.strings(item, w, "domains", (name,) if name else ())
            if not domains_raw:
                self.error(f"{w}.domains", "must list at least one domain")
            domains: list[str] = []
            challenge = self.choice(item, w, "challenge", CHALLENGES, "http-01")
            for i, d in enumerate(domains_raw):
                clean = self.domain(f"{w}.domains[{i + 1}]", d, wildcard=challenge == "dns-01")  # RFC 8555 8.4
                if clean and clean in domains:
                    self.error(f"{w}.domains[{i + 1}]", f"{d!r} is listed twice")
                elif clean:
                    domains.append(clean)
            key_mode = self.mode(item, w, "key_mode", 0o600)
            if key_mode & 0o037:
                # smtpd refuses group-writable keys; nobody else may read a private key.
                self.error(f"{w}.key_mode", f"{key_mode:04o} lets others read or the group write the key; "
                                            "use 0600, 0640 or 0440")
            profile = self.string(item, w, "profile")
            cert = CertificateConfig(
                name=name,
                domains=tuple(domains),
                key_type=self.choice(item, w, "key_type", KEY_TYPES, "ecdsa-p256"),
                key=self.required_path(item, w, "key", Path(f"/etc/ssl/private/{name}.key")),
                cert=self.required_path(item, w, "cert", Path(f"/etc/ssl/{name}.crt")),
                chain=self.required_path(item, w, "chain", Path(f"/etc/ssl/{name}.chain.pem")),
                fullchain=self.required_path(item, w, "fullchain", Path(f"/etc/ssl/{name}.fullchain.pem")),
                key_owner=self.user(item, w, "key_owner"),
                key_group=self.group(item, w, "key_group"),
                key_mode=key_mode,
                cert_owner=self.user(item, w, "cert_owner"),
                cert_group=self.group(item, w, "cert_group"),
                cert_mode=self.mode(item, w, "cert_mode", 0o644),
                reuse_key=self.boolean(item, w, "reuse_key", False),
                dane=self.boolean(item, w, "dane", False),
                profile=profile,
                hooks=self.strings(item, w, "hooks"),
                authority=self.string(item, w, "authority", authority),
                fallback=self.strings(item, w, "fallback"),
                challenge=challenge,
            )
            if valid_name:
                yield cert

    def hooks(self, data: dict[str, Any]) -> dict[str, HookConfig]:
        hooks: dict[str, HookConfig] = {}
        for name, item in data.items():
            w = f"hooks.{name}"
            if not isinstance(item, dict):
                self.error(w, "must be a table ([hooks.NAME])")
                continue
            self.table(item, w, {"command", "verify", "timeout", "verify_timeout"})
            # () for a built-in kind: its command for this host's service manager, found at run time.
            command = self.strings(item, w, "command")
            if not command and name not in HOOK_DEFAULT_COMMANDS:
                known = ", ".join(HOOK_DEFAULT_COMMANDS)
                self.error(f"{w}.command", f"is required for a hook that is not one of {known}")
            verify = self.strings(item, w, "verify", HOOK_DEFAULT_VERIFY.get(name, ()))
            for i, url in enumerate(verify):
                problem = verify_url_problem(url)
                if problem:
                    self.error(f"{w}.verify[{i + 1}]", f"{url!r} {problem}")
            hooks[name] = HookConfig(
                name=name, command=command, verify=verify,
                timeout=self.number(item, w, "timeout", 60.0, 1, 3600),
                verify_timeout=self.number(item, w, "verify_timeout", 30.0, 0, 3600),
            )
        return hooks

    def mta_sts_list(self, data: dict[str, Any], certificates: tuple[CertificateConfig, ...]) -> Iterator[MtaStsConfig]:
        by_name = {c.name: c for c in certificates}
        seen: set[str] = set()
        for w, item in self.array_of_tables(data, "mta_sts"):
            self.table(item, w, {"domain", "mode", "mx", "max_age", "certificate"})
            # A bad domain is reported and the rest of the table still checked.
            domain = self.domain(f"{w}.domain", self.string(item, w, "domain"))
            if domain is not None and domain in seen:
                self.error(f"{w}.domain", f"{domain!r} already has an [[mta_sts]] table")
                domain = None
            elif domain is not None:
                seen.add(domain)
            mode = self.string(item, w, "mode", "testing")
            if mode not in MTA_STS_MODES:
                self.error(f"{w}.mode", f"{mode!r} is not one of {', '.join(MTA_STS_MODES)}")
            patterns = self.strings(item, w, "mx")
            mx: list[str] = []
            for i, pattern in enumerate(patterns):
                # RFC 8461 3.2: mx patterns are A-label names, optionally with a leading "*." wildcard.
                clean = self.domain(f"{w}.mx[{i + 1}]", pattern, wildcard=True)
                if clean:
                    mx.append(clean)
            # With [fleet] and no mx, the policy lists every live host's MX names (their union, from etcd).
            fleet_mx = "mx" not in item and "fleet" in data and mode in ("enforce", "testing")
            if not patterns and mode in ("enforce", "testing") and not fleet_mx:
                self.error(f"{w}.mx", f"is required when mode is {mode!r} (RFC 8461 3.2)")
            max_age = self.integer(item, w, "max_age", 604800, 0, RFC8461_MAX_AGE)
            cert_name = self.string(item, w, "certificate", f"mta-sts.{domain}" if domain else "")
            cert = by_name.get(cert_name)
            if cert is None and cert_name:
                self.error(f"{w}.certificate", f"{cert_name!r} is not the name of a [[certificate]]")
            elif cert is not None and domain and f"mta-sts.{domain}" not in cert.domains:
                self.error(f"{w}.certificate", f"{cert_name!r} does not cover mta-sts.{domain}")
            if domain is not None and mode in MTA_STS_MODES:
                yield MtaStsConfig(domain=domain, mode=mode, mx=tuple(mx), max_age=max_age, certificate=cert_name,
                                   fleet_mx=fleet_mx)

    def dns(self, data: dict[str, Any]) -> DnsConfig:
        w = "dns"
        self.table(data, w, {
            "backend", "zone", "server", "tsig_key_name", "tsig_algorithm", "tsig_secret_file", "ttl",
            "check_servers", "resolver", "zonefile", "reload_command", "propagation_timeout",
            "propagation_interval", "mta_sts_fetch_address", "mta_sts_fetch_ca",
        })
        backend = self.choice(data, w, "backend", DNS_BACKENDS, "manual")
        zone = self.string(data, w, "zone")
        if zone:
            zone = self.domain(f"{w}.zone", zone) or ""
        server = self.string(data, w, "server")
        if server:
            self.host_port(f"{w}.server", server)
        check_servers = self.strings(data, w, "check_servers")
        for i, item in enumerate(check_servers):
            self.host_port(f"{w}.check_servers[{i + 1}]", item)
        resolver = self.string(data, w, "resolver")
        if resolver:
            self.host_port(f"{w}.resolver", resolver)
        config = DnsConfig(
            backend=backend, zone=zone, server=server,
            tsig_key_name=self.string(data, w, "tsig_key_name"),
            tsig_algorithm=self.choice(data, w, "tsig_algorithm", TSIG_ALGORITHMS, "hmac-sha256"),
            tsig_secret_file=self.path(data, w, "tsig_secret_file", None),
            ttl=self.integer(data, w, "ttl", 300, 1, 604800),
            check_servers=check_servers, resolver=resolver,
            zonefile=self.path(data, w, "zonefile", None),
            reload_command=self.strings(data, w, "reload_command"),
            propagation_timeout=self.number(data, w, "propagation_timeout", 600.0, 0, 86400),
            propagation_interval=self.number(data, w, "propagation_interval", 2.0, 0.05, 3600),
            mta_sts_fetch_address=self.string(data, w, "mta_sts_fetch_address"),
            mta_sts_fetch_ca=self.path(data, w, "mta_sts_fetch_ca", None),
        )
        if config.mta_sts_fetch_address:
            self.host_port(f"{w}.mta_sts_fetch_address", config.mta_sts_fetch_address)
        if backend == "rfc2136":
            for key in ("zone", "server"):
                if not getattr(config, key):
                    self.error(f"{w}.{key}", "is required with backend 'rfc2136'")
            if config.tsig_key_name and config.tsig_secret_file is None:
                self.error(f"{w}.tsig_secret_file", "is required when tsig_key_name is set")
        if backend == "zonefile" and config.zonefile is None:
            self.error(f"{w}.zonefile", "is required with backend 'zonefile'")
        return config

    def dane(self, data: dict[str, Any], certificates: tuple[CertificateConfig, ...], dns: DnsConfig) -> DaneConfig:
        w = "dane"
        self.table(data, w, {"ports", "usage", "ttl", "resolver", "check_address"})
        raw_ports = self.get(data, w, "ports", list, None)
        ports: list[int] = []
        for i, port in enumerate(raw_ports if raw_ports is not None else list(DaneConfig.ports)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                self.error(f"{w}.ports[{i + 1}]", f"{_show(port)} is not a TCP port (1..65535)")
            elif port in ports:
                self.error(f"{w}.ports[{i + 1}]", f"{port} is listed twice")
            else:
                ports.append(port)
        if raw_ports is not None and not raw_ports:
            self.error(f"{w}.ports", "is empty; list at least one port (25 for SMTP)")
        resolver = self.string(data, w, "resolver")
        if resolver:
            self.host_port(f"{w}.resolver", resolver)
        check_address = self.string(data, w, "check_address")
        if check_address:
            try:
                ipaddress.ip_address(check_address)
            except ValueError:
                self.error(f"{w}.check_address", f"{check_address!r} is not a numeric IP address")
        config = DaneConfig(ports=tuple(ports), usage=self.choice(data, w, "usage", DANE_USAGES, "3 1 1"),
                            ttl=self.integer(data, w, "ttl", 0, 0, 86400), resolver=resolver,
                            check_address=check_address)
        for i, cert in enumerate(certificates):
            if cert.dane and dns.backend == "manual":
                self.error(f"certificate[{i + 1}].dane", "needs [dns] backend rfc2136 or zonefile: TLSA "
                           "records change at every key roll and must be seen before the key is used")
            if cert.dane and dns.zone and any(not (d == dns.zone or d.endswith("." + dns.zone))
                                              for d in cert.domains if not d.startswith("*.")):
                self.error(f"certificate[{i + 1}].dane", f"a name of {cert.name!r} is outside [dns] zone "
                           f"{dns.zone!r}, where its TLSA record would go")
        return config

    def dane_with_mta_sts(self, certificates: tuple[CertificateConfig, ...], mta_sts: tuple[MtaStsConfig, ...],
                          records: RecordsConfig) -> None:
        """An MX host with TLSA records must also be allowed by the MTA-STS policy of the same domain, or
        senders that use MTA-STS refuse the host that DANE senders accept (the MX, the policy's mx, the
        certificate's names and the TLSA owner name must agree)."""
        mx_hosts = records.mx or ((certificates[0].name.lower(),) if certificates else ())
        dane_names = {d: i for i, c in enumerate(certificates) if c.dane for d in c.domains}
        for i, policy in enumerate(mta_sts):
            if policy.mode == "none":
                continue
            for host in mx_hosts:
                if host in dane_names and not any(_mx_pattern_matches(p, host) for p in policy.mx):
                    self.error(f"mta_sts[{i + 1}].mx", f"the MX host {host!r} has DANE TLSA records (certificate"
                               f"[{dane_names[host] + 1}] dane = true) but matches none of {list(policy.mx)}; "
                               "MTA-STS senders would refuse it")

    def host_port(self, where: str, value: str) -> None:
        problem = host_port_problem(value)
        if problem:
            self.error(where, f"{value!r} {problem}")

    def tlsrpt(self, data: dict[str, Any]) -> TlsRptConfig:
        w = "tlsrpt"
        self.table(data, w, {"rua", "domains"})
        rua = self.strings(data, w, "rua")
        for i, uri in enumerate(rua):
            # RFC 8460 3: rua is a mailto: or https: URI.
            if not re.match(r"^(mailto:[^@\s;,]+@[^@\s;,]+|https://[^\s;,]+)$", uri):
                self.error(f"{w}.rua[{i + 1}]", f"{uri!r} is not a mailto: or https: URI")
        domains = [d for i, d in enumerate(self.strings(data, w, "domains"))
                   if self.domain(f"{w}.domains[{i + 1}]", d)]
        return TlsRptConfig(rua=rua, domains=tuple(d.lower().rstrip(".") for d in domains))

    def dmarc(self, data: dict[str, Any]) -> DmarcConfig:
        w = "dmarc"
        self.table(data, w, {"policy", "subdomain_policy", "rua", "ruf", "aspf", "adkim", "pct", "fo"})
        policies = ("none", "quarantine", "reject")
        rua, ruf = self.strings(data, w, "rua"), self.strings(data, w, "ruf")
        for key, uris in (("rua", rua), ("ruf", ruf)):
            for i, uri in enumerate(uris):  # RFC 7489 6.4: a URI; certkeeper writes them comma-separated
                if not re.fullmatch(r"[a-z][a-z0-9+.-]*:[^\s,;!]+(![0-9]+[kmgt]?)?", uri):
                    self.error(f"{w}.{key}[{i + 1}]", f"{uri!r} is not a URI such as \"mailto:dmarc@example.com\"")
        fo = self.string(data, w, "fo")
        if fo and not re.fullmatch(r"[01ds](:[01ds])*", fo):  # RFC 7489 6.3: colon-separated 0, 1, d, s
            self.error(f"{w}.fo", f"{fo!r} is not one or more of 0, 1, d, s separated by ':'")
            fo = ""
        return DmarcConfig(
            policy=self.choice(data, w, "policy", policies, "reject"),
            subdomain_policy=self.choice(data, w, "subdomain_policy", policies, "reject"),
            rua=rua,
            ruf=ruf,
            aspf=self.choice(data, w, "aspf", ("", "r", "s"), "") if "aspf" in data else "",
            adkim=self.choice(data, w, "adkim", ("", "r", "s"), "") if "adkim" in data else "",
            pct=self.integer(data, w, "pct", 100, 0, 100) if "pct" in data else None,
            fo=fo,
        )

    def records(self, data: dict[str, Any]) -> RecordsConfig:
        w = "records"
        self.table(data, w, {"ipv4", "ipv6", "mx", "caa_issuer"})
        ipv4 = self.strings(data, w, "ipv4")
        ipv6 = self.strings(data, w, "ipv6")
        for key, values, version in (("ipv4", ipv4, 4), ("ipv6", ipv6, 6)):
            for i, value in enumerate(values):
                try:
                    if ipaddress.ip_address(value).version != version:
                        raise ValueError
                except ValueError:
                    self.error(f"{w}.{key}[{i + 1}]", f"{value!r} is not an IPv{version} address")
        mx = [m for i, m in enumerate(self.strings(data, w, "mx")) if self.domain(f"{w}.mx[{i + 1}]", m)]
        return RecordsConfig(ipv4=ipv4, ipv6=ipv6, mx=tuple(m.lower().rstrip(".") for m in mx),
                             caa_issuer=self.string(data, w, "caa_issuer"))

    def dkim_list(self, data: dict[str, Any]) -> Iterator[DkimConfig]:
        seen: set[str] = set()
        dkimsign_files: dict[str, str] = {}  # filter-dkimsign fragment -> the domain it signs for
        for w, item in self.array_of_tables(data, "dkim"):
            self.table(item, w, {
                "domain", "algorithms", "selector_format", "rotate_every", "publish_ahead", "retire_after",
                "remove_after", "key_dir", "key_owner", "key_group", "key_mode", "signer", "signer_config",
                "signer_hook", "reveal_retired", "signer_user", "signer_group", "signer_service_config", "probe",
                "probe_sink", "probe_recipient",
            })
            domain = self.domain(f"{w}.domain", self.string(item, w, "domain"))
            if domain is None:
                continue
            if domain in seen:
                self.error(f"{w}.domain", f"{domain!r} already has a [[dkim]] table")
                continue
            seen.add(domain)
            algorithms = self.strings(item, w, "algorithms", ("rsa2048",))
            for i, alg in enumerate(algorithms):
                if alg not in DKIM_ALGORITHMS:
                    self.error(f"{w}.algorithms[{i + 1}]", f"{alg!r} is not one of {', '.join(DKIM_ALGORITHMS)}")
            if not algorithms:
                self.error(f"{w}.algorithms", "must list at least one algorithm")
            if len(set(algorithms)) != len(algorithms):
                self.error(f"{w}.algorithms", "lists an algorithm twice")
            selector_format = self.string(item, w, "selector_format", "%Y%m%d")
            problem = selector_format_problem(selector_format, algorithms)
            if problem:
                self.error(f"{w}.selector_format", f"{selector_format!r} {problem}")
            key_mode = self.mode(item, w, "key_mode", 0o440)
            if key_mode & 0o037:
                self.error(f"{w}.key_mode", f"{key_mode:04o} lets others read or the group write the key")
            signer_config = self.path(item, w, "signer_config", None)
            signer = self.choice(item, w, "signer", DKIM_SIGNERS, "rspamd")
            if signer == "rspamd" and len(algorithms) > 1:
                self.error(f"{w}.algorithms", "rspamd's selector_map and path_map hold one key per domain: list one "
                           "algorithm, or use signer = \"filter-dkimsign\" (one chained filter per key)")
            signer_user = self.string(item, w, "signer_user", DKIM_SIGNER_ACCOUNTS[signer])
            signer_group = self.string(item, w, "signer_group", DKIM_SIGNER_ACCOUNTS[signer])
            for key, value in (("signer_user", signer_user), ("signer_group", signer_group)):
                if value and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value):
                    self.error(f"{w}.{key}", f"{value!r} is not a user or group name")
            if item.get("signer") == "filter-dkimsign":
                # filter-dkimsign(8) takes one -k and one -s: one smtpd.conf fragment signs for one domain.
                other = dkimsign_files.setdefault(str(signer_config), domain)
                if other != domain:
                    self.error(f"{w}.signer_config", f"filter-dkimsign signs with one key and selector, so "
                               f"{str(signer_config or 'the default fragment')!r} cannot serve both {other!r} "
                               f"and {domain!r}; give each domain its own signer_config, or use rspamd")
            probe = self.string(item, w, "probe")
            problem = probe_problem(probe)
            if problem:
                self.error(f"{w}.probe", f"{probe!r} {problem}")
            probe_sink = self.string(item, w, "probe_sink", "127.0.0.1:10500")
            problem = address_problem(probe_sink)
            if problem:
                self.error(f"{w}.probe_sink", f"{probe_sink!r} {problem}")
            probe_recipient = self.string(item, w, "probe_recipient", "dkim-probe@certkeeper.invalid")
            if not re.fullmatch(r"[^@\s<>\"]+@[^@\s<>\"]+", probe_recipient):
                self.error(f"{w}.probe_recipient", f"{probe_recipient!r} is not a mail address")
            yield DkimConfig(
                domain=domain,
                algorithms=algorithms,
                selector_format=selector_format,
                rotate_every=self.duration(item, w, "rotate_every", timedelta(days=90)),
                publish_ahead=self.duration(item, w, "publish_ahead", timedelta(days=2)),
                retire_after=self.duration(item, w, "retire_after", timedelta(days=7)),
                remove_after=self.duration(item, w, "remove_after", timedelta(days=30)),
                key_dir=self.required_path(item, w, "key_dir", Path("/etc/mail/dkim")),
                key_owner=self.user(item, w, "key_owner", "root"),
                key_group=self.group(item, w, "key_group", signer_group),
                key_mode=key_mode,
                signer=signer,
                signer_config=signer_config,
                signer_hook=self.string(item, w, "signer_hook"),
                reveal_retired=self.boolean(item, w, "reveal_retired", False),
                signer_user=signer_user,
                signer_group=signer_group,
                signer_service_config=self.path(item, w, "signer_service_config", None),
                probe=probe,
                probe_sink=probe_sink,
                probe_recipient=probe_recipient,
            )

    def alerts(self, data: dict[str, Any]) -> AlertsConfig:
        w = "alerts"
        self.table(data, w, {"mail_to", "mail_from", "smtp", "sendmail", "command", "expiry_warning_days"})
        mail_to = self.strings(data, w, "mail_to")
        for i, addr in enumerate(mail_to):
            if not re.fullmatch(r"[^@\s]+@[^@\s]+", addr):
                self.error(f"{w}.mail_to[{i + 1}]", f"{addr!r} is not a mail address")
        smtp = self.string(data, w, "smtp", "127.0.0.1:25")
        self.host_port(f"{w}.smtp", smtp)
        return AlertsConfig(
            mail_to=mail_to,
            mail_from=self.string(data, w, "mail_from"),
            smtp=smtp,
            sendmail=self.strings(data, w, "sendmail"),
            command=self.strings(data, w, "command"),
            expiry_warning_days=self.integer(data, w, "expiry_warning_days", 7, 0, 365),
        )

    def metrics(self, data: dict[str, Any]) -> MetricsConfig:
        w = "metrics"
        self.table(data, w, {"listen"})
        listen = self.string(data, w, "listen")
        if listen:
            self.address(f"{w}.listen", listen)
        return MetricsConfig(listen=listen)

    def fleet(self, data: dict[str, Any], certificates: tuple[CertificateConfig, ...]) -> FleetConfig:
        w = "fleet"
        self.table(data, w, {"backend", "endpoints", "prefix", "ca", "cert", "key", "username", "password_file",
                             "host", "secret_file", "lease_ttl", "live_within", "mx"})
        backend = self.choice(data, w, "backend", ("etcd",), "etcd")
        if "backend" not in data:
            self.error(f"{w}.backend", 'is required ("etcd")')
        endpoints = self.strings(data, w, "endpoints")
        if not endpoints:
            self.error(f"{w}.endpoints", 'is required: the etcd client URLs, e.g. ["https://10.0.0.1:2379"]')
        for i, url in enumerate(endpoints):
            problem = endpoint_problem(url)
            if problem:
                self.error(f"{w}.endpoints[{i + 1}]", f"{url!r} {problem}")
        prefix = self.string(data, w, "prefix", FleetConfig.prefix)
        if not re.fullmatch(r"/[A-Za-z0-9._/-]*", prefix) or "//" in prefix:
            self.error(f"{w}.prefix", f"{prefix!r} is not a key prefix like \"/certkeeper\"")
        config = FleetConfig(
            backend=backend, endpoints=endpoints, prefix=prefix.rstrip("/") or "/",
            ca=self.path(data, w, "ca", None), cert=self.path(data, w, "cert", None),
            key=self.path(data, w, "key", None), username=self.string(data, w, "username"),
            password_file=self.path(data, w, "password_file", None),
            host=self.string(data, w, "host"), secret_file=self.path(data, w, "secret_file", None),
            lease_ttl=self.integer(data, w, "lease_ttl", FleetConfig.lease_ttl, 2, 3600),
            live_within=self.duration(data, w, "live_within", FleetConfig.live_within),
        )
        if (config.cert is None) != (config.key is None):
            self.error(f"{w}.{'key' if config.key is None else 'cert'}", "is required with "
                       f"{'cert' if config.key is None else 'key'} (a client certificate and its key)")
        if (config.ca or config.cert) and any(e.startswith("http://") for e in endpoints):
            self.error(f"{w}.endpoints", "use https:// URLs with ca/cert/key (TLS to etcd)")
        if bool(config.username) != (config.password_file is not None):
            self.error(f"{w}.{'password_file' if config.username else 'username'}",
                       "is required with " + ("username" if config.username else "password_file"))
        if config.secret_file is None:
            self.error(f"{w}.secret_file", "is required: the fleet's shared key (32 random bytes or more, 0600)")
        if config.host:
            host = self.domain(f"{w}.host", config.host)
            config = replace(config, host=host or "")
        elif certificates:
            config = replace(config, host=certificates[0].name.lower().rstrip("."))
        else:
            self.error(f"{w}.host", "is required when there is no [[certificate]] (this host's name)")
        mx = [self.domain(f"{w}.mx[{i + 1}]", name) for i, name in enumerate(self.strings(data, w, "mx"))]
        default = (config.host,) if config.host else ()
        config = replace(config, mx=tuple(n for n in mx if n) if "mx" in data else default)
        return config

    def cross_check(self, certificates: tuple[CertificateConfig, ...], hooks: dict[str, HookConfig],
                    dkim: tuple[DkimConfig, ...]) -> None:
        for i, cert in enumerate(certificates):
            for j, hook in enumerate(cert.hooks):
                if hook not in hooks and hook not in HOOK_DEFAULT_COMMANDS:
                    known = ", ".join(HOOK_DEFAULT_COMMANDS)
                    self.error(f"certificate[{i + 1}].hooks[{j + 1}]",
                               f"{hook!r} is neither a [hooks.{hook}] table nor one of {known}")
        for i, item in enumerate(dkim):
            if item.signer_hook and item.signer_hook not in hooks and item.signer_hook not in HOOK_DEFAULT_COMMANDS:
                self.error(f"dkim[{i + 1}].signer_hook", f"{item.signer_hook!r} is not a configured hook")


def _mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: "*.example.com" matches exactly one more label; other patterns the name itself."""
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


def hook_config(config: Config, name: str) -> HookConfig:
    """The hook's table, or the built-in default for a known kind without one.

    ``command`` is () for a built-in kind whose table does not set it: certkeeper.keeper.hooks
    picks the command of the host's service manager when it runs.
    """
    if name in config.hooks:
        return config.hooks[name]
    return HookConfig(name=name, command=(), verify=HOOK_DEFAULT_VERIFY.get(name, ()))


# ---------------------------------------------------------------------------
# Checks shared with other modules (pure functions returning a problem or "").


def domain_problem(value: str, wildcard: bool = False) -> str:
    """Why ``value`` is not a valid A-label host name, or "" when it is."""
    name = value.rstrip(".")
    if wildcard and name.startswith("*."):
        name = name[2:]
    if not name:
        return "is not a domain name"
    if not name.isascii():
        try:
            alabel = name.encode("idna").decode("ascii")
        except UnicodeError:
            return "is not a valid internationalised domain name"
        return f"is not in A-label form; write {alabel!r}"
    if "*" in name:
        return "may not contain '*'" if not wildcard else "may use '*' only as the whole first label"
    if len(name) > 253:
        return "is longer than 253 characters"
    labels = name.lower().split(".")
    if len(labels) < 2:
        return "is not a fully qualified domain name"
    for label in labels:
        if not _LABEL.match(label):
            return f"has an invalid label {label!r}"
    return ""


def endpoint_problem(url: str) -> str:
    """An etcd client URL: https://HOST:PORT, or http:// on a loopback address only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        return "is not an etcd client URL like https://10.0.0.1:2379"
    try:
        port = parts.port
    except ValueError:
        return "has a bad port"
    if port is None:
        return "needs a port (etcd listens on 2379)"
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            return "is plain http: use https:// (http:// only for a cluster on loopback)"
    return ""


PROBE_SCHEMES = ("smtp", "rspamd")  # [[dkim]] probe: an MTA's SMTP listener, rspamd's normal worker (HTTP)


def probe_problem(url: str) -> str:
    """Why ``url`` is not a [[dkim]] probe (``smtp://HOST:PORT`` or ``rspamd://HOST:PORT``), or ""."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in PROBE_SCHEMES or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.fragment or parts.username:
        return "is not smtp://HOST:PORT or rspamd://HOST:PORT"
    try:
        port = parts.port
    except ValueError:
        return "has a bad port"
    if port is None:
        return "needs a port (e.g. smtp://127.0.0.1:25, rspamd://127.0.0.1:11333)"
    return ""


def host_port_problem(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return "is not HOST:PORT"
    host = host.strip("[]")
    if not host:
        return "is not HOST:PORT"
    return ""


def address_problem(value: str) -> str:
    """Why ``value`` is not ``ADDR:PORT`` / ``[V6ADDR]:PORT``, or ""."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return "is not ADDRESS:PORT (e.g. \"0.0.0.0:80\" or \"[::]:80\")"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return "needs brackets around an IPv6 address, e.g. \"[::1]:80\""
    if host in ("", "localhost"):
        return ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "is not a numeric IP address and port"
    return ""


def verify_url_problem(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in VERIFY_SCHEMES:
        return f"does not start with one of {', '.join(s + '://' for s in VERIFY_SCHEMES)}"
    problem = host_port_problem(rest.rstrip("/"))
    return "needs HOST:PORT after the scheme" if problem else ""


def selector_format_problem(fmt: str, algorithms: tuple[str, ...]) -> str:
    """RFC 6376 3.1: a selector is one or more DNS labels; check a sample of each."""
    from datetime import datetime

    samples = [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2031, 12, 31, 23, 59, 59, tzinfo=UTC)]
    for alg in algorithms or ("rsa2048",):
        for when in samples:
            try:
                selector = when.strftime(fmt.replace("{alg}", alg))
            except ValueError:
                return "is not a valid strftime format"
            labels = selector.lower().split(".")
            if not all(_LABEL.match(label) for label in labels):
                return f"makes {selector!r}, which is not a valid DNS label"
    if len(algorithms) > 1 and "{alg}" not in fmt:
        return "must contain {alg} when more than one algorithm is listed"
    return ""


def _known(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except (KeyError, ValueError):  # ValueError: a name with a NUL byte
        return False
    return True


def _in_zone(name: str, zone: str) -> bool:
    name = name.removeprefix("*.")
    return name == zone or name.endswith("." + zone)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return _kind_name(type(value))
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else "a huge integer"
    return text if len(text) <= 80 else text[:60] + "..." + text[-1]  # one line of reasonable length


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
             dict: "a table", Path: "a path"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)

