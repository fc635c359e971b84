"""Config validation: every error is one line naming file, key and value; `certkeeper check` exits 0/1."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from certkeeper import cli
from certkeeper.core import config
from certkeeper.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "certkeeper.toml"

MINIMAL = """
[[certificate]]
name = "mail.example.com"
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "etc/certkeeper.toml")
    return info.value.lines


def test_example_config_is_valid_and_uses_the_guides_hosts() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.certificate_names() == ("mail.example.com", "mta-sts.example.com")
    mail = cfg.certificate("mail.example.com")
    assert mail.key == Path("/etc/ssl/private/mail.example.com.key")
    assert mail.fullchain == Path("/etc/ssl/mail.example.com.fullchain.pem")
    assert mail.key_mode == 0o600
    assert cfg.acme.account_key == Path("/etc/acme/letsencrypt-privkey.pem")
    assert cfg.mta_sts[0].host == "mta-sts.example.com"


def test_paths_default_to_acme_client_layout() -> None:
    cert = config.parse(MINIMAL).certificates[0]
    assert cert.domains == ("mail.example.com",)
    assert cert.key == Path("/etc/ssl/private/mail.example.com.key")
    assert cert.cert == Path("/etc/ssl/mail.example.com.crt")
    assert cert.chain == Path("/etc/ssl/mail.example.com.chain.pem")
    assert cert.fullchain == Path("/etc/ssl/mail.example.com.fullchain.pem")
    assert cert.key_type == "ecdsa-p256"


def test_bad_key_type_is_one_line_naming_file_key_and_value() -> None:
    lines = errors_of(MINIMAL + 'key_type = "rsa1024"\n')
    assert lines == ["etc/certkeeper.toml: certificate[1].key_type: 'rsa1024' is not one of "
                     "rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384"]


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[acme]\ndirectroy = "https://x/dir"\n', "etc/certkeeper.toml: acme.directroy: unknown key"),
    ('[[certificate]]\nname = "a.example.com"\nkeyfile = "/x"\n',
     "etc/certkeeper.toml: certificate[1].keyfile: unknown key"),
    ('[[certificate]]\nname = "a.example.com"\ndomains = ["bad_name.example.com"]\n',
     "etc/certkeeper.toml: certificate[1].domains[1]: 'bad_name.example.com' has an invalid label 'bad_name'"),
    ('[[certificate]]\nname = "a.example.com"\ndomains = ["*.example.com"]\n',
     "etc/certkeeper.toml: certificate[1].domains[1]: '*.example.com' may not contain '*'"),
    ('[[certificate]]\nname = "a.example.com"\ndomains = ["localhost"]\n',
     "etc/certkeeper.toml: certificate[1].domains[1]: 'localhost' is not a fully qualified domain name"),
    ('[[certificate]]\nname = "a.example.com"\ndomains = ["bücher.example"]\n',
     "etc/certkeeper.toml: certificate[1].domains[1]: 'bücher.example' is not in A-label form; "
     "write 'xn--bcher-kva.example'"),
    ('[[certificate]]\nname = "a.example.com"\nkey = "ssl/a.key"\n',
     "etc/certkeeper.toml: certificate[1].key: 'ssl/a.key' is a relative path; use an absolute one"),
    ('state_dir = "var/db/certkeeper"\n',
     "etc/certkeeper.toml: state_dir: 'var/db/certkeeper' is a relative path; use an absolute one"),
    ('[[certificate]]\nname = "a.example.com"\n[[certificate]]\nname = "a.example.com"\n',
     "etc/certkeeper.toml: certificate[2].name: 'a.example.com' is already used by certificate[1]"),
    ('[[certificate]]\nname = "a.example.com"\nkey_mode = "0644"\n',
     "etc/certkeeper.toml: certificate[1].key_mode: 0644 lets others read"),
    ('[acme]\ndirectory = "http://insecure.example/dir"\n',
     "etc/certkeeper.toml: acme.directory: 'http://insecure.example/dir' is not an https:// URL"),
    ('[acme]\ncontact = ["postmaster@example.com"]\n',
     "etc/certkeeper.toml: acme.contact[1]: 'postmaster@example.com' is not a mailto: URL"),
    ('[http]\nlisten = ["80"]\n', "etc/certkeeper.toml: http.listen[1]: '80' is not ADDRESS:PORT"),
    ('[acme]\nconcurrency = 0\n', "etc/certkeeper.toml: acme.concurrency: 0 is out of range 1..64"),
    ('[acme]\nconcurrency = "4"\n', "etc/certkeeper.toml: acme.concurrency: '4' is not an integer"),
    ('[[certificate]]\nname = "a.example.com"\nhooks = ["postfix"]\n',
     "etc/certkeeper.toml: certificate[1].hooks[1]: 'postfix' is neither a [hooks.postfix] table"),
    ('[hooks.smtpd]\nverify = ["smtp://127.0.0.1:25"]\n',
     "etc/certkeeper.toml: hooks.smtpd.verify[1]: 'smtp://127.0.0.1:25' does not start with one of"),
])
def test_each_validation_error_is_one_line(snippet: str, expected: str) -> None:
    lines = errors_of(snippet)
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]
    assert "\n" not in lines[0]


