"""Every DNS record a mail domain needs, printed in BIND format or checked live (``certkeeper dns``).

This module owns the list of records the guide's DNS section asks for, filled
from the configuration (section A plus DKIM, DMARC, CAA, TLSRPT and MTA-STS):

- A/AAAA of the mail host(s) and of ``mta-sts.DOMAIN`` (``[records] ipv4/ipv6``);
- MX (``[records] mx``, default the first ``[[certificate]]``'s name);
- SPF ``v=spf1 mx -all`` (RFC 7208);
- the DKIM key records certkeeper published (``certkeeper.network.rotation``'s state);
- DMARC from ``[dmarc]`` (RFC 7489 6.3);
- CAA ``0 issue "NAME"`` for each of the ACME directory's ``meta.caaIdentities``
  (RFC 8555 7.1.1; ``[records] caa_issuer`` overrides; RFC 8659);
- ``_mta-sts`` (RFC 8461 3.1) and ``_smtp._tls`` (RFC 8460 3);
- the PTR record(s) to ask the hosting provider for (reverse DNS, FCrDNS).

``--check`` looks each one up through ``[dns] resolver`` (or the system's) and
reports expected / found / ok|missing|wrong; it also checks every MX host
against the MTA-STS policy's ``mx`` patterns (RFC 8461 4.1) and for
forward-confirmed reverse DNS. Lookups go through a ``Lookup`` so units can use
a plain dict of answers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import dns.exception
import dns.resolver
import dns.reversename

from certkeeper.core.config import AcmeConfig, Config
from certkeeper.core.errors import DNSError
from certkeeper.network.dns import RecordSet, from_rdata
from certkeeper.network.dns.propagation import make_resolver

log = logging.getLogger(__name__)

# ACME directory host → the CAA issuer domain of that CA (RFC 8659 4.2 issuer-domain-name): used only
# when the directory cannot be fetched or lists no meta.caaIdentities.
KNOWN_ISSUERS = {
    "acme-v02.api.letsencrypt.org": "letsencrypt.org",
    "acme-staging-v02.api.letsencrypt.org": "letsencrypt.org",
    "acme.zerossl.com": "sectigo.com",
    "api.buypass.com": "buypass.com",
    "api.test4.buypass.no": "buypass.com",
    "dv.acme-v02.api.pki.goog": "pki.goog",
    "dv.acme-v02.test-api.pki.goog": "pki.goog",
    "acme.ssl.com": "ssl.com",
}


@dataclass(frozen=True)
class Expected:
    """One record (set) the domain should have."""

    section: str  # the comment heading it is printed under
    name: str
    rtype: str
    values: tuple[str, ...]
    kind: str = ""  # how found values are compared: spf, tags, sts, tlsrpt, caa, ptr, set
    note: str = ""  # printed as a comment after the record
    groups: tuple[tuple[str, ...], ...] = ()  # caa: each authority's names; one of each must be found

    def as_record_set(self, ttl: int) -> RecordSet:
        return RecordSet(self.name, self.rtype, self.values, ttl)


# ---------------------------------------------------------------------------
# What to expect (pure: config + state in, records out).


def mail_domains(config: Config) -> list[str]:
    """Every mail domain the configuration mentions, in order of first mention."""
    from certkeeper.network.mtasts_publish import tlsrpt_domains

    found = [m.domain for m in config.mta_sts] + [d.domain for d in config.dkim] + list(tlsrpt_domains(config))
    if not found and config.dns.zone:
        found.append(config.dns.zone)
    return list(dict.fromkeys(found))


def mx_hosts(config: Config) -> tuple[str, ...]:
    if config.records.mx:
        return config.records.mx
    return (config.certificates[0].name.lower(),) if config.certificates else ()


_DIRECTORY_META: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}  # one fetch per directory and run


def directory_caa_identities(acme: AcmeConfig) -> tuple[tuple[str, ...], str]:
    """The ``meta.caaIdentities`` of an authority's directory (RFC 8555 7.1.1: the names the CA
    recognises in CAA records), and "" or why there are none. Fetched once per process, through
    ``ca_bundle``."""
    import requests

    directory = acme.directory
    key = (directory, str(acme.ca_bundle or ""))
    if key not in _DIRECTORY_META:
        verify: bool | str = str(acme.ca_bundle) if acme.ca_bundle else True
        try:
            response = requests.get(directory, timeout=acme.timeout, verify=verify)
            response.raise_for_status()
            meta = response.json().get("meta") or {}
            found = meta.get("caaIdentities") if isinstance(meta, dict) else None
        except (requests.RequestException, ValueError, AttributeError) as exc:
            _DIRECTORY_META[key] = ((), f"cannot fetch {directory}: {' '.join(str(exc).split())}")
        else:
            names = tuple(n.lower() for n in found if isinstance(n, str) and n) if isinstance(found, list) else ()
            _DIRECTORY_META[key] = (names, "" if names else f"{directory} lists no meta.caaIdentities")
    return _DIRECTORY_META[key]


def authority_caa_issuers(acme: AcmeConfig) -> tuple[tuple[str, ...], str]:
    """One authority's CAA issuer names, and a note on where they came from when that is not its
    directory: certkeeper's table of known CAs (no fetch needed), else the directory's
    ``meta.caaIdentities``; () when neither knows."""
    host = (urlsplit(acme.directory).hostname or "").lower()
    if host in KNOWN_ISSUERS:
        return (KNOWN_ISSUERS[host],), ""
    names, problem = directory_caa_identities(acme)
    if names:
        return names, ""
    return (), f"{problem}: set [records] caa_issuer to the CA's CAA name"


def caa_groups(config: Config) -> tuple[tuple[tuple[str, ...], ...], str]:
    """The CAA issuer names of every configured authority, one tuple per authority (a fallback must be
    allowed to issue too), and what could not be found; ``[records] caa_issuer`` alone when set."""
    if config.records.caa_issuer:
        return ((config.records.caa_issuer,),), ""
    groups, notes = [], []
    for name in config.authorities:
        names, note = authority_caa_issuers(config.authority(name))
        if names and names not in groups:
            groups.append(names)
        if note:
            notes.append(f"{name}: {note}" if len(config.authorities) > 1 else note)
    return tuple(groups), "; ".join(notes)


def caa_issuers(config: Config) -> tuple[tuple[str, ...], str]:
    """Every CAA issuer name to publish (see ``caa_groups``), each once, and what could not be found."""
    groups, note = caa_groups(config)
    return tuple(dict.fromkeys(n for g in groups for n in g)), note


def caa_issuer(config: Config) -> str:
    """The first CAA issuer name (see ``caa_issuers``), "" when unknown."""
    names, _ = caa_issuers(config)
    return names[0] if names else ""


def render_dmarc(config: Config) -> str:
    """RFC 7489 6.3: v and p first; then the guide's order (sp, pct, aspf, adkim, fo); rua/ruf are
    comma-separated URIs. fo=1 (report any failure) goes with ruf unless ``fo`` says otherwise."""
    d = config.dmarc
    text = f"v=DMARC1; p={d.policy}; sp={d.subdomain_policy}"
    fo = d.fo or ("1" if d.ruf else "")
    for tag, value in (("pct", "" if d.pct is None else str(d.pct)), ("aspf", d.aspf), ("adkim", d.adkim),
                       ("fo", fo), ("rua", ",".join(d.rua)), ("ruf", ",".join(d.ruf))):
        if value:
            text += f"; {tag}={value}"
    return text


def in_domain(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def expected_records(config: Config, domain: str) -> list[Expected]:
    """The full record set for one mail domain, in the order ``certkeeper dns`` prints it."""
    out: list[Expected] = []
    out += _address_records(config, domain)
    hosts = mx_hosts(config)
    if hosts:
        # RFC 5321 5.1: lower preference first; 10, 20, ... leaves room to add one.
        out.append(Expected("MX", domain, "MX", tuple(f"{10 * (i + 1)} {h}." for i, h in enumerate(hosts)), "mx"))
    out.append(Expected("SPF (RFC 7208): only the MX hosts may send", domain, "TXT", ("v=spf1 mx -all",), "spf"))
    out += _dkim_records(config, domain)
    out.append(Expected("DMARC (RFC 7489)", f"_dmarc.{domain}", "TXT", (render_dmarc(config),), "dmarc"))
    out += _caa_records(config, domain)
    out += _mta_sts_records(config, domain)
    out += _ptr_records(config)
    return out


def _address_records(config: Config, domain: str) -> list[Expected]:
    hosts = list(mx_hosts(config))
    if any(m.domain == domain for m in config.mta_sts):
        hosts.append(f"mta-sts.{domain}")
    out = []
    for host in dict.fromkeys(hosts):
        for rtype, values in (("A", config.records.ipv4), ("AAAA", config.records.ipv6)):
            if values:
                out.append(Expected("A/AAAA of the mail and MTA-STS hosts", host, rtype, tuple(values), "set"))
    return out


def _dkim_records(config: Config, domain: str) -> list[Expected]:
    if not any(d.domain == domain for d in config.dkim):
        return []
    from certkeeper.network import rotation

    rows = {r["selector"]: r for r in rotation.status_rows(config) if r["domain"] == domain and r["selector"]}
    keys = rotation.load_state(config, domain).keys
    out = []
    for key in keys:
        if key.selector not in rows or key.published is None or key.state == "removed":
            continue  # not in DNS yet, or gone
        value = "v=DKIM1; p=" if key.state == "revoked" else key.record  # RFC 6376 3.6.1: revoked key
        out.append(Expected("DKIM (RFC 6376): published selectors", f"{key.selector}._domainkey.{domain}", "TXT",
                            (value,), "tags", f"{key.algorithm}, {key.state}"))
    if not out:
        out.append(Expected("DKIM (RFC 6376)", f"_domainkey.{domain}", "TXT", (), "none",
                            f"no DKIM key published for {domain} yet: run `certkeeper rotate-dkim {domain}`"))
    return out


def _caa_records(config: Config, domain: str) -> list[Expected]:
    names = sorted({d.removeprefix("*.") for c in config.certificates for d in c.domains if in_domain(d, domain)})
    groups, note = caa_groups(config)
    issuers = tuple(dict.fromkeys(n for g in groups for n in g))
    if not issuers:
        log.warning("CAA: %s", note)
        return [Expected("CAA (RFC 8659)", name, "CAA", (), "none", f"no CAA issuer known: {note}")
                for name in names or [domain]]
    if note:
        log.info("CAA: %s", note)
    wild = {d[2:] for c in config.certificates for d in c.domains if d.startswith("*.")}
    heading = "CAA (RFC 8659): only this CA may issue" if len(groups) == 1 else \
        "CAA (RFC 8659): only these CAs (every configured authority) may issue"
    out = []
    for name in names or [domain]:
        values = tuple(f'0 issue "{i}"' for i in issuers)
        if name in wild:  # RFC 8659 4.3: issuewild for the wildcard certificate's CAs
            values += tuple(f'0 issuewild "{i}"' for i in issuers)
        out.append(Expected(heading, name, "CAA", values, "caa", groups=groups))
    return out


def _mta_sts_records(config: Config, domain: str) -> list[Expected]:
    from certkeeper.core.mtasts import render_txt
    from certkeeper.network.mtasts_publish import domains_to_serve, render_tlsrpt, tlsrpt_domains

    out = []
    policy = domains_to_serve(config).get(domain)
    if policy is not None:
        out.append(Expected("MTA-STS (RFC 8461) and TLSRPT (RFC 8460)", f"_mta-sts.{domain}", "TXT",
                            (render_txt(policy.policy_id()),), "sts", "certkeeper publishes this one"))
    if domain in tlsrpt_domains(config):
        out.append(Expected("MTA-STS (RFC 8461) and TLSRPT (RFC 8460)", f"_smtp._tls.{domain}", "TXT",
                            (render_tlsrpt(config.tlsrpt.rua),), "tlsrpt", "certkeeper publishes this one"))
    return out


def _ptr_records(config: Config) -> list[Expected]:
    hosts = mx_hosts(config)
    if not hosts:
        return []
    return [Expected("PTR: ask your hosting provider for these (reverse DNS, FCrDNS)",
                     dns.reversename.from_address(addr).to_text(omit_final_dot=True), "PTR", (f"{hosts[0]}.",),
                     "ptr") for addr in (*config.records.ipv4, *config.records.ipv6)]


# ---------------------------------------------------------------------------
# Printing.


def render(config: Config, domains: Iterable[str]) -> str:
    """BIND-format lines for every record of every domain, grouped under comments."""
    lines: list[str] = []
    done: set[tuple[str, str]] = set()
    for domain in domains:
        lines.append(f"; ---- {domain}: DNS records for mail (certkeeper dns) ----")
        if not config.records.ipv4 and not config.records.ipv6:
            lines.append("; set [records] ipv4 / ipv6 to get the A, AAAA and PTR records")
        section = ""
        for item in expected_records(config, domain):
            if (item.name, item.rtype) in done:
                continue
            done.add((item.name, item.rtype))
            if item.section != section:
                section = item.section
                lines.append(f"; {section}")
            if not item.values:
                lines.append(f"; {item.note}")
                continue
            note = f"  ; {item.note}" if item.note else ""
            bind = item.as_record_set(config.dns.ttl).to_bind().splitlines()
            lines += [line + note for line in bind]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Checking.


@dataclass(frozen=True)
class Row:
    record: str  # "NAME TYPE" or a check's name
    expected: str
    found: str
    status: str  # ok | missing | wrong


Lookup = Callable[[str, str], tuple[str, ...]]  # (name, type) -> values (TXT joined); () when none


def resolver_lookup(config: Config) -> Lookup:
    """Live lookups through ``[dns] resolver`` or the system's resolver."""
    resolver = make_resolver(config)

    def lookup(name: str, rtype: str) -> tuple[str, ...]:
        try:
            answer = resolver.resolve(name.rstrip(".") + ".", rtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return ()
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            # The resolver itself failed: that says nothing about the record, so it is not "missing".
            where = config.dns.resolver or "the system's resolver"
            raise DNSError(f"cannot look up {name} {rtype} through {where}: {' '.join(str(exc).split())}") from None
        except dns.exception.DNSException as exc:
            log.info("lookup %s %s failed: %s", name, rtype, exc)
            return ()
        return tuple(sorted(from_rdata(r) for r in answer.rrset or ()))

    return lookup


def dict_lookup(answers: dict[tuple[str, str], Iterable[str]]) -> Lookup:
    """A plain-data lookup for unit tests."""
    return lambda name, rtype: tuple(sorted(answers.get((name.rstrip(".").lower(), rtype.upper()), ())))


def check(config: Config, domain: str, lookup: Lookup) -> list[Row]:
    rows: list[Row] = []
    for item in expected_records(config, domain):
        if not item.values:
            rows.append(Row(f"{item.name} {item.rtype}", item.note, "-", "missing"))
            continue
        rows.append(_check_one(item, lookup))
    rows += _mx_policy_rows(config, domain, lookup)
    rows += _fcrdns_rows(config, domain, lookup)
    rows += handmade_selector_rows(config, domain, lookup)
    return rows


# Selectors people pick by hand (the guide's "default", providers' "selector1" ...), looked up besides the
# ones the signer's configuration and key_dir name: DNS cannot list the names under _domainkey.
COMMON_SELECTORS = ("default", "dkim", "mail", "selector1", "selector2", "s1", "s2")


def handmade_selector_rows(config: Config, domain: str, lookup: Lookup) -> list[Row]:
    """DKIM key records in DNS that certkeeper's state does not know (keys made by hand), status
    "unmanaged", each with the command that adopts it (``rotate-dkim --adopt``)."""
    item = next((d for d in config.dkim if d.domain == domain), None)
    if item is None:
        return []
    from certkeeper.keeper import signers
    from certkeeper.network import rotation

    mine = rotation.load_state(config, domain).selectors
    prefix, suffix = f"{domain}.", ".key"
    try:
        names = [entry.name for entry in item.key_dir.iterdir()]
    except OSError:
        names = []
    on_disk = {n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)}
    candidates = (set(COMMON_SELECTORS) | set(signers.keys_named(item)) | on_disk) - mine
    rows = []
    for selector in sorted(candidates):
        name = f"{selector}._domainkey.{domain}"
        found = [v for v in lookup(name, "TXT") if _relevant("tags", v) and not _revoked(v)]
        if found:
            rows.append(Row(f"{name} TXT", f"made by hand? certkeeper rotate-dkim --adopt {selector} {domain}",
                            ", ".join(found), "unmanaged"))
    return rows


