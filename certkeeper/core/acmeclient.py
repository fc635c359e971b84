"""``certkeeper import-acme-client``: acme-client.conf(5) in, certkeeper.toml out.

This module owns reading OpenBSD's acme-client.conf (lexer and parser follow
``usr.sbin/acme-client/parse.y``: macros, ``#`` comments, quoted strings,
backslash line continuation, ``include``) and rendering an equivalent
certkeeper.toml that keeps the SAME account key and file paths, so the first
renewal needs no new ACME account and no change in smtpd, dovecot or httpd.

Every authority a domain signs with is carried over with its own account key:
the first domain's becomes ``[acme]``, each other one an ``[authority.NAME]``
table, and its domains name it with ``authority = "NAME"``. What cannot be
carried over (``challengedir``, ``insecure``, a non-mailto contact) becomes a
``#`` comment in the output and a warning. Errors are one line: ``FILE:LINE: message``.
"""

from __future__ import annotations

import json
import posixpath
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from certkeeper.core import config as cfg
from certkeeper.core.errors import ConfigError

# parse.y lookup(): unquoted words that are keywords, never plain strings.
KEYWORDS = frozenset({
    "account", "alternative", "api", "authority", "certificate", "chain", "challengedir", "contact", "domain",
    "ecdsa", "full", "include", "insecure", "key", "name", "names", "profile", "rsa", "sign", "url", "with",
})
# acme-client key.c: "rsa" keys are RSA 4096 (KBITS), "ecdsa" keys are P-384 (NID_secp384r1).
KEY_TYPES = {"rsa": "rsa4096", "ecdsa": "ecdsa-p384"}
DEFAULT_CHALLENGEDIR = "/var/www/acme"
_EOF = ""
_START_EXPAND, _DONE_EXPAND = "\x01", "\x02"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ---------------------------------------------------------------------------
# The parsed file.


@dataclass
class Authority:
    name: str
    where: str  # "FILE:LINE" of the authority keyword
    api: str = ""
    account_key: str = ""
    account_key_type: str = "rsa"
    contact: str = ""
    insecure: str = ""  # "FILE:LINE" when set


@dataclass
class Domain:
    handle: str
    where: str
    domain_name: str = ""
    altnames: list[str] = field(default_factory=list)
    key: str = ""
    key_type: str = "rsa"
    cert: str = ""
    chain: str = ""
    fullchain: str = ""
    sign_with: str = ""
    challengedir: str = ""
    profile: str = ""
    lines: dict[str, str] = field(default_factory=dict)  # setting → "FILE:LINE"

    @property
    def common_name(self) -> str:
        return self.domain_name or self.handle

    @property
    def cert_dir(self) -> str:
        """acme-client main.c: the directory of the certificate (or full chain) file."""
        return posixpath.dirname(self.cert or self.fullchain)


@dataclass
class AcmeClientConf:
    authorities: list[Authority] = field(default_factory=list)
    domains: list[Domain] = field(default_factory=list)

    def authority(self, name: str) -> Authority | None:
        return next((a for a in self.authorities if a.name == name), None)

    def authority_of(self, domain: Domain) -> Authority | None:
        """acme-client: without ``sign with`` the first authority in the file is used."""
        if domain.sign_with:
            return self.authority(domain.sign_with)
        return self.authorities[0] if self.authorities else None


# ---------------------------------------------------------------------------
# Lexer (parse.y yylex/lgetc).


@dataclass(frozen=True)
class Token:
    kind: str  # "word" (unquoted), "string" (quoted), "char", "nl", "eof"
    value: str
    line: int

    def is_keyword(self, word: str | None = None) -> bool:
        return self.kind == "word" and self.value in KEYWORDS and (word is None or self.value == word)

    @property
    def is_string(self) -> bool:
        return self.kind == "string" or (self.kind == "word" and self.value not in KEYWORDS)

    def show(self) -> str:
        if self.kind == "nl":
            return "end of line"
        if self.kind == "eof":
            return "end of file"
        return repr(self.value) if self.kind != "word" or self.value not in KEYWORDS else f"keyword {self.value!r}"