def test_every_problem_is_reported_not_just_the_first() -> None:
    lines = errors_of('state_dir = "rel"\n[acme]\nbogus = 1\n[[certificate]]\nname = "x.example.com"\n'
                      'key_type = "dsa"\n')
    assert [line.split(": ")[1] for line in lines] == ["state_dir", "acme.bogus", "certificate[1].key_type"]


def test_toml_syntax_error_names_the_file() -> None:
    lines = errors_of("[acme\n")
    assert len(lines) == 1 and lines[0].startswith("etc/certkeeper.toml: ")


def test_mta_sts_validation_follows_rfc8461() -> None:
    base = '[[certificate]]\nname = "mta-sts.example.com"\n[[mta_sts]]\ndomain = "example.com"\n'
    assert errors_of(base + 'mode = "enforce"\n') == [
        "etc/certkeeper.toml: mta_sts[1].mx: is required when mode is 'enforce' (RFC 8461 3.2)"]
    assert errors_of(base + 'mode = "testing"\nmx = ["mail.example.com"]\nmax_age = 31557601\n') == [
        "etc/certkeeper.toml: mta_sts[1].max_age: 31557601 is out of range 0..31557600"]
    ok = config.parse(base + 'mode = "none"\n')
    assert ok.mta_sts[0].mx == () and ok.mta_sts[0].certificate == "mta-sts.example.com"
    wildcard = config.parse(base + 'mode = "enforce"\nmx = ["*.example.com"]\n')
    assert wildcard.mta_sts[0].mx == ("*.example.com",)


def test_dkim_selector_format_must_make_a_dns_label() -> None:
    lines = errors_of('[[dkim]]\ndomain = "example.com"\nselector_format = "%Y %m"\n')
    assert lines == ["etc/certkeeper.toml: dkim[1].selector_format: '%Y %m' makes '2026 01', "
                     "which is not a valid DNS label"]


