"""Issue 12, served equals disk: an install that a crash interrupted is finished by the next run's
keeper, and the certificate's hooks then run as after a renewal, so the services load what is on disk.

The run is the real CLI (keeper, unprivileged network worker, protocol); the crash is an install
stopped after its journal was written, before the renames (the store's commit point).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from certkeeper.core import certs
from certkeeper.core.config import parse
from certkeeper.keeper.store import CertificateStore
from tests.certfactory import make_set

ROOT = Path(__file__).resolve().parent.parent
NAME = "mail.example.com"


def test_a_finished_interrupted_install_runs_the_certificates_hooks(tmp_path, monkeypatch):
    marker = tmp_path / "hook.log"
    text = f"""state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/ck.sock"
[http]
listen = []
tls_listen = []
[[certificate]]
name = "{NAME}"
domains = ["{NAME}"]
key = "{tmp_path}/ssl/k.pem"
cert = "{tmp_path}/ssl/c.pem"
chain = "{tmp_path}/ssl/ch.pem"
fullchain = "{tmp_path}/ssl/f.pem"
hooks = ["smtpd"]
[hooks.smtpd]
command = ["sh", "-c", "echo \\"$CERTKEEPER_CERTIFICATES\\" >> {marker}"]
verify = []
"""
    path = tmp_path / "certkeeper.toml"
    path.write_text(text)
    config = parse(text, path)
    cert = config.certificate(NAME)
    store = CertificateStore(config.state_dir)
    old, new = make_set((NAME,)), make_set((NAME,))
    store.install(cert, old)

    def crash(self: CertificateStore, journal: Path) -> None:
        raise KeyboardInterrupt("killed after the journal, before the renames")

    monkeypatch.setattr(CertificateStore, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        store.install(cert, new)
    monkeypatch.undo()
    assert certs.parse_cert(cert.cert.read_bytes()).serial == certs.parse_cert(old.cert).serial  # not yet

    done = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "renew"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr  # nothing was due: the new set is valid
    assert certs.parse_cert(cert.cert.read_bytes()).serial == certs.parse_cert(new.cert).serial  # finished
    assert marker.read_text().split() == [NAME]  # and the service was told, once
    again = subprocess.run([sys.executable, "-m", "certkeeper", "-c", str(path), "renew"], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 2, again.stdout + again.stderr
    assert marker.read_text().split() == [NAME]  # nothing left to finish: no second reload


def test_status_shows_the_served_serial_beside_the_one_on_disk(tmp_path):
    """The last verification said "ok" for the set on disk then; the disk has changed since (a renewal
    whose reload has not run yet): status names the served serial and the mismatch, not the stale "ok"."""
    from datetime import UTC, datetime

    from certkeeper.keeper import status
    from certkeeper.network import verification

    text = f"""state_dir = "{tmp_path}/state"
[[certificate]]
name = "{NAME}"
domains = ["{NAME}"]
key = "{tmp_path}/k.pem"
cert = "{tmp_path}/c.pem"
chain = "{tmp_path}/ch.pem"
fullchain = "{tmp_path}/f.pem"
hooks = ["smtpd"]
[hooks.smtpd]
command = ["true"]
verify = ["smtp+starttls://127.0.0.1:25"]
"""
    config = parse(text, tmp_path / "c.toml")
    cert = config.certificate(NAME)
    store = CertificateStore(config.state_dir)
    old, new = make_set((NAME,)), make_set((NAME,))
    store.install(cert, old)
    served = certs.parse_cert(old.cert)
    seen = verification.Observation("smtp+starttls://127.0.0.1:25", served, "", datetime.now(UTC))
    verification.save_results(config, NAME, [verification.Check(NAME, "smtpd", served, seen)])
    store.install(cert, new)  # on disk, not yet reloaded
    row = status.collect(config)["certificates"][0]
    assert row["served_serial"] == f"{served.serial:X}" != row["serial"] == f"{certs.parse_cert(new.cert).serial:X}"
    text_out = "".join(status.render_text(status.collect(config)).split())  # lines wrap at 80 columns
    assert f"servedserial{served.serial:X},MISMATCH(diskhasserial{row['serial']}now)" in text_out