class _Lexer:
    """Characters → tokens, expanding ``$macro`` in unquoted text."""

    def __init__(self, text: str, filename: str, macros: dict[str, str]) -> None:
        self.text, self.filename, self.macros = text, filename, macros
        self.pos = 0
        self.line = 1
        self.pushback: list[str] = []
        self.expanding = False
        self.eof_reached = False

    def error(self, line: int, message: str) -> ConfigError:
        return ConfigError([f"{self.filename}:{line}: {message}"])

    def _igetc(self) -> str:
        while True:
            if self.pushback:
                c = self.pushback.pop()
            elif self.pos < len(self.text):
                c = self.text[self.pos]
                self.pos += 1
            else:
                return _EOF
            if c == _START_EXPAND:
                self.expanding = True
            elif c == _DONE_EXPAND:
                self.expanding = False
            else:
                return c

    def _lgetc(self) -> str:
        c = self._igetc()
        while c == "\\":  # a backslash before the newline continues the line
            nxt = self._igetc()
            if nxt != "\n":
                c = nxt
                break
            self.line += 1
            c = self._igetc()
        if c == _EOF and not self.eof_reached:  # a fake end of line keeps the last line's number right
            self.eof_reached = True
            return "\n"
        return c

    def _unget(self, c: str) -> None:
        if c != _EOF:
            self.pushback.append(c)

    def next(self) -> Token:
        while True:
            c = self._lgetc()
            while c in (" ", "\t"):
                c = self._lgetc()
            line = self.line
            if c == "#":
                while c not in ("\n", _EOF):
                    c = self._lgetc()
            if c == "$" and not self.expanding:
                self._expand(line)
                continue
            if c in ("'", '"'):
                return Token("string", self._quoted(c, line), line)
            if _starts_word(c):
                return Token("word", self._word(c), line)
            if c == "\n":
                self.line += 1
                return Token("nl", c, line)
            if c == _EOF:  # reported on the file's last line
                return Token("eof", c, max(1, 1 + self.text.rstrip("\n").count("\n")))
            if not c.isprintable():
                raise self.error(line, f"unexpected character {c!r}")
            return Token("char", c, line)

    def _expand(self, line: int) -> None:
        name = ""
        c = self._lgetc()
        while c != _EOF and c.isascii() and (c.isalnum() or c == "_"):
            name += c
            c = self._lgetc()
        self._unget(c)
        if name not in self.macros:
            raise self.error(line, f"macro '{name}' not defined")
        # Re-read the value as if it had been written here; no nested expansion.
        self.pushback.extend([_DONE_EXPAND, *reversed(self.macros[name]), _START_EXPAND])

    def _quoted(self, quote: str, line: int) -> str:
        buf: list[str] = []
        while True:
            c = self._igetc()
            if c == _EOF:
                raise self.error(line, "reached end of file while parsing quoted string")
            if c == "\n":
                self.line += 1
                continue
            if c == "\\":
                nxt = self._igetc()
                if nxt in (quote, " ", "\t"):
                    c = nxt
                elif nxt == "\n":
                    self.line += 1
                    continue
                else:
                    self._unget(nxt)
            elif c == quote:
                return "".join(buf)
            elif c == "\0":
                raise self.error(self.line, "syntax error: NUL byte in a quoted string")
            buf.append(c)

    def _word(self, first: str) -> str:
        buf = [first]
        c = self._lgetc()
        while c != _EOF and _in_word(c):
            buf.append(c)
            c = self._lgetc()
        self._unget(c)
        return "".join(buf)


def _starts_word(c: str) -> bool:
    # parse.y starts a word on a letter, digit, ':' or '_'; the man page also allows '/'.
    return c != _EOF and c.isascii() and (c.isalnum() or c in ":_/")


def _in_word(c: str) -> bool:
    # parse.y allowed_in_string(): alphanumerics and punctuation except ( ) { } ! = # ,
    return c.isascii() and (c.isalnum() or (c in string.punctuation and c not in "(){}!=#,"))


# ---------------------------------------------------------------------------
# Parser (parse.y grammar).


