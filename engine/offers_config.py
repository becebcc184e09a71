"""Offers as a marketer writes them in the rules YAML, validated at load.

An offer names its channels, eligibility (segments, minimum propensity, date window, countries,
required consent, something in the cart), business value (fixed, or the margin of an item), cost,
priority class, frequency caps, suppression, kill switch and holdout share. A mistake — an unknown
field, a bad date, a cap without a window — is an error naming the offer and the field
(``offers.free_shipping.caps.0.window``), and a server keeps serving its previous rules.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

Channel = Literal["web", "email", "push", "sms"]
PriorityClass = Literal["transactional", "service", "marketing"]
CLASS_RANK: dict[str, int] = {"transactional": 0, "service": 1, "marketing": 2}
# The consent a marketing offer needs on each channel (web needs none beyond the offer's own rule).
CHANNEL_CONSENT: dict[str, str | None] = {"web": None, "email": "email", "push": "push", "sms": "sms"}
# The RFM segments of training.features (engine cannot import training; a test keeps them equal).
SEGMENTS: frozenset[str] = frozenset(
    {
        "prospects",
        "champions",
        "loyal",
        "potential_loyalists",
        "new",
        "promising",
        "need_attention",
        "about_to_sleep",
        "cant_lose",
        "at_risk",
        "hibernating",
    }
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def _seconds(value: object) -> object:
    """'7d', '12h', '30m', '45s', '2w' or a number of seconds."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
        if match is None:
            raise ValueError(f"a duration like '7d', '12h' or '30m', got {value!r}")
        return int(match.group(1)) * _UNITS[match.group(2)]
    return value


Duration = Annotated[int, BeforeValidator(_seconds), Field(ge=1, le=366 * 86_400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CapRule(_Strict):
    """At most `limit` impressions per customer within `window`, counted per offer, class or channel."""

    scope: Literal["offer", "class", "channel"] = "offer"
    limit: int = Field(..., ge=1, le=10_000)
    window: Duration


class Eligibility(_Strict):
    segments: frozenset[str] = Field(frozenset(), description="RFM segments allowed (empty: any)")
    min_propensity: float = Field(0.0, ge=0, le=1)
    start: dt.date | None = None
    end: dt.date | None = Field(None, description="last day the offer runs (inclusive)")
    countries: frozenset[str] = Field(frozenset(), description="ISO country codes allowed (empty: any)")
    consent: Literal["email", "sms", "push", "personalization"] | None = Field(
        None, description="a consent purpose the customer must have given, on top of the channel's"
    )
    cart: bool = Field(
        False, description="only for a customer with something in the cart (the profile's, or the request's)"
    )

    @model_validator(mode="after")
    def _check(self) -> Eligibility:
        unknown = self.segments - SEGMENTS
        if unknown:
            raise ValueError(f"unknown segment(s) {sorted(unknown)}; known: {', '.join(sorted(SEGMENTS))}")
        if self.start and self.end and self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")
        return self


class Value(_Strict):
    """What one acceptance is worth: a fixed amount, or the margin of an item (price − cost)."""

    fixed: float | None = Field(None, ge=0, le=1e7)
    margin_of: str | None = Field(None, min_length=1, description="item id whose margin is the value")

    @model_validator(mode="after")
    def _one(self) -> Value:
        if (self.fixed is None) == (self.margin_of is None):
            raise ValueError("give exactly one of fixed or margin_of")
        return self


class Offer(_Strict):
    title: str = Field(..., min_length=1, max_length=200)
    url: str = Field("", max_length=2000, description="landing page (email click links); default the shop's")
    channels: frozenset[Channel] = Field(..., min_length=1)
    priority_class: PriorityClass = Field("marketing", alias="class")
    eligibility: Eligibility = Eligibility()
    value: Value
    cost: float = Field(0.0, ge=0, le=1e7, description="cost of one acceptance, taken off the value")
    propensity_model: str = Field("purchase_30d", min_length=1, description="the model whose probability scores it")
    lever: float = Field(1.0, ge=0, le=100, description="a marketer's multiplier")
    context_weights: dict[Literal["item", "cart", "none"], float] = Field(
        default_factory=dict, description="weight by what the page shows (default 1)"
    )
    caps: tuple[CapRule, ...] = ()
    suppress_after: int | None = Field(None, ge=1, le=1000, description="ignored impressions in a row before it stops")
    enabled: bool = Field(True, description="kill switch")
    holdout: float = Field(0.0, ge=0, le=0.5, description="share of customers who never get it (control group)")


class OfferSettings(_Strict):
    holdout_salt: str = Field("nextbest-holdout-v1", min_length=1, description="changing it reshuffles holdouts")
    holdout_share: float = Field(
        0.0, ge=0, le=0.5, description="customers in the global control group: no marketing offers at all"
    )
    disabled_channels: frozenset[Channel] = Field(frozenset(), description="kill switch per channel")
    default_propensity: float = Field(
        0.02, gt=0, le=1, description="used when no model scores a customer (unknown customer, model missing)"
    )
