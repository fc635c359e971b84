"""import-acme-client: acme-client.conf(5) → certkeeper.toml (fixtures written from the man page grammar)."""

from __future__ import annotations

import argparse
import io
import tomllib
from pathlib import Path

import pytest

from certkeeper.cli import main
from certkeeper.commands import import_acme_client
from certkeeper.core import acmeclient, config
from certkeeper.core.errors import ConfigError

# The usual authority block from acme-client's /etc/examples/acme-client.conf plus the guide's
# two domain blocks (mailserver-guide.txt sections C.2 and N.2.d), as written there.
GUIDE = """\
#
# $OpenBSD: acme-client.conf,v 1.5 2023/05/10 07:34:57 tb Exp $
#
authority letsencrypt {
\tapi url "https://acme-v02.api.letsencrypt.org/directory"
\taccount key "/etc/acme/letsencrypt-privkey.pem"
}

authority letsencrypt-staging {
\tapi url "https://acme-staging-v02.api.letsencrypt.org/directory"
\taccount key "/etc/acme/letsencrypt-staging-privkey.pem"
}

domain mail.example.com {
        domain key "/etc/ssl/private/mail.example.com.key"
        domain certificate "/etc/ssl/mail.example.com.crt"
        domain full chain certificate "/etc/ssl/mail.example.com.fullchain.pem"
        sign with letsencrypt
}

domain mta-sts.example.com {
        domain key "/etc/ssl/private/mta-sts.example.com.key"
        domain certificate "/etc/ssl/mta-sts.example.com.crt"
        domain full chain certificate "/etc/ssl/mta-sts.example.com.fullchain.pem"
        sign with letsencrypt
}
"""

# Every keyword of acme-client.conf(5): macros, include, continuation, quoting, comments.
EVERY_KEYWORD = """\
api_url="https://acme.example.net/directory"   # a macro
keydir = /etc/ssl/private
authority example {
\tapi url $api_url
\taccount key "/etc/acme/example-privkey.pem" ecdsa
\tcontact "mailto:hostmaster@example.com"
\tinsecure
}
authority other {
\tapi url "https://other.example.org/dir"
\taccount key '/etc/acme/other.pem' rsa
}
domain www {
\tdomain name "www.example.com"
\talternative names { example.com, secure.example.com \\
\t\tstatic.example.com }
\tdomain key "/etc/ssl/private/www.key" ecdsa
\tdomain certificate "/etc/ssl/www.crt"
\tdomain chain certificate "chain/www.chain.pem"
\tdomain full chain certificate "/etc/ssl/www.fullchain.pem"
\tsign with example
\tchallengedir "/var/www/acme-www"
\tprofile "tlsserver"
}
domain other.example.com {
\tdomain key "/etc/ssl/private/other.key"
\tdomain full chain certificate "/etc/ssl/other.fullchain.pem"
\tsign with other
}
"""


def convert(text: str, tmp_path: Path, name: str = "acme-client.conf") -> acmeclient.Conversion:
    path = tmp_path / name
    path.write_text(text)
    return acmeclient.convert(acmeclient.load(path), str(path))


def run_cli(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["import-acme-client", str(path)], out=out)
    return code, out.getvalue()


def test_guide_blocks_become_certificates_with_the_same_paths(tmp_path):
    result = convert(GUIDE, tmp_path)
    parsed = config.parse(result.toml, "converted.toml")  # passes `certkeeper check`
    assert parsed.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert parsed.acme.account_key == Path("/etc/acme/letsencrypt-privkey.pem")
    assert parsed.acme.account_key_type == "rsa4096"  # acme-client's default rsa is RSA 4096
    assert parsed.certificate_names() == ("mail.example.com", "mta-sts.example.com")
    mail = parsed.certificate("mail.example.com")
    assert mail.domains == ("mail.example.com",)
    assert mail.key == Path("/etc/ssl/private/mail.example.com.key")
    assert mail.cert == Path("/etc/ssl/mail.example.com.crt")
    assert mail.fullchain == Path("/etc/ssl/mail.example.com.fullchain.pem")
    assert mail.chain == Path("/etc/ssl/mail.example.com.chain.pem")  # new file beside the cert
    assert mail.key_type == "rsa4096" and mail.reuse_key is True
    assert parsed.certificate("mta-sts.example.com").key == Path("/etc/ssl/private/mta-sts.example.com.key")
    # nothing in the guide's file is lost, so no warnings; the unused staging authority is a comment
    assert result.warnings == ()
    assert "# authority letsencrypt-staging" in result.toml
    # ... and what renew --dry-run orders from
    assert parsed.acme.staging == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert "# [[mta_sts]]" in result.toml  # a hint, commented


