"""Email slots at send time: decide once per (campaign, customer), store, read back, replace what sold out.

One round trip reads the profile, the catalog version and any stored content. A first call decides the
product slots with the placement's pipeline and ranks the offers for the offer slots, then one script
run (`STORE_FIRST_RESERVING`, the second round trip) stores the content unless some is stored already
and, in the same run, reserves the offers' caps and appends the granted offers to it. If a concurrent
first call stored first, its content is returned instead: this call reserved nothing, and its decision
is dropped unlogged. Whenever Redis cannot be used the answer is bestsellers in stock with
`fallback: true`: an email never goes out empty.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api import metrics
from api.offers import (
    OfferAnswer,
    OfferPlan,
    OfferRequest,
    offers_decision,
    plan_offers,
    propensities_many,
    reservation_template_of,
    settle,
)
from engine.email import (
    ContentDecodeError,
    EmailContent,
    content_from_decision,
    replace_unavailable,
    unavailable_slots,
    with_offers,
)
from engine.fastinit import fast_init
from engine.ids import new_decision_ids
from engine.pipeline import Request, recommend, recommend_many
from engine.state import ServingState
from engine.types import Context, Decision, Profile
from feature_store.caps import Reservation, template_keys_args
from feature_store.email_store import EmailRead, EmailStore, country_of, profile_of
from feature_store.profiles import ProfileDecodeError
from feature_store.resp import Arg
from feature_store.store import StoreUnavailableError

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger("nextbest")
# A batch chunk hands the event loop back after this many recipients (a few milliseconds of work): the
# worker's other requests, and the replies of the chunk waiting on Redis, are not held up behind it.
YIELD_EVERY = 8
# Recipients decided in one `recommend_many` call: the batch's numpy calls serve them all, and the loop is
# handed back between groups (64 decisions are about 8 ms; 32 cost 10 % more per recipient, 128 more again).
DECIDE_TOGETHER = 64
STORE_DOWN = ("redis_unavailable", "redis_circuit_open")


@fast_init
@dataclass(frozen=True, slots=True)
class SlotsRequest:
    campaign_id: str
    customer_id: str
    placement: str
    slots: int


@fast_init
@dataclass(frozen=True, slots=True)
class EmailAnswer:
    content: EmailContent
    source: str  # "decided" (first call), "stored" (read back), "fallback" (not stored)
    country: str | None


class EmailSlots:
    """The email flows over one runtime (its state, store client, breaker and decision log)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = EmailStore(runtime.store.client, runtime.keys)
        # A batch is not waited on by an inbox: its round trips carry 256 recipients and get the patient
        # budget of writes, not the request path's few milliseconds.
        self.batch_store = EmailStore(runtime.ingest_client, runtime.keys)
        # A first call's store-and-reserve is a write: the cap reservation's bounded budget, not a read's.
        self.write_store = EmailStore(runtime.caps_client, runtime.keys)

    async def slots(self, req: SlotsRequest) -> EmailAnswer:
        """One recipient on the request path: its round trips get the request's budgets."""
        (answer,) = await self._answers([req], self.store, self.write_store)
        return answer

    async def slots_many(self, reqs: list[SlotsRequest]) -> list[EmailAnswer]:
        """Many recipients of one campaign (the pre-send batch), with the patient budget of writes."""
        return await self._answers(reqs, self.batch_store, self.batch_store)

    async def _answers(self, reqs: list[SlotsRequest], store: EmailStore, write_store: EmailStore) -> list[EmailAnswer]:
        """The content of each recipient of one campaign, with a round trip per step, not per recipient:
        one read (profile, catalog version, stored content), one script run per recipient that stores its
        content if absent and reserves its offers' caps, one log write. Stored content is read back
        (sold-out items replaced); a first call decides; Redis trouble gives bestsellers, not stored."""
        rt = self.runtime
        state = rt.state
        if state is None:
            from api.runtime import NotReadyError  # runtime imports this module

            raise NotReadyError("no catalog loaded yet")
        if not reqs:
            return []
        campaign = reqs[0].campaign_id
        if not rt.breaker.allow():
            return [self._fallback(state, r, "redis_circuit_open", None) for r in reqs]
        try:
            reads = await store.read_many([r.customer_id for r in reqs], campaign)
        except StoreUnavailableError as exc:
            rt.store_failed("email", exc)
            return [self._fallback(state, r, "redis_unavailable", None) for r in reqs]
        await rt.store_succeeded(reads[0].catalog_version)
        state = rt.state or state
        answers: list[EmailAnswer | None] = [None] * len(reqs)
        fresh: list[tuple[int, Decision, Profile | None, OfferRequest | None, OfferPlan | None]] = []
        for j, (req, read) in enumerate(zip(reqs, reads, strict=True)):
            if j and not j % YIELD_EVERY:
                await asyncio.sleep(0)
            if read.stored is not None:
                answers[j] = await self._read_back(state, req, read, store)
        pending = [j for j, a in enumerate(answers) if a is None]
        # The whole profile only where a decision is made: a read-back needs the country alone (`_read_back`).
        profiles: list[tuple[Profile | None, str | None]] = [(None, None)] * len(reqs)
        for j in pending:
            profiles[j] = self._profile(reqs[j].customer_id, reads[j])
        # One campaign, one placement: score the offers of every recipient, each model run once on the recipients
        # whose offers use it.
        offer_slots = state.rules.placement(reqs[0].placement).offer_slots
        wants_offers = bool(state.rules.offers) and offer_slots > 0
        scored = propensities_many(rt, [profiles[j][0] for j in pending], "email") if wants_offers else []
        scores = dict(zip(pending, scored, strict=False))
        # The offers' decision ids of the whole batch from one system call (their random half is also the
        # nonce of each recipient's cap reservation).
        offer_ids = dict(zip(pending, new_decision_ids(len(pending)), strict=True)) if wants_offers else {}
        for k in range(0, len(pending), DECIDE_TOGETHER):
            if k:
                await asyncio.sleep(0)
            group = pending[k : k + DECIDE_TOGETHER]
            decisions = self._recommend(state, [reqs[j] for j in group], [profiles[j] for j in group])
            for j, decision in zip(group, decisions, strict=True):
                req, (profile, reason) = reqs[j], profiles[j]
                if wants_offers:
                    wanted = OfferRequest(req.customer_id, "email", offer_slots)
                    offer_plan = plan_offers(rt, wanted, profile, reason, scores.get(j), offer_ids[j])
                    fresh.append((j, decision, profile, wanted, offer_plan))
                else:
                    fresh.append((j, decision, profile, None, None))
        # Store each content and reserve its offers' caps in the same script run: a call that finds content
        # already stored (a concurrent first call won) reserves nothing and serves what is stored.
        now_ms = int(time.time() * 1000)
        ttl = state.rules.email.content_ttl
        writes: list[tuple[str, str, bytes, int, tuple[list[Arg], list[Arg]] | None]] = []
        # What each write stores, and its offers: the products alone when the script is to add the offers.
        built: list[tuple[EmailContent, OfferAnswer | None]] = []
        for j, decision, _profile, offer_req, plan in fresh:
            if offer_req is not None and plan is not None and plan.ranked and not plan.store_down:
                products = self._content(reqs[j], decision, None, now_ms)
                built.append((products, None))
                template = reservation_template_of(rt, offer_req, plan.ranked)
                call = template_keys_args(template, rt.keys, offer_req.customer_id, now_ms, plan.decision_id[-16:])
                offered = [(r.offer_id, r.priority_class) for r in plan.ranked]
                pending_bytes = products.with_pending_offers(offered, plan.decision_id)
                writes.append((reqs[j].customer_id, campaign, pending_bytes, ttl, call))
            else:
                offers = settle(plan, offer_req, Reservation(granted=(), refused={})) if offer_req and plan else None
                content = self._content(reqs[j], decision, offers, now_ms)
                built.append((content, offers))
                writes.append((reqs[j].customer_id, campaign, content.to_bytes(), ttl, None))
        try:
            stored = await write_store.store_first_reserving_many(writes)
        except StoreUnavailableError as exc:
            rt.store_failed("email", exc)
            for j, _, profile, _, _ in fresh:
                answers[j] = self._fallback(state, reqs[j], "redis_unavailable", profile.country if profile else None)
            return [a for a in answers if a is not None]
        records: list[tuple[Decision, Context, Profile | None, str, int | None]] = []
        decided = 0
        for (j, decision, profile, offer_req, plan), (sent, sent_offers), (other, reservation) in zip(
            fresh, built, stored, strict=True
        ):
            country = profile.country if profile else None
            if other is not None:
                metrics.EMAIL_SLOTS.labels("race_lost").inc()
                answers[j] = EmailAnswer(EmailContent.from_bytes(other), "stored", country)
                continue
            content, offers = sent, sent_offers
            if reservation is not None and offer_req is not None and plan is not None:
                # What the script stored: the products, then the offers it granted.
                offers = settle(plan, offer_req, reservation)
                content = with_offers(sent, _offer_slots(offers), offers.decision_id)
            records += self._log_records(state, decision, offers, reqs[j], profile)
            decided += 1
            answers[j] = EmailAnswer(content, "decided", country)
        metrics.EMAIL_SLOTS.labels("decided").inc(decided)
        await rt.log_decisions(records)
        return [a for a in answers if a is not None]

    def _recommend(
        self, state: ServingState, reqs: list[SlotsRequest], reads: list[tuple[Profile | None, str | None]]
    ) -> list[Decision]:
        """The product slots of recipients of one placement, decided together (`recommend_many`)."""
        rt = self.runtime
        return recommend_many(
            state,
            [Request(r.customer_id, r.placement, r.slots) for r in reqs],
            [profile for profile, _ in reads],
            fallback_reasons=[reason for _, reason in reads],
            explore=rt.settings.exploration,
            arms=rt.arms if state.catalog is rt.catalog else {},
        )

    def _profile(self, customer_id: str, read: EmailRead) -> tuple[Profile | None, str | None]:
        try:
            return profile_of(customer_id, read.profile_raw), None
        except ProfileDecodeError as exc:
            log.error("%s", exc)
            return None, "profile_unreadable"

    def _country(self, customer_id: str, read: EmailRead) -> str | None:
        try:
            return country_of(customer_id, read.profile_raw)
        except ProfileDecodeError as exc:
            log.error("%s", exc)
            return None

    async def _read_back(
        self, state: ServingState, req: SlotsRequest, read: EmailRead, store: EmailStore
    ) -> EmailAnswer | None:
        """The stored content, with sold-out items replaced in place; None if it cannot be read.

        The profile is decoded whole only when a slot is to be replaced (its ranking is the customer's);
        otherwise its country, for the prices' format, is all the answer needs."""
        raw = read.stored
        assert raw is not None
        try:
            content = EmailContent.from_bytes(raw)
        except ContentDecodeError as exc:
            log.error("email content of campaign %r is unreadable, deciding again: %s", req.campaign_id, exc)
            return None
        if content.placement not in state.rules.placements:
            # The placement was removed: serve as stored.
            return EmailAnswer(content, "stored", self._country(req.customer_id, read))
        if unavailable_slots(content, state):
            profile, _ = self._profile(req.customer_id, read)
            country = profile.country if profile else None
            refreshed = replace_unavailable(content, state, profile, req.customer_id)
        else:
            country, refreshed = self._country(req.customer_id, read), None
        if refreshed is not None:
            try:
                now = await store.replace_if_same(req.customer_id, req.campaign_id, raw, refreshed.to_bytes())
            except StoreUnavailableError as exc:
                self.runtime.store_failed("email", exc)
                now = None
            # Another open replaced first: serve what it stored, so every open shows the same email.
            content = EmailContent.from_bytes(now) if now is not None else refreshed
            metrics.EMAIL_SLOTS.labels("replaced").inc()
        metrics.EMAIL_SLOTS.labels("stored").inc()
        return EmailAnswer(content, "stored", country)

    def _content(self, req: SlotsRequest, decision: Decision, offers: OfferAnswer | None, now_ms: int) -> EmailContent:
        chosen = _offer_slots(offers) if offers else []
        return content_from_decision(req.campaign_id, decision, chosen, offers.decision_id if offers else None, now_ms)

    def _log_records(
        self,
        state: ServingState,
        decision: Decision,
        offers: OfferAnswer | None,
        req: SlotsRequest,
        profile: Profile | None,
    ) -> list[tuple[Decision, Context, Profile | None, str, int | None]]:
        """What the decision log gets for a stored content: the products' decision and the offers' one."""
        if not self.runtime.settings.decision_log:
            return []
        window = state.rules.email.click_ttl
        out: list[tuple[Decision, Context, Profile | None, str, int | None]] = [
            (decision, Context(), profile, "email", window)
        ]
        if offers is not None and offers.offers and not offers.fallback:
            offer_req = OfferRequest(req.customer_id, "email", len(offers.offers))
            out.append((offers_decision(offers, offer_req, self.runtime), Context(), profile, "email", window))
        return out

    def _fallback(self, state: ServingState, req: SlotsRequest, reason: str, country: str | None) -> EmailAnswer:
        """Bestsellers in stock, decided without the store (deterministic, so retries agree), not stored."""
        decision = recommend(
            state, Request(req.customer_id, req.placement, req.slots), None, fallback_reason=reason, explore=False
        )
        metrics.EMAIL_SLOTS.labels("fallback").inc()
        return EmailAnswer(content_from_decision(req.campaign_id, decision, []), "fallback", country)


def _offer_slots(offers: OfferAnswer) -> list[tuple[str, str]]:
    """(offer id, class) of the offers shown, as the content's offer slots hold them."""
    return [(o.offer_id, o.priority_class) for o in offers.offers]