class _Parser:
    def __init__(self, text: str, filename: str, macros: dict[str, str], conf: AcmeClientConf,
                 depth: int = 0) -> None:
        self.lexer = _Lexer(text, filename, macros)
        self.filename = filename
        self.macros = macros
        self.conf = conf
        self.depth = depth
        self.keyfiles: set[str] = set()
        self.tok = self.lexer.next()

    # -- helpers ---------------------------------------------------------------

    def error(self, message: str, line: int | None = None) -> ConfigError:
        return self.lexer.error(self.tok.line if line is None else line, message)

    def where(self, line: int) -> str:
        return f"{self.filename}:{line}"

    def advance(self) -> Token:
        tok = self.tok
        self.tok = self.lexer.next()
        return tok

    def expected(self, what: str) -> ConfigError:
        return self.error(f"syntax error: expected {what}, found {self.tok.show()}")

    def keyword(self, word: str) -> Token:
        if not self.tok.is_keyword(word):
            raise self.expected(f"'{word}'")
        return self.advance()

    def char(self, c: str) -> None:
        if not (self.tok.kind == "char" and self.tok.value == c):
            raise self.expected(f"'{c}'")
        self.advance()

    def string(self, what: str) -> str:
        if not self.tok.is_string:
            raise self.expected(what)
        return self.advance().value

    def skip_newlines(self) -> None:
        while self.tok.kind == "nl":
            self.advance()

    def end_of_statement(self) -> None:
        if self.tok.kind not in ("nl", "eof"):
            raise self.expected("end of line")

    # -- grammar -----------------------------------------------------------------

    def parse(self) -> None:
        while self.tok.kind != "eof":
            if self.tok.kind == "nl":
                self.advance()
                continue
            if self.tok.is_keyword("include"):
                self.include()
            elif self.tok.is_keyword("authority"):
                self.authority()
            elif self.tok.is_keyword("domain"):
                self.domain()
            elif self.tok.kind == "word" and self.tok.is_string:
                self.varset()
            else:
                raise self.expected("'authority', 'domain', 'include' or a macro definition")
            self.end_of_statement()

    def include(self) -> None:
        line = self.advance().line
        name = self.string("a file name")
        path = Path(name)
        if self.depth >= 8:
            raise self.error(f"include {name!r}: files include each other too deeply", line)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self.error(f"failed to include file {name}: {getattr(exc, 'strerror', None) or exc}", line) \
                from None
        sub = _Parser(text, str(path), self.macros, self.conf, self.depth + 1)
        sub.keyfiles = self.keyfiles
        sub.parse()

    def varset(self) -> None:
        # parse.y varset: STRING '=' string (several strings are joined by a space)
        name = self.advance()
        self.char("=")
        values = [self.string("a macro value")]
        while self.tok.is_string:
            values.append(self.advance().value)
        self.macros[name.value] = " ".join(values)

    def block(self, option: Callable[[], None]) -> None:
        self.char("{")
        self.skip_newlines()
        while not (self.tok.kind == "char" and self.tok.value == "}"):
            if self.tok.kind == "eof":
                raise self.expected("'}'")
            option()
            if not (self.tok.kind == "char" and self.tok.value == "}"):
                if self.tok.kind != "nl":
                    raise self.expected("end of line or '}'")
                self.skip_newlines()
        self.advance()

    def authority(self) -> None:
        line = self.advance().line
        name = self.string("an authority name")
        if self.conf.authority(name):
            raise self.error(f"authority {name} already defined", line)
        auth = Authority(name=name, where=self.where(line))
        self.conf.authorities.append(auth)
        self.block(lambda: self.authority_option(auth))
        if not auth.api:
            raise self.error(f"authority {name}: no api URL specified", line)
        if not auth.account_key:
            raise self.error(f"authority {name}: no account key file specified", line)

    def authority_option(self, auth: Authority) -> None:
        tok = self.tok
        if tok.is_keyword("api"):
            self.advance()
            self.keyword("url")
            self.set_once(auth, "api", self.string("a URL"), "api", tok.line)
        elif tok.is_keyword("account"):
            self.advance()
            self.keyword("key")
            self.set_once(auth, "account_key", self.absolute(self.string("a file name"), tok.line), "account",
                          tok.line)
            auth.account_key_type = self.keytype()
        elif tok.is_keyword("contact"):
            self.advance()
            self.set_once(auth, "contact", self.string("a contact URL"), "contact", tok.line)
        elif tok.is_keyword("insecure"):
            self.advance()
            auth.insecure = self.where(tok.line)
        else:
            raise self.expected("'api url', 'account key', 'contact' or 'insecure'")

    def keytype(self) -> str:
        if self.tok.is_keyword("rsa") or self.tok.is_keyword("ecdsa"):
            return self.advance().value
        return "rsa"  # parse.y: keytype defaults to rsa

    def set_once(self, obj: object, attr: str, value: str, what: str, line: int) -> None:
        if getattr(obj, attr):
            raise self.error(f"duplicate {what}", line)
        setattr(obj, attr, value)

    def absolute(self, path: str, line: int) -> str:
        if not path.startswith("/"):
            raise self.error(f"{path}: not an absolute path", line)
        return path

    def domain(self) -> None:
        line = self.advance().line
        handle = self.string("a domain name")
        if any(d.handle == handle for d in self.conf.domains):
            raise self.error(f"domain {handle} already defined", line)
        dom = Domain(handle=handle, where=self.where(line))
        self.block(lambda: self.domain_option(dom))
        if not dom.domain_name and (problem := cfg.domain_problem(handle)):
            raise self.error(f"{handle}: bad domain syntax ({handle!r} {problem})", line)
        if not dom.key:
            raise self.error(f"no domain key file specified for domain {dom.common_name}", line)
        if not dom.cert and not dom.fullchain:
            raise self.error("at least certificate file or full certificate chain file must be specified "
                             f"for domain {dom.common_name}", line)
        dom.chain = self.relative_to_certdir(dom, dom.chain)
        dom.fullchain = self.relative_to_certdir(dom, dom.fullchain)
        self.conf.domains.append(dom)

    def relative_to_certdir(self, dom: Domain, path: str) -> str:
        # acme-client.conf(5): chain files may be relative to the certificate's directory.
        return path if not path or path.startswith("/") else posixpath.normpath(posixpath.join(dom.cert_dir, path))

    def domain_option(self, dom: Domain) -> None:
        tok = self.tok
        line = tok.line
        if tok.is_keyword("alternative"):
            self.advance()
            self.keyword("names")
            self.altnames(dom)
            dom.lines.setdefault("alternative names", self.where(line))
        elif tok.is_keyword("domain"):
            self.advance()
            self.domain_file_option(dom, line)
        elif tok.is_keyword("sign"):
            self.advance()
            self.keyword("with")
            name = self.string("an authority name")
            if dom.sign_with:
                raise self.error("duplicate sign with", line)
            if self.conf.authority(name) is None:
                raise self.error(f"sign with: unknown authority {name!r}", line)
            dom.sign_with = name
        elif tok.is_keyword("challengedir"):
            self.advance()
            self.set_once(dom, "challengedir", self.string("a directory"), "challengedir", line)
        elif tok.is_keyword("profile"):
            self.advance()
            self.set_once(dom, "profile", self.string("a profile name"), "profile", line)
        else:
            raise self.expected("a domain option ('alternative names', 'domain key', 'domain certificate', "
                                "'domain chain certificate', 'domain full chain certificate', 'sign with', "
                                "'challengedir' or 'profile')")
        dom.lines[tok.value] = self.where(line)

    def domain_file_option(self, dom: Domain, line: int) -> None:
        tok = self.tok
        if tok.is_keyword("name"):
            self.advance()
            name = self.string("a domain name")
            if problem := cfg.domain_problem(name):
                raise self.error(f"{name}: bad domain syntax ({name!r} {problem})", line)
            self.set_once(dom, "domain_name", name, "domain name", line)
            return
        if tok.is_keyword("key"):
            self.advance()
            self.set_once(dom, "key", self.keyfile(self.absolute(self.string("a file name"), line), "key", line),
                          "key", line)
            dom.key_type = self.keytype()
            return
        attr, what = {"certificate": ("cert", "cert"), "chain": ("chain", "chain"),
                      "full": ("fullchain", "full chain")}.get(tok.value if tok.kind == "word" else "", ("", ""))
        if not attr:
            raise self.expected("'name', 'key', 'certificate', 'chain certificate' or 'full chain certificate'")
        self.advance()
        if attr == "fullchain":
            self.keyword("chain")
        if attr != "cert":
            self.keyword("certificate")
        path = self.string("a file name")
        if attr == "cert":
            self.absolute(path, line)
        self.set_once(dom, attr, self.keyfile(path, what, line), what, line)

    def keyfile(self, path: str, what: str, line: int) -> str:
        # parse.y conf_new_keyfile(): one file can serve one role in one domain only.
        if path in self.keyfiles:
            raise self.error(f"domain {what} file already used", line)
        self.keyfiles.add(path)
        return path

    def altnames(self, dom: Domain) -> None:
        self.char("{")
        while True:
            self.skip_newlines()
            if self.tok.kind == "char" and self.tok.value == "}":
                break
            line = self.tok.line
            name = self.string("an alternative name or '}'")
            if problem := cfg.domain_problem(name):
                raise self.error(f"{name}: bad domain syntax ({name!r} {problem})", line)
            dom.altnames.append(name)
            if self.tok.kind == "char" and self.tok.value == ",":
                self.advance()
        if not dom.altnames:
            raise self.expected("at least one alternative name")
        self.advance()


