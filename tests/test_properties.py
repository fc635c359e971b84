"""Property-based tests (hypothesis) of the pure cores: the renewal planner, the DKIM rotation planner
as a state machine, the MTA-STS id, and render/parse round trips of every format certkeeper writes and
reads. Settings come from the profile in tests/conftest.py ("ci": derandomized, no deadline); the
example counts here keep the whole file well under 30 s on two cores."""

from __future__ import annotations

import datetime as dt
import json
import string
from dataclasses import replace
from functools import cache
from pathlib import Path

from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from certkeeper import control, protocol
from certkeeper.core import dkim, dkimstate, mtasts, renewal
from certkeeper.core.config import (
    MTA_STS_MODES,
    RFC8461_MAX_AGE,
    AcmeConfig,
    CertificateConfig,
    DkimConfig,
    MtaStsConfig,
)
from certkeeper.core.dkimstate import DomainState, KeyState
from certkeeper.core.state import CertState
from certkeeper.keeper.store import CertificateSet
from certkeeper.network.dns import RecordSet, join_txt, split_txt
from certkeeper.network.dns.zonefile import parse_include
from certkeeper.network.mtasts_publish import parse_tlsrpt, render_tlsrpt
from tests.certfactory import make_set

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)

# ---------------------------------------------------------------------------
# Shared strategies.

LABEL = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=16).map(
    lambda s: s.strip("-") or "a")
TLD = st.text(alphabet=string.ascii_lowercase, min_size=2, max_size=6)
DOMAIN = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, min_size=1, max_size=3), TLD)
MX_PATTERN = st.builds(lambda wild, name: ("*." if wild else "") + name, st.booleans(), DOMAIN)
AWARE = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                     timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=2)),
                                                dt.timezone(dt.timedelta(hours=-7, minutes=-30))]))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def policies(draw: st.DrawFn) -> mtasts.Policy:
    mode = draw(st.sampled_from(MTA_STS_MODES))
    mx = draw(st.lists(MX_PATTERN, min_size=0 if mode == "none" else 1, max_size=4))
    return mtasts.Policy(mode=mode, mx=tuple(mx), max_age=draw(st.integers(0, RFC8461_MAX_AGE)))


# ---------------------------------------------------------------------------
# The renewal planner.

LIFETIMES = (6, 45, 90)


@cache
def cert_set(days: float) -> CertificateSet:
    return make_set(("mail.example.com",), not_before=T0, days=days)


def cert_config() -> CertificateConfig:
    return CertificateConfig(name="mail.example.com", domains=("mail.example.com",), key_type="ecdsa-p256",
                             key=Path("/k"), cert=Path("/c"), chain=Path("/ch"), fullchain=Path("/f"))


@settings(max_examples=150)
@given(days=st.sampled_from(LIFETIMES), offset=st.integers(-2 * 86400, 92 * 86400))
def test_renewal_is_due_exactly_when_now_reaches_the_planned_time(days: int, offset: int) -> None:
    on_disk = cert_set(days)
    info = on_disk.info()
    assert info is not None
    now = T0 + dt.timedelta(seconds=offset)
    decision = renewal.plan(cert_config(), on_disk, CertState(name="mail.example.com"), now)
    lifetime = info.not_after - info.not_before
    planned = info.not_after - lifetime / (2 if days < 10 else 3)  # half when short-lived, else a third
    if now >= info.not_after:
        assert decision.due and decision.reason.startswith("expired")
        return
    assert decision.due == (now >= planned)
    if decision.due:
        assert decision.when == now
    else:
        assert decision.when == planned > now
        # asking again at the planned time, the answer is "now": the planner never skips its own time
        assert renewal.plan(cert_config(), on_disk, CertState(name="mail.example.com"), decision.when).due


@settings(max_examples=100)
@given(failures=st.integers(1, 30), now=AWARE,
       retry_after=st.none() | st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=3)))
def test_backoff_is_monotonic_and_never_sooner_than_retry_after(failures: int, now: dt.datetime,
                                                                 retry_after: dt.timedelta | None) -> None:
    server = now + retry_after if retry_after is not None else None
    this = renewal.backoff(failures, server, now)
    following = renewal.backoff(failures + 1, server, now)
    assert now + dt.timedelta(minutes=1) <= this <= following
    assert following - now <= max(dt.timedelta(days=1), retry_after or dt.timedelta(0))
    if server is not None:
        assert this >= server


@settings(max_examples=60)
@given(days=st.sampled_from(LIFETIMES), failures=st.integers(1, 6), offset=st.integers(0, 95 * 86400),
       force=st.booleans())
