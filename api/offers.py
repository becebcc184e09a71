"""Next best offers: profile and features → propensities (ONNX Runtime) → arbitration → holdout → caps.

The pure parts live in the engine (`engine.offers.arbitrate`, `engine.holdout`); this module adds what
needs the store: the profile read (the request's first round trip), the cap reservation (one Lua
script, the second), and the decision log. With Redis down the answer is the safe default: offers
that need no state — nothing with a cap or suppression — and nothing that needs a consent we cannot
read, with `fallback: true`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.fastinit import fast_init
from engine.holdout import in_holdout
from engine.ids import new_decision_id
from engine.offers import Customer, RankedOffer, arbitrate, models_to_score, referenced_models
from engine.offers_config import Offer
from engine.types import Context, Decision, Profile, ShownItem
from feature_store.caps import Candidate, Cap, Reservation, ReservationTemplate, reservation_template, reserve
from feature_store.resp import RespConnectionError, RespError

if TYPE_CHECKING:
    from api.runtime import Runtime

GLOBAL_HOLDOUT = "__all_offers__"  # the salt's suffix for the global control group


@fast_init
@dataclass(frozen=True, slots=True)
class OfferRequest:
    customer_id: str
    channel: str
    limit: int
    context: Context = field(default_factory=Context)


@fast_init
@dataclass(frozen=True, slots=True)
class OfferAnswer:
    decision_id: str
    offers: tuple[RankedOffer, ...]
    segment: str | None
    holdout: bool
    held_out: tuple[str, ...]
    fallback: bool
    fallback_reason: str | None
    refused: dict[str, str]


def _candidate(offer_id: str, offer: Offer, channel: str) -> Candidate:
    scope = {"offer": f"offer:{offer_id}", "class": f"class:{offer.priority_class}", "channel": f"channel:{channel}"}
    caps = tuple(Cap(scope[rule.scope], rule.limit, rule.window) for rule in offer.caps)
    return Candidate(offer_id, caps, offer.suppress_after)


def offer_models(runtime: Runtime) -> frozenset[str]:
    """The models the rules' offers score with: a request runs at most these, not every model of the version."""
    return referenced_models(runtime.rules.offers)


def _customer(
    runtime: Runtime, req: OfferRequest, profile: Profile | None, scores: dict[str, float] | None = None
) -> Customer:
    in_cart = bool(req.context.cart) or (profile is not None and bool(profile.cart))
    if profile is None:
        return Customer(req.customer_id, has_cart=in_cart)
    if scores is None:
        scores = {}
        models = runtime.model.propensity if runtime.model is not None else None
        if models is not None and len(profile.features) == len(models.feature_names):
            rules = runtime.rules
            customer = Customer(req.customer_id, profile.segment, profile.country, profile.consents, has_cart=in_cart)
            wanted = models_to_score(rules.offers, rules.offer_settings, customer, req.channel, now=_now())
            scores = models.predict(profile.features, wanted) if wanted else {}
    return Customer(req.customer_id, profile.segment, profile.country, profile.consents, scores, in_cart)


def propensities_many(runtime: Runtime, profiles: list[Profile | None], channel: str) -> list[dict[str, float] | None]:
    """Model scores for many customers at once (None where `_customer` would score alone or not at all):
    each customer gets the models its offers on `channel` need, as `_customer` would score them, and each
    model runs once, on the customers that need it."""
    models = runtime.model.propensity if runtime.model is not None else None
    if models is None:
        return [None] * len(profiles)
    n = len(models.feature_names)
    rows = [k for k, p in enumerate(profiles) if p is not None and len(p.features) == n]
    out: list[dict[str, float] | None] = [None] * len(profiles)
    rules, now = runtime.rules, _now()
    features: list[tuple[float, ...]] = []
    wanted: list[frozenset[str]] = []
    for k in rows:
        p = profiles[k]
        assert p is not None
        customer = Customer(p.customer_id, p.segment, p.country, p.consents, has_cart=bool(p.cart))
        features.append(p.features)
        wanted.append(models_to_score(rules.offers, rules.offer_settings, customer, channel, now=now))
    scored = models.predict_each(features, wanted)
    for k, scores in zip(rows, scored, strict=True):
        out[k] = scores
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@fast_init
@dataclass(frozen=True, slots=True)
class OfferPlan:
    """Everything decided before the store is asked for caps: ranked offers that passed the hard filters."""

    decision_id: str
    ranked: tuple[RankedOffer, ...]
    refused: dict[str, str]
    segment: str | None
    holdout: bool
    held_out: tuple[str, ...]
    store_down: bool
    reason: str | None


