"""MTA-STS policy and TXT record: render/parse round trips, good() and bad() tables (RFC 8461)."""

from __future__ import annotations

import pytest

from certkeeper.core.config import MtaStsConfig
from certkeeper.core.mtasts import MtaStsError, Policy, parse_policy, parse_txt, render_txt


def good_policy(text: str, want: Policy) -> None:
    assert parse_policy(text) == want


def bad_policy(text: str, message: str) -> None:
    with pytest.raises(MtaStsError, match=message):
        parse_policy(text)


ENFORCE = Policy(mode="enforce", mx=("mail.example.com", "*.example.net"), max_age=604800)


def test_render_is_crlf_in_rfc_order():
    assert ENFORCE.render() == (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"
    )


@pytest.mark.parametrize("policy", [
    ENFORCE,
    Policy(mode="testing", mx=("mx1.example.org",), max_age=0),
    Policy(mode="none", mx=(), max_age=86400),
    Policy(mode="enforce", mx=("xn--bcher-kva.example",), max_age=31557600),
])
def test_round_trip(policy):
    assert parse_policy(policy.render()) == policy
    assert parse_txt(render_txt(policy.policy_id())) == policy.policy_id()


def test_from_config():
    cfg = MtaStsConfig(domain="example.com", mode="enforce", mx=("mail.example.com",), max_age=604800,
                       certificate="mta-sts.example.com")
    assert Policy.from_config(cfg) == Policy(mode="enforce", mx=("mail.example.com",), max_age=604800)


@pytest.mark.parametrize("text, want", [
    # RFC 8461 3.2: LF is as good as CRLF; fields in any order; WSP after ':' and at line end.
    ("version: STSv1\nmode: testing\nmx: a.example.com\nmax_age: 10\n", Policy("testing", ("a.example.com",), 10)),
    ("max_age:10\r\nmx:\ta.example.com \r\nmode: enforce\r\nversion: STSv1",
     Policy("enforce", ("a.example.com",), 10)),
    # RFC 8461 3.2: extension fields are ignored.
    ("version: STSv1\nmode: none\nmax_age: 5\nx-future.thing: anything at all\n", Policy("none", (), 5)),
    # MX names ignore case.
    ("version: STSv1\nmode: enforce\nmx: MAIL.Example.COM\nmax_age: 1\n", Policy("enforce", ("mail.example.com",), 1)),
])
def test_parse_policy_good(text, want):
    good_policy(text, want)


@pytest.mark.parametrize("text, message", [
    ("", "no 'version'"),
    ("version: STSv2\nmode: enforce\nmx: a.example.com\nmax_age: 1\n", "version 'STSv2'"),
    ("Version: STSv1\nmode: none\nmax_age: 1\n", "no 'version'"),  # %s: names are case-sensitive
    ("version: STSv1\nmode: strict\nmx: a.example.com\nmax_age: 1\n", "mode 'strict'"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "at least one mx"),
    ("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 31557601\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: -1\n", "max_age '-1'"),
    ("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 12345678901\n", "1 to 10 digits"),
    ("version: STSv1\nmode: enforce\nmx: a.*.example.com\nmax_age: 1\n", "mx 'a.\\*.example.com'"),
    ("version: STSv1\nmode: enforce\nmx: bücher.example\nmax_age: 1\n", "non-printable"),
    ("version: STSv1\nmode: enforce\nmode: none\nmx: a.example.com\nmax_age: 1\n", "twice"),
    ("version: STSv1\nthis line has no colon\n", "not 'name: value'"),
    ("version: STSv1\nmode:\nmax_age: 1\n", "empty or non-printable"),
])
def test_parse_policy_bad(text, message):
    bad_policy(text, message)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="enforce", mx=(), max_age=1), "at least one mx"),
    (dict(mode="testing", mx=("Mail.example.com",), max_age=1), "lower case"),
    (dict(mode="testing", mx=("mail.example.com.",), max_age=1), "trailing dot"),
    (dict(mode="testing", mx=("localhost",), max_age=1), "fully qualified"),
    (dict(mode="testing", mx=("bücher.example",), max_age=1), "A-label"),
    (dict(mode="testing", mx=("a.example.com",), max_age=True), "max_age"),
])
def test_policy_cannot_be_invalid(kwargs, message):
    with pytest.raises(MtaStsError, match=message):
        Policy(**kwargs)


def test_policy_id_follows_content():
    same = Policy(mode="enforce", mx=("mail.example.com", "*.example.net"), max_age=604800)
    changed = Policy(mode="testing", mx=("mail.example.com", "*.example.net"), max_age=604800)
    assert ENFORCE.policy_id() == same.policy_id()
    assert ENFORCE.policy_id() != changed.policy_id()
    assert 1 <= len(ENFORCE.policy_id()) <= 32 and ENFORCE.policy_id().isalnum()


@pytest.mark.parametrize("text, want", [
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
    ("v=STSv1;id=abc", "abc"),
    ("v=STSv1 ;\tid=abc ; ext=v-1.2", "abc"),  # RFC 8461 3.1: extensions are ignored
    ("v=STSv1; future=x; id=" + "a" * 32, "a" * 32),
])
def test_parse_txt_good(text, want):
    assert parse_txt(text) == want


@pytest.mark.parametrize("text, message", [
    ("", "does not start"),
    ("id=abc; v=STSv1", "does not start"),
    ("v=STSv2; id=abc", "does not start"),
    ("V=STSv1; id=abc", "does not start"),
    ("v=STSv1", "no id"),
    ("v=STSv1; id=" + "a" * 33, "1 to 32"),
    ("v=STSv1; id=ab-c", "1 to 32"),
    ("v=STSv1; id=abc; id=def", "more than one id"),
    ("v=STSv1; id=abc; broken", "not 'name=value'"),
])
def test_parse_txt_bad(text, message):
    with pytest.raises(MtaStsError, match=message):
        parse_txt(text)


@pytest.mark.parametrize("policy_id", ["", "a" * 33, "has space", "dash-ed"])
def test_render_txt_refuses_bad_ids(policy_id):
    with pytest.raises(MtaStsError):
        render_txt(policy_id)
