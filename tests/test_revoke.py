"""``certkeeper revoke NAME [--reason keyCompromise]`` against Pebble: revoked at the issuing
authority with the account key, then renewed at once with a fresh key (even with ``reuse_key``)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from certkeeper.core import certs, config
from tests.fixtures.pebble import Pebble

ROOT = Path(__file__).resolve().parent.parent
NAME = "mail.example.com"


def certkeeper(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certkeeper", "--config", str(conf), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def pebble_status(pebble: Pebble, serial: int) -> dict[str, object]:
    """Pebble's management API: what the CA knows of a serial (``Status``: Valid or Revoked)."""
    context = ssl.create_default_context(cafile=str(pebble.ca_file))
    with urllib.request.urlopen(f"{pebble.management}/cert-status-by-serial/{serial:x}", context=context,
                                timeout=5) as resp:
        return dict(json.loads(resp.read()))


def test_revoke_key_compromise_revokes_and_renews_with_a_fresh_key(pebble: Pebble, tmp_path: Path) -> None:
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(pebble.config_text(tmp_path, [NAME]).replace(
        'key_type = "ecdsa-p256"', 'key_type = "ecdsa-p256"\nreuse_key = true'))
    assert certkeeper(conf, "renew").returncode == 0
    cert = config.load(conf).certificates[0]
    old_key, old_serial = cert.key.read_bytes(), certs.parse_cert(cert.cert.read_bytes()).serial
    assert pebble_status(pebble, old_serial)["Status"] == "Valid"

    result = certkeeper(conf, "revoke", "--reason", "keyCompromise", NAME)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{NAME}: serial {old_serial:x} revoked at acme (keyCompromise)"
    assert lines[-1].startswith(f"{NAME}: renewed, valid until ")
    assert pebble_status(pebble, old_serial)["Status"] == "Revoked"
    new_key, new_leaf = cert.key.read_bytes(), cert.cert.read_bytes()
    assert new_key != old_key  # reuse_key = true, but a revoked key is never certified again
    assert certs.key_matches_cert(new_key, new_leaf)
    assert certs.parse_cert(new_leaf).serial != old_serial
    assert pebble_status(pebble, certs.parse_cert(new_leaf).serial)["Status"] == "Valid"


def test_revoke_without_a_certificate_or_with_an_unknown_name_is_one_line(pebble: Pebble, tmp_path: Path) -> None:
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(pebble.config_text(tmp_path, [NAME]))
    unknown = certkeeper(conf, "revoke", "nosuch.example.com")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == f"certkeeper: no [[certificate]] named 'nosuch.example.com' in {conf}"
    missing = certkeeper(conf, "revoke", NAME)
    assert missing.returncode == 1
    assert f"{NAME}: there is no certificate on disk to revoke" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    assert not cert_files(tmp_path)
    bad = certkeeper(conf, "revoke", "--reason", "bogus", NAME)
    assert bad.returncode == 1 and "invalid choice: 'bogus'" in bad.stderr


def cert_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "ssl").rglob("*.crt")) if (tmp_path / "ssl").exists() else []