def test_cli_prints_a_file_that_check_accepts(tmp_path, capsys):
    src = tmp_path / "acme-client.conf"
    src.write_text(GUIDE)
    code, text = run_cli(src)
    assert code == 0
    target = tmp_path / "certkeeper.toml"
    target.write_text(text)
    assert main(["--config", str(target), "check"], out=io.StringIO()) == 0
    assert capsys.readouterr().err == ""


def test_every_keyword(tmp_path, capsys):
    result = convert(EVERY_KEYWORD, tmp_path)
    parsed = config.parse(result.toml, "converted.toml")
    assert parsed.acme.directory == "https://acme.example.net/directory"  # macro expanded
    assert parsed.acme.account_key == Path("/etc/acme/example-privkey.pem")
    assert parsed.acme.account_key_type == "ecdsa-p384"  # acme-client's ecdsa is P-384
    assert parsed.acme.contact == ("mailto:hostmaster@example.com",)
    www, other = parsed.certificates  # "other" signs with the second authority, with its own account
    assert other.name == "other.example.com" and other.authority == "other"
    assert parsed.authority("other").directory == "https://other.example.org/dir"
    assert parsed.authority("other").account_key == Path("/etc/acme/other.pem")
    assert parsed.authority("other").account_key_type == "rsa4096"
    assert www.authority == "acme"
    assert www.name == "www"
    assert www.domains == ("www.example.com", "example.com", "secure.example.com", "static.example.com")
    assert www.key_type == "ecdsa-p384"
    assert www.chain == Path("/etc/ssl/chain/www.chain.pem")  # relative to the certificate's directory
    assert www.profile == "tlsserver"
    warnings = "\n".join(result.warnings)
    assert len(result.warnings) == 2
    assert f"{tmp_path}/acme-client.conf:7: 'insecure'" in warnings
    assert f"{tmp_path}/acme-client.conf:22: challengedir '/var/www/acme-www'" in warnings
    for line in result.warnings:  # each warning is also a comment in the output
        assert line.split(": ", 1)[1][:30] in result.toml

    code, _ = run_cli(tmp_path / "acme-client.conf")
    err = capsys.readouterr().err.splitlines()
    assert code == 0 and len(err) == 2 and all(e.startswith("certkeeper: warning: ") for e in err)


def test_macro_with_several_words_and_include(tmp_path):
    (tmp_path / "auth.conf").write_text('authority le {\n api url "https://le.example/dir"\n'
                                        ' account key "/etc/acme/le.pem"\n}\n')
    text = (f'include "{tmp_path}/auth.conf"\n'
            'alts = "a.example.com" b.example.com\n'
            'domain a.example.com {\n alternative names { $alts }\n domain key "/k/a.key"\n'
            ' domain full chain certificate "/c/a.pem"\n}\n')
    parsed = config.parse(convert(text, tmp_path).toml)
    assert parsed.certificates[0].domains == ("a.example.com", "b.example.com")  # CN not repeated
    assert parsed.certificates[0].cert == Path("/c/a.example.com.crt")


def test_quotes_keep_hash_and_keywords(tmp_path):
    text = ('authority "domain" {\n api url "https://x.example/#frag"\n account key "/k # not a comment"\n}\n'
            'domain d.example.com {\n domain key "/k/d.key"\n domain certificate "/c/d.crt"\n}\n')
    parsed = config.parse(convert(text, tmp_path).toml)
    assert parsed.acme.directory == "https://x.example/#frag"
    assert parsed.acme.account_key == Path("/k # not a comment")