def _revoked(value: str) -> bool:
    return ("p", "") in _tags(value)


def _check_one(item: Expected, lookup: Lookup) -> Row:
    label = f"{item.name} {item.rtype}"
    expected = ", ".join(item.values)
    if item.kind == "caa":
        return _check_caa(item, lookup)
    found = lookup(item.name, item.rtype)
    relevant = [v for v in found if _relevant(item.kind, v)]
    shown = ", ".join(relevant) if relevant else ("-" if not found else "(only: " + ", ".join(found) + ")")
    if not relevant:
        return Row(label, expected, shown, "missing")
    same = _normal(item.kind, relevant) == _normal(item.kind, item.values)
    return Row(label, expected, shown, "ok" if same else "wrong")


_PREFIX = {"spf": "v=spf1", "sts": "v=stsv1", "tlsrpt": "v=tlsrptv1"}


# RFC 7489 6.3: a tag left out means its default, so "pct=100" and no pct are the same record.
_DMARC_DEFAULTS = {("pct", "100"), ("aspf", "r"), ("adkim", "r"), ("fo", "0"), ("rf", "afrf"), ("ri", "86400")}


def _relevant(kind: str, value: str) -> bool:
    """Only records of the expected kind count (a domain has other TXT records)."""
    if kind == "dmarc":
        return value.replace(" ", "").lower().startswith("v=dmarc1")
    prefix = _PREFIX.get(kind)
    if prefix is None:
        return kind != "tags" or value.replace(" ", "").lower().startswith(("v=dmarc1", "v=dkim1", "k=", "p="))
    v = value.strip().lower()
    return v == prefix or v.startswith(prefix + " ") or v.startswith(prefix + ";")


