"""Domain types that travel between layers: profiles, request context, decisions."""

from __future__ import annotations

from dataclasses import dataclass

from engine.fastinit import fast_init

EVENT_TYPES = ("view_item", "add_to_cart", "purchase", "email_open", "email_click")
CONSENT_CHANNELS = ("email", "sms", "push", "personalization")
SECONDS_PER_DAY = 86_400


@fast_init
@dataclass(frozen=True, slots=True)
class PurchaseSummary:
    """What a customer bought of one item: how often, and first/last day (days since the Unix epoch)."""

    item_id: str
    count: int
    first_day: int
    last_day: int


@fast_init
@dataclass(frozen=True, slots=True)
class Profile:
    """A customer's live profile as stored in the feature store (a few hundred bytes)."""

    customer_id: str
    recent_views: tuple[str, ...] = ()  # most recent first
    cart: tuple[str, ...] = ()
    purchases: tuple[PurchaseSummary, ...] = ()  # most recent first
    category_affinity: tuple[tuple[str, float], ...] = ()  # strongest first, weights sum to <= 1
    consents: frozenset[str] = frozenset(CONSENT_CHANNELS)
    orders: int = 0
    spend: float = 0.0
    updated_at: int = 0  # unix seconds
    pseudonym: str | None = None  # random id the decision log uses instead of the customer id
    segment: str | None = None  # RFM segment at load time (training.features.SEGMENTS)
    country: str | None = None
    # Customer features in the order of the propensity models' feature_names (training.features.FEATURE_COLUMNS),
    # stored as float16: about 3 significant digits (see feature_store.profiles); () when not loaded.
    features: tuple[float, ...] = ()

    def has_consent(self, channel: str) -> bool:
        return channel in self.consents

    @property
    def interacted_items(self) -> tuple[str, ...]:
        """Items the customer showed interest in, strongest signals first (for folding in a user vector)."""
        return tuple(p.item_id for p in self.purchases) + self.cart + self.recent_views


@fast_init
@dataclass(frozen=True, slots=True)
class Context:
    """What the page shows right now: the current item and the cart."""

    item_id: str | None = None
    cart: tuple[str, ...] = ()

    @property
    def item_ids(self) -> tuple[str, ...]:
        return ((self.item_id,) if self.item_id else ()) + self.cart


@fast_init
@dataclass(frozen=True, slots=True)
class ShownItem:
    item_id: str
    position: int  # 1-based
    score: float
    reasons: tuple[str, ...]
    propensity: float = 1.0  # probability the policy chose this item for this slot, given the slots before


@dataclass(frozen=True, slots=True)
class ShadowDecision:
    """What a second (shadow) policy would have shown, evaluated on the same candidates but never shown."""

    policy: str
    params: tuple[tuple[str, float], ...]
    items: tuple[tuple[str, float], ...]  # (item_id, propensity) per slot of the shadow's own list
    # The shadow's probability of each *shown* item at its slot given the shown items before it: the
    # target propensities off-policy evaluation needs to estimate the shadow's value from live traffic.
    target_propensities: tuple[float, ...]


@fast_init
@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request, with everything needed to explain and log it."""

    decision_id: str
    placement: str
    customer_id: str
    model_version: str | None
    items: tuple[ShownItem, ...]
    fallback: bool = False
    fallback_reason: str | None = None
    policy: str = "greedy"
    policy_params: tuple[tuple[str, float], ...] = ()
    shadow: ShadowDecision | None = None
    # Per shown item, the click rate the ranker implied (read by `thompson_lift` arms); () for other policies.
    expected_clicks: tuple[float, ...] = ()