BROKEN = [
    ("domain a.example.com {\n domain key \"/k\"\n", 2, "expected '}', found end of file"),
    ('authority le {\n api url "https://x/"\n}\n', 1, "authority le: no account key file specified"),
    ('authority le {\n api url "https://x/"\n account key "/a"\n api url "https://y/"\n}\n', 4, "duplicate api"),
    ('authority le {\n api url "https://x/"\n account key "/a"\n}\n'
     'domain a.example.com {\n domain certificate "/c"\n}\n', 5, "no domain key file specified"),
    ('authority le {\n api url "https://x/"\n account key "/a"\n}\n'
     'domain a.example.com {\n domain key "/k"\n}\n', 5, "at least certificate file or full"),
    ('domain a.example.com {\n domain key "/k"\n domain certificate "/c"\n sign with nobody\n}\n', 4,
     "sign with: unknown authority 'nobody'"),
    ('x = 1\ndomain a.example.com {\n domain key $y\n}\n', 3, "macro 'y' not defined"),
    ('domain bad_name!.example {\n}\n', 1, "syntax error"),
    ('domain a.example.com {\n domain key "/k"\n domain cert "/c"\n}\n', 3, "syntax error: expected"),
    ('domain a.example.com {\n domain key "relative.key"\n}\n', 2, "relative.key: not an absolute path"),
    ('authority le {\n api url "https://x/\n', 2, "reached end of file while parsing quoted string"),
    ('authority le {\n api url "https://x/"\n account key "/a"\n}\nauthority le {\n}\n', 5,
     "authority le already defined"),
    ('domain a.example.com {\n alternative names { not_a..name }\n}\n', 2, "bad domain syntax"),
    ('domain a.example.com {\n domain key "/k"\n domain full chain certificate "/k"\n}\n', 3,
     "domain full chain file already used"),
    ('authority le {\n api url "https://x/" account key "/a"\n}\n', 2, "expected end of line or '}'"),
    ('include "/nonexistent/acme.conf"\n', 1, "failed to include file /nonexistent/acme.conf"),
]


@pytest.mark.parametrize(("text", "line", "message"), BROKEN)
def test_broken_files_give_one_line_with_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "broken.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        acmeclient.convert(acmeclient.load(path), str(path))
    assert len(info.value.lines) == 1
    assert "\n" not in info.value.lines[0]
    assert info.value.lines[0].startswith(f"{path}:{line}: "), info.value.lines[0]
    assert message in info.value.lines[0]


def test_broken_file_through_the_cli(tmp_path, capsys):
    path = tmp_path / "broken.conf"
    path.write_text('authority le {\n\tapi url "https://x/"\n\taccount key "/a" dsa\n}\n')
    code, out = run_cli(path)
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert err == f"certkeeper: {path}:3: syntax error: expected end of line or '}}', found 'dsa'\n"


def test_http_directory_is_refused(tmp_path):
    text = 'authority t {\n api url "http://127.0.0.1:14000/dir"\n account key "/a"\n}\n'
    with pytest.raises(ConfigError, match=r":1: api url 'http://127.0.0.1:14000/dir' is not an https:// URL"):
        convert(text, tmp_path)


def test_missing_file_is_one_line(tmp_path):
    args = argparse.Namespace(file=str(tmp_path / "none.conf"))
    with pytest.raises(ConfigError, match="none.conf: cannot read: No such file"):
        import_acme_client.main(args, io.StringIO())


def test_output_is_valid_toml_with_odd_characters(tmp_path):
    text = ('authority le {\n api url "https://x.example/d"\n account key "/etc/acme/a \\"q\\" \\\\.pem"\n}\n'
            'domain a.example.com {\n domain key "/k/ä.key"\n domain certificate "/c/a.crt"\n}\n')
    data = tomllib.loads(convert(text, tmp_path).toml)
    assert data["acme"]["account_key"] == '/etc/acme/a "q" \\\\.pem'
    assert data["certificate"][0]["key"] == "/k/ä.key"


# Valid per parse.y, though unusual: an unquoted URL from a macro, a block on one line, a
# backslash-continued line, a handle that is not the domain name (`domain name`), several
# macro words in `alternative names`, a relative full chain, a name that starts with a digit,
# a quoted path with a space, and a second authority defined on the line of its brace.
ODD_BUT_VALID = """\
api_le=https://acme-v02.api.letsencrypt.org/directory
alts = "smtp.example.com, imap.example.com"
authority letsencrypt {
\tapi url $api_le
\taccount key "/etc/acme/letsencrypt-privkey.pem" ecdsa
\tcontact "mailto:postmaster@example.com" # a comment after a statement
}
authority staging { api url https://acme-staging-v02.api.letsencrypt.org/directory
\taccount key '/etc/acme/staging.pem' }
domain "mail" {
\tdomain name mail.example.com
\talternative names { $alts }
\tdomain key "/etc/ssl/private/mail.example.com.key" rsa
\tdomain certificate \\
\t\t"/etc/ssl/mail.example.com.crt"
\tdomain full chain certificate "mail.example.com.fullchain.pem"
\tsign with letsencrypt
}
domain 3com.example.com { domain key "/etc/ssl/private/3com key.key"
\tdomain certificate "/etc/ssl/3com.example.com.crt" }
"""


