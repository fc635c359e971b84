"""certkeeper.network.records: `certkeeper dns` prints every mail record and `--check` finds what is wrong."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certkeeper import cli
from certkeeper.core import config as ck_config
from certkeeper.core.errors import ConfigError
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
caa_issuer = "letsencrypt.org"  # the guide's CAA record; not fetched from Let's Encrypt (loopback only)
"""



def without_caa() -> str:
    return "\n".join(line for line in EXTRA.splitlines() if not line.startswith("caa_issuer")) + "\n"


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


def test_example_config_prints_the_guides_full_record_set(tmp_path):
    # The CA's CAA name is set, so the test does not fetch Let's Encrypt's directory (loopback only).
    example = (ROOT / "etc" / "certkeeper.toml").read_text()
    conf = tmp_path / "certkeeper.toml"
    conf.write_text(example.replace("[records]\n", '[records]\ncaa_issuer = "letsencrypt.org"\n', 1))
    out = io.StringIO()
    assert cli.main(["-c", str(conf), "dns"], out) == 0
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


@contextlib.contextmanager
def directory_server(document: dict) -> Iterator[tuple[str, Path]]:
    """An ACME directory (only the directory) over HTTPS on 127.0.0.1; yields (URL, CA file)."""
    import http.server
    import ssl
    import threading

    import trustme

    ca = trustme.CA()
    body = json.dumps(document).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        try:
            yield f"https://127.0.0.1:{server.server_address[1]}/directory", ca_file
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


def test_caa_issuers_come_from_the_directorys_caa_identities(tmp_path):
    meta = {"meta": {"caaIdentities": ["ca.example", "other-name.example"]}, "newNonce": "x"}
    with directory_server(meta) as (url, ca_file):
        config = parse(tmp_path, f'[acme]\ndirectory = "{url}"\nca_bundle = "{ca_file}"\n' + without_caa())
        assert records.caa_issuers(config) == (("ca.example", "other-name.example"), "")
        text = records.render(config, ["example.test"])
    assert 'mail.example.test. 300 IN CAA 0 issue "ca.example"' in text
    assert 'mail.example.test. 300 IN CAA 0 issue "other-name.example"' in text
    answers = {("example.test", "CAA"): ['0 issue "other-name.example"']}  # any of the CA's names will do
    rows = {r.record: r for r in records.check(config, "example.test", records.dict_lookup(answers))}
    assert rows["mail.example.test CAA"].status == "ok"


def test_a_directory_without_caa_identities_is_not_guessed_from_its_url(tmp_path, pebble):
    config = parse(tmp_path, f'[acme]\ndirectory = "{pebble.directory}"\nca_bundle = "{pebble.ca_file}"\n'
                   + without_caa())
    issuers, note = records.caa_issuers(config)  # Pebble lists no caaIdentities: no "0.1" or "127.0.0.1" made up
    assert issuers == () and note == f"{pebble.directory} lists no meta.caaIdentities: set [records] caa_issuer " \
                                     "to the CA's CAA name"
    text = records.render(config, ["example.test"])
    assert "IN CAA" not in text and f"; no CAA issuer known: {pebble.directory} lists no" in text
    # A directory that cannot be fetched, of a CA certkeeper does not know: nothing is guessed either.
    unknown = parse(tmp_path, '[acme]\ndirectory = "https://127.0.0.1:1/acme.zerossl.com"\n' + without_caa())
    issuers, note = records.caa_issuers(unknown)
    assert issuers == () and note.startswith("cannot fetch https://127.0.0.1:1/acme.zerossl.com: ")
    overridden = parse(tmp_path, EXTRA.replace('caa_issuer = "letsencrypt.org"', 'caa_issuer = "pki.goog"'))
    assert records.caa_issuer(overridden) == "pki.goog"


def test_dmarc_tags_of_the_guide_make_its_record_pass(tmp_path):
    guide = "v=DMARC1; p=reject; sp=reject; pct=100; aspf=s; adkim=s; fo=1; ruf=mailto:postmaster@example.test"
    config = parse(tmp_path, EXTRA.replace('rua = ["mailto:postmaster@example.test"]\n',
                                           'ruf = ["mailto:postmaster@example.test"]\npct = 100\naspf = "s"\n'
                                           'adkim = "s"\nfo = "1"\n'))
    assert records.render_dmarc(config) == guide
    answers = {("_dmarc.example.test", "TXT"): [guide.replace("; ", ";")]}
    rows = {r.record: r for r in records.check(config, "example.test", records.dict_lookup(answers))}
    assert rows["_dmarc.example.test TXT"].status == "ok"
    # Without the tags, only what differs from RFC 7489's defaults counts: aspf=s is a difference, pct=100 is not.
    plain = parse(tmp_path, EXTRA.replace('rua = ["mailto:postmaster@example.test"]\n',
                                          'ruf = ["mailto:postmaster@example.test"]\n'))
    rows = {r.record: r for r in records.check(plain, "example.test", records.dict_lookup(answers))}
    assert rows["_dmarc.example.test TXT"].status == "wrong"
    answers = {("_dmarc.example.test", "TXT"): [guide.replace("aspf=s; adkim=s; ", "")]}
    rows = {r.record: r for r in records.check(plain, "example.test", records.dict_lookup(answers))}
    assert rows["_dmarc.example.test TXT"].status == "ok"


def test_dmarc_tag_values_are_checked():
    with pytest.raises(ConfigError) as err:
        ck_config.parse('[dmarc]\naspf = "x"\npct = 101\nfo = "2"\nruf = ["postmaster@example.test"]\n', "t.toml")
    assert err.value.lines == [
        "t.toml: dmarc.ruf[1]: 'postmaster@example.test' is not a URI such as \"mailto:dmarc@example.com\"",
        "t.toml: dmarc.fo: '2' is not one or more of 0, 1, d, s separated by ':'",
        "t.toml: dmarc.aspf: 'x' is not one of , r, s",
        "t.toml: dmarc.pct: 101 is out of range 0..100",
    ]


def test_check_table_fits_100_columns_and_never_cuts_an_expected_value():
    key = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9
    rows = [records.Row("20260304._domainkey.example.test TXT", key, "-", "missing"),
            records.Row("_dmarc.example.test TXT", "v=DMARC1; p=reject; sp=reject; pct=100; aspf=s; adkim=s; "
                        "fo=1; ruf=mailto:postmaster@example.test", "v=DMARC1; p=none", "wrong")]
    table = records.render_table(rows)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split() == ["RECORD", "EXPECTED", "FOUND", "STATUS"]
    start = lines[0].index("EXPECTED")
    end = lines[0].index("FOUND")
    cells = [line[start:end].strip() for line in lines[1:]]
    joined = "".join(cells)
    assert key.replace(" ", "") in joined.replace(" ", "")  # every character of the key is there
    assert "..." not in table


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
