"""Fuzzing in CI, bounded: every parser of outside input gets random and mutated input, and may fail
only with the error type it documents (which the CLI turns into a one-line message).

Each parser is one ``Target`` in ``TARGETS``: its name, the function, the documented errors and the
valid samples that the mutations start from. Adding a parser is one line there. Inputs are a mix of
random text or bytes, valid samples with random edits (insert, delete, duplicate, replace), and
pathological shapes (deep nesting, huge numbers, long lines). The example count per target is set so
that the whole file runs in well under a minute on two cores; the "ci" hypothesis profile
(tests/conftest.py) makes the run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certkeeper import control, protocol
from certkeeper.core import acmeclient, config, dkim, mtasts
from certkeeper.core.errors import ConfigError, LocalError
from certkeeper.network.mtasts_publish import parse_tlsrpt
from tests.test_acmeclient import EVERY_KEYWORD, GUIDE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 800  # per target


def import_acme_client(text: str) -> object:
    """What `certkeeper import-acme-client` does with a file: parse, convert, check the result."""
    return acmeclient.convert(acmeclient.parse(text, "fuzz.conf"), "fuzz.conf")


def text_samples(*texts: str) -> tuple[str, ...]:
    return texts


def bytes_samples(*texts: str) -> tuple[bytes, ...]:
    return tuple(t.encode() for t in texts)


@dataclass(frozen=True)
class Target:
    name: str
    parse: Callable[..., object]
    errors: tuple[type[BaseException], ...]  # what the parser documents; anything else is a bug
    samples: tuple[str, ...] | tuple[bytes, ...]  # valid inputs the mutations start from
    nest: tuple[str, str, str] = ("[", "]", "")  # (open, close, prefix): deeply nested input
    examples: int = EXAMPLES
    extra: tuple[str, ...] | tuple[bytes, ...] = field(default=())  # known nasty inputs, always tried
    accept: Callable[[Any], bool] = lambda data: True  # inputs the fuzzer must not hand over


POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"
WORKER = ('{"type": "Challenge", "token": "tok", "key_authorization": "tok.thumb"}',
          '{"type": "Line", "text": "mail.example.com: renewed"}', '{"type": "Install", "name": "m", "fullchain": "C"}',
          '{"type": "Unchallenge", "token": "tok"}', '{"type": "Exit", "code": 0, "next": "2030-01-01T00:00:00Z"}',
          '{"type": "SwitchSigner", "domain": "d", "keys": [{"domain": "d", "selector": "s", "algorithm": "a"}]}')

TARGETS = (
    Target("config", lambda text: config.parse(text, "fuzz.toml"), (ConfigError,),
           text_samples((ROOT / "etc" / "certkeeper.toml").read_text(),
                        '[[dkim]]\ndomain = "example.com"\nrotate_every = "90d"\n', 'state_dir = "/x"\n'),
           nest=("[", "]", "x = "), extra=("x = " + "9" * 5000, 'x = "' + "a" * 100000 + '"')),
    Target("acme-client.conf", import_acme_client, (ConfigError,), text_samples(GUIDE, EVERY_KEYWORD),
           nest=("{", "}", "domain a.example.com "),
           accept=lambda text: "include" not in text),  # include reads other files: test_acmeclient's part
    Target("mta-sts policy", mtasts.parse_policy, (mtasts.MtaStsError,), text_samples(POLICY)),
    Target("mta-sts txt", mtasts.parse_txt, (mtasts.MtaStsError,),
           text_samples("v=STSv1; id=20260101T000000", "v=STSv1; id=abc; ext=1;")),
    Target("tlsrpt txt", parse_tlsrpt, (ValueError,), text_samples("v=TLSRPTv1; rua=mailto:t@example.com")),
    Target("dkim key record", dkim.parse_key_record, (ValueError,),
           text_samples("v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", "v=DKIM1; p=")),
    Target("control request", control.parse_request, (ValueError,),
           bytes_samples('{"command": "status", "payload": {"names": ["mail"], "json": true}}\n')),
    Target("control answer", control.parse_answer, (LocalError,), bytes_samples('{"line": "x"}', '{"exit": 1}')),
    Target("process message (protocol.py)", protocol.parse, (protocol.ProtocolError,), bytes_samples(*WORKER)),
)


# ---------------------------------------------------------------------------
# Inputs.


@st.composite
def mutated(draw: st.DrawFn, samples: tuple[str, ...] | tuple[bytes, ...]) -> str | bytes:
    data = draw(st.sampled_from(samples))
    is_bytes = isinstance(data, bytes)
    text = data.decode("latin-1") if is_bytes else data
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "duplicate", "replace", "truncate"]))
        if op == "insert":
            piece = draw(st.text(max_size=12) | st.sampled_from(['"', "'", "\\", "\n", "{", "[", "=", ";", ":",
                                                                  "\x00", "\r", "#", "$", "\t", "\u00e9"]))
            text = text[:at] + piece + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif op == "duplicate":
            end = min(len(text), at + draw(st.integers(1, 40)))
            text = text[:end] + text[at:end] * draw(st.integers(1, 50)) + text[end:]
        elif op == "replace" and at < len(text):
            text = text[:at] + chr(draw(st.integers(0, 0x2FF))) + text[at + 1:]
        elif op == "truncate":
            text = text[:at]
    if is_bytes:
        return text.encode("utf-8", errors="surrogateescape")
    return text


def inputs(target: Target) -> st.SearchStrategy[object]:
    is_bytes = isinstance(target.samples[0], bytes)
    opening, closing, prefix = target.nest
    depth = st.sampled_from([10, 100, 1000, 5000, 50000])
    nested = depth.map(lambda n: prefix + opening * n + closing * n)
    options: list[st.SearchStrategy[object]] = [
        st.binary(max_size=300) if is_bytes else st.text(max_size=300),
        mutated(target.samples),
        nested.map(lambda s: s.encode()) if is_bytes else nested,
    ]
    if target.extra:
        options.append(st.sampled_from(target.extra))
    return st.one_of(*options).filter(target.accept)


# ---------------------------------------------------------------------------
# The test.


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_parser_raises_only_its_documented_errors(target: Target) -> None:
    for sample in target.samples:  # the samples are valid: they parse
        target.parse(sample)

    @settings(max_examples=target.examples, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.filter_too_much])
    @given(data=inputs(target))
    def fuzz(data: object) -> None:
        try:
            target.parse(data)
        except target.errors as exc:
            for line in getattr(exc, "lines", None) or [str(exc)]:  # a ConfigError holds one line per problem
                assert "\n" not in line and len(line) < 1000, f"not a one-line error: {line[:200]!r}"

    fuzz()


def test_what_the_fuzzer_found_stays_fixed() -> None:
    """Each was a traceback (RecursionError, ValueError) or an error spread over lines before."""
    deep = b"[" * 50000 + b"]" * 50000
    with pytest.raises(ValueError, match="not JSON"):
        control.parse_request(deep)
    with pytest.raises(LocalError, match="malformed answer"):
        control.parse_answer(deep)
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        protocol.parse(deep)
    with pytest.raises(ConfigError, match="nested more than 16 deep"):
        config.parse("x = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="4300 digits"):
        config.parse("x = " + "9" * 5000)
    with pytest.raises(ValueError) as info:
        dkim.parse_key_record("v=DKIM1; k=e\nd25519; p=")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as too_long:
        config.parse("[acme]\n" + "k" * 5000 + " = 1\n")
    assert all(len(line) <= 500 for line in too_long.value.lines)
