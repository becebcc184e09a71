"""Offers in the rules YAML and their arbitration: hard filters, class order, priority formula."""

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.catalog import CatalogItem, CatalogState
from engine.offers import Customer, arbitrate
from engine.offers_config import SEGMENTS, Offer, OfferSettings
from engine.rules import RulesError, parse_rules
from engine.types import Context

NOW = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
BASE = """
placements:
  home: {sources: {als: 1.0}}
offers:
"""


def _rules(offers_yaml: str):  # type: ignore[no-untyped-def]
    return parse_rules(BASE + offers_yaml, Path("rules.yaml"))


def _offer(**kw: object) -> Offer:
    return Offer.model_validate({"title": "t", "channels": ["web"], "value": {"fixed": 10.0}, **kw})


def test_a_full_offer_parses_with_durations_and_class():
    rules = _rules("""
  free_shipping:
    title: Free shipping on your next order
    channels: [web, email]
    class: service
    eligibility: {segments: [at_risk, hibernating], min_propensity: 0.05, start: 2026-11-01, end: 2026-12-31,
                  countries: [DE, FR], consent: email}
    value: {fixed: 4.0}
    cost: 1.5
    lever: 1.2
    context_weights: {cart: 1.5, none: 0.5}
    caps: [{scope: offer, limit: 3, window: 7d}, {scope: channel, limit: 2, window: 24h}]
    suppress_after: 5
    holdout: 0.1
""")
    offer = rules.offers["free_shipping"]
    assert offer.priority_class == "service" and offer.channels == {"web", "email"}
    assert [c.window for c in offer.caps] == [7 * 86400, 86400]
    assert offer.eligibility.end == dt.date(2026, 12, 31)


@pytest.mark.parametrize(
    ("yaml_text", "where"),
    [
        ("  x: {title: t, channels: [web], value: {fixed: 1}, caps: [{limit: 3}]}", "offers.x.caps.0.window"),
        (
            "  x: {title: t, channels: [web], value: {fixed: 1}, eligibility: {start: 2026-13-01}}",
            "offers.x.eligibility.start",
        ),
        ("  x: {title: t, channels: [web], value: {fixed: 1}, colour: red}", "offers.x.colour"),
        ("  x: {title: t, channels: [fax], value: {fixed: 1}}", "offers.x.channels"),
        ("  x: {title: t, channels: [web], value: {fixed: 1, margin_of: i1}}", "offers.x.value"),
        ("  x: {title: t, channels: [web], value: {fixed: 1}, eligibility: {segments: [vip]}}", "offers.x.eligibility"),
        (
            "  x: {title: t, channels: [web], value: {fixed: 1}, caps: [{limit: 1, window: 3 days}]}",
            "offers.x.caps.0.window",
        ),
        (
            "  x: {title: t, channels: [web], value: {fixed: 1}, eligibility: {start: 2026-12-01, end: 2026-11-01}}",
            "offers.x.eligibility",
        ),
    ],
)
def test_a_bad_offer_is_an_error_naming_the_offer_and_field(yaml_text, where):
    with pytest.raises(RulesError) as err:
        _rules(yaml_text)
    assert where in str(err.value)


def test_segments_match_the_ones_training_computes():
    from training.features import SEGMENTS as TRAINED

    assert frozenset(TRAINED) == SEGMENTS


def _known(**kw: object) -> Customer:
    base: dict[str, object] = {
        "customer_id": "c1",
        "segment": "at_risk",
        "country": "DE",
        "consents": frozenset({"email", "personalization"}),
        "propensities": {"purchase_30d": 0.2},
    }
    return Customer(**{**base, **kw})  # type: ignore[arg-type]


def _ids(ranked) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.offer_id for r in ranked]


def test_class_order_comes_before_priority():
    offers = {
        "big_marketing": _offer(value={"fixed": 100.0}),
        "small_service": _offer(value={"fixed": 1.0}, **{"class": "service"}),
        "tiny_transactional": _offer(value={"fixed": 0.1}, **{"class": "transactional"}),
    }
    ranked, _ = arbitrate(offers, OfferSettings(), _known(), "web", Context(), now=NOW)
    assert _ids(ranked) == ["tiny_transactional", "small_service", "big_marketing"]


def test_consent_is_absolute_for_marketing_on_its_channel():
    offers = {
        "news": _offer(channels=["email"]),
        "receipt": _offer(channels=["email"], **{"class": "transactional"}),
        "banner": _offer(channels=["web"]),
    }
    no_email = _known(consents=frozenset({"personalization"}))
    ranked, refused = arbitrate(offers, OfferSettings(), no_email, "email", Context(), now=NOW)
    assert _ids(ranked) == ["receipt"] and refused["news"] == "no email consent"
    unknown = Customer("stranger")
    assert _ids(arbitrate(offers, OfferSettings(), unknown, "email", Context(), now=NOW)[0]) == ["receipt"]
    assert _ids(arbitrate(offers, OfferSettings(), unknown, "web", Context(), now=NOW)[0]) == ["banner"]


def test_a_cart_offer_goes_only_to_customers_with_something_in_the_cart():
    offers = {"reminder": _offer(eligibility={"cart": True}, **{"class": "transactional"}), "any": _offer()}
    # Same kind of customer otherwise: the refusals kept per kind must tell the two apart, in either order.
    for first in (False, True):
        for has_cart in (first, not first):
            ranked, refused = arbitrate(offers, OfferSettings(), _known(has_cart=has_cart), "web", Context(), now=NOW)
            if has_cart:
                assert _ids(ranked) == ["reminder", "any"]
            else:
                assert _ids(ranked) == ["any"] and refused["reminder"] == "nothing in the cart"
    assert "reminder" in arbitrate(offers, OfferSettings(), Customer("x"), "web", Context(), now=NOW)[1]