def test_odd_but_valid_input(tmp_path):
    result = convert(ODD_BUT_VALID, tmp_path)
    parsed = config.parse(result.toml, "converted.toml")
    assert parsed.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert parsed.acme.account_key_type == "ecdsa-p384"
    mail, third = parsed.certificates
    assert mail.name == "mail" and mail.domains == ("mail.example.com", "smtp.example.com", "imap.example.com")
    assert mail.cert == Path("/etc/ssl/mail.example.com.crt")  # the continued line
    assert mail.fullchain == Path("/etc/ssl/mail.example.com.fullchain.pem")  # relative to the cert's directory
    assert mail.key_type == "rsa4096"
    assert third.name == "3com.example.com" and third.key == Path("/etc/ssl/private/3com key.key")
    assert result.warnings == ()
    assert "# authority staging" in result.toml


TWO_AUTHORITIES = """\
authority letsencrypt {
\tapi url "https://acme-v02.api.letsencrypt.org/directory"
\taccount key "/etc/acme/letsencrypt-privkey.pem"
}
authority buypass {
\tapi url "https://api.buypass.com/acme/directory"
\taccount key "/etc/acme/buypass-privkey.pem" ecdsa
\tcontact "mailto:hostmaster@example.com"
}
domain mail.example.com {
\tdomain key "/etc/ssl/private/mail.example.com.key"
\tdomain full chain certificate "/etc/ssl/mail.example.com.fullchain.pem"
\tsign with letsencrypt
}
domain mx2.example.net {
\talternative names { smtp.example.net }
\tdomain key "/etc/ssl/private/mx2.example.net.key"
\tdomain full chain certificate "/etc/ssl/mx2.example.net.fullchain.pem"
\tsign with buypass
}
"""


def test_two_authorities_import_with_both_domains_and_check_accepts_it(tmp_path, capsys):
    """Every authority a domain signs with is carried over, each with its own account key."""
    src = tmp_path / "acme-client.conf"
    src.write_text(TWO_AUTHORITIES)
    code, text = run_cli(src)
    assert code == 0 and capsys.readouterr().err == ""
    target = tmp_path / "certkeeper.toml"
    target.write_text(text)
    assert main(["--config", str(target), "check"], out=io.StringIO()) == 0
    parsed = config.load(target)
    assert list(parsed.authorities) == ["acme", "buypass"]
    assert parsed.acme.account_key == Path("/etc/acme/letsencrypt-privkey.pem")
    buypass = parsed.authority("buypass")
    assert buypass.directory == "https://api.buypass.com/acme/directory"
    assert buypass.account_key == Path("/etc/acme/buypass-privkey.pem")
    assert buypass.account_key_type == "ecdsa-p384" and buypass.contact == ("mailto:hostmaster@example.com",)
    mail, mx2 = parsed.certificates
    assert (mail.name, mail.authority, mail.domains) == ("mail.example.com", "acme", ("mail.example.com",))
    assert (mx2.name, mx2.authority, mx2.domains) == ("mx2.example.net", "buypass",
                                                      ("mx2.example.net", "smtp.example.net"))
    assert mx2.key == Path("/etc/ssl/private/mx2.example.net.key")


def test_an_authority_named_acme_that_is_not_the_first_gets_another_name(tmp_path):
    text = TWO_AUTHORITIES.replace("buypass", "acme")
    parsed = config.parse(convert(text, tmp_path).toml, "converted.toml")
    assert list(parsed.authorities) == ["acme", "acme-2"]
    assert parsed.certificates[1].authority == "acme-2"
    assert parsed.authority("acme-2").account_key == Path("/etc/acme/acme-privkey.pem")
