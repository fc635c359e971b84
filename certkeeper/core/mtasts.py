"""MTA-STS: the policy file (RFC 8461 3.2) and the ``_mta-sts`` TXT record (3.1).

This module owns both formats, each rendered and parsed side by side, and the
policy id. It does no I/O: ``web`` serves ``Policy.render()``; the DNS side
publishes ``render_txt(policy.policy_id())``.

A ``Policy`` cannot be invalid: it validates when built, so a policy in mode
``enforce`` with no ``mx`` line never exists. The id is derived from the
rendered policy, so it changes exactly when the served file changes (RFC 8461
3.1: senders refetch the policy when the id changes) and needs no state.

Malformed input raises ``MtaStsError`` (a ``ValueError``) with a one-line
message; callers turn it into the error class that fits (a remote policy is the
peer's fault, a local one is ours).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from certkeeper.core.config import MTA_STS_MODES, RFC8461_MAX_AGE, MtaStsConfig, domain_problem

VERSION = "STSv1"
# RFC 8461 3.3: the policy is served as text/plain.
MEDIA_TYPE = "text/plain"
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 3.3

# RFC 8461 3.2: sts-policy-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_POLICY_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# RFC 8461 3.2: sts-policy-max-age-value = 1*10(DIGIT)
_MAX_AGE = re.compile(r"[0-9]{1,10}")
# RFC 8461 3.1: sts-id = %s"id=" 1*32(ALPHA / DIGIT)
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# RFC 8461 3.1: sts-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_TXT_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# RFC 8461 3.1: sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E)  (no "=", ";", SP or CTLs)
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 8461 3.1: sts-field-delim = *WSP ";" *WSP
_TXT_DELIM = re.compile(r"[ \t]*;[ \t]*")


class MtaStsError(ValueError):
    """A policy or TXT record that does not follow RFC 8461; one-line message."""


# ---------------------------------------------------------------------------
# The policy file (RFC 8461 3.2).


@dataclass(frozen=True)
class Policy:
    """One MTA-STS policy; valid by construction."""

    mode: str
    mx: tuple[str, ...]
    max_age: int

    def __post_init__(self) -> None:
        # RFC 8461 3.2: mode is "enforce", "testing" or "none".
        if self.mode not in MTA_STS_MODES:
            raise MtaStsError(f"mode {self.mode!r} is not one of {', '.join(MTA_STS_MODES)}")
        # RFC 8461 3.2: max_age is a non-negative integer "less than or equal to 31557600".
        if isinstance(self.max_age, bool) or not isinstance(self.max_age, int) \
                or not 0 <= self.max_age <= RFC8461_MAX_AGE:
            raise MtaStsError(f"max_age {self.max_age!r} is not an integer in 0..{RFC8461_MAX_AGE}")
        # RFC 8461 3.2: "One or more patterns matching allowed MX hosts"; a policy in mode
        # "none" only withdraws an earlier one (RFC 8461 8.3), so it may list none.
        if not self.mx and self.mode != "none":
            raise MtaStsError(f"mode {self.mode!r} needs at least one mx pattern")
        for pattern in self.mx:
            _check_mx_pattern(pattern)

    @classmethod
    def from_config(cls, cfg: MtaStsConfig) -> Policy:
        return cls(mode=cfg.mode, mx=tuple(cfg.mx), max_age=cfg.max_age)

    def render(self) -> str:
        """The policy file: one ``field: value`` per line, CRLF line ends (RFC 8461 3.2)."""
        lines = [f"version: {VERSION}", f"mode: {self.mode}"]
        lines += [f"mx: {pattern}" for pattern in self.mx]
        lines.append(f"max_age: {self.max_age}")
        return "".join(line + "\r\n" for line in lines)

    def policy_id(self) -> str:
        """A 32-character id (RFC 8461 3.1: 1*32 ALPHA/DIGIT) that changes with the content.

        The rendered policy is hashed, so the same policy always gets the same id and any
        change to the served file gives a new one.
        """
        return hashlib.sha256(self.render().encode("ascii")).hexdigest()[:32]


def _check_mx_pattern(pattern: str) -> None:
    # RFC 8461 3.2: sts-policy-mx-value = ["*."] Domain; names are A-labels (RFC 8461 3.2,
    # "mx" patterns use the same form as the MX records they match: lower case, no root dot).
    if pattern != pattern.lower() or pattern.endswith("."):
        raise MtaStsError(f"mx {pattern!r} must be lower case without a trailing dot")
    problem = domain_problem(pattern, wildcard=True)
    if problem:
        raise MtaStsError(f"mx {pattern!r} {problem}")


def parse_policy(text: str) -> Policy:
    """Parse a policy file body; raise ``MtaStsError`` naming the first problem."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    # RFC 8461 3.2: sts-policy-term-delim = CRLF / LF
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if line == "":
            continue  # the optional final delimiter (and blank lines) carry no field
        name, value = _policy_field(line, number)
        if name == "mx":
            mx.append(value.lower())  # RFC 8461 3.2: mx may appear more than once; names ignore case
        elif name in ("version", "mode", "max_age"):
            if name in fields:
                raise MtaStsError(f"line {number}: {name!r} is given twice")
            fields[name] = value
        # RFC 8461 3.2: other names are sts-policy-extension fields; a receiver ignores them.
    return _policy_from_fields(fields, mx)


