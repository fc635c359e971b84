"""certkeeper.keeper.signers: the rspamd / filter-dkimsign files and their hook, the key files' owner
and mode, and the checks before a switch (as the signer's user; real ``smtpd -n`` and ``rspamadm
configtest``). Signing by the real services is in test_rotation (smtpd) and test_rspamd."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

import pytest

from certkeeper.core import config as ck_config
from certkeeper.core import dkim
from certkeeper.core.errors import ConfigError, LocalError, ServiceError
from certkeeper.keeper import signers
from certkeeper.keeper.service import LocalKeeper

RSA = signers.SigningKey("example.com", "20260304", "rsa2048", Path("/etc/mail/dkim/example.com.20260304.key"))
ED = signers.SigningKey("example.com", "20260304-ed25519", "ed25519",
                        Path("/etc/mail/dkim/example.com.20260304-ed25519.key"))
OTHER = signers.SigningKey("example.org", "20260101", "rsa2048", Path("/etc/mail/dkim/example.org.20260101.key"))


def make_config(tmp_path: Path, signer: str = "rspamd", hook_command: str = "echo ran >> $LOG") -> ck_config.Config:
    log = tmp_path / "hook.log"
    if signer == "rspamd":  # the operator's dkim_signing.conf, naming the maps certkeeper writes
        (tmp_path / "signer.conf").write_text(DKIM_SIGNING_CONF.format(tmp=tmp_path))
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


# The guide's dkim_signing.conf with the two lines the README asks to add.
DKIM_SIGNING_CONF = """# the operator's own file: certkeeper only reads it
allow_username_mismatch = true;
selector_map = "{tmp}/dkim_selectors.map";
path_map = "file://{tmp}/dkim_paths.map"; # a file:// map is a local file too
"""


def test_rspamd_maps_give_one_selector_named_key_file_per_domain():
    selectors, paths = signers.render_rspamd_maps([OTHER, RSA])
    assert [line for line in selectors.splitlines() if not line.startswith("#")] == [
        "example.com 20260304", "example.org 20260101"]  # stable order
    assert [line for line in paths.splitlines() if not line.startswith("#")] == [
        "example.com /etc/mail/dkim/example.com.20260304.key", "example.org /etc/mail/dkim/example.org.20260101.key"]
    with pytest.raises(LocalError, match="one key per domain, but example.com has 20260304 and 20260304-ed25519"):
        signers.render_rspamd_maps([RSA, ED])


def test_rspamd_map_names_come_from_the_operators_dkim_signing_conf(tmp_path):
    conf = tmp_path / "dkim_signing.conf"
    conf.write_text(DKIM_SIGNING_CONF.format(tmp=tmp_path))
    assert signers.rspamd_maps(conf) == (tmp_path / "dkim_selectors.map", tmp_path / "dkim_paths.map")
    conf.write_text('# selector_map = "/nowhere";\nselector_map = "/etc/rspamd/sel.map";\n')
    with pytest.raises(LocalError) as err:
        signers.rspamd_maps(conf)
    assert str(err.value) == (f'{conf}: names no path_map; add path_map = "/etc/rspamd/dkim_paths.map"; '
                              "(certkeeper writes the map, never this file)")
    conf.write_text('selector_map = "https://example.com/sel.map";\npath_map = "/p.map";\n')
    with pytest.raises(LocalError, match="is not a local file with an absolute path"):
        signers.rspamd_maps(conf)


def test_two_algorithms_with_rspamd_are_refused_by_the_config(tmp_path):
    with pytest.raises(ConfigError) as err:
        ck_config.parse('[[dkim]]\ndomain = "example.com"\nalgorithms = ["rsa2048", "ed25519"]\n'
                        'selector_format = "%Y%m%d-{alg}"\n', "t.toml")
    assert str(err.value).startswith("t.toml: dkim[1].algorithms: rspamd's selector_map and path_map hold one key")


def test_dkimsign_fragment_for_one_key():
    text = signers.render_dkimsign([RSA])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ['filter "dkimsign" proc-exec "filter-dkimsign -d example.com -s 20260304 '
                     '-k /etc/mail/dkim/example.com.20260304.key"']
    text = signers.render_dkimsign([RSA], user="_dkimsign", group="_dkimsign")
    assert text.splitlines()[-1] == ('filter "dkimsign" proc-exec "filter-dkimsign -d example.com -s 20260304 '
                                     '-k /etc/mail/dkim/example.com.20260304.key" user _dkimsign group _dkimsign')


def test_signer_user_and_group_default_to_the_guides_and_key_group_follows():
    dkimsign = ck_config.parse('[[dkim]]\ndomain = "example.com"\nsigner = "filter-dkimsign"\n', "t.toml").dkim[0]
    assert (dkimsign.signer_user, dkimsign.signer_group, dkimsign.key_group) == ("_dkimsign", "_dkimsign", "_dkimsign")
    rspamd = ck_config.parse('[[dkim]]\ndomain = "example.com"\n', "t.toml").dkim[0]
    assert (rspamd.signer_user, rspamd.signer_group, rspamd.key_group) == ("_rspamd", "_rspamd", "_rspamd")
    own = ck_config.parse('[[dkim]]\ndomain = "example.com"\nsigner = "filter-dkimsign"\nsigner_user = "dk"\n'
                          'signer_group = "mail"\n', "t.toml").dkim[0]
    assert (own.signer_user, own.signer_group, own.key_group) == ("dk", "mail", "mail")
    with pytest.raises(ConfigError, match="dkim\\[1\\].signer_user: 'a b' is not a user or group name"):
        ck_config.parse('[[dkim]]\ndomain = "example.com"\nsigner_user = "a b"\n', "t.toml")


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
    operators = (tmp_path / "signer.conf").read_text()
    assert signers.apply(config, item, [RSA], lines.append) is True
    assert (tmp_path / "signer.conf").read_text() == operators  # dkim_signing.conf is never written
    selectors, paths = signers.render_rspamd_maps([RSA])
    assert (tmp_path / "dkim_selectors.map").read_text() == selectors
    assert (tmp_path / "dkim_paths.map").read_text() == paths
    for target in (tmp_path / "dkim_selectors.map", tmp_path / "dkim_paths.map"):
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert (tmp_path / "hook.log").read_text().splitlines() == ["ran"]
    assert not list(tmp_path.glob(".dkim_*"))  # no temp file left behind
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


def test_rspamd_without_the_map_lines_is_an_error_and_its_file_is_left_alone(tmp_path):
    config = make_config(tmp_path)
    guide = "allow_username_mismatch = true;\n\ndomain {\n  example.com {\n    selector = \"default\";\n  }\n}\n"
    (tmp_path / "signer.conf").write_text(guide)
    with pytest.raises(LocalError, match="names no selector_map"):
        signers.apply(config, config.dkim[0], [RSA], lambda line: None)
    assert (tmp_path / "signer.conf").read_text() == guide and not (tmp_path / "hook.log").exists()


def test_defaults():
    item = ck_config.DkimConfig(domain="example.com")
    assert signers.config_path(item) == Path("/etc/rspamd/local.d/dkim_signing.conf")
    assert signers.hook_name(item) == "rspamd"
    smtpd = ck_config.DkimConfig(domain="example.com", signer="filter-dkimsign")
    assert signers.hook_name(smtpd) == "smtpd"
    assert signers.config_path(ck_config.DkimConfig(domain="example.com", signer="none")) is None


# -- key files and the checks before a switch (real users, real smtpd -n and rspamadm) -------------


def _dkimsign_item(tmp: Path, **overrides: object) -> ck_config.DkimConfig:
    fields: dict[str, object] = dict(domain="example.com", key_dir=tmp, key_owner="root", key_group="_dkimsign",
                                     key_mode=0o440, signer="filter-dkimsign", signer_config=tmp / "dkimsign.conf",
                                     signer_user="_dkimsign", signer_group="_dkimsign")
    fields.update(overrides)
    return ck_config.DkimConfig(**fields)  # type: ignore[arg-type]


def _key(tmp: Path, selector: str = "20260304", mode: int = 0o600) -> signers.SigningKey:
    path = tmp / f"example.com.{selector}.key"
    path.write_bytes(dkim.private_key_file(dkim.generate_private_key("rsa2048")))
    path.chmod(mode)
    return signers.SigningKey("example.com", selector, "rsa2048", path)


def test_key_files_follow_owner_group_and_mode_on_every_run(open_dir):
    item = _dkimsign_item(open_dir)
    key = _key(open_dir)
    os.chown(key.key_file, 0, 0)
    lines: list[str] = []
    assert signers.enforce_key_files(item, [key.key_file, open_dir / "gone.key"], lines.append) == [key.key_file]
    st = key.key_file.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, grp.getgrnam("_dkimsign").gr_gid, 0o440)
    assert lines == [f"{key.key_file}: set owner root:_dkimsign mode 0440"]
    assert signers.enforce_key_files(item, [key.key_file], lines.append) == []  # nothing to do: no line
    assert len(lines) == 1
    with pytest.raises(LocalError, match="key_group 'no-such-group' is no group on this host"):
        signers.enforce_key_files(_dkimsign_item(open_dir, key_group="no-such-group"), [key.key_file], print)


def test_run_steps_puts_a_hand_changed_key_mode_back(tmp_path):
    from datetime import UTC, datetime

    from certkeeper.network import rotation

    config = ck_config.parse(f"""
