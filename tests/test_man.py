"""Manual pages: mandoc -T lint clean, and every config key, subcommand and flag documented."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from certkeeper import cli
from certkeeper.core import config
from certkeeper.core.errors import ConfigError
from tests.fixtures.peers import require_binary

MAN = Path(__file__).resolve().parent.parent / "certkeeper" / "man"
PAGES = ["certkeeper.8", "certkeeper.toml.5"]

# .Sh section of certkeeper.toml(5) → (TOML snippet with a bogus key in that table, dataclass)
SECTIONS: dict[str, tuple[str, type]] = {
    "GLOBAL KEYS": ("bogus_key = 1\n", config.Config),
    "ACME SECTION": ("[acme]\nbogus_key = 1\n", config.AcmeConfig),
    "HTTP SECTION": ("[http]\nbogus_key = 1\n", config.HttpConfig),
    "CERTIFICATE TABLES": ('[[certificate]]\nname = "a.example.com"\nbogus_key = 1\n', config.CertificateConfig),
    "HOOK TABLES": ('[hooks.x]\ncommand = ["true"]\nbogus_key = 1\n', config.HookConfig),
    "MTA-STS TABLES": ('[[mta_sts]]\ndomain = "example.com"\nmode = "none"\nbogus_key = 1\n', config.MtaStsConfig),
    "DNS SECTION": ("[dns]\nbogus_key = 1\n", config.DnsConfig),
    "DANE SECTION": ("[dane]\nbogus_key = 1\n", config.DaneConfig),
    "TLSRPT SECTION": ("[tlsrpt]\nbogus_key = 1\n", config.TlsRptConfig),
    "DMARC SECTION": ("[dmarc]\nbogus_key = 1\n", config.DmarcConfig),
    "RECORDS SECTION": ("[records]\nbogus_key = 1\n", config.RecordsConfig),
    "DKIM TABLES": ('[[dkim]]\ndomain = "example.com"\nbogus_key = 1\n', config.DkimConfig),
    "ALERTS SECTION": ("[alerts]\nbogus_key = 1\n", config.AlertsConfig),
    "METRICS SECTION": ("[metrics]\nbogus_key = 1\n", config.MetricsConfig),
    "FLEET SECTION": ('[fleet]\nbackend = "etcd"\nbogus_key = 1\n', config.FleetConfig),
}
SUB_TABLES = {"acme", "http", "certificate", "hooks", "mta_sts", "dns", "dane", "tlsrpt", "dmarc", "records", "dkim",
              "alerts", "metrics", "fleet", "authority"}


def read(page: str) -> str:
    return (MAN / page).read_text()


# What `mandoc -T lint` says about the machine, not the page: pages it cannot find (acme-client(1) is
# OpenBSD's) and a stale mandoc.db.
ENVIRONMENT_NOTES = ("referenced manual not found", "outdated mandoc.db")


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_clean(page):
    mandoc = require_binary("mandoc")
    proc = subprocess.run([mandoc, "-T", "lint", "-W", "warning", str(MAN / page)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    # Plain `mandoc -T lint` also prints STYLE messages (section names that look like typos,
    # delimiters without a blank): none of those either.
    proc = subprocess.run([mandoc, "-T", "lint", str(MAN / page)], capture_output=True, text=True, timeout=30,
                          check=False)
    notes = [line for line in (proc.stdout + proc.stderr).splitlines()
             if not any(note in line for note in ENVIRONMENT_NOTES)]
    assert notes == []


def keys_the_validator_accepts(snippet: str) -> list[str]:
    """The key list from config.py's own 'unknown key (expected one of ...)' message."""
    with pytest.raises(ConfigError) as info:
        config.parse(snippet, "probe.toml")
    (line,) = [x for x in info.value.lines if "bogus_key: unknown key" in x]
    listed = re.search(r"expected one of (.*)\)$", line).group(1)
    return [k for k in listed.split(", ") if k not in SUB_TABLES]


def man_sections(text: str) -> dict[str, str]:
    parts = re.split(r"^\.Sh (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def item_line(section: str, key: str) -> str:
    match = re.search(rf"^\.It Ic (?:[\w]+ , )*{re.escape(key)}\b.*$", section, re.M)
    return match.group(0) if match else ""


def documented_default(value: object, name: str) -> list[str]:
    """How the man page spells a dataclass default, or [] when it is not a simple scalar."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, int) and name.endswith("mode"):
        return [f'"{value:04o}"']
    if isinstance(value, int | float):
        return [f"{value:g}"]
    if isinstance(value, str | Path) and str(value):
        return [f'"{value}"']
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return [f'"{v}"' for v in value]
    return []


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_config_key_and_default_is_in_certkeeper_toml_5(section):
    snippet, cls = SECTIONS[section]
    text = re.sub(r"Qq (\S+)", r'"\1"', man_sections(read("certkeeper.toml.5"))[section])
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING and not isinstance(f.default, timedelta)}
    for key in keys_the_validator_accepts(snippet):
        line = item_line(text, key)
        assert line, f"{section}: key {key!r} is not documented"
        for spelling in documented_default(defaults.get(key), key):
            assert spelling in line, (section, key, spelling, line)


def test_every_subcommand_and_flag_is_in_certkeeper_8():
    text = read("certkeeper.8")
    commands = re.findall(r"^\.It Cm (\S+)", text, re.M)
    for command in [*cli.COMMANDS, *cli.NO_CONFIG]:
        assert command in commands, f"subcommand {command} has no .It Cm entry"
    parser = cli.build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API
        for flag in action.option_strings:  # the global flags: -c/--config, -v, --version
            if flag not in ("-h", "--help"):
                assert (f"Fl {flag[1:]}" if not flag.startswith("--") else f"Fl \\-{flag[2:]}") in text, flag
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 - argparse has no public API
    for name, subparser in sub.choices.items():
        for action in subparser._actions:  # noqa: SLF001
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                spelled = "Fl " + flag.lstrip("-").replace("-", "\\-") if flag.startswith("--") else f"Fl {flag[1:]}"
                if flag.startswith("--"):
                    spelled = "Fl \\-" + flag[2:]
                assert spelled in text, f"{name}: flag {flag} is not documented"
    for code in ("0", "1", "2"):
        assert re.search(rf"^\.It {code}$", text, re.M)
    for heading in ("SIGNALS", "FILES", "EXIT STATUS", "EXAMPLES", "JSON STATUS", "ENVIRONMENT"):
        assert re.search(rf"^\.S[hs] {heading}$", text, re.M), heading


def test_json_keys_of_status_are_documented():
    from certkeeper.keeper import status

    text = read("certkeeper.8")
    json_part = text[text.index(".Ss JSON STATUS"):text.index(".Sh SIGNALS")]
    for key in status.CERTIFICATE_KEYS + ("version", "generated_at", "config", "certificates", "dkim", "mta_sts"):
        assert re.search(rf"\b{key}\b", json_part), key
