"""HTTP request and response bodies (validated at the edge, then turned into engine values)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    WithJsonSchema,
    model_validator,
)

# No braces (Redis hash tags), no whitespace or control characters. Spelled out rather than `\s`, whose
# meaning differs between pydantic's Rust regex, Python's `re` (str.isspace, as the caps scripts check)
# and the ECMA regex of OpenAPI clients: an id one of them accepts and another refuses was a 500.
ID_PATTERN = r"^[^{}\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]{1,128}$"
ItemId = Annotated[str, Field(pattern=ID_PATTERN)]


def _utc_if_naive(value: datetime) -> datetime:
    # Without this a naive time would be read in the server's local zone (datetime.timestamp()).
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# Request bodies take exactly the JSON types they document: no 0/1 or "yes" for a boolean, no "2.5" for a
# number (pydantic's lax mode would, and the OpenAPI document would not say so).
REQUEST_BODY = ConfigDict(extra="forbid", strict=True)

MAX_UNIX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last instant a datetime holds


def _unix_time_in_range(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool) and not 0 <= value <= MAX_UNIX_MS:
        raise ValueError(f"unix time must be between 0 and {MAX_UNIX_MS} (seconds, or milliseconds above 2e10)")
    return value


# pydantic takes unix time too (seconds, or milliseconds above 2e10): the documented schema says so.
Timestamp = Annotated[
    datetime,
    BeforeValidator(_unix_time_in_range),
    AfterValidator(_utc_if_naive),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number", "minimum": 0, "maximum": MAX_UNIX_MS}]}
    ),
]


def _integral(value: object) -> object:
    # JSON Schema counts 3.0 as an integer; strict mode alone would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# After the bounds in each Annotated[...]: the other order documents them as "ge"/"le", unknown to JSON Schema.
WHOLE = BeforeValidator(_integral)


class RecommendationContext(BaseModel):
    model_config = REQUEST_BODY

    item_id: str | None = Field(None, pattern=ID_PATTERN, description="the item on the page")
    cart: list[ItemId] = Field(default_factory=list, max_length=100, description="item ids in the cart")


class RecommendationRequest(BaseModel):
    model_config = REQUEST_BODY

    customer_id: str = Field(..., pattern=ID_PATTERN, examples=["c42"])
    placement: str = Field(..., min_length=1, max_length=64, examples=["home"])
    limit: Annotated[int, Field(ge=1, le=100), WHOLE] | None = Field(
        None, description="items wanted (default: the placement's)"
    )
    context: RecommendationContext = Field(default_factory=RecommendationContext)


class RecommendedItem(BaseModel):
    item_id: str
    position: int
    score: float
    propensity: float = Field(
        description="probability the placement's policy chose this item for this position, given the ones before"
    )
    reasons: list[str]


class RecommendationResponse(BaseModel):
    decision_id: str
    placement: str
    model_version: str | None
    items: list[RecommendedItem]
    fallback: bool
    fallback_reason: str | None


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[ValidationIssue]


EVENT_TYPE = Literal["view_item", "add_to_cart", "purchase", "email_open", "email_click"]
MAX_EVENTS_PER_REQUEST = 1000


class EventIn(BaseModel):
    """One shop event, in the schema of the `events` data file."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # `_item_required`, said in JSON Schema so that clients (and the fuzz tests) know it too
        json_schema_extra={
            "if": {"properties": {"type": {"const": "email_open"}}, "required": ["type"]},
            "else": {"properties": {"item_id": {"type": "string"}}, "required": ["item_id"]},
        },
    )

    event_id: str = Field(..., pattern=ID_PATTERN, examples=["e-9f1c"])
    customer_id: str = Field(..., pattern=ID_PATTERN, examples=["c42"])
    type: EVENT_TYPE
    item_id: str | None = Field(None, pattern=ID_PATTERN, description="required except for email_open")
    quantity: Annotated[int, Field(ge=1, le=10_000), WHOLE] = 1
    price: float = Field(0.0, ge=0, le=1e9, allow_inf_nan=False, description="unit price")
    timestamp: Timestamp = Field(..., strict=False, description="ISO-8601 (UTC if no offset) or unix seconds")

    @model_validator(mode="after")
    def _item_required(self) -> EventIn:
        if self.type != "email_open" and not self.item_id:
            raise ValueError(f"item_id is required for {self.type} events")
        return self