state_dir = "{tmp_path / 'state'}"
[dns]
backend = "manual"
[[dkim]]
domain = "example.com"
key_dir = "{tmp_path}"
key_owner = ""
key_group = ""
key_mode = "0400"
signer = "none"
""", tmp_path / "certkeeper.toml")
    key = _key(tmp_path, mode=0o644)
    state = rotation.DomainState("example.com", (rotation.KeyState(
        selector="20260304", algorithm="rsa2048", state="active", key_file=str(key.key_file), record="v=DKIM1; p=x",
        created=datetime(2026, 3, 4, tzinfo=UTC), activated=datetime(2026, 3, 4, tzinfo=UTC)),))
    lines: list[str] = []
    rotation.run_steps(config, config.dkim[0], state, datetime(2026, 3, 5, tzinfo=UTC), lines.append,
                       LocalKeeper(config))
    assert stat.S_IMODE(key.key_file.stat().st_mode) == 0o400
    assert any("mode 0400" in line for line in lines)


def test_readable_as_checks_as_the_signers_user(open_dir):
    key = _key(open_dir, mode=0o440)
    os.chown(key.key_file, 0, grp.getgrnam("_dkimsign").gr_gid)
    assert signers.readable_as(key.key_file, "_dkimsign", "_dkimsign") == ""
    os.chown(key.key_file, 0, 0)  # root:root 0440: the guide's mistake that stopped smtpd
    assert signers.readable_as(key.key_file, "_dkimsign", "_dkimsign") == (
        f"{key.key_file}: _dkimsign:_dkimsign cannot read it: Permission denied")
    os.chown(key.key_file, 0, grp.getgrnam("_dkimsign").gr_gid)
    open_dir.chmod(0o700)  # the key is fine, its directory is not
    assert "Permission denied" in signers.readable_as(key.key_file, "_dkimsign", "_dkimsign")
    open_dir.chmod(0o755)
    assert signers.readable_as(open_dir / "missing.key", "_dkimsign", "") == (
        f"{open_dir / 'missing.key'}: _dkimsign:{pwd.getpwnam('_dkimsign').pw_gid} cannot read it: "
        "No such file or directory")
    assert signers.readable_as(key.key_file, "no-such-user", "") == "signer_user 'no-such-user' is no user on this host"


def _smtpd_conf(tmp: Path, fragment: Path) -> Path:
    conf = tmp / "smtpd.conf"
    conf.write_text(f'include "{fragment}"\nlisten on 127.0.0.1 port 2525 filter "dkimsign"\n'
                    'action "out" relay host smtp://127.0.0.1:2526\nmatch from local for any action "out"\n')
    return conf


def test_smtpd_config_test_runs_smtpd_n_with_the_new_fragment(open_dir):
    from tests.fixtures.mailservices import require_smtpd_74

    require_smtpd_74()
    fragment = open_dir / "dkimsign.conf"
    good = signers.render_dkimsign([_key(open_dir)], user="_dkimsign", group="_dkimsign")
    fragment.write_text(good)
    conf = _smtpd_conf(open_dir, fragment)
    assert signers.smtpd_config_test(fragment, good, conf) == ""
    broken = good.replace("proc-exec", "proc-exex")
    problem = signers.smtpd_config_test(fragment, broken, conf)
    assert problem.startswith("smtpd -n with the new dkimsign.conf: exit 1: ") and "syntax error" in problem
    assert fragment.read_text() == good  # the live fragment was never touched
    # (smtpd -n does not look the filter's user up; check_before_switch's readable_as does.)
    conf.write_text("listen on 127.0.0.1 port 2525\n")
    assert signers.smtpd_config_test(fragment, good, conf) == (
        f'{conf}: does not include {fragment} (add: include "{fragment}")')


def test_rspamd_config_test_runs_rspamadm_configtest(tmp_path):
    from tests.fixtures.peers import require_binary

    require_binary("rspamadm")
    local = tmp_path / "local.d"
    local.mkdir()
    for module in ("fuzzy_check", "rbl"):  # no name lookups of rspamd.com while testing the config
        (local / f"{module}.conf").write_text("enabled = false;\n")
    (local / "dkim_signing.conf").write_text(DKIM_SIGNING_CONF.format(tmp=tmp_path))
    assert signers.rspamd_config_test(variables={"LOCAL_CONFDIR": str(tmp_path)}) == ""
    (local / "dkim_signing.conf").write_text("selector_map = {{\n")
    problem = signers.rspamd_config_test(variables={"LOCAL_CONFDIR": str(tmp_path)})
    assert problem.startswith("rspamadm configtest: exit 1: ") and "dkim_signing.conf" in problem


def test_check_before_switch_names_every_problem(open_dir):
    from tests.fixtures.mailservices import require_smtpd_74

    require_smtpd_74()
    item = _dkimsign_item(open_dir)
    config = ck_config.Config(path=open_dir / "certkeeper.toml", dkim=(item,))
    key = _key(open_dir)
    conf = _smtpd_conf(open_dir, item.signer_config)  # type: ignore[arg-type]
    os.chown(key.key_file, 0, 0)
    assert signers.check_before_switch(config, item, [key], smtpd_conf=conf) == [
        f"{key.key_file}: _dkimsign:_dkimsign cannot read it: Permission denied"]
    signers.enforce_key_files(item, [key.key_file], lambda line: None)
    assert signers.check_before_switch(config, item, [key], smtpd_conf=conf) == []
    assert not item.signer_config.exists()  # type: ignore[union-attr]  # checks write nothing


# -- the keeper's switch: files kept until confirmed, restored when the hook fails --------------------


def _keeper_with_keys(tmp: Path, hook_command: str) -> tuple[LocalKeeper, Path, Path]:
    """A LocalKeeper for an rspamd signer (no signer_user: no readability check) with two keys."""
    (tmp / "signer.conf").write_text(DKIM_SIGNING_CONF.format(tmp=tmp))
    config = ck_config.parse(f"""
