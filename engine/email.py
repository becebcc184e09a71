"""Email content for one (campaign, customer): decided once, stored, and read back at send and open time.

The first call decides the product slots (the placement's pipeline, with its exploration and logged
propensities) and the offer slots; the content is stored and every later call returns it. At open time,
days later, an item that went out of stock or inactive is replaced in its own slot by the best item
that is not already in the email and keeps the placement's category cap; the other slots stay as sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import orjson

from engine.fastinit import fast_init
from engine.pipeline import Request, recommend
from engine.state import ServingState
from engine.types import Context, Decision, Profile

CONTENT_VERSION = 1
# A first call's content awaiting its offers: the script that stores it reserves the offers' caps in the
# same run and appends the granted offer ids, one per line (see `with_pending_offers`).
PENDING_OFFERS_VERSION = 2
REPLACEMENT_REASON = "replaced_unavailable"


class ContentDecodeError(ValueError):
    """Stored content that cannot be read back (written by an incompatible version, or damaged)."""


@fast_init
@dataclass(frozen=True, slots=True)
class EmailSlot:
    position: int  # 1-based, products first, then offers
    kind: str  # "product" | "offer"
    item_id: str  # item id, or offer id for an offer slot
    reasons: tuple[str, ...]
    propensity: float = 1.0
    score: float = 0.0


@fast_init
@dataclass(frozen=True, slots=True)
class EmailContent:
    campaign_id: str
    decision_id: str
    placement: str
    slots: tuple[EmailSlot, ...]
    created_ms: int
    model_version: str | None = None
    fallback_reason: str | None = None
    replaced: int = 0  # slots replaced at open time since the content was first stored
    offers_decision_id: str | None = None  # the offers' own logged decision (feedback on an offer slot)

    @property
    def fallback(self) -> bool:
        return self.fallback_reason is not None

    @property
    def products(self) -> tuple[EmailSlot, ...]:
        return tuple(s for s in self.slots if s.kind == "product")

    def to_bytes(self) -> bytes:
        return orjson.dumps(self._document(CONTENT_VERSION))

    def with_pending_offers(self, offers: list[tuple[str, str]], offers_decision_id: str | None = None) -> bytes:
        """This content (its product slots) stored with the (offer id, class) candidates of its offer slots,
        to be completed by the store script: it appends a line per granted offer id. JSON has no raw
        newline, so the first line is the document and every other one an offer id. `offers_decision_id`,
        if given, is the offers' decision the content names once an offer is granted (else this content's)."""
        doc = self._document(PENDING_OFFERS_VERSION)
        doc["oc"] = [[oid, cls] for oid, cls in offers]
        if offers_decision_id is not None:
            doc["od"] = offers_decision_id
        return orjson.dumps(doc) + b"\n"

    def _document(self, version: int) -> dict[str, object]:
        return {
            "v": version,
            "c": self.campaign_id,
            "d": self.decision_id,
            "p": self.placement,
            "t": self.created_ms,
            "m": self.model_version,
            "f": self.fallback_reason,
            "r": self.replaced,
            "od": self.offers_decision_id,
            "s": [[s.kind[0], s.item_id, list(s.reasons), s.propensity, s.score] for s in self.slots],
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> EmailContent:
        try:
            head, *granted = raw.split(b"\n")
            d = orjson.loads(head)
            expected = PENDING_OFFERS_VERSION if granted else CONTENT_VERSION
            if d.get("v") != expected:
                raise ContentDecodeError(f"stored email content has version {d.get('v')!r}, expected {expected}")
            if granted:
                classes = {str(oid): str(c) for oid, c in d["oc"]}
                offers = [g.decode() for g in granted if g]
                d["s"] = [*d["s"], *(["o", oid, [classes[oid]], 1.0, 0.0] for oid in offers)]
                d["od"] = d.get("od") if offers else None  # as content_from_decision: no offer slot, no offers id
            # Positional arguments and map(): every open of every email reads its content back through here.
            slots = tuple(
                EmailSlot(
                    pos,
                    "offer" if kind == "o" else "product",
                    str(item),
                    tuple(map(str, reasons)),
                    float(prop),
                    float(score),
                )
                for pos, (kind, item, reasons, prop, score) in enumerate(d["s"], start=1)
            )
            return cls(
                str(d["c"]),
                str(d["d"]),
                str(d["p"]),
                slots,
                int(d["t"]),
                d.get("m"),
                d.get("f"),
                int(d.get("r", 0)),
                d.get("od"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, ContentDecodeError):
                raise
            raise ContentDecodeError(f"stored email content is unreadable: {exc}") from exc


def content_from_decision(
    campaign_id: str,
    decision: Decision,
    offers: list[tuple[str, str]],
    offers_decision_id: str | None = None,
    now_ms: int | None = None,
) -> EmailContent:
    """The content of a first call: the decision's items as product slots, then (offer id, class) slots."""
    # Positional (campaign, decision, placement, slots, created, model version, fallback reason) and a list,
    # not a generator: a batch builds one for every recipient.
    products = EmailContent(
        campaign_id,
        decision.decision_id,
        decision.placement,
        tuple([EmailSlot(i.position, "product", i.item_id, i.reasons, i.propensity, i.score) for i in decision.items]),
        int(time.time() * 1000) if now_ms is None else now_ms,
        decision.model_version,
        decision.fallback_reason,
    )
    return with_offers(products, offers, offers_decision_id) if offers else products


