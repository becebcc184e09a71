"""Next-best-offer arbitration: hard filters first, then priority class, then expected value.

priority = propensity × value × lever × context weight, where value is the offer's business value net
of its cost. Eligibility, consent, kill switches and the date window are hard filters: an offer that
fails one is never ranked, and the reason is kept for the explanation. Ranking puts every
`transactional` offer before every `service` offer before every `marketing` one, and orders by
priority inside a class. Caps and holdouts need the store and are applied by the caller around this
pure function (see api/offers): a holdout customer gets the control answer, and capped offers are
skipped in this order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.catalog import CatalogState
from engine.fastinit import fast_init
from engine.offers_config import CHANNEL_CONSENT, CLASS_RANK, Offer, OfferSettings
from engine.types import Context


@fast_init
@dataclass(frozen=True, slots=True)
class Customer:
    """What arbitration knows of the customer; `consents` is None for an unknown customer."""

    customer_id: str
    segment: str | None = None
    country: str | None = None
    consents: frozenset[str] | None = None
    propensities: Mapping[str, float] = field(default_factory=dict)  # model name -> probability
    has_cart: bool = False  # something in the profile's cart or in the request's context cart


@fast_init
@dataclass(frozen=True, slots=True)
class RankedOffer:
    offer_id: str
    priority_class: str
    priority: float
    propensity: float
    value: float  # net of cost
    lever: float
    context_weight: float
    propensity_source: str  # the model's name, or "default" when no model scored this customer


def _context_kind(context: Context) -> str:
    if context.cart:
        return "cart"
    return "item" if context.item_id else "none"


def _refusal(offer: Offer, settings: OfferSettings, customer: Customer, channel: str, today: dt.date) -> str | None:
    """Why the offer cannot be shown to this kind of customer, or None: every hard filter but the minimum
    propensity, in a fixed order."""
    el = offer.eligibility
    if not offer.enabled:
        return "disabled (kill switch)"
    if channel in settings.disabled_channels:
        return f"channel {channel} disabled (kill switch)"
    if channel not in offer.channels:
        return f"not offered on {channel}"
    if el.start and today < el.start:
        return f"starts {el.start}"
    if el.end and today > el.end:
        return f"ended {el.end}"
    if el.countries and customer.country not in el.countries:
        return f"country {customer.country or 'unknown'} not eligible"
    if el.segments and customer.segment not in el.segments:
        return f"segment {customer.segment or 'unknown'} not eligible"
    if el.cart and not customer.has_cart:
        return "nothing in the cart"
    needed = [CHANNEL_CONSENT[channel]] if offer.priority_class == "marketing" else []
    needed += [el.consent] if el.consent else []
    for purpose in filter(None, needed):
        if customer.consents is None or purpose not in customer.consents:
            return f"no {purpose} consent"
    return None


_Kind = tuple[str, dt.date, str | None, str | None, frozenset[str] | None, bool]


class _Refusals:
    """Each offer's hard-filter refusal per kind of customer (channel, day, segment, country, consents, cart): a
    batch meets a few hundred kinds, so the filters run once per kind, not once per recipient and offer."""

    def __init__(self) -> None:
        self._rules: tuple[Mapping[str, Offer], OfferSettings] | None = None
        self._by_kind: dict[_Kind, dict[str, str | None]] = {}

    def of(
        self, offers: Mapping[str, Offer], settings: OfferSettings, customer: Customer, channel: str, today: dt.date
    ) -> dict[str, str | None]:
        rules = self._rules
        if rules is None or rules[0] is not offers or rules[1] is not settings or len(self._by_kind) > 4096:
            self._rules, self._by_kind = (offers, settings), {}
        kind = (channel, today, customer.segment, customer.country, customer.consents, customer.has_cart)
        found = self._by_kind.get(kind)
        if found is None:
            found = self._by_kind[kind] = {
                oid: _refusal(offer, settings, customer, channel, today) for oid, offer in offers.items()
            }
        return found


_REFUSALS = _Refusals()


def referenced_models(offers: Mapping[str, Offer]) -> frozenset[str]:
    """Every model the offers name (the most a request can run; `models_to_score` picks a customer's share)."""
    return frozenset(offer.propensity_model for offer in offers.values())


def models_to_score(
    offers: Mapping[str, Offer], settings: OfferSettings, customer: Customer, channel: str, *, now: dt.datetime
) -> frozenset[str]:
    """The models of the offers that pass every hard filter but the minimum propensity: the only ones whose
    scores can change this customer's answer (a model costs the request one ONNX run)."""
    refusals = _REFUSALS.of(offers, settings, customer, channel, now.astimezone(dt.UTC).date())
    return frozenset(offer.propensity_model for oid, offer in offers.items() if refusals[oid] is None)


def _value(offer: Offer, catalog: CatalogState | None) -> float | None:
    if offer.value.fixed is not None:
        return offer.value.fixed - offer.cost
    item = offer.value.margin_of
    if catalog is None or item is None or item not in catalog.index:
        return None
    i = catalog.index[item]
    return float(catalog.price[i] - catalog.cost[i]) - offer.cost


def arbitrate(
    offers: Mapping[str, Offer],
    settings: OfferSettings,
    customer: Customer,
    channel: str,
    context: Context,
    *,
    now: dt.datetime,
    catalog: CatalogState | None = None,
) -> tuple[list[RankedOffer], dict[str, str]]:
    """Eligible offers in the order they should be shown, and the reason for every one left out."""
    refusals = _REFUSALS.of(offers, settings, customer, channel, now.astimezone(dt.UTC).date())
    kind = _context_kind(context)
    ranked: list[RankedOffer] = []
    refused: dict[str, str] = {}
    for offer_id, offer in offers.items():
        reason = refusals[offer_id]
        if reason is not None:  # a hard filter: nothing else about the offer matters
            refused[offer_id] = reason
            continue
        model = offer.propensity_model
        scored = model in customer.propensities
        propensity = customer.propensities[model] if scored else settings.default_propensity
        if propensity < offer.eligibility.min_propensity:
            refused[offer_id] = f"propensity {propensity:.3f} below {offer.eligibility.min_propensity:g}"
            continue
        value = _value(offer, catalog)
        if value is None:
            refused[offer_id] = f"value: item {offer.value.margin_of} not in the catalog"
            continue
        weight = offer.context_weights.get(kind, 1.0)  # type: ignore[call-overload,unused-ignore]
        # Positional (offer_id, priority_class, priority, propensity, value, lever, context_weight,
        # propensity_source): a third cheaper than keywords, for every eligible offer of every recipient.
        ranked.append(
            RankedOffer(
                offer_id,
                offer.priority_class,
                propensity * value * offer.lever * weight,
                propensity,
                value,
                offer.lever,
                weight,
                model if scored else "default",
            )
        )
    ranked.sort(key=lambda r: (CLASS_RANK[r.priority_class], -r.priority, r.offer_id))
    return ranked, refused