state_dir = "{tmp / 'state'}"
[hooks.signer]
command = ["sh", "-c", "{hook_command}"]
[[dkim]]
domain = "example.com"
key_dir = "{tmp / 'keys'}"
key_owner = ""
key_group = ""
signer_user = ""
signer_config = "{tmp / 'signer.conf'}"
signer_hook = "signer"
""", tmp / "certkeeper.toml")
    keeper = LocalKeeper(config)
    for selector in ("a", "b"):
        keeper.dkim_key("example.com", selector, "rsa2048", create=True)
    return keeper, tmp / "dkim_selectors.map", tmp / "state" / "journal"


def test_a_failing_hook_puts_the_previous_signer_files_back_and_runs_the_hook_again(tmp_path):
    from certkeeper.keeper.service import SignerNotSwitched

    marker = tmp_path / "fail-next"
    keeper, selectors, journal = _keeper_with_keys(
        tmp_path, f"echo ran >> {tmp_path / 'hook.log'}; if [ -e {marker} ]; then rm {marker}; exit 3; fi")
    keeper.switch_signer("example.com", [("example.com", "a", "rsa2048")], print)
    assert list(journal.glob("signer-*.json"))  # kept until the worker confirms the switch
    keeper.confirm_signer("example.com")
    assert not list(journal.glob("signer-*.json"))
    before = selectors.read_text()
    marker.touch()
    with pytest.raises(SignerNotSwitched) as err:
        keeper.switch_signer("example.com", [("example.com", "b", "rsa2048")], print)
    assert "exit 3" in str(err.value)
    assert "the previous signer files are back and hook signer ran again" in str(err.value)
    assert selectors.read_text() == before and (tmp_path / "hook.log").read_text().count("ran") == 3
    assert not list(journal.glob("signer-*.json"))


def test_an_unconfirmed_switch_keeps_the_oldest_files_for_the_rollback(tmp_path):
    keeper, selectors, journal = _keeper_with_keys(tmp_path, f"echo ran >> {tmp_path / 'hook.log'}")
    assert keeper.restore_signer("example.com", print) == "no switch to roll back"
    keeper.switch_signer("example.com", [("example.com", "a", "rsa2048")], print)
    keeper.confirm_signer("example.com")
    signing_a = selectors.read_text()
    keeper.switch_signer("example.com", [("example.com", "b", "rsa2048")], print)  # then a crash: no confirm
    keeper.switch_signer("example.com", [("example.com", "b", "rsa2048")], print)  # the step runs again
    assert "example.com b" in selectors.read_text()
    assert keeper.restore_signer("example.com", print) == ("the previous signer files are back and hook "
                                                           "signer ran again")
    assert selectors.read_text() == signing_a  # a's maps, not those the first try of b wrote
    assert not list(journal.glob("signer-*.json"))