def test_check_command_exit_codes(tmp_path: Path) -> None:
    out = io.StringIO()
    assert cli.main(["--config", str(EXAMPLE), "check"], out=out) == 0
    assert "configuration OK" in out.getvalue()
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('key_type = "ecdsa-p256"', 'key_type = "rsa1024"', 1))
    result = subprocess.run([sys.executable, "-m", "certkeeper", "--config", str(bad), "check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr == (f"certkeeper: {bad}: certificate[1].key_type: 'rsa1024' is not one of "
                             "rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384\n")
    assert "Traceback" not in result.stderr


def test_check_warns_for_a_dkim_signer_without_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The switch cannot be verified end to end: a warning line, the exit status unchanged."""
    conf = tmp_path / "certkeeper.toml"
    tables = (f'[[dkim]]\ndomain = "a.example"\nkey_dir = "{tmp_path}/a"\nsigner = "rspamd"\n'
              f'[[dkim]]\ndomain = "b.example"\nkey_dir = "{tmp_path}/b"\nsigner = "filter-dkimsign"\n'
              f'signer_config = "{tmp_path}/dkimsign.conf"\n'
              f'[[dkim]]\ndomain = "c.example"\nkey_dir = "{tmp_path}/c"\nsigner = "none"\n')
    conf.write_text(f'state_dir = "{tmp_path}/state"\n[hooks.rspamd]\ncommand = ["true"]\n'
                    f'[hooks.smtpd]\ncommand = ["true"]\n{tables}')
    out = io.StringIO()
    assert cli.main(["--config", str(conf), "check"], out=out) == 0
    assert out.getvalue() == f"{conf}: configuration OK\n"
    assert capsys.readouterr().err.splitlines() == [
        f"certkeeper: warning: {conf}: dkim[1].probe: none for a.example: a switch to a new key is not checked "
        'to sign with it (add probe = "rspamd://127.0.0.1:11333")',
        f"certkeeper: warning: {conf}: dkim[2].probe: none for b.example: a switch to a new key is not checked "
        'to sign with it (add probe = "smtp://127.0.0.1:25")',
    ]
    conf.write_text(conf.read_text().replace('signer = "rspamd"\n', 'signer = "rspamd"\nprobe = "rspamd://127.0.0.1:11333"\n')
                    .replace('signer = "filter-dkimsign"\n', 'signer = "filter-dkimsign"\nprobe = "smtp://127.0.0.1:25"\n'))
    assert cli.main(["--config", str(conf), "check"], out=io.StringIO()) == 0
    assert capsys.readouterr().err == ""


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(tmp_path / "nope.toml"), "check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == f"certkeeper: {tmp_path / 'nope.toml'}: cannot read: No such file or directory"


def test_a_bad_table_still_has_its_other_keys_checked() -> None:
    lines = errors_of('[[certificate]]\nname = "a.example.com"\n'
                      '[[certificate]]\nname = "a.example.com"\ndomains = ["bad_name.example.com"]\nkey = "rel.key"\n'
                      '[[mta_sts]]\ndomain = "bücher.example"\nmax_age = -1\nmx = ["x..example.com"]\n')
    assert [line.split(": ")[1] for line in lines] == [
        "certificate[2].name", "certificate[2].domains[1]", "certificate[2].key", "mta_sts[1].domain",
        "mta_sts[1].mx[1]", "mta_sts[1].max_age"]


def test_mx_is_required_only_when_none_was_given() -> None:
    base = '[[certificate]]\nname = "mta-sts.example.com"\n[[mta_sts]]\ndomain = "example.com"\n'
    assert errors_of(base + 'mode = "enforced"\nmx = ["mail.example.com"]\n') == [
        "etc/certkeeper.toml: mta_sts[1].mode: 'enforced' is not one of enforce, testing, none"]
    assert [line.split(": ")[1] for line in errors_of(base + 'mode = "enforce"\nmx = ["bad_mx.example.com"]\n')] \
        == ["mta_sts[1].mx[1]"]


@pytest.mark.parametrize("value", ["600", "0o600"])
def test_a_file_mode_must_be_quoted(value: str) -> None:
    assert errors_of(MINIMAL + f"key_mode = {value}\n") == [
        f"etc/certkeeper.toml: certificate[1].key_mode: {int(value, 0)} is not a file mode in quotes, "
        "such as \"0600\""]


def test_usage_errors_exit_1_never_2_which_means_nothing_was_due() -> None:
    result = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(EXAMPLE), "renew", "--bogus"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "certkeeper: unrecognized arguments: --bogus"


@pytest.mark.parametrize("value", ['"3000000d"', '"9999999999999999999990d"', "9999999999999999999999",
                                   '"3651d"', '"522w"'])
def test_absurd_durations_are_one_line_errors(tmp_path: Path, value: str) -> None:
    """A duration past ten years is a typo; before, "3000000d" passed and killed the DKIM job with an
    OverflowError, and a 22-digit one made `check` print a traceback."""
    path = tmp_path / "c.toml"
    path.write_text(f'[[dkim]]\ndomain = "example.com"\nrotate_every = {value}\n')
    out = io.StringIO()
    assert cli.main(["--config", str(path), "check"], out=out) == 1
    assert errors_of(path.read_text()) == [
        f"etc/certkeeper.toml: dkim[1].rotate_every: {value.replace(chr(34), chr(39))} is longer than 3650d "
        "(ten years)"]
    assert config.parse('[[dkim]]\ndomain = "example.com"\nrotate_every = "3650d"\n').dkim[0].rotate_every \
        == config.MAX_DURATION


@pytest.mark.parametrize(("text", "expected"), [
    ("x = " + "[" * 5000 + "]" * 5000, "etc/certkeeper.toml: arrays or tables nested more than 16 deep"),
    ("x = " + "9" * 5000, "etc/certkeeper.toml: Exceeds the limit (4300 digits) for integer string conversion"),
])
def test_pathological_toml_is_a_config_error(text: str, expected: str) -> None:
    lines = errors_of(text)
    assert len(lines) == 1 and lines[0].startswith(expected) and "\n" not in lines[0], lines


def test_a_group_writable_dkim_key_mode_is_refused() -> None:
    for mode in ("0660", "0460", "0444"):
        lines = errors_of(f'[[dkim]]\ndomain = "example.com"\nkey_mode = "{mode}"\n')
        assert lines == [f"etc/certkeeper.toml: dkim[1].key_mode: {mode} lets others read or the group write "
                         "the key"]
    assert config.parse('[[dkim]]\ndomain = "example.com"\nkey_mode = "0640"\n').dkim[0].key_mode == 0o640