def parse(text: str, filename: str = "<acme-client.conf>") -> AcmeClientConf:
    """Parse acme-client.conf text; raise ConfigError("FILE:LINE: message")."""
    if "\0" in text or _START_EXPAND in text or _DONE_EXPAND in text:
        line = 1 + text[: min(i for i in (text.find(c) for c in "\0\x01\x02") if i >= 0)].count("\n")
        raise ConfigError([f"{filename}:{line}: unexpected control character"])
    conf = AcmeClientConf()
    _Parser(text, filename, {}, conf).parse()
    return conf


def load(path: Path | str) -> AcmeClientConf:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        line = 1 + path.read_bytes()[: exc.start].count(b"\n")
        raise ConfigError([f"{path}:{line}: not UTF-8 text"]) from None
    return parse(text, str(path))


# ---------------------------------------------------------------------------
# Rendering certkeeper.toml.


@dataclass(frozen=True)
class Conversion:
    toml: str
    warnings: tuple[str, ...]  # each "FILE:LINE: message"


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _qlist(values: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


class _Renderer:
    def __init__(self, conf: AcmeClientConf, source: str) -> None:
        self.conf = conf
        self.source = source
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.names: dict[int, str] = {}  # id(Authority) -> its table name

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")
        self.lines.append(f"# NOT CARRIED OVER ({where}): {message}")

    def render(self) -> Conversion:
        if not self.conf.authorities:
            raise ConfigError([f"{self.source}:1: no authority defined; acme-client needs one to sign with"])
        main = self.main_authority()
        self.names = self.authority_names(main)
        self.header()
        self.acme(main)
        for auth in self.conf.authorities:
            if auth is not main and id(auth) in self.names:
                self.acme(auth, self.names[id(auth)])
        self.http()
        mta_sts: list[str] = []
        for dom in self.conf.domains:
            signer = self.conf.authority_of(dom)
            self.certificate(dom, "" if signer is None or signer is main else self.names[id(signer)])
            if dom.common_name.startswith("mta-sts."):
                mta_sts.append(dom.common_name)
        self.mta_sts_hint(mta_sts)
        return Conversion("\n".join(self.lines) + "\n", tuple(self.warnings))

    def authority_names(self, main: Authority) -> dict[int, str]:
        """id(authority) → its name in certkeeper.toml: ``acme`` for the main one, acme-client's name
        (made a valid, distinct table name) for every other one a domain signs with."""
        names = {id(main): cfg.DEFAULT_AUTHORITY}
        for auth in self.conf.authorities:
            if auth is main or not any(self.conf.authority_of(d) is auth for d in self.conf.domains):
                continue
            name = re.sub(r"[^A-Za-z0-9._-]", "-", auth.name).lstrip("-._") or "authority"
            base, n = name, 2
            while name in names.values():
                name, n = f"{base}-{n}", n + 1
            names[id(auth)] = name
        return names

    def main_authority(self) -> Authority:
        """The authority of the first domain: it becomes [acme]."""
        for dom in self.conf.domains:
            auth = self.conf.authority_of(dom)
            if auth is not None:
                return auth
        return self.conf.authorities[0]

    def header(self) -> None:
        self.lines += [
            f"# certkeeper.toml made by `certkeeper import-acme-client {self.source}`.",
            "# The account key and every key and certificate path are acme-client's own: the first",
            "# renewal reuses the ACME account, and smtpd, dovecot and httpd need no change.",
            "# Check it with `certkeeper --config FILE check`; every key is in certkeeper.toml(5).",
            "",
            f"state_dir = {_q(str(cfg.Config.state_dir))}",
            "",
        ]

    def acme(self, auth: Authority, name: str = "") -> None:
        """[acme] for the main authority, [authority.NAME] for another one."""
        table = f"authority.{name}" if name else "acme"
        self.lines += [f"[{table}]", f"# from authority {auth.name} ({auth.where})"]
        if not re.match(r"^https://[^/\s]+", auth.api):
            raise ConfigError([f"{auth.where}: api url {auth.api!r} is not an https:// URL; "
                               "certkeeper talks to ACME servers over https only"])
        self.lines.append(f"directory = {_q(auth.api)}")
        self.lines.append(f"account_key = {_q(auth.account_key)}  # reused as is: same ACME account")
        self.lines.append(f"account_key_type = {_q(KEY_TYPES[auth.account_key_type])}"
                          f"  # acme-client's {auth.account_key_type!r}; used only if the key file is missing")
        if auth.contact:
            if re.match(r"^mailto:[^@\s]+@[^@\s]+$", auth.contact):
                self.lines.append(f"contact = [{_q(auth.contact)}]")
            else:
                self.warn(auth.where, f"contact {auth.contact!r} is not a mailto: URL; certkeeper accepts "
                                      "only mailto: contacts")
        if auth.insecure:
            self.warn(auth.insecure, "'insecure' (no TLS verification of the ACME server): certkeeper always "
                                     f"verifies; set [{table}] ca_bundle to trust a private CA instead")
        staging = False
        for other in self.conf.authorities if not name else ():
            if other is not auth and not any(self.conf.authority_of(d) is other for d in self.conf.domains):
                if not staging and "staging" in f"{other.name} {other.api}".lower() \
                        and re.match(r"^https://[^/\s]+", other.api):
                    staging = True  # renew --dry-run tests against it (its own account key is not needed)
                    self.lines.append(f"staging = {_q(other.api)}  # authority {other.name} ({other.where}): "
                                      "renew --dry-run orders here")
                    continue
                self.lines.append(f"# authority {other.name} ({other.where}) signs no domain; left out")
        self.lines.append("")

    def http(self) -> None:
        self.lines += [
            "[http]",
            "# certkeeper answers HTTP-01 challenges itself on port 80 and redirects everything else",
            "# to https: remove httpd's port-80 'server' blocks for these names, the",
            "# 'location \"/.well-known/acme-challenge/*\"' blocks and /var/www/acme.",
            f"listen = {_qlist(cfg.HttpConfig.listen)}",
            "",
        ]

    def certificate(self, dom: Domain, authority: str = "") -> None:
        self.lines += ["[[certificate]]", f"# from domain {dom.handle} ({dom.where})"]
        if authority:
            self.lines.append(f"authority = {_q(authority)}  # sign with {dom.sign_with}")
        name = dom.handle
        if not _NAME.fullmatch(name):
            name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("-._") or "certificate"
            self.warn(dom.where, f"handle {dom.handle!r} is not a certkeeper name; renamed {name!r}")
        domains = list(dict.fromkeys(d.lower().rstrip(".") for d in [dom.common_name, *dom.altnames]))
        cert_dir = dom.cert_dir
        self.lines += [
            f"name = {_q(name)}",
            f"domains = {_qlist(domains)}",
            f"key_type = {_q(KEY_TYPES[dom.key_type])}  # acme-client's {dom.key_type!r}",
            "reuse_key = true  # acme-client keeps the domain key at every renewal; false makes a fresh one",
            f"key = {_q(dom.key)}",
        ]
        for attr, keyword, default in (("cert", "domain certificate", f"{name}.crt"),
                                       ("chain", "domain chain certificate", f"{name}.chain.pem"),
                                       ("fullchain", "domain full chain certificate", f"{name}.fullchain.pem")):
            value = getattr(dom, attr)
            if value:
                self.lines.append(f"{attr} = {_q(value)}")
            else:
                path = posixpath.join(cert_dir, default)
                self.lines.append(f"{attr} = {_q(path)}  # new file: no '{keyword}' in acme-client.conf")
        if dom.profile:
            self.lines.append(f"profile = {_q(dom.profile)}")
        if dom.challengedir:
            self.warn(dom.lines["challengedir"], f"challengedir {dom.challengedir!r}: certkeeper serves "
                                                 "challenges itself; the directory is no longer used")
        hint = '["httpd"]' if dom.common_name.startswith("mta-sts.") else '["smtpd", "dovecot"]'
        self.lines += [
            "# Services to reload after a renewal (what '&& rcctl restart ...' in a crontab did):",
            f"# hooks = {hint}",
            "",
        ]

    def mta_sts_hint(self, hosts: list[str]) -> None:
        for host in hosts:
            domain = host.removeprefix("mta-sts.")
            self.lines += [
                f"# {host} serves an MTA-STS policy: certkeeper can serve mta-sts.txt itself",
                "# (and replace /var/www/mta-sts and the https server block). Fill in and uncomment:",
                "# [[mta_sts]]",
                f"# domain = {_q(domain)}",
                '# mode = "testing"',
                f"# mx = [{_q('mail.' + domain)}]",
                "# max_age = 86400",
                "",
            ]


def convert(conf: AcmeClientConf, source: str) -> Conversion:
    """Render ``conf`` as certkeeper.toml and check it with certkeeper's own validator."""
    result = _Renderer(conf, source).render()
    cfg.parse(result.toml, f"{source} (converted)")  # raises ConfigError if we made an invalid file
    return result


