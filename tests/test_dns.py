"""certkeeper.network.dns: record sets, TXT splitting, and the backends against a real BIND."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from certkeeper.core.errors import DNSError, LocalError
from certkeeper.network.dns import RecordSet, backend_for, join_txt, split_txt
from certkeeper.network.dns.propagation import wait_until_absent, wait_until_visible
from certkeeper.network.dns.rfc2136 import read_tsig_secret
from certkeeper.network.dns.zonefile import parse_include

LONG_DKIM = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9  # > 255 bytes


# ---------------------------------------------------------------------------
# Units: plain values.


@pytest.mark.parametrize("value", ["", "v=spf1 mx -all", "x" * 255, "x" * 256, LONG_DKIM, "é" * 200])
def test_txt_split_round_trip(value):
    strings = split_txt(value)
    assert all(len(s) <= 255 for s in strings)
    assert join_txt(strings) == value
    assert len(strings) == max(1, -(-len(value.encode()) // 255))


def test_long_txt_renders_as_several_strings_and_parses_back():
    rrset = RecordSet("sel._domainkey.example.test.", "txt", (LONG_DKIM,), 300)
    line = rrset.to_bind()
    assert line.startswith("sel._domainkey.example.test. 300 IN TXT \"")
    assert line.count('" "') == len(split_txt(LONG_DKIM)) - 1
    assert parse_include(line) == [rrset]


def test_record_set_is_normalized_and_compares_canonically():
    a = RecordSet("Example.TEST.", "mx", ("10 mail.example.test", "10 mail.example.test."), 60)
    assert (a.name, a.rtype, a.values) == ("example.test", "MX", ("10 mail.example.test", "10 mail.example.test."))
    assert a.same_data(["10 MAIL.example.test."])
    assert not a.same_data(["20 mail.example.test."])
    with pytest.raises(ValueError):
        RecordSet("example.test", "MX", ("not an mx",))
    with pytest.raises(ValueError):
        RecordSet("example.test", "TXT", ())


def test_tsig_secret_file_forms(tmp_path):
    bare = tmp_path / "bare"
    bare.write_text("c2VjcmV0c2VjcmV0c2VjcmV0\n")
    clause = tmp_path / "clause"
    clause.write_text('key "k" {\n\talgorithm hmac-sha256;\n\tsecret "c2VjcmV0c2VjcmV0c2VjcmV0";\n};\n')
    assert read_tsig_secret(bare) == read_tsig_secret(clause) == "c2VjcmV0c2VjcmV0c2VjcmV0"
    bad = tmp_path / "bad"
    bad.write_text("not base64 !!!")
    with pytest.raises(LocalError, match="does not hold a base64 TSIG secret") as info:
        read_tsig_secret(bad)
    assert "!!!" not in str(info.value)
    with pytest.raises(LocalError, match="cannot read"):
        read_tsig_secret(tmp_path / "missing")


# ---------------------------------------------------------------------------
# rfc2136 against BIND.


def test_rfc2136_publish_change_remove(bind):
    config = bind.config()
    backend = backend_for(config)
    lines: list[str] = []
    first = RecordSet("_mta-sts.example.test", "TXT", ("v=STSv1; id=one",), 300)
    backend.publish(first)
    wait_until_visible(config, first, lines.append)
    assert bind.query("_mta-sts.example.test", "TXT") == ["v=STSv1; id=one"]

    second = RecordSet("_mta-sts.example.test", "TXT", ("v=STSv1; id=two",), 300)
    backend.publish(second)  # replaces, never adds
    wait_until_visible(config, second, lines.append)
    assert bind.query("_mta-sts.example.test", "TXT") == ["v=STSv1; id=two"]
    assert second in backend.list()

    backend.remove("_mta-sts.example.test", "TXT")
    backend.remove("_mta-sts.example.test", "TXT")  # absent is fine
    wait_until_absent(config, "_mta-sts.example.test", "TXT", lines.append)
    assert bind.query("_mta-sts.example.test", "TXT") == []
    assert all(s.name != "_mta-sts.example.test" for s in backend.list())


def test_rfc2136_long_txt_round_trip(bind):
    config = bind.config()
    backend = backend_for(config)
    rrset = RecordSet("sel._domainkey.example.test", "TXT", (LONG_DKIM,), 300)
    backend.publish(rrset)
    wait_until_visible(config, rrset, lambda line: None)
    assert bind.query(rrset.name, "TXT") == [LONG_DKIM]
    if shutil.which("dig") is None:
        pytest.skip("dig (bind9-dnsutils) is not installed")
    dig = subprocess.run(["dig", "+short", "-p", str(bind.port), "@127.0.0.1", rrset.name, "TXT"],
                         capture_output=True, text=True, timeout=10)
    assert dig.returncode == 0, dig.stderr  # a failing dig is a failure, not a reason to check less
    assert dig.stdout.count('" "') == len(split_txt(LONG_DKIM)) - 1  # dig shows the separate character-strings


def test_rfc2136_other_types(bind):
    config = bind.config()
    backend = backend_for(config)
    for rrset in (RecordSet("mail.example.test", "A", ("192.0.2.25",)),  # BIND wants the MX's address first
                  RecordSet("example.test", "MX", ("10 mail.example.test",)),
                  RecordSet("example.test", "CAA", ('0 issue "letsencrypt.org"',))):
        backend.publish(rrset)
        wait_until_visible(config, rrset, lambda line: None)
    assert bind.query("example.test", "MX") == ["10 mail.example.test."]


def test_rfc2136_wrong_secret_is_one_line(bind, tmp_path):
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("d3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZ3dyb25nMTI=\n")
    os.chmod(wrong, 0o600)
    backend = backend_for(bind.config(tsig_secret_file=str(wrong)))
    with pytest.raises(DNSError) as info:
        backend.publish(RecordSet("x.example.test", "TXT", ("hello",)))
    message = str(info.value)
    assert "BADSIG" in message and bind.server in message and "\n" not in message
    assert "d3Jvbmd3" not in message and bind.secret not in message
    assert bind.query("x.example.test", "TXT") == []


def test_rfc2136_unknown_key_is_one_line(bind):
    backend = backend_for(bind.config(tsig_key_name="nobody"))
    with pytest.raises(DNSError) as info:
        backend.publish(RecordSet("x.example.test", "TXT", ("hello",)))
    assert "BADKEY" in str(info.value) and "\n" not in str(info.value)
    assert bind.query("x.example.test", "TXT") == []


def test_rfc2136_unsigned_update_refused(bind):
    backend = backend_for(bind.config(tsig_key_name=None, tsig_secret_file=None))
    with pytest.raises(DNSError) as info:
        backend.publish(RecordSet("x.example.test", "TXT", ("hello",)))
    message = str(info.value)
    assert "REFUSED" in message and "unsigned" in message and "\n" not in message
    assert bind.query("x.example.test", "TXT") == []


def test_record_outside_zone_is_refused_before_sending(bind):
    backend = backend_for(bind.config())
    with pytest.raises(DNSError, match="not inside the zone example.test"):
        backend.publish(RecordSet("_mta-sts.example.org", "TXT", ("v=STSv1; id=x",)))


def test_rfc2136_refuses_to_publish_beside_a_cname(bind_factory):
    # RFC 2136 3.4.2.2: BIND answers NOERROR and silently drops a TXT added at a CNAME; the
    # prerequisite turns that into a refusal naming the cause.
    server = bind_factory(records="_mta-sts 300 IN CNAME _mta-sts.provider.example.")
    backend = backend_for(server.config())
    with pytest.raises(DNSError) as info:
        backend.publish(RecordSet("_mta-sts.example.test", "TXT", ("v=STSv1; id=x",)))
    message = str(info.value)
    assert "YXRRSET" in message and "CNAME" in message and "\n" not in message
    assert server.query("_mta-sts.example.test", "CNAME") == ["_mta-sts.provider.example."]
    backend.publish(RecordSet("_smtp._tls.example.test", "TXT", ("v=TLSRPTv1; rua=mailto:a@example.test",)))
    assert server.query("_smtp._tls.example.test", "TXT") == ["v=TLSRPTv1; rua=mailto:a@example.test"]


# ---------------------------------------------------------------------------
# Propagation with a second server.


def test_a_referral_is_not_an_authoritative_absence(bind, bind_factory):
    # A server of the parent zone answers NOERROR without AA (a referral): it must never pass for
    # "the record is gone" (nor for "it is there").
    parent = bind_factory(zone="test", name="parent", records="example 300 IN NS ns1.example.test.")
    config = bind.config(check_servers=[bind.server, parent.server], propagation_timeout=0.3)
    with pytest.raises(DNSError) as info:
        wait_until_absent(config, "_mta-sts.example.test", "TXT", lambda line: None)
    message = str(info.value)
    assert "1 of 2" in message and parent.server in message and "AA flag" in message


def test_lagging_server_times_out_with_clear_message(bind, bind_factory):
    stale = bind_factory(key=bind.key, dynamic=False, name="stale",
                         records='_mta-sts IN TXT "v=STSv1; id=old"')
    config = bind.config(check_servers=[bind.server, stale.server], propagation_timeout=0.6)
    rrset = RecordSet("_mta-sts.example.test", "TXT", ("v=STSv1; id=new",))
    backend_for(config).publish(rrset)
    lines: list[str] = []
    with pytest.raises(DNSError) as info:
        wait_until_visible(config, rrset, lines.append)
    message = str(info.value)
    assert "1 of 2" in message and stale.server in message and "'v=STSv1; id=old'" in message
    assert bind.server not in message.split("lag", 1)[1]  # the primary is not blamed
    assert lines and "waiting for 1 of 2 servers" in lines[0]


def test_down_server_times_out(bind):
    from tests.fixtures.peers import free_port

    down = f"127.0.0.1:{free_port(udp_too=True)}"
    config = bind.config(check_servers=[bind.server, down], propagation_timeout=0.3)
    with pytest.raises(DNSError, match=f"{down} fails: no answer"):
        wait_until_absent(config, "nothing.example.test", "TXT", lambda line: None)


def test_real_secondary_catches_up(bind, bind_factory):
    secondary = bind_factory(primary=bind, name="secondary")
    config = bind.config(check_servers=[bind.server, secondary.server], propagation_timeout=15)
    rrset = RecordSet("_smtp._tls.example.test", "TXT", ("v=TLSRPTv1; rua=mailto:tlsrpt@example.test",))
    backend_for(config).publish(rrset)
    wait_until_visible(config, rrset, lambda line: None)
    assert secondary.query(rrset.name, "TXT") == list(rrset.values)


def test_ns_lookup_finds_servers(bind):
    from certkeeper.network.dns.propagation import authoritative_servers

    # the zone's NS is ns1.example.test → 127.0.0.1 (port 53, nothing to query there: only resolve)
    servers = authoritative_servers(bind.config(check_servers=[]), "example.test")
    assert [(s.addr, s.port) for s in servers] == [("127.0.0.1", 53)]
    assert "ns1.example.test" in servers[0].label


# ---------------------------------------------------------------------------
# zonefile and manual.


def test_zonefile_backend_with_rndc_reload(bind_factory, tmp_path):
    include = tmp_path / "certkeeper.inc"
    include.write_text("")
    server = bind_factory(include=include, name="zf", dynamic=False)
    config = server.config(backend="zonefile", zonefile=str(include),
                           reload_command=server.rndc("reload", "example.test"))
    backend = backend_for(config)
    rrset = RecordSet("_mta-sts.example.test", "TXT", ("v=STSv1; id=abc",))
    backend.publish(rrset)
    wait_until_visible(config, rrset, lambda line: None)
    assert backend.list() == [rrset]
    assert "v=STSv1; id=abc" in include.read_text()
    other = RecordSet("sel._domainkey.example.test", "TXT", (LONG_DKIM,))
    backend.publish(other)
    wait_until_visible(config, other, lambda line: None)
    backend.remove(rrset.name, "TXT")
    wait_until_absent(config, rrset.name, "TXT", lambda line: None)
    assert backend.list() == [other]
    assert not list(tmp_path.glob(".*certkeeper-new"))


def test_zonefile_reload_failure_is_one_line(tmp_path):
    from certkeeper.core import config as ck_config

    config = ck_config.parse(f'state_dir = "{tmp_path}"\n[dns]\nbackend = "zonefile"\nzone = "example.test"\n'
                             f'zonefile = "{tmp_path}/z.inc"\nreload_command = ["false"]\n')
    with pytest.raises(DNSError, match="reload_command 'false' exited with 1"):
        backend_for(config).publish(RecordSet("a.example.test", "TXT", ("x",)))


def test_manual_backend_prints_records_then_waits(bind):
    config = bind.config(backend="manual")
    lines: list[str] = []
    backend = backend_for(config, progress=lines.append)
    rrset = RecordSet("_mta-sts.example.test", "TXT", ("v=STSv1; id=manual1",))
    backend.publish(rrset)
    assert '    _mta-sts.example.test. 300 IN TXT "v=STSv1; id=manual1"' in lines
    assert backend.list() == [rrset]
    with pytest.raises(DNSError, match="has no such record"):  # the operator has not added it yet
        wait_until_visible(config, rrset, lines.append, timeout=0.2)
    backend_for(bind.config()).publish(rrset)  # the operator adds it
    wait_until_visible(config, rrset, lines.append)
    backend.remove(rrset.name, "TXT")
    assert any("delete every TXT record of _mta-sts.example.test." in line for line in lines)
    assert backend.list() == []


def test_zonefile_concurrent_publishers_lose_nothing(tmp_path):
    import threading

    from certkeeper.core import config as ck_config

    config = ck_config.parse(f'state_dir = "{tmp_path}"\n[dns]\nbackend = "zonefile"\nzone = "example.test"\n'
                             f'zonefile = "{tmp_path}/z.inc"\n')
    sets = [RecordSet(f"r{i}.example.test", "TXT", (f"value {i}",)) for i in range(8)]
    threads = [threading.Thread(target=backend_for(config).publish, args=(s,)) for s in sets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert backend_for(config).list() == sorted(sets, key=lambda s: s.name)


def test_each_query_gets_the_configured_timeout_not_three_seconds(bind, monkeypatch):
    """[dns] propagation_timeout bounds every single query (one-round checks and the resolver too);
    before, name_in_use and visible_everywhere always allowed 3 s and the resolver 6 s."""
    from certkeeper.network.dns import propagation

    seen: list[float] = []
    real = propagation.query

    def recording(server, name, rtype, timeout=propagation.QUERY_TIMEOUT):
        seen.append(timeout)
        return real(server, name, rtype, timeout)

    monkeypatch.setattr(propagation, "query", recording)
    config = bind.config(propagation_timeout=0.3)
    assert propagation.name_in_use(config, "nothing.example.test") is False
    assert propagation.visible_everywhere(config, RecordSet("nothing.example.test", "TXT", ("x",))) is False
    wait_until_absent(config, "nothing.example.test", "TXT", lambda line: None)
    assert len(seen) == 3 and max(seen) <= 0.3, seen
    resolver = propagation.make_resolver(config)
    assert resolver.timeout <= 0.3 and resolver.lifetime <= 0.6
    assert propagation.make_resolver(bind.config(propagation_timeout=600)).lifetime == 2 * propagation.QUERY_TIMEOUT