def _normal(kind: str, values: Iterable[str]) -> frozenset[object]:
    if kind in ("tags", "sts", "tlsrpt"):
        return frozenset(_tags(v) for v in values)
    if kind == "dmarc":  # tag names and policy values are case-insensitive; defaults need not be written
        return frozenset(frozenset((t, v if t in ("rua", "ruf") else v.lower()) for t, v in _tags(x)) -
                         _DMARC_DEFAULTS for x in values)
    if kind == "spf":
        return frozenset(" ".join(v.lower().split()) for v in values)
    if kind == "mx":  # the hosts matter; a preference of 1 instead of 10 is not an error
        return frozenset(v.split()[-1].rstrip(".").lower() for v in values if v.split())
    if kind in ("ptr", "set"):
        return frozenset(_name_or_address(v) for v in values)
    return frozenset(values)


def _tags(text: str) -> frozenset[tuple[str, str]]:
    """RFC 6376 3.2 / RFC 7489 6.4 tag-list, whitespace ignored, as a set of (tag, value)."""
    pairs = set()
    for spec in text.split(";"):
        name, _, value = spec.partition("=")
        if name.strip():
            pairs.add((name.strip().lower(), re.sub(r"\s+", "", value)))
    return frozenset(pairs)


def _name_or_address(value: str) -> str:
    value = value.strip().lower()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    return " ".join(part.rstrip(".") for part in value.split())


