"""Issue 12, item 6: `certkeeper check` (every command: it is the config loader) catches what would
break later, one line each: unknown users and groups, NUL bytes, dangerous modes, absurd nesting and size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from certkeeper.core.config import MAX_SIZE, load, parse
from certkeeper.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CERT = '[[certificate]]\nname = "mail.example.com"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, "ck.toml")
    return info.value.lines


@pytest.mark.parametrize("key", ["key_owner", "cert_owner"])
def test_unknown_users_are_found_before_any_order(key):
    assert problems(CERT + f'{key} = "no-such-user-ck"\n') == \
        [f"ck.toml: certificate[1].{key}: 'no-such-user-ck' is not a user on this host"]


@pytest.mark.parametrize("key", ["key_group", "cert_group"])
def test_unknown_groups_are_found_before_any_order(key):
    assert problems(CERT + f'{key} = "no-such-group-ck"\n') == \
        [f"ck.toml: certificate[1].{key}: 'no-such-group-ck' is not a group on this host"]


def test_dkim_owner_and_group_are_checked_too():
    assert problems('[[dkim]]\ndomain = "example.com"\nkey_owner = "nobody-ck"\nkey_group = "nogroup-ck"\n') == [
        "ck.toml: dkim[1].key_owner: 'nobody-ck' is not a user on this host",
        "ck.toml: dkim[1].key_group: 'nogroup-ck' is not a group on this host",
    ]


def test_existing_users_and_groups_pass():
    config = parse(CERT + 'key_owner = "root"\nkey_group = "root"\ncert_owner = "root"\ncert_group = "root"\n')
    assert config.certificates[0].key_owner == "root"


@pytest.mark.parametrize("text, where", [
    (r'state_dir = "/var/db/cert\u0000keeper"', "state_dir"),
    (CERT + r'key = "/etc/ssl/private/a\u0000.key"', "certificate[1].key"),
    (r'[hooks.x]' + '\n' + r'command = ["rcctl", "restart\u0000", "smtpd"]', "hooks.x.command[2]"),
    (r'[acme]' + '\n' + r'"dir\u0000ectory" = "https://x.example/"', "acme.'dir\\x00ectory'"),
])
def test_nul_bytes_anywhere_are_one_line(text, where):
    [line] = problems(text + "\n")
    assert line.startswith(f"ck.toml: {where}: ") and "NUL byte" in line
    assert "\x00" not in line  # shown escaped


@pytest.mark.parametrize("value, why", [
    ("4777", "sets the setuid, setgid or sticky bit; certificates and keys need none of them"),
    ("2644", "sets the setuid, setgid or sticky bit; certificates and keys need none of them"),
    ("1644", "sets the setuid, setgid or sticky bit; certificates and keys need none of them"),
    ("0646", "lets anyone write the file"),
    ("0666", "lets anyone write the file"),
])
def test_cert_modes_with_special_or_world_write_bits_are_refused(value, why):
    assert problems(CERT + f'cert_mode = "{value}"\n') == [f"ck.toml: certificate[1].cert_mode: '{value}' {why}"]


@pytest.mark.parametrize("value", ["0660", "0620", "0604", "4600"])
def test_key_modes_that_others_could_use_are_refused(value):
    [line] = problems(CERT + f'key_mode = "{value}"\n')
    assert line.startswith("ck.toml: certificate[1].key_mode: ")


def test_a_5000_deep_array_is_one_line_not_a_recursion_error():
    assert problems("x = " + "[" * 5000 + "]" * 5000 + "\n") == ["ck.toml: arrays or tables nested more than 16 deep"]
    [line] = problems("x = " + "[" * 40 + "]" * 40 + "\n")
    assert line.endswith(": arrays or tables nested more than 16 deep") and line.startswith("ck.toml: x[1]")


def test_a_huge_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * (MAX_SIZE // 10 + 1))
    with pytest.raises(ConfigError) as info:
        load(big)
    assert info.value.lines == [f"{big}: is larger than 1024 KiB; not a certkeeper configuration"]
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load("/dev/zero")  # would never end if read whole


def test_check_prints_one_line_per_problem_and_exits_1(tmp_path):
    config = tmp_path / "ck.toml"
    config.write_text(CERT + 'key_owner = "no-such-user-ck"\ncert_mode = "4777"\n'
                      + r'key = "/etc/ssl/private/a\u0000.key"' + "\n")
    done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config), "check"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines == [f"certkeeper: {config}: certificate[1].key: '/etc/ssl/private/a\\x00.key' contains a NUL byte"]
    config.write_text(CERT + 'key_owner = "no-such-user-ck"\ncert_mode = "4777"\n')
    done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(config), "check"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"certkeeper: {config}: certificate[1].key_owner: 'no-such-user-ck' is not a user on this host",
        f"certkeeper: {config}: certificate[1].cert_mode: '4777' sets the setuid, setgid or sticky bit; "
        "certificates and keys need none of them",
    ]
