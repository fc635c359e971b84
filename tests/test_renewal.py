"""The pure renewal planner: every rule with `now` passed in, no clock, no network."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from certkeeper.core import certs, renewal
from certkeeper.core.config import CertificateConfig
from certkeeper.core.state import CertState
from certkeeper.keeper.store import CertificateSet
from tests.certfactory import make_set

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def cfg(domains: tuple[str, ...] = ("mail.example.com",), key_type: str = "ecdsa-p256") -> CertificateConfig:
    return CertificateConfig(name=domains[0], domains=domains, key_type=key_type, key=Path("/k"), cert=Path("/c"),
                             chain=Path("/ch"), fullchain=Path("/f"))


def state() -> CertState:
    return CertState(name="mail.example.com")


def test_missing_files_are_due() -> None:
    decision = renewal.plan(cfg(), None, state(), T0)
    assert decision.due and decision.reason == "no certificate on disk"


def test_a_third_of_the_lifetime_rule_for_90_day_certificates() -> None:
    on_disk = make_set(not_before=T0, days=90)
    renew_at = T0 + dt.timedelta(days=60)
    before = renewal.plan(cfg(), on_disk, state(), renew_at - dt.timedelta(seconds=1))
    assert not before.due and before.when == renew_at
    assert renewal.plan(cfg(), on_disk, state(), renew_at).due


def test_half_of_the_lifetime_for_short_lived_certificates() -> None:
    on_disk = make_set(not_before=T0, days=6)
    decision = renewal.plan(cfg(), on_disk, state(), T0)
    assert not decision.due and decision.when == T0 + dt.timedelta(days=3)
    assert "half" in decision.reason


def test_the_short_lived_boundary_is_ten_days() -> None:
    """A lifetime under 10 days renews at half of it, 10 days and more at two thirds."""
    for lifetime, share in ((dt.timedelta(days=10, seconds=-1), 2), (dt.timedelta(days=10), 3)):
        on_disk = make_set(("mail.example.com",), not_before=T0, days=lifetime / dt.timedelta(days=1))
        info = on_disk.info()
        assert info is not None and info.not_after - info.not_before == lifetime
        when, why = renewal.renewal_time(info, CertState(name="mail.example.com"))
        assert when == info.not_after - lifetime / share, (lifetime, why)
        assert ("half" in why) == (share == 2)


def test_force_renews_a_fresh_certificate() -> None:
    decision = renewal.plan(cfg(), make_set(not_before=T0), state(), T0, force=True)
    assert decision.due and decision.reason == "forced"


def test_key_that_does_not_match_is_due() -> None:
    good = make_set(not_before=T0)
    mismatched = CertificateSet(key=certs.generate_key("ecdsa-p256"), cert=good.cert, chain=good.chain)
    decision = renewal.plan(cfg(), mismatched, state(), T0)
    assert decision.due and "does not match" in decision.reason


def test_domains_no_longer_covered_are_due() -> None:
    on_disk = make_set(("mail.example.com",), not_before=T0)
    decision = renewal.plan(cfg(("mail.example.com", "smtp.example.com")), on_disk, state(), T0)
    assert decision.due and "not mail.example.com, smtp.example.com" in decision.reason


def test_changed_key_type_is_due() -> None:
    decision = renewal.plan(cfg(key_type="rsa2048"), make_set(not_before=T0), state(), T0)
    assert decision.due and "ecdsa-p256" in decision.reason


def test_unparsable_certificate_is_due() -> None:
    good = make_set(not_before=T0)
    broken = CertificateSet(key=good.key, cert=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                            chain=b"")
    assert renewal.plan(cfg(), broken, state(), T0).due


def test_expired_is_due() -> None:
    on_disk = make_set(not_before=T0, days=1)
    decision = renewal.plan(cfg(), on_disk, state(), T0 + dt.timedelta(days=2))
    assert decision.due and decision.reason.startswith("expired")


def test_backoff_holds_even_without_files_but_force_overrides_it() -> None:
    """Never sooner than Retry-After: a restart must not retry a failing first order at once."""
    st = state()
    st.consecutive_failures, st.last_error = 1, "rateLimited"
    st.retry_not_before = T0 + dt.timedelta(hours=1)
    waiting = renewal.plan(cfg(), None, st, T0)
    assert not waiting.due and waiting.when == st.retry_not_before
    assert renewal.plan(cfg(), None, st, T0 + dt.timedelta(hours=1)).due
    assert renewal.plan(cfg(), None, st, T0, force=True).due


def test_backoff_postpones_a_due_renewal() -> None:
    on_disk = make_set(not_before=T0, days=90)
    st = state()
    st.consecutive_failures, st.last_error = 2, "boom"
    st.retry_not_before = T0 + dt.timedelta(days=61)
    decision = renewal.plan(cfg(), on_disk, st, T0 + dt.timedelta(days=60, hours=1))
    assert not decision.due and decision.when == st.retry_not_before and "boom" in decision.reason


def test_backoff_schedule_is_1m_10m_100m_then_daily_and_respects_retry_after() -> None:
    delays = [renewal.backoff(n, None, T0) - T0 for n in (1, 2, 3, 4, 9)]
    assert delays == [dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100),
                      dt.timedelta(days=1), dt.timedelta(days=1)]
    assert renewal.backoff(1, T0 + dt.timedelta(hours=3), T0) == T0 + dt.timedelta(hours=3)


def test_ari_window_overrides_the_lifetime_rule_for_the_same_certificate() -> None:
    on_disk = make_set(not_before=T0, days=90)
    info = certs.parse_cert(on_disk.cert)
    st = state()
    st.ari_cert = info.fingerprint
    st.ari_renewal_time = T0 + dt.timedelta(days=10)  # e.g. the CA announced a revocation
    assert renewal.plan(cfg(), on_disk, st, T0 + dt.timedelta(days=10)).due
    assert not renewal.plan(cfg(), on_disk, st, T0 + dt.timedelta(days=9)).due
    st.ari_cert = "another certificate"
    assert renewal.plan(cfg(), on_disk, st, T0 + dt.timedelta(days=10)).when == T0 + dt.timedelta(days=60)


def test_point_in_window_is_inside_and_stable() -> None:
    start, end = T0, T0 + dt.timedelta(days=2)
    points = {renewal.point_in_window(start, end, serial) for serial in range(50)}
    assert all(start <= p <= end for p in points) and len(points) > 40
    assert renewal.point_in_window(start, end, 7) == renewal.point_in_window(start, end, 7)


def test_our_backoff_is_lifted_when_the_failing_settings_changed() -> None:
    st = state()
    st.consecutive_failures, st.retry_not_before = 3, T0 + dt.timedelta(hours=1)
    st.failed_settings = "old-settings"
    assert not renewal.plan(cfg(), None, st, T0, settings="old-settings").due
    assert renewal.plan(cfg(), None, st, T0, settings="fixed-settings").due
    st.retry_by_server = True  # a server's Retry-After holds whatever changed
    assert not renewal.plan(cfg(), None, st, T0, settings="fixed-settings").due


def test_settings_digest_changes_with_what_decides_an_order() -> None:
    from certkeeper.core.config import AcmeConfig

    base = renewal.settings_digest(cfg(), AcmeConfig())
    assert base == renewal.settings_digest(cfg(), AcmeConfig())
    assert base != renewal.settings_digest(cfg(("mail.example.com", "smtp.example.com")), AcmeConfig())
    assert base != renewal.settings_digest(cfg(), AcmeConfig(eab_kid="kid-1"))


def test_a_problem_with_the_chain_files_is_due() -> None:
    decision = renewal.plan(cfg(), make_set(not_before=T0), state(), T0, disk_problem="/x/chain.pem: missing")
    assert decision.due and decision.reason == "/x/chain.pem: missing"


def test_reuse_key_does_not_keep_a_key_of_another_type() -> None:
    reuse = CertificateConfig(name="mail.example.com", domains=("mail.example.com",), key_type="rsa2048",
                              key=Path("/k"), cert=Path("/c"), chain=Path("/ch"), fullchain=Path("/f"), reuse_key=True)
    decision = renewal.plan(reuse, make_set(not_before=T0), state(), T0)
    assert decision.due and "the configuration asks for rsa2048" in decision.reason