def _check_caa(item: Expected, lookup: Lookup) -> Row:
    """RFC 8659 3: the relevant CAA set is the closest one found climbing towards the root."""
    label = f"{item.name} CAA"
    name = item.name
    found: tuple[str, ...] = ()
    while name.count(".") >= 1:
        found = lookup(name, "CAA")
        if found:
            break
        name = name.split(".", 1)[1]
    expected = ", ".join(item.values)
    if not found:
        return Row(label, expected, "- (any CA may issue)", "missing")
    shown = ", ".join(found) + (f" (at {name})" if name != item.name else "")

    def issuers(values: tuple[str, ...], tag: str) -> set[str]:
        return {v.split('"')[1].split(";")[0].strip().lower() for v in values if f" {tag} " in f" {v} " and '"' in v}

    # Every configured CA may issue, by any of the names it recognises; for a wildcard, issuewild when
    # present, else issue (RFC 8659 4.3).
    issue, wild = issuers(found, "issue"), issuers(found, "issuewild") or issuers(found, "issue")
    groups = item.groups or tuple((n,) for n in issuers(item.values, "issue"))
    ok = all(set(g) & issue for g in groups)
    if issuers(item.values, "issuewild"):
        ok = ok and all(set(g) & wild for g in groups)
    return Row(label, expected, shown, "ok" if ok else "wrong")


