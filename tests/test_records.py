"""certkeeper.network.records: `certkeeper dns` prints every mail record and `--check` finds what is wrong."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

from certkeeper import cli
from certkeeper.core import config as ck_config
from certkeeper.network import records
from certkeeper.network.dns import RecordSet, backend_for

ROOT = Path(__file__).resolve().parent.parent

EXTRA = """
[[certificate]]
name = "mail.example.test"
domains = ["mail.example.test"]
key = "{tmp}/mail.key"
cert = "{tmp}/mail.crt"
chain = "{tmp}/mail.chain"
fullchain = "{tmp}/mail.full"

[[certificate]]
name = "mta-sts.example.test"
domains = ["mta-sts.example.test"]
key = "{tmp}/sts.key"
cert = "{tmp}/sts.crt"
chain = "{tmp}/sts.chain"
fullchain = "{tmp}/sts.full"

[[mta_sts]]
domain = "example.test"
mode = "enforce"
mx = ["mail.example.test"]
max_age = 604800
certificate = "mta-sts.example.test"

[tlsrpt]
rua = ["mailto:tlsrpt@example.test"]

[dmarc]
policy = "reject"
rua = ["mailto:postmaster@example.test"]

[records]
ipv4 = ["192.0.2.25"]
"""


def parse(tmp_path, extra):
    return ck_config.parse(f'state_dir = "{tmp_path}/state"\n' + extra.format(tmp=tmp_path), tmp_path / "c.toml")


def problems(output: str) -> dict[str, str]:
    """Table rows whose status is not ok: record -> status."""
    out = {}
    for line in output.splitlines():
        status = line.rsplit(None, 1)[-1] if line.strip() else ""
        if status in ("missing", "wrong") and " ok, " not in line:
            out[line.split("  ")[0]] = status
    return out


def test_example_config_prints_the_guides_full_record_set():
    out = io.StringIO()
    assert cli.main(["-c", str(ROOT / "etc" / "certkeeper.toml"), "dns"], out) == 0
    text = out.getvalue()
    for line in (
        "mail.example.com. 300 IN A 192.0.2.25",
        "mail.example.com. 300 IN AAAA 2001:db8::25",
        "mta-sts.example.com. 300 IN A 192.0.2.25",
        "example.com. 300 IN MX 10 mail.example.com.",
        'example.com. 300 IN TXT "v=spf1 mx -all"',
        '_dmarc.example.com. 300 IN TXT "v=DMARC1; p=reject; sp=reject; rua=mailto:postmaster@example.com"',
        'mail.example.com. 300 IN CAA 0 issue "letsencrypt.org"',
        'mta-sts.example.com. 300 IN CAA 0 issue "letsencrypt.org"',
        '_mta-sts.example.com. 300 IN TXT "v=STSv1; id=',
        '_smtp._tls.example.com. 300 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.com"',
        "25.2.0.192.in-addr.arpa. 300 IN PTR mail.example.com.",
        "ip6.arpa. 300 IN PTR mail.example.com.",
        "; DKIM (RFC 6376)",
    ):
        assert line in text, line


def test_dkim_selectors_come_from_the_rotation_state(tmp_path):
    from certkeeper.network import rotation

    config = parse(tmp_path, EXTRA + '\n[[dkim]]\ndomain = "example.test"\nalgorithms = ["ed25519"]\n'
                               'selector_format = "s%Y{{alg}}"\n')
    when = datetime(2026, 1, 1, tzinfo=UTC)
    value = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    key = rotation.KeyState(selector="s2026ed25519", algorithm="ed25519", state="active", created=when,
                            key_file="/x", record=value, published=when)
    rotation.save_state(config, rotation.DomainState("example.test", (key,)))
    text = records.render(config, ["example.test"])
    assert f's2026ed25519._domainkey.example.test. 300 IN TXT "{value}"  ; ed25519, active' in text


def test_caa_issuer_follows_the_acme_directory(tmp_path):
    config = parse(tmp_path, '[acme]\ndirectory = "https://acme.zerossl.com/v2/DV90"\n' + EXTRA)
    assert records.caa_issuer(config) == "sectigo.com"
    config = parse(tmp_path, '[records]\ncaa_issuer = "pki.goog"\n' + EXTRA.replace("[records]\n", "[x]\n")
                   .replace('[x]\nipv4 = ["192.0.2.25"]\n', ""))
    assert records.caa_issuer(config) == "pki.goog"


def test_check_with_plain_answers_cross_checks_mx_and_caa(tmp_path):
    config = parse(tmp_path, EXTRA)
    answers = {
        ("example.test", "MX"): ["10 mx.other.test."],
        ("mx.other.test", "A"): ["192.0.2.99"],
        ("99.2.0.192.in-addr.arpa", "PTR"): ["mail.example.test."],
        ("example.test", "CAA"): ['0 issue "letsencrypt.org"'],  # found by climbing from mail./mta-sts.
    }
    rows = {r.record: r for r in records.check(config, "example.test", records.dict_lookup(answers))}
    assert rows["example.test MX"].status == "wrong"
    assert rows["MX mx.other.test in MTA-STS policy"].status == "wrong"
    assert rows["FCrDNS mx.other.test 192.0.2.99"].status == "wrong"  # PTR points elsewhere
    assert rows["mail.example.test CAA"].status == "ok" and "(at example.test)" in rows["mail.example.test CAA"].found
    assert rows["_dmarc.example.test TXT"].status == "missing"
    answers[("example.test", "MX")] = ["1 mail.example.test."]  # the guide's preference: still ok
    rows = {r.record: r for r in records.check(config, "example.test", records.dict_lookup(answers))}
    assert rows["example.test MX"].status == "ok"
    assert rows["MX mail.example.test in MTA-STS policy"].status == "ok"
    assert rows["FCrDNS mail.example.test"].status == "missing"  # no address for it


def test_wildcard_mx_pattern_matches_one_label():
    assert records._mx_matches("*.example.test", "mx1.example.test")
    assert not records._mx_matches("*.example.test", "a.b.example.test")
    assert not records._mx_matches("*.example.test", "example.test")


def test_check_against_bind_reports_exactly_the_wrong_and_the_missing(tmp_path, bind_factory):
    printed = records.render(parse(tmp_path, EXTRA), ["example.test"])
    lines = [line for line in printed.splitlines() if line and not line.startswith(";")]
    reverse = [line for line in lines if ".in-addr.arpa." in line]
    server = bind_factory(records="\n".join(line for line in lines if line not in reverse),
                          extra_zones={"2.0.192.in-addr.arpa": "\n".join(reverse)})  # BIND loads what we print
    config = server.config(EXTRA.format(tmp=tmp_path), state_dir=tmp_path / "state")

    out = io.StringIO()
    assert cli.main(["-c", str(config.path), "dns", "--check"], out) == 0, out.getvalue()
    assert problems(out.getvalue()) == {}
    assert "FCrDNS mail.example.test 192.0.2.25" in out.getvalue()

    backend = backend_for(config)
    backend.publish(RecordSet("example.test", "TXT", ("v=spf1 a -all", "google-site-verification=x")))
    backend.remove("_dmarc.example.test", "TXT")
    out = io.StringIO()
    assert cli.main(["-c", str(config.path), "dns", "--check", "example.test"], out) == 1
    assert problems(out.getvalue()) == {"example.test TXT": "wrong", "_dmarc.example.test TXT": "missing"}
    assert "v=spf1 a -all" in out.getvalue() and "google-site-verification" not in out.getvalue()


def test_a_resolver_that_does_not_answer_is_one_line_not_a_table_of_missing_records(tmp_path, bind, capsys):
    """Lookups that time out say nothing about the records: one error naming the resolver, exit 1."""
    from tests.fixtures.peers import free_port

    silent = f"127.0.0.1:{free_port(udp_too=True)}"  # nothing listens there
    config = bind.config(EXTRA.format(tmp=tmp_path), state_dir=tmp_path / "state", resolver=silent,
                         propagation_timeout=0.3)  # passed through to each lookup: no 6 s wait
    out = io.StringIO()
    assert cli.main(["-c", str(config.path), "dns", "--check", "example.test"], out) == 1
    assert "missing" not in out.getvalue()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("certkeeper: cannot look up ") and silent in error[0]


def test_a_domain_that_is_not_configured_is_refused(capsys):
    example = Path(__file__).resolve().parent.parent / "etc" / "certkeeper.toml"
    assert cli.main(["-c", str(example), "dns", "nosuch.test"], io.StringIO()) == 1
    assert capsys.readouterr().err == (f"certkeeper: {example}: 'nosuch.test' is not a configured mail domain "
                                       "(configured: example.com)\n")