def test_unknown_customers_get_only_segment_free_offers_at_the_default_propensity():
    offers = {"any": _offer(), "winback": _offer(eligibility={"segments": ["at_risk"]})}
    ranked, refused = arbitrate(
        offers, OfferSettings(default_propensity=0.03), Customer("x"), "web", Context(), now=NOW
    )
    assert _ids(ranked) == ["any"] and "segment" in refused["winback"]
    assert ranked[0].propensity == 0.03 and ranked[0].propensity_source == "default"


def test_hard_filters_each_name_their_reason():
    offers = {
        "off": _offer(enabled=False),
        "later": _offer(eligibility={"start": "2026-12-01"}),
        "over": _offer(eligibility={"end": "2026-11-22"}),
        "fr_only": _offer(eligibility={"countries": ["FR"]}),
        "picky": _offer(eligibility={"min_propensity": 0.5}),
        "ok": _offer(eligibility={"end": "2026-11-23"}),  # the end day is included
    }
    ranked, refused = arbitrate(offers, OfferSettings(), _known(), "web", Context(), now=NOW)
    assert _ids(ranked) == ["ok"]
    assert refused == {
        "off": "disabled (kill switch)",
        "later": "starts 2026-12-01",
        "over": "ended 2026-11-22",
        "fr_only": "country DE not eligible",
        "picky": "propensity 0.200 below 0.5",
    }
    killed = OfferSettings(disabled_channels=frozenset({"web"}))
    assert arbitrate(offers, killed, _known(), "web", Context(), now=NOW)[0] == []


def test_value_from_an_items_margin_net_of_cost():
    catalog = CatalogState.from_items([CatalogItem("i1", "A", "x", 30.0, 18.0, 5)], "t")
    offers = {"bundle": _offer(value={"margin_of": "i1"}, cost=2.0), "gone": _offer(value={"margin_of": "i9"})}
    ranked, refused = arbitrate(offers, OfferSettings(), _known(), "web", Context(), now=NOW, catalog=catalog)
    assert ranked[0].value == pytest.approx(10.0) and ranked[0].priority == pytest.approx(0.2 * 10.0)
    assert "not in the catalog" in refused["gone"]


@settings(max_examples=200, deadline=None)
@given(
    offers=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=4),
        st.tuples(
            st.sampled_from(["transactional", "service", "marketing"]),
            st.floats(0, 1000),
            st.floats(0, 10),
            st.floats(0, 5),
            st.sampled_from(["purchase_30d", "churn_90d", "missing"]),
        ),
        min_size=1,
        max_size=8,
    ),
    p_purchase=st.floats(0, 1),
    p_churn=st.floats(0, 1),
    context=st.sampled_from([Context(), Context(item_id="i1"), Context(cart=("i1",))]),
)
def test_priority_is_the_product_of_its_factors_and_the_order_follows_it(offers, p_purchase, p_churn, context):
    kind = "cart" if context.cart else ("item" if context.item_id else "none")
    built = {
        oid: _offer(
            value={"fixed": value},
            lever=lever,
            context_weights={kind: weight},
            propensity_model=model,
            **{"class": cls},
        )
        for oid, (cls, value, lever, weight, model) in offers.items()
    }
    customer = _known(propensities={"purchase_30d": p_purchase, "churn_90d": p_churn})
    ranked, refused = arbitrate(built, OfferSettings(), customer, "web", context, now=NOW)
    assert not refused and len(ranked) == len(built)
    rank = {"transactional": 0, "service": 1, "marketing": 2}
    for r in ranked:
        _, value, lever, weight, model = offers[r.offer_id]
        p = {"purchase_30d": p_purchase, "churn_90d": p_churn}.get(model, OfferSettings().default_propensity)
        assert r.priority == pytest.approx(p * value * lever * weight)
        assert (r.propensity, r.value, r.lever, r.context_weight) == (p, value, lever, weight)
    keys = [(rank[r.priority_class], -r.priority) for r in ranked]
    assert keys == sorted(keys)


def test_only_the_models_of_offers_past_the_hard_filters_are_scored_and_the_answer_is_the_same():
    from engine.offers import models_to_score

    offers = {
        "loyal_only": _offer(propensity_model="m_loyal", eligibility={"segments": ["loyal"]}),
        "email_only": _offer(propensity_model="m_email", channels=["email"]),
        "picky": _offer(propensity_model="m_picky", eligibility={"min_propensity": 0.9}),
        "off": _offer(propensity_model="m_off", enabled=False),
        "shared": _offer(propensity_model="m_picky"),
    }
    customer = Customer("c1", segment="at_risk", consents=frozenset({"web", "email"}))
    wanted = models_to_score(offers, OfferSettings(), customer, "web", now=NOW)
    # The minimum propensity needs the score, so its model is scored; segment, channel and kill switch do not.
    assert wanted == {"m_picky"}
    every = {"m_loyal": 0.5, "m_email": 0.5, "m_picky": 0.95, "m_off": 0.5}
    scored = Customer("c1", segment="at_risk", consents=customer.consents, propensities=every)
    only = Customer("c1", segment="at_risk", consents=customer.consents, propensities={m: every[m] for m in wanted})
    assert arbitrate(offers, OfferSettings(), scored, "web", Context(), now=NOW) == arbitrate(
        offers, OfferSettings(), only, "web", Context(), now=NOW
    )