def _mx_policy_rows(config: Config, domain: str, lookup: Lookup) -> list[Row]:
    """RFC 8461 4.1: every MX host must match one of the policy's mx patterns."""
    from certkeeper.network.mtasts_publish import domains_to_serve

    policy = domains_to_serve(config).get(domain)
    if policy is None or policy.mode == "none":
        return []
    rows = []
    for host in _found_mx(domain, lookup):
        ok = any(_mx_matches(pattern, host) for pattern in policy.mx)
        rows.append(Row(f"MX {host} in MTA-STS policy", "matches " + ", ".join(policy.mx),
                        "yes" if ok else "no match", "ok" if ok else "wrong"))
    return rows


def _mx_matches(pattern: str, host: str) -> bool:
    # RFC 8461 4.1: "*.example.com" matches exactly one extra label, not the base name.
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


def _found_mx(domain: str, lookup: Lookup) -> list[str]:
    return sorted({v.split()[-1].rstrip(".").lower() for v in lookup(domain, "MX") if v.split()})


def _fcrdns_rows(config: Config, domain: str, lookup: Lookup) -> list[Row]:
    """Forward-confirmed reverse DNS of every address of every MX host (the guide's A.5)."""
    rows = []
    for host in _found_mx(domain, lookup) or list(mx_hosts(config)):
        addresses = lookup(host, "A") + lookup(host, "AAAA")
        if not addresses:
            rows.append(Row(f"FCrDNS {host}", "A/AAAA + PTR back to it", "no address", "missing"))
        for addr in addresses:
            rows.append(_fcrdns_row(host, addr, lookup))
    return rows