def with_offers(content: EmailContent, offers: list[tuple[str, str]], offers_decision_id: str | None) -> EmailContent:
    """The content with (offer id, class) slots after its slots; no offer slot, no offers' decision id."""
    start = len(content.slots) + 1
    offer_slots = tuple([EmailSlot(start + k, "offer", oid, (cls,)) for k, (oid, cls) in enumerate(offers)])
    # Built field by field, in field order, rather than with `dataclasses.replace`, which costs several times
    # more: a batch does this for every recipient granted an offer. (A new field must be added here.)
    return EmailContent(
        content.campaign_id,
        content.decision_id,
        content.placement,
        content.slots + offer_slots,
        content.created_ms,
        content.model_version,
        content.fallback_reason,
        content.replaced,
        offers_decision_id if offer_slots else None,
    )


def feedback_target(content: EmailContent, position: int) -> tuple[str, str] | None:
    """(decision id, action) that a click on the slot at `position` rewards, or None if there is no slot."""
    for s in content.slots:
        if s.position == position:
            if s.kind == "offer":
                return (content.offers_decision_id, s.item_id) if content.offers_decision_id else None
            return content.decision_id, s.item_id
    return None


def unavailable_slots(content: EmailContent, state: ServingState) -> list[int]:
    """Positions of product slots whose item is gone from the catalog, inactive or out of stock."""
    index, available = state.catalog.index, state.available
    gone = []
    for s in content.slots:
        if s.kind == "product":
            i = index.get(s.item_id)
            if i is None or not available[i]:
                gone.append(s.position)
    return gone


def replace_unavailable(
    content: EmailContent, state: ServingState, profile: Profile | None, customer_id: str
) -> EmailContent | None:
    """The content with each unavailable product slot refilled in place; None when nothing needs replacing.

    Replacements come from the placement's own ranking for the customer today (greedy: the email is
    already out, so there is nothing to explore), skipping items already in the email and keeping the
    placement's category cap across all product slots.
    """
    gone = unavailable_slots(content, state)
    if not gone:
        return None
    placement = state.rules.placement(content.placement)
    cat = state.catalog
    kept = [s for s in content.products if s.position not in gone]
    in_email = [s.item_id for s in content.products]
    per_category: dict[int, int] = {}
    for s in kept:
        code = int(cat.category[cat.index[s.item_id]])
        per_category[code] = per_category.get(code, 0) + 1
    want = len(gone)
    # The ranking excludes what the email already holds by passing it as context (never recommended back).
    limit = min(placement.max_limit, want + len(in_email) + 8)
    ranked = recommend(
        state,
        Request(customer_id, content.placement, limit, Context(cart=tuple(in_email))),
        profile,
        explore=False,
    )
    cap = placement.rerank.max_per_category
    picks: list[tuple[str, tuple[str, ...], float]] = []
    spare: list[tuple[str, tuple[str, ...], float]] = []
    for item in ranked.items:
        if item.item_id in in_email:
            continue
        code = int(cat.category[cat.index[item.item_id]])
        if per_category.get(code, 0) < cap:
            per_category[code] = per_category.get(code, 0) + 1
            picks.append((item.item_id, item.reasons, item.score))
        else:
            spare.append((item.item_id, item.reasons, item.score))
        if len(picks) == want:
            break
    picks += spare[: want - len(picks)]  # never leave a slot empty: relax diversity before that
    if len(picks) < want:
        picks += _any_available(state, {*in_email, *(p[0] for p in picks)}, want - len(picks))
    by_position = dict(zip(gone, picks, strict=False))
    slots = tuple(
        replace(
            s,
            item_id=by_position[s.position][0],
            reasons=(REPLACEMENT_REASON, *by_position[s.position][1]),
            propensity=1.0,
            score=by_position[s.position][2],
        )
        if s.position in by_position
        else s
        for s in content.slots
    )
    return replace(content, slots=slots, replaced=content.replaced + len(by_position))


def _any_available(state: ServingState, taken: set[str], n: int) -> list[tuple[str, tuple[str, ...], float]]:
    order = np.argsort(-state.catalog.popularity, kind="stable")
    out: list[tuple[str, tuple[str, ...], float]] = []
    for i in order.tolist():
        item = state.catalog.item_ids[i]
        if state.available[i] and item not in taken:
            out.append((item, ("bestseller",), 0.0))
            if len(out) == n:
                break
    return out