def test_a_pending_backoff_postpones_everything_but_force(days: int, failures: int, offset: int,
                                                          force: bool) -> None:
    now = T0 + dt.timedelta(seconds=offset)
    settings_now = renewal.settings_digest(cert_config(), AcmeConfig())
    state = CertState(name="mail.example.com", consecutive_failures=failures, last_error="boom",
                      retry_not_before=renewal.backoff(failures, None, now), failed_settings=settings_now)
    decision = renewal.plan(cert_config(), cert_set(days), state, now, force=force, settings=settings_now)
    assert decision.due == force
    if not force:
        assert decision.when == state.retry_not_before > now


# ---------------------------------------------------------------------------
# The DKIM rotation planner as a state machine.
#
# The model executes each step the planner says is due the way network/rotation.py's executor changes
# the state (without DNS: "publish" makes the record visible at once or later, as a server lags), keeps
# the key files of key_dir as a set, and may lose the state file at any time.


ALGORITHMS = ("rsa2048", "ed25519")
DURATION = st.integers(0, 120).map(lambda days: dt.timedelta(days=days))


class RotationMachine(RuleBasedStateMachine):
    @initialize(rotate=st.integers(3, 120), ahead=st.integers(0, 5), retire=DURATION, remove=DURATION,
                algorithms=st.sampled_from([("rsa2048",), ("ed25519",), ALGORITHMS]),
                selector_format=st.sampled_from(["%Y%m%d", "%Y%m", "s{alg}"]))
    def start(self, rotate: int, ahead: int, retire: dt.timedelta, remove: dt.timedelta,
              algorithms: tuple[str, ...], selector_format: str) -> None:
        self.item = DkimConfig(domain="example.test", algorithms=algorithms, selector_format=selector_format,
                               rotate_every=rotate * DAY, publish_ahead=ahead * DAY, retire_after=retire,
                               remove_after=remove, key_dir=Path("/keys"))
        self.state = DomainState("example.test")
        self.now = T0
        self.on_disk: set[str] = set()  # selectors with a key file in key_dir
        self.lagging: set[str] = set()  # published, not yet answered by every server

    def taken(self) -> frozenset[str]:
        return frozenset(self.on_disk)  # what rotation.taken_selectors finds in key_dir

    def add_key(self, key: KeyState) -> None:
        assert key.selector not in self.state.selectors, "a selector of the state was reused"
        assert key.selector not in self.on_disk, "a selector with a key file in key_dir was reused"
        assert key.key_file == str(self.item.key_dir / dkim.key_file_name("example.test", key.selector))
        self.state = self.state.with_key(key)

    @rule(days=st.integers(0, 100), hours=st.integers(0, 23))
    def time_passes(self, days: int, hours: int) -> None:
        self.now += dt.timedelta(days=days, hours=hours)

    @rule()
    def servers_catch_up(self) -> None:
        for selector in sorted(self.lagging):
            self.state = self.state.with_key(replace(self.state.key(selector), visible=self.now))
        self.lagging.clear()

    @rule(lagging=st.booleans())
    def run_due_steps(self, lagging: bool) -> None:
        """As rotation.run_steps: every due step, re-planning after each, each at most once."""
        done: set[dkimstate.Action] = set()
        for _ in range(50):
            due = [a for a in dkimstate.plan(self.state, self.item, self.now).actions if a not in done]
            if not due:
                break
            action = due[0]
            done.add(action)
            note(f"{self.now:%Y-%m-%d %H:%M} {action}")
            self.execute(action, lagging)
        plan = dkimstate.plan(self.state, self.item, self.now)
        assert plan.next_at is None or plan.next_at > self.now or set(plan.actions) <= done

    def execute(self, action: dkimstate.Action, lagging: bool) -> None:
        if action.kind == "create":
            active = self.state.current(action.algorithm, "active")
            if active is not None and active.activated is not None:  # the next key starts publish_ahead early
                assert self.now >= active.activated + self.item.rotate_every - self.item.publish_ahead
            self.add_key(dkimstate.new_key(self.state, self.item, action.algorithm, self.now, self.taken()))
            return
        key = self.state.key(action.selector)
        if action.kind == "generate":
            self.on_disk.add(key.selector)
            self.state = self.state.with_key(replace(key, record=f"v=DKIM1; p={key.selector}"))
        elif action.kind == "publish":
            if key.selector in self.lagging:
                return
            if lagging:
                self.lagging.add(key.selector)
                self.state = self.state.with_key(replace(key, published=self.now))
            else:
                self.state = self.state.with_key(replace(key, published=self.now, visible=self.now))
        elif action.kind == "activate":
            assert key.visible is not None and key.selector not in self.lagging, "activated before visible"
            previous = self.state.current(key.algorithm, "active")
            if previous is not None and not key.emergency:
                assert self.now >= key.visible + self.item.publish_ahead, "activated before publish_ahead"
            self.state = dkimstate.activated(self.state, key.selector, self.now)
        elif action.kind == "retire":
            self.state = self.state.with_key(replace(key, state="retiring", retired=self.now))
        elif action.kind == "revoke":
            assert key.retired is not None and self.now >= key.retired + self.item.retire_after
            self.state = self.state.with_key(replace(key, state="revoked", revoked=self.now))
        elif action.kind == "remove":
            assert key.revoked is not None and self.now >= key.revoked + self.item.remove_after
            self.on_disk.discard(key.selector)
            self.state = self.state.with_key(replace(key, state="removed", removed=self.now))

    @rule(emergency=st.booleans())
    def rotate_dkim_now(self, emergency: bool) -> None:
        before = self.state.selectors
        after = dkimstate.request_rotation(self.state, self.item, self.now, emergency, self.taken())
        for key in after.keys:
            if key.selector not in before:
                self.add_key(key)
            else:
                self.state = self.state.with_key(key)

    @rule()
    def state_file_is_lost(self) -> None:
        self.state = DomainState("example.test")
        self.lagging.clear()

    @invariant()
    def one_active_key_per_algorithm(self) -> None:
        for algorithm in ALGORITHMS:
            assert len([k for k in self.state.keys if k.algorithm == algorithm and k.state == "active"]) <= 1
            assert len([k for k in self.state.keys if k.algorithm == algorithm and k.state == "pending"]) <= 1

    @invariant()
    def selectors_are_unique_and_keys_consistent(self) -> None:
        selectors = [k.selector for k in self.state.keys]
        assert len(selectors) == len(set(selectors))
        for k in self.state.keys:
            if k.state == "active":
                assert k.activated is not None and k.visible is not None and k.activated >= k.visible
            assert k.created <= self.now

    @invariant()
    def the_planner_agrees_with_its_schedule(self) -> None:
        plan = dkimstate.plan(self.state, self.item, self.now)
        steps = dkimstate.schedule(self.state, self.item)
        assert set(plan.actions) == {a for at, a in steps if at <= self.now}
        assert plan.next_at == min((at for at, _ in steps if at > self.now), default=None)


RotationMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
test_dkim_rotation_state_machine = RotationMachine.TestCase


# ---------------------------------------------------------------------------
# The MTA-STS id: a function of every policy field and nothing else.


@settings(max_examples=200)
@given(a=policies(), b=policies())
def test_policy_id_changes_exactly_when_a_field_changes(a: mtasts.Policy, b: mtasts.Policy) -> None:
    assert (a.policy_id() == b.policy_id()) == (a == b)


@settings(max_examples=100)
@given(policy=policies(), domain=DOMAIN, certificate=DOMAIN, other=policies())
def test_policy_id_ignores_everything_but_the_policy(policy: mtasts.Policy, domain: str, certificate: str,
                                                     other: mtasts.Policy) -> None:
    configured = MtaStsConfig(domain=domain, mode=policy.mode, mx=policy.mx, max_age=policy.max_age,
                              certificate=certificate)
    assert mtasts.Policy.from_config(configured).policy_id() == policy.policy_id()
    for field in ("mode", "mx", "max_age"):  # each field on its own changes the id
        try:
            changed = replace(policy, **{field: getattr(other, field)})
        except mtasts.MtaStsError:
            continue  # e.g. mode enforce with no mx: not a policy
        assert (changed.policy_id() == policy.policy_id()) == (getattr(other, field) == getattr(policy, field))


# ---------------------------------------------------------------------------
# Round trips of every format certkeeper writes and reads.


@settings(max_examples=150)
@given(policy=policies(), lf=st.booleans())
def test_policy_file_round_trip(policy: mtasts.Policy, lf: bool) -> None:
    text = policy.render()
    assert mtasts.parse_policy(text.replace("\r\n", "\n") if lf else text) == policy


@settings(max_examples=100)
@given(policy=policies())
def test_mta_sts_txt_round_trip(policy: mtasts.Policy) -> None:
    assert mtasts.parse_txt(mtasts.render_txt(policy.policy_id())) == policy.policy_id()


@settings(max_examples=100)
@given(policy_id=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=32))
def test_mta_sts_txt_round_trip_any_id(policy_id: str) -> None:
    assert mtasts.parse_txt(mtasts.render_txt(policy_id)) == policy_id


URI = st.builds(lambda user, host: f"mailto:{user}@{host}",
                st.text(alphabet=string.ascii_lowercase + string.digits + ".+_-", min_size=1, max_size=12), DOMAIN) \
    | st.builds(lambda host, path: f"https://{host}/{path}", DOMAIN,
                st.text(alphabet=string.ascii_lowercase + string.digits + "/_-", max_size=12))


@settings(max_examples=100)
@given(rua=st.lists(URI, min_size=1, max_size=4))
def test_tlsrpt_round_trip(rua: list[str]) -> None:
    assert parse_tlsrpt(render_tlsrpt(tuple(rua))) == tuple(rua)