def _fcrdns_row(host: str, addr: str, lookup: Lookup) -> Row:
    label = f"FCrDNS {host} {addr}"
    ptrs = [p.rstrip(".").lower() for p in lookup(dns.reversename.from_address(addr).to_text(), "PTR")]
    if not ptrs:
        return Row(label, f"PTR {host}", "no PTR", "missing")
    for name in ptrs:
        if name == host and addr in lookup(name, "A") + lookup(name, "AAAA"):
            return Row(label, f"PTR {host}", f"PTR {name} -> {addr}", "ok")
    return Row(label, f"PTR {host}", "PTR " + ", ".join(ptrs), "wrong")


TABLE_WIDTH = 100  # columns of `dns --check` output: fits a terminal and a mail


def render_table(rows: list[Row], width: int = TABLE_WIDTH) -> str:
    """RECORD, EXPECTED, FOUND, STATUS in at most ``width`` columns: long cells wrap onto more
    lines (at spaces, else anywhere), never cut: every expected value is there whole."""
    header = Row("RECORD", "EXPECTED", "FOUND", "STATUS")
    status_w = max(len(r.status) for r in [header, *rows])
    gaps = 3 * 2
    record_w = min(max(len(r.record) for r in [header, *rows]), 40)
    rest = max(width - gaps - status_w - record_w, 20)
    longest_expected = max(len(r.expected) for r in [header, *rows])
    longest_found = max(len(r.found) for r in [header, *rows])
    expected_w = min(longest_expected, max(rest - min(longest_found, rest // 2), rest // 2))
    found_w = max(min(longest_found, rest - expected_w), 5)
    lines = []
    for row in [header, *rows]:
        cells = [_wrap(row.record, record_w), _wrap(row.expected, expected_w), _wrap(row.found, found_w),
                 [row.status]]
        for i in range(max(len(c) for c in cells)):
            parts = [c[i] if i < len(c) else "" for c in cells]
            lines.append(f"{parts[0]:<{record_w}}  {parts[1]:<{expected_w}}  {parts[2]:<{found_w}}  {parts[3]}"
                         .rstrip())
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken after "; ", ", " or a space when
    there is one, else anywhere (a base64 key); nothing is left out."""
    out: list[str] = []
    while len(text) > width:
        cut = max(text.rfind(" ", 0, width + 1), 0)
        if cut == 0:
            cut = width
        out.append(text[:cut].rstrip())
        text = text[cut:].lstrip(" ")
    out.append(text)
    return out
