"""HTTP request and response bodies (validated at the edge, then turned into engine values)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

ID_PATTERN = r"^[^\s{}]{1,128}$"
ItemId = Annotated[str, Field(pattern=ID_PATTERN)]


class RecommendationContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str | None = Field(None, pattern=ID_PATTERN, description="the item on the page")
    cart: list[ItemId] = Field(default_factory=list, max_length=100, description="item ids in the cart")


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(..., pattern=ID_PATTERN, examples=["c42"])
    placement: str = Field(..., min_length=1, max_length=64, examples=["home"])
    limit: int | None = Field(None, ge=1, le=100, description="items wanted (default: the placement's)")
    context: RecommendationContext = Field(default_factory=RecommendationContext)


class RecommendedItem(BaseModel):
    item_id: str
    position: int
    score: float
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
