"""DANE for SMTP (issue 15): TLSA records for the current and the next key, checked through DNSSEC."""

from __future__ import annotations

from tests.fixtures.dnssec import Resolver, SignedZone, StartResolver, wrong_anchor


def test_validating_resolver_sets_ad_only_with_the_right_anchor(signed_bind: SignedZone,
                                                                 validating_resolver: Resolver,
                                                                 resolver_factory: StartResolver) -> None:
    values, ad = validating_resolver.query("ns1.example.test", "A")
    assert values == ["127.0.0.1"]
    assert ad, "the zone's own key as anchor: the answer is validated"
    wrong = resolver_factory(wrong_anchor(signed_bind.trust_anchor))
    values, ad = wrong.query("ns1.example.test", "A")
    assert not ad
    assert values == []  # bogus: unbound answers SERVFAIL, no data