def plan_offers(
    runtime: Runtime,
    req: OfferRequest,
    profile: Profile | None,
    reason: str | None,
    scores: dict[str, float] | None = None,
    decision_id: str | None = None,
) -> OfferPlan:
    """Propensities, arbitration, the global and per-offer holdouts: pure, given the profile read
    (and the model scores and decision id, when the caller scored and named a batch of customers at once)."""
    rules = runtime.rules
    offers, settings = rules.offers, rules.offer_settings
    store_down = reason in ("redis_unavailable", "redis_circuit_open")
    customer = _customer(runtime, req, profile, scores)
    now = _now()
    ranked, refused = arbitrate(offers, settings, customer, req.channel, req.context, now=now, catalog=runtime.catalog)
    holdout = settings.holdout_share > 0 and in_holdout(
        req.customer_id, f"{settings.holdout_salt}:{GLOBAL_HOLDOUT}", settings.holdout_share
    )
    if holdout:
        # The control group: what it would get without marketing (transactional and service still flow).
        for r in ranked:
            if r.priority_class == "marketing":
                refused[r.offer_id] = "holdout (control group)"
        ranked = [r for r in ranked if r.priority_class != "marketing"]
    held_out = tuple(
        r.offer_id
        for r in ranked
        if offers[r.offer_id].holdout > 0
        and in_holdout(req.customer_id, f"{settings.holdout_salt}:{r.offer_id}", offers[r.offer_id].holdout)
    )
    for oid in held_out:
        refused[oid] = "holdout for this offer"
    ranked = [r for r in ranked if r.offer_id not in held_out]
    if store_down:
        stateless = [r for r in ranked if not offers[r.offer_id].caps and offers[r.offer_id].suppress_after is None]
        for r in ranked:
            if r not in stateless:
                refused[r.offer_id] = "needs the store (caps), which is unavailable"
        ranked = stateless
    # Positionally, in field order (a third cheaper than keywords: one per recipient of a batch).
    return OfferPlan(
        decision_id or new_decision_id(),
        tuple(ranked),
        refused,
        customer.segment,
        holdout,
        held_out,
        store_down,
        reason,
    )


def settle(plan: OfferPlan, req: OfferRequest, reservation: Reservation | None) -> OfferAnswer:
    """The answer once caps are reserved (`reservation` None: the store failed, only stateless offers)."""
    refused = dict(plan.refused)
    store_down, reason = plan.store_down, plan.reason
    if store_down:
        chosen = list(plan.ranked[: req.limit])
    elif reservation is None:
        chosen, store_down, reason = [], True, "redis_unavailable"
    else:
        refused.update(reservation.refused)
        granted = set(reservation.granted)
        chosen = [r for r in plan.ranked if r.offer_id in granted]
    # Positionally, in field order (a third cheaper than keywords: one per recipient of a batch).
    return OfferAnswer(
        plan.decision_id,
        tuple(chosen),
        plan.segment,
        plan.holdout,
        plan.held_out,
        store_down,
        reason if store_down else None,
        refused,
    )