class EventBatch(BaseModel):
    model_config = REQUEST_BODY

    # Any JSON value is accepted per entry: each is validated as an event on its own, and a bad one is
    # reported in `rejected` by its index (the request is still a 202), so the schema must not promise more.
    events: list[Any] = Field(
        ...,
        min_length=1,
        max_length=MAX_EVENTS_PER_REQUEST,
        description="events, each as the single-event body; invalid entries are listed in `rejected`",
    )


class EventsRequest(RootModel[EventIn | EventBatch]):
    """Either one event or {"events": [...]} (each event validated on its own)."""


class RejectedEvent(BaseModel):
    index: int
    event_id: str | None
    errors: list[ValidationIssue]


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]


ITEM_FIELDS = ("title", "category", "price", "cost", "stock", "url", "image_url", "active")


def _one_field_given(schema: dict[str, Any]) -> None:
    """`ItemPatch._something_to_change` in JSON Schema: at least one field besides item_id, not null.

    Each branch repeats the field's own schema (without null), so that a generator which takes a branch
    for the whole object keeps the field's bounds.
    """
    props = schema["properties"]
    branches = []
    for f in ITEM_FIELDS:
        given = [s for s in props[f].get("anyOf", [props[f]]) if s.get("type") != "null"]
        branches.append({"required": [f], "properties": {f: given[0]}})
    schema["anyOf"] = branches


class ItemPatch(BaseModel):
    """Fields to change on one catalog item; a new item needs title, category, price, cost and stock.

    A field sent as null is the same as a field left out: it changes nothing (a null title or price
    written into the catalog broke every worker's next catalog rebuild).
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra=lambda schema, _: _one_field_given(schema),
    )

    item_id: str = Field(..., pattern=ID_PATTERN)
    title: str | None = Field(None, min_length=1, max_length=500)
    category: str | None = Field(None, pattern=ID_PATTERN)
    price: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False)
    cost: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False, description="unit cost; margin follows")
    stock: Annotated[int, Field(ge=0, le=10**9), WHOLE] | None = None
    url: str | None = Field(None, max_length=2048)
    image_url: str | None = Field(None, max_length=2048)
    active: bool | None = None

    def changes(self) -> dict[str, object]:
        """The fields given with a value."""
        return self.model_dump(exclude_none=True, exclude={"item_id"})

    @model_validator(mode="after")
    def _something_to_change(self) -> ItemPatch:
        if not self.changes():
            raise ValueError("nothing to change: give at least one field besides item_id (null changes nothing)")
        return self


class ItemBatch(BaseModel):
    model_config = REQUEST_BODY

    items: list[Any] = Field(  # like EventBatch.events: each entry validated on its own
        ...,
        min_length=1,
        max_length=MAX_EVENTS_PER_REQUEST,
        description="item patches, each as the single-item body; invalid entries are listed in `rejected`",
    )


class ItemsRequest(RootModel[ItemPatch | ItemBatch]):
    """Either one item patch or {"items": [...]} (each validated on its own)."""


class RejectedItem(BaseModel):
    index: int
    item_id: str | None
    errors: list[ValidationIssue]


class ItemsResponse(BaseModel):
    catalog_version: int
    created: list[str]
    updated: list[str]
    rejected: list[RejectedItem]


CONSENT_CHANNEL = Literal["email", "sms", "push", "personalization"]


class ConsentUpdate(BaseModel):
    """Consent per channel or purpose; channels not named keep their current value."""

    model_config = REQUEST_BODY

    channels: dict[CONSENT_CHANNEL, bool] = Field(..., min_length=1, examples=[{"personalization": True}])
    source: str = Field(..., min_length=1, max_length=100, examples=["cookie-banner"])
    timestamp: Timestamp | None = Field(
        None,
        strict=False,
        description="when the customer decided (default: now): ISO-8601 (UTC if no offset) or unix seconds",
    )


class ConsentState(BaseModel):
    customer_id: str
    consents: dict[str, bool]


DECISION_ID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"  # a ULID, as every decision id nextbest hands out
REWARD_TYPE = Literal["click", "add_to_cart", "purchase"]


class FeedbackIn(BaseModel):
    """A reward for one action of a logged decision: an item (or offer) that was shown."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # `_finite`'s second rule, said in JSON Schema: a value only with a purchase
        json_schema_extra={
            "if": {"properties": {"value": {"type": "number"}}, "required": ["value"]},
            "then": {"properties": {"reward": {"const": "purchase"}}},
        },
    )

    decision_id: str = Field(..., pattern=DECISION_ID_PATTERN, examples=["01JDAB4ZK3W8T5N6QXR2C7M9EF"])
    action: str = Field(..., pattern=ID_PATTERN, description="the item or offer id the reward is for")
    reward: REWARD_TYPE | Annotated[float, Field(ge=-1e9, le=1e9)] = Field(
        ..., description="click, add_to_cart, purchase, or a number (e.g. revenue)", examples=["click"]
    )
    value: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False, description="order value of a purchase")

    @model_validator(mode="after")
    def _finite(self) -> FeedbackIn:
        if isinstance(self.reward, float) and not -1e9 <= self.reward <= 1e9:
            raise ValueError("a numeric reward must be finite and within ±1e9")
        if self.value is not None and self.reward != "purchase":
            raise ValueError("value is only for purchase rewards")
        return self

    def reward_type_and_value(self) -> tuple[str, float]:
        if isinstance(self.reward, float):
            return "value", self.reward
        if self.reward == "purchase":
            return "purchase", self.value if self.value is not None else 1.0
        return self.reward, 1.0


