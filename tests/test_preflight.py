"""Issue 12 item 4: what ``keeper.preflight`` finds unusable in a configuration before a SIGHUP switches to
it, one line each naming the file (or command) and the key; and what it lets through."""

from __future__ import annotations

from pathlib import Path

import pytest

from certkeeper.core.config import parse
from certkeeper.keeper import preflight
from tests.certfactory import make_set

WEB = "mta-sts.example.com"
GARBAGE = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"


def config_text(tmp_path: Path, extra: str = "", key: str = "", acme: str = "", dns: str = "") -> str:
    return f"""state_dir = "{tmp_path}/state"
[acme]
account_key = "{tmp_path}/account.pem"
{acme}
{dns}
[[certificate]]
name = "{WEB}"
domains = ["{WEB}"]
key = "{key or tmp_path / 'web.key'}"
cert = "{tmp_path}/web.crt"
chain = "{tmp_path}/web.chain.pem"
fullchain = "{tmp_path}/web.fullchain.pem"

[[mta_sts]]
domain = "example.com"
mode = "enforce"
mx = ["mail.example.com"]
certificate = "{WEB}"
{extra}"""


def write_set(tmp_path: Path, key: bytes | None = None) -> None:
    issued = make_set((WEB,))
    (tmp_path / "web.key").write_bytes(key if key is not None else issued.key)
    (tmp_path / "web.crt").write_bytes(issued.cert)
    (tmp_path / "web.fullchain.pem").write_bytes(issued.fullchain)


def problems(tmp_path: Path, running: str | None = None, **parts: str) -> list[str]:
    config = parse(config_text(tmp_path, **parts), tmp_path / "c.toml")
    return preflight.problems(config, parse(running, tmp_path / "c.toml") if running else None)


def test_a_usable_configuration_and_missing_certificate_files_pass(tmp_path):
    assert problems(tmp_path) == []  # nothing on disk yet: the certificate is obtained, the account key made
    write_set(tmp_path)
    assert problems(tmp_path) == []


def test_the_listeners_key_must_load_with_its_certificate(tmp_path):
    write_set(tmp_path, key=GARBAGE)
    [line] = problems(tmp_path)
    assert line == f"{tmp_path}/web.key: not a PEM private key ([[certificate]] {WEB}, served by the listener)"
    other = make_set((WEB,))  # a key, but not this certificate's
    (tmp_path / "web.key").write_bytes(other.key)
    [line] = problems(tmp_path)
    assert line.startswith(f"{tmp_path}/web.key: does not load with {tmp_path}/web.fullchain.pem (") \
        and "mismatch" in line
    # The running configuration serves these very files already: the renewal's to replace, no refusal.
    assert problems(tmp_path, running=config_text(tmp_path)) == []
    # A new path to the same broken key is a change: refused.
    (tmp_path / "moved.key").write_bytes(other.key)
    assert len(problems(tmp_path, running=config_text(tmp_path), key=f"{tmp_path}/moved.key")) == 1


@pytest.mark.parametrize(("part", "content", "expected"), [
    ("acme", "", "{tmp}/account.pem: not a PEM private key ([acme] account_key)"),
    ("ca", "ca_bundle", "{tmp}/file: holds no PEM certificate ([acme] ca_bundle)"),
    ("eab", "eab", "{tmp}/file: does not hold a base64url key ([acme] eab_hmac_key_file)"),
    ("tsig", "tsig", "{tmp}/file: does not hold a base64 TSIG secret ([dns] tsig_secret_file)"),
])
def test_each_file_it_names_must_be_usable(tmp_path, part, content, expected):
    (tmp_path / "file").write_bytes(b"%%% not this %%%\n")
    parts = {
        "acme": {},
        "ca": {"acme": f'ca_bundle = "{tmp_path}/file"'},
        "eab": {"acme": f'eab_kid = "kid"\neab_hmac_key_file = "{tmp_path}/file"'},
        "tsig": {"dns": f'[dns]\nbackend = "rfc2136"\nzone = "example.com"\nserver = "127.0.0.1:53"\n'
                        f'tsig_key_name = "k"\ntsig_secret_file = "{tmp_path}/file"'},
    }[part]
    if part == "acme":
        (tmp_path / "account.pem").write_bytes(GARBAGE)
    assert problems(tmp_path, **parts) == [expected.format(tmp=tmp_path)]
    (tmp_path / "file").unlink()
    if part != "acme":
        [line] = problems(tmp_path, **parts)
        assert line.startswith(f"{tmp_path}/file: cannot read (") and "No such file" in line


def test_commands_must_exist(tmp_path):
    extra = f"""
[alerts]
mail_to = ["postmaster@example.com"]
command = ["{tmp_path}/no-alert"]
"""
    text = config_text(tmp_path, extra=extra).replace(f'name = "{WEB}"\n', f'name = "{WEB}"\nhooks = ["web"]\n')
    text += f'[hooks.web]\ncommand = ["{tmp_path}/no-reload"]\nverify = []\n'
    config = parse(text, tmp_path / "c.toml")
    assert sorted(preflight.problems(config)) == [
        f"{tmp_path}/c.toml: [alerts] command: '{tmp_path}/no-alert' does not exist",
        f"{tmp_path}/c.toml: hooks.web.command: '{tmp_path}/no-reload' does not exist",
    ]


def test_check_names_an_unusable_file_too(tmp_path):
    """``certkeeper check`` says before a SIGHUP what the SIGHUP would refuse."""
    import subprocess
    import sys

    write_set(tmp_path, key=GARBAGE)
    path = tmp_path / "c.toml"
    path.write_text(config_text(tmp_path))
    done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"certkeeper: {tmp_path}/web.key: not a PEM private key "
                                                f"([[certificate]] {WEB}, served by the listener)"]
