"""certkeeper.keeper.signers: the rspamd / filter-dkimsign files and their hook (content only; no
rspamd or smtpd is started here: the hooks engineer owns the one smtpd this machine runs)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from certkeeper.core import config as ck_config
from certkeeper.core.errors import ConfigError, LocalError, ServiceError
from certkeeper.keeper import signers

RSA = signers.SigningKey("example.com", "20260304", "rsa2048", Path("/etc/mail/dkim/example.com.20260304.key"))
ED = signers.SigningKey("example.com", "20260304-ed25519", "ed25519",
                        Path("/etc/mail/dkim/example.com.20260304-ed25519.key"))
OTHER = signers.SigningKey("example.org", "20260101", "rsa2048", Path("/etc/mail/dkim/example.org.20260101.key"))


def make_config(tmp_path: Path, signer: str = "rspamd", hook_command: str = "echo ran >> $LOG") -> ck_config.Config:
    log = tmp_path / "hook.log"
    text = f"""
state_dir = "{tmp_path / 'state'}"
[hooks.signer]
command = ["sh", "-c", "{hook_command.replace('$LOG', str(log))}"]
[[dkim]]
domain = "example.com"
signer = "{signer}"
signer_config = "{tmp_path / 'signer.conf'}"
signer_hook = "signer"
"""
    return ck_config.parse(text, tmp_path / "certkeeper.toml")


def test_rspamd_single_key_uses_selector_named_key_file():
    text = signers.render_rspamd([RSA])
    assert 'path = "/etc/mail/dkim/example.com.20260304.key";' in text
    assert 'selector = "20260304";' in text
    assert '"example.com" {' in text and text.count("{") == text.count("}")
    assert "selectors" not in text


def test_rspamd_two_keys_for_one_domain_sign_twice_and_domains_are_separate():
    text = signers.render_rspamd([OTHER, ED, RSA])
    assert text.index('"example.com"') < text.index('"example.org"')  # stable order
    assert "selectors [" in text
    for key in (RSA, ED, OTHER):
        assert f'path = "{key.key_file}";' in text and f'selector = "{key.selector}";' in text
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")


def test_dkimsign_fragment_for_one_key():
    text = signers.render_dkimsign([RSA])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ['filter "dkimsign" proc-exec "filter-dkimsign -d example.com -s 20260304 '
                     '-k /etc/mail/dkim/example.com.20260304.key"']


def test_dkimsign_fragment_chains_one_filter_per_key():
    text = signers.render_dkimsign([ED, RSA])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        'filter "dkimsign-1" proc-exec "filter-dkimsign -a ed25519-sha256 -d example.com -s 20260304-ed25519 '
        '-k /etc/mail/dkim/example.com.20260304-ed25519.key"',
        'filter "dkimsign-2" proc-exec "filter-dkimsign -d example.com -s 20260304 '
        '-k /etc/mail/dkim/example.com.20260304.key"',
        'filter "dkimsign" chain { "dkimsign-1", "dkimsign-2" }',
    ]


def test_dkimsign_fragment_never_signs_for_two_domains(tmp_path):
    # filter-dkimsign(8) takes one -k and one -s; a chain of per-domain filters would sign every
    # message with every domain's key.
    with pytest.raises(LocalError) as info:
        signers.render_dkimsign([RSA, OTHER])
    assert "example.com and example.org" in str(info.value) and "\n" not in str(info.value)
    text = f"""
state_dir = "{tmp_path / 'state'}"
[[dkim]]
domain = "example.com"
signer = "filter-dkimsign"
[[dkim]]
domain = "example.org"
signer = "filter-dkimsign"
[[dkim]]
domain = "example.net"
signer = "filter-dkimsign"
signer_config = "{tmp_path / 'net.conf'}"
"""
    with pytest.raises(ConfigError) as err:
        ck_config.parse(text, tmp_path / "certkeeper.toml")
    (line,) = str(err.value).splitlines()
    assert "dkim[2].signer_config" in line and "'example.com' and 'example.org'" in line

    own = ck_config.parse("".join(f"""
[[dkim]]
domain = "{d}"
signer = "filter-dkimsign"
signer_config = "{tmp_path / d}.conf"
""" for d in ("example.com", "example.org", "example.net")), tmp_path / "certkeeper.toml")
    names = {signers.filter_name(own, item) for item in own.dkim}  # each fragment on its own listener
    assert names == {"dkimsign-example.com", "dkimsign-example.org", "dkimsign-example.net"}


def test_apply_writes_atomically_and_runs_the_hook_only_on_change(tmp_path):
    config = make_config(tmp_path)
    item = config.dkim[0]
    lines: list[str] = []
    assert signers.apply(config, item, [RSA], lines.append) is True
    target = tmp_path / "signer.conf"
    assert target.read_text() == signers.render_rspamd([RSA])
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert (tmp_path / "hook.log").read_text().splitlines() == ["ran"]
    assert not list(tmp_path.glob(".signer.conf*"))  # no temp file left behind
    assert signers.apply(config, item, [RSA], lines.append) is False
    assert (tmp_path / "hook.log").read_text().splitlines() == ["ran"]
    signers.apply(config, item, [RSA], lines.append, force_hook=True)  # a resumed switch re-runs it
    assert (tmp_path / "hook.log").read_text().splitlines() == ["ran", "ran"]
    assert any("running hook signer" in line for line in lines)


def test_failing_hook_is_a_one_line_service_error(tmp_path):
    config = make_config(tmp_path, hook_command="echo nope >&2; exit 3")
    with pytest.raises(ServiceError) as err:
        signers.apply(config, config.dkim[0], [RSA], lambda line: None)
    assert "hook signer" in str(err.value) and "exit 3" in str(err.value) and "nope" in str(err.value)
    assert "\n" not in str(err.value)


def test_none_signer_writes_nothing(tmp_path):
    config = make_config(tmp_path, signer="none")
    assert signers.apply(config, config.dkim[0], [RSA], lambda line: None) is False
    assert not (tmp_path / "signer.conf").exists() and not (tmp_path / "hook.log").exists()


def test_defaults():
    item = ck_config.DkimConfig(domain="example.com")
    assert signers.config_path(item) == Path("/etc/rspamd/local.d/dkim_signing.conf")
    assert signers.hook_name(item) == "rspamd"
    smtpd = ck_config.DkimConfig(domain="example.com", signer="filter-dkimsign")
    assert signers.hook_name(smtpd) == "smtpd"
    assert signers.config_path(ck_config.DkimConfig(domain="example.com", signer="none")) is None