class FeedbackOut(BaseModel):
    status: Literal["accepted", "duplicate"]
    decision_id: str
    action: str
    reward_type: str
    reward: float
    counted_as_success: bool = Field(description="whether this reward updated the placement's bandit state")


class ErasureOut(BaseModel):
    customer_id: str
    erased: list[str] = Field(description="the kinds of data that existed and were deleted")
    decision_log: str = Field(description="what happened to the customer's entries in the decision log")


class OffersRequest(BaseModel):
    model_config = REQUEST_BODY

    customer_id: str = Field(..., pattern=ID_PATTERN, examples=["c42"])
    channel: Literal["web", "email", "push", "sms"] = Field(..., examples=["web"])
    limit: Annotated[int, Field(ge=1, le=20), WHOLE] = Field(3, description="offers wanted")
    context: RecommendationContext = Field(default_factory=RecommendationContext)


class OfferExplanation(BaseModel):
    propensity: float = Field(description="probability from the offer's propensity model (or the default)")
    propensity_source: str = Field(description="the model's name, or 'default' when no model scored the customer")
    value: float = Field(description="business value net of the offer's cost")
    lever: float
    context_weight: float
    segment: str | None


class OfferOut(BaseModel):
    offer_id: str
    title: str
    priority_class: str
    position: int
    priority: float = Field(description="propensity × value × lever × context_weight")
    explanation: OfferExplanation


class OffersResponse(BaseModel):
    decision_id: str
    offers: list[OfferOut]
    holdout: bool = Field(description="the customer is in the control group: no marketing offers")
    held_out: list[str] = Field(description="offers whose own holdout includes this customer")
    not_shown: dict[str, str] = Field(description="every other offer, with the reason it was left out")
    fallback: bool
    fallback_reason: str | None


CAMPAIGN_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
MAX_BATCH_RECIPIENTS = 100_000


class EmailSlotOut(BaseModel):
    position: int
    type: Literal["product", "offer"]
    item_id: str | None = Field(None, description="product slots")
    offer_id: str | None = Field(None, description="offer slots")
    title: str
    price: float | None = Field(description="in the customer's currency (catalog price × the country's rate)")
    price_formatted: str = Field(description="price in the customer's locale, e.g. '12,99 €'")
    image_url: str
    click_url: str = Field(description="signed link: records the click, then redirects with UTM parameters")
    reasons: list[str]


class EmailSlotsOut(BaseModel):
    campaign_id: str
    decision_id: str
    placement: str
    locale: str
    currency: str
    source: Literal["decided", "stored", "fallback"] = Field(
        description="decided: this call chose the content; stored: read back; fallback: bestsellers, not stored"
    )
    fallback: bool
    fallback_reason: str | None
    slots: list[EmailSlotOut]


class EmailBatchIn(BaseModel):
    """Recipients of one campaign; each is a customer id (or {"customer_id": ...}). A bad entry is reported
    on its own NDJSON line and does not stop the batch."""

    model_config = REQUEST_BODY

    campaign_id: str = Field(..., pattern=CAMPAIGN_PATTERN, examples=["weekly-2026-48"])
    placement: str = Field("email:weekly", min_length=1, max_length=64)
    slots: Annotated[int, Field(ge=1, le=100), WHOLE] | None = Field(
        None, description="product slots (default: the placement's)"
    )
    recipients: list[Any] = Field(..., min_length=1, max_length=MAX_BATCH_RECIPIENTS)


class EmailBatchLine(BaseModel):
    """One NDJSON line: the recipient's content as the single call returns it, or the entry's error."""

    index: int
    customer_id: str | None = None
    error: str | None = None
    content: EmailSlotsOut | None = None
