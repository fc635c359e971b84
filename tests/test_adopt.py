"""Hand-made DKIM selectors: `dns --check` lists them, `rotate-dkim --adopt SELECTOR` takes them over
(active when the private key is found, else retired on schedule), against the test BIND."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from certkeeper import cli
from certkeeper.core import dkim
from certkeeper.network import records, rotation
from certkeeper.network.dns import RecordSet, backend_for

DAY = timedelta(days=1)


def setup(bind, tmp_path):
    """The guide's set-up before certkeeper: a key made by hand, selector "default", in rspamd's
    dkim_signing.conf and in DNS; plus an old selector1 record whose private key is gone."""
    guide_key = dkim.generate_private_key("rsa2048")
    (tmp_path / "private.key").write_bytes(dkim.private_key_file(guide_key))
    conf = tmp_path / "dkim_signing.conf"
    conf.write_text(f'allow_username_mismatch = true;\nselector_map = "{tmp_path}/selectors.map";\n'
                    f'path_map = "{tmp_path}/paths.map";\n\ndomain {{\n  example.test {{\n'
                    f'    path = "{tmp_path}/private.key";\n    selector = "default";\n  }}\n}}\n')
    config = bind.config(f"""
[hooks.signer]
command = ["sh", "-c", "echo reload >> {tmp_path / 'hook.log'}"]
[[dkim]]
domain = "example.test"
key_dir = "{tmp_path / 'keys'}"
key_owner = ""
signer = "rspamd"
signer_config = "{conf}"
signer_hook = "signer"
""")
    backend = backend_for(config)
    backend.publish(RecordSet("default._domainkey.example.test", "TXT", (dkim.key_record_for(guide_key).render(),)))
    lost = dkim.generate_private_key("rsa2048")
    backend.publish(RecordSet("selector1._domainkey.example.test", "TXT", (dkim.key_record_for(lost).render(),)))
    return config, guide_key


def unmanaged(config, bind) -> dict[str, str]:
    rows = records.handmade_selector_rows(config, "example.test", lambda name, rtype: tuple(bind.query(name, rtype)))
    return {r.record: r.expected for r in rows if r.status == "unmanaged"}


def test_hand_made_selectors_are_listed_then_adopted_and_retired_on_schedule(bind, tmp_path):
    config, guide_key = setup(bind, tmp_path)
    assert unmanaged(config, bind) == {
        "default._domainkey.example.test TXT": "made by hand? certkeeper rotate-dkim --adopt default example.test",
        "selector1._domainkey.example.test TXT": "made by hand? certkeeper rotate-dkim --adopt selector1 example.test",
    }

    out = io.StringIO()
    assert cli.main(["rotate-dkim", "-c", str(config.path), "--adopt", "default"], out=out) == 0, out.getvalue()
    state = rotation.load_state(config, "example.test")
    key = state.key("default")
    assert (key.state, key.algorithm) == ("active", "rsa2048")
    copied = tmp_path / "keys" / "example.test.default.key"
    assert dkim.load_private_key(copied.read_bytes()).private_numbers() == guide_key.private_numbers()  # type: ignore[union-attr]
    assert oct(copied.stat().st_mode & 0o777) == "0o440"
    assert (tmp_path / "selectors.map").read_text().splitlines()[-1] == "example.test default"
    assert (tmp_path / "hook.log").read_text().count("reload") == 1
    assert "adopted selector default (rsa2048): active" in out.getvalue()

    out = io.StringIO()
    assert cli.main(["rotate-dkim", "-c", str(config.path), "--adopt", "selector1", "example.test"], out=out) == 0
    assert "adopted selector selector1 (rsa2048) as retiring (its private key was not found)" in out.getvalue()
    assert unmanaged(config, bind) == {}

    now = datetime.now(UTC)
    assert rotation.run_due(config, now + 8 * DAY, print).errors == ()  # retire_after (7d): revoked
    assert bind.query("selector1._domainkey.example.test", "TXT") == ["v=DKIM1; p="]
    assert rotation.load_state(config, "example.test").key("default").state == "active"
    for days in (88, 90):  # rotated like certkeeper's own: a new key published, then switched to
        assert rotation.run_due(config, now + days * DAY, print).errors == ()
    assert {k.selector: k.state for k in rotation.load_state(config, "example.test").keys}["default"] == "retiring"


def test_adopting_a_selector_without_a_record_or_twice_is_one_line_and_exit_1(bind, tmp_path, capsys):
    config, _ = setup(bind, tmp_path)
    assert cli.main(["rotate-dkim", "-c", str(config.path), "--adopt", "nosuch"], out=io.StringIO()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkeeper: dkim example.test: nosuch._domainkey.example.test TXT "
                                               "holds no single DKIM key record to adopt")
    assert cli.main(["rotate-dkim", "-c", str(config.path), "--adopt", "default"], out=io.StringIO()) == 0
    # The switch says what it could not check: no rspamd.conf reads this test's dkim_signing.conf.
    assert "the rspamd configuration is not tested before the switch" in capsys.readouterr().err
    assert cli.main(["rotate-dkim", "-c", str(config.path), "--adopt", "default"], out=io.StringIO()) == 1
    assert capsys.readouterr().err.strip() == "certkeeper: dkim example.test: selector default is already certkeeper's"