def _policy_field(line: str, number: int) -> tuple[str, str]:
    # RFC 8461 3.2: sts-policy-field-delim = ":" *WSP, and each field is followed by *WSP.
    name, sep, value = line.partition(":")
    if not sep or not _POLICY_FIELD_NAME.fullmatch(name):
        raise MtaStsError(f"line {number}: {line[:60]!r} is not 'name: value'")
    value = value.strip(" \t")
    if not value or any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise MtaStsError(f"line {number}: {name!r} has an empty or non-printable value")
    return name, value


def _policy_from_fields(fields: dict[str, str], mx: list[str]) -> Policy:
    for required in ("version", "mode", "max_age"):
        if required not in fields:
            raise MtaStsError(f"the policy has no {required!r} field")
    # RFC 8461 3.2: sts-policy-version-value = %s"STSv1" (case-sensitive)
    if fields["version"] != VERSION:
        raise MtaStsError(f"version {fields['version']!r} is not {VERSION!r}")
    if not _MAX_AGE.fullmatch(fields["max_age"]):
        raise MtaStsError(f"max_age {fields['max_age']!r} is not 1 to 10 digits")
    return Policy(mode=fields["mode"], mx=tuple(mx), max_age=int(fields["max_age"]))


# ---------------------------------------------------------------------------
# The _mta-sts TXT record (RFC 8461 3.1).


def render_txt(policy_id: str) -> str:
    """``v=STSv1; id=ID`` for the ``_mta-sts.DOMAIN`` TXT record."""
    if not _ID.fullmatch(policy_id):
        raise MtaStsError(f"id {policy_id[:40]!r} is not 1 to 32 letters and digits")
    return f"v={VERSION}; id={policy_id}"


def parse_txt(text: str) -> str:
    """The policy id of one ``_mta-sts`` TXT record (strings already joined)."""
    parts = _TXT_DELIM.split(text)
    if parts and parts[-1] == "":
        parts.pop()  # RFC 8461 3.1: a trailing sts-field-delim is allowed
    # RFC 8461 3.1: the record starts with sts-version = %s"v=STSv1" (case-sensitive).
    if not parts or parts[0] != f"v={VERSION}":
        raise MtaStsError(f"TXT record {text[:60]!r} does not start with 'v={VERSION}'")
    policy_id = None
    for field in parts[1:]:
        name, sep, value = field.partition("=")
        if not sep or not _TXT_EXT_NAME.fullmatch(name) or not _TXT_EXT_VALUE.fullmatch(value):
            raise MtaStsError(f"TXT record field {field[:60]!r} is not 'name=value'")
        if name == "id":
            if not _ID.fullmatch(value):
                raise MtaStsError(f"TXT record id {value[:40]!r} is not 1 to 32 letters and digits")
            if policy_id is not None:
                raise MtaStsError("TXT record has more than one id")
            policy_id = value
        # RFC 8461 3.1: other fields are sts-extension; a receiver ignores them.
    # RFC 8461 3.1: the id field is required (sts-text-record has 1*(... sts-field), id among them).
    if policy_id is None:
        raise MtaStsError(f"TXT record {text[:60]!r} has no id field")
    return policy_id