async def next_best_offers(
    runtime: Runtime,
    req: OfferRequest,
    *,
    read: tuple[Profile | None, str | None] | None = None,
    log: bool = True,
) -> OfferAnswer:
    """The offers for one customer. `read` is a profile read the caller already made (email slots);
    with `log` False the caller logs the answer itself (`log_offers`) once it knows it is used."""
    profile, reason = read if read is not None else await runtime.read_profile(req.customer_id)
    plan = plan_offers(runtime, req, profile, reason)
    reservation = None if plan.store_down else await _reserve(runtime, req, list(plan.ranked))
    answer = settle(plan, req, reservation)
    if log:
        await log_offers(runtime, answer, req, profile)
    return answer


async def log_offers(
    runtime: Runtime,
    answer: OfferAnswer,
    req: OfferRequest,
    profile: Profile | None,
    feedback_window_s: int | None = None,
) -> None:
    if runtime.settings.decision_log and not answer.fallback:
        await runtime.log_decision(
            offers_decision(answer, req, runtime), req.context, profile, req.channel, feedback_window_s
        )


# (offer id, channel) -> the offer it was built from and its cap candidate: rules change rarely and a
# request asks for the same few, so each is built once per loaded offer (a reload brings new objects).
_CANDIDATES: dict[tuple[str, str], tuple[Offer, Candidate]] = {}


def cap_candidates(runtime: Runtime, req: OfferRequest, ranked: Sequence[RankedOffer]) -> list[Candidate]:
    offers = runtime.rules.offers
    out = []
    for r in ranked:
        offer = offers[r.offer_id]
        cached = _CANDIDATES.get((r.offer_id, req.channel))
        if cached is None or cached[0] is not offer:
            if len(_CANDIDATES) > 4096:  # offers renamed over many reloads: start again
                _CANDIDATES.clear()
            cached = _CANDIDATES[(r.offer_id, req.channel)] = (offer, _candidate(r.offer_id, offer, req.channel))
        out.append(cached[1])
    return out


# The reservation template of each candidate list a channel's requests have had (`reservation_template_of`).
_TEMPLATES: dict[tuple[str, int, tuple[str, ...]], tuple[list[Candidate], ReservationTemplate]] = {}


def reservation_template_of(runtime: Runtime, req: OfferRequest, ranked: Sequence[RankedOffer]) -> ReservationTemplate:
    """The cap reservation's template of these ranked offers, made once per candidate list and rules (a batch's
    recipients share a few lists); ValueError if the rules' caps are malformed."""
    candidates = cap_candidates(runtime, req, ranked)
    key = (req.channel, req.limit, tuple(c.offer_id for c in candidates))
    cached = _TEMPLATES.get(key)
    # The candidates are the rules' own objects (cap_candidates), new ones only when the rules changed.
    if cached is None or any(a is not b for a, b in zip(cached[0], candidates, strict=True)):
        if len(_TEMPLATES) > 4096:  # many reloads or many lists: start again
            _TEMPLATES.clear()
        cached = _TEMPLATES[key] = (candidates, reservation_template(candidates, req.limit))
    return cached[1]


async def _reserve(runtime: Runtime, req: OfferRequest, ranked: list[RankedOffer]) -> Reservation | None:
    try:
        return await reserve(
            runtime.caps_client,
            runtime.keys,
            req.customer_id,
            cap_candidates(runtime, req, ranked),
            req.limit,
            int(time.time() * 1000),
        )
    except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
        runtime.store_failed("caps", exc)
        return None


def offers_decision(answer: OfferAnswer, req: OfferRequest, runtime: Runtime) -> Decision:
    """The answer in the decision log's terms: one action per offer (offers are ranked, not explored)."""
    items = tuple(
        [
            ShownItem(r.offer_id, pos, round(r.priority, 6), (r.priority_class,))
            for pos, r in enumerate(answer.offers, 1)
        ]
    )
    return Decision(
        decision_id=answer.decision_id,
        placement=f"offers:{req.channel}",
        customer_id=req.customer_id,
        model_version=runtime.status.model_version,
        items=items,
        fallback=answer.fallback,
        fallback_reason=answer.fallback_reason,
        policy="greedy",
    )