@settings(max_examples=100)
@given(key_type=st.sampled_from(["ed25519", "revoked"]), raw=st.binary(min_size=32, max_size=32))
def test_dkim_key_record_round_trip(key_type: str, raw: bytes) -> None:
    record = dkim.REVOKED if key_type == "revoked" else dkim.KeyRecord("ed25519", raw)
    assert dkim.parse_key_record(record.render()) == record


@cache
def rsa_record() -> dkim.KeyRecord:
    return dkim.key_record_for(dkim.generate_private_key("rsa2048"))


def test_dkim_rsa_key_record_round_trip() -> None:
    assert dkim.parse_key_record(rsa_record().render()) == rsa_record()


TXT_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=700)


@settings(max_examples=150)
@given(value=TXT_VALUE)
def test_txt_split_join_round_trip(value: str) -> None:
    strings = split_txt(value)
    assert all(len(s) <= 255 for s in strings)
    assert join_txt(strings) == value


@settings(max_examples=60)
@given(sets=st.lists(st.one_of(
    st.builds(lambda label, values, ttl: RecordSet(f"{label}.example.test", "TXT", tuple(values), ttl),
              LABEL, st.lists(TXT_VALUE, min_size=1, max_size=3), st.integers(0, 86400)),
    st.builds(lambda label, pref, host: RecordSet(f"{label}.example.test", "MX", (f"{pref} {host}.",)),
              LABEL, st.integers(0, 65535), DOMAIN),
    st.builds(lambda label, issuer: RecordSet(f"{label}.example.test", "CAA", (f'0 issue "{issuer}"',)),
              LABEL, DOMAIN),
), max_size=5))
def test_zone_snippet_round_trip(sets: list[RecordSet]) -> None:
    """What the zonefile backend and `certkeeper dns` write (RecordSet.to_bind) reads back the same."""
    unique = {(s.name, s.rtype): s for s in sets}
    text = "".join(s.to_bind() + "\n" for s in unique.values())
    back = {(s.name, s.rtype): s for s in parse_include(text)}
    assert set(back) == set(unique)
    for where, rrset in unique.items():
        assert back[where].same_data(rrset)
        assert back[where].ttl == rrset.ttl


WORKER_TEXT = st.text(max_size=200)


@settings(max_examples=150)
@given(message=st.one_of(
    st.builds(protocol.Challenge, WORKER_TEXT, WORKER_TEXT),
    st.builds(protocol.Line, WORKER_TEXT),
    st.builds(protocol.Install, WORKER_TEXT, WORKER_TEXT),
    st.builds(protocol.Exit, st.integers(-2**63, 2**63), st.none().map(lambda _: "") | AWARE.map(str)),
    st.builds(protocol.HookRan, st.lists(WORKER_TEXT, max_size=3).map(tuple), st.none() | st.integers(-255, 255),
              WORKER_TEXT, st.floats(0, 1e6)),
    st.builds(protocol.SwitchSigner, WORKER_TEXT, st.lists(st.builds(protocol.SignerKey, WORKER_TEXT, WORKER_TEXT,
                                                                      WORKER_TEXT), max_size=3).map(tuple)),
))
def test_process_message_round_trip(message: object) -> None:
    frame = protocol.render(message)  # as the keeper and the worker send it
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert protocol.parse(frame[4:]) == message


@settings(max_examples=150)
@given(command=st.text(max_size=40), payload=st.dictionaries(st.text(max_size=10), JSON, max_size=5))
def test_control_request_round_trip(command: str, payload: dict[str, object]) -> None:
    raw = control.render_request(command, payload)
    assert raw.count(b"\n") == 1
    assert control.parse_request(raw) == (command, payload)


@settings(max_examples=100)
@given(text=st.text(max_size=300), code=st.integers(-2**31, 2**31))
def test_control_answer_round_trip(text: str, code: int) -> None:
    assert control.parse_answer(control.render_line(text)) == (text, None)
    assert control.parse_answer(control.render_exit(code)) == (None, code)


@settings(max_examples=100)
@given(items=st.lists(st.tuples(st.sampled_from(["pending", "active", "retiring", "revoked", "removed"]),
                                st.sampled_from(ALGORITHMS), AWARE, st.booleans(), st.none() | AWARE),
                      max_size=5))
def test_dkim_state_file_round_trip(items: list[tuple[str, str, dt.datetime, bool, dt.datetime | None]]) -> None:
    keys = tuple(KeyState(selector=f"s{i}", algorithm=alg, state=state, created=created, key_file=f"/k/s{i}.key",
                          record="v=DKIM1; p=", emergency=emergency, visible=visible, activated=visible)
                 for i, (state, alg, created, emergency, visible) in enumerate(items))
    domain = DomainState("example.test", keys)
    assert DomainState.from_json(json.loads(json.dumps(domain.to_json()))) == domain
