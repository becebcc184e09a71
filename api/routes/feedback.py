"""POST /v1/feedback: rewards for logged decisions, joined by decision id, idempotent."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse

from api.deps import get_runtime
from api.runtime import Runtime
from api.schemas import FeedbackIn, FeedbackOut, ValidationErrorBody

router = APIRouter(tags=["ingest"])


def _refused(field: str, msg: str) -> JSONResponse:
    return JSONResponse(
        status_code=422, content={"detail": [{"loc": ["body", field], "msg": msg, "type": "value_error"}]}
    )


@router.post(
    "/v1/feedback",
    status_code=202,
    response_model=FeedbackOut,
    responses={
        400: {"description": "the body is not UTF-8 text"},
        422: {"model": ValidationErrorBody},
        503: {"description": "store unavailable; nothing recorded"},
    },
    summary="Record a reward (click, add to cart, purchase, or a number) for a shown action",
)
async def post_feedback(
    body: FeedbackIn, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> FeedbackOut | JSONResponse:
    reward_type, reward = body.reward_type_and_value()
    result = await runtime.feedback(body.decision_id, body.action, reward_type, reward)
    if result is None:
        raise HTTPException(status_code=503, detail="feedback store unavailable; nothing recorded, retry")
    if result.status == "unknown":
        window = runtime.settings.feedback_window_s
        return _refused("decision_id", f"unknown decision id, or older than the feedback window ({window} s)")
    if result.status == "not_shown":
        return _refused("action", f"{body.action!r} was not shown in decision {body.decision_id}")
    return FeedbackOut(
        status="accepted" if result.status == "ok" else "duplicate",
        decision_id=body.decision_id,
        action=body.action,
        reward_type=reward_type,
        reward=reward,
        counted_as_success=result.counted_as_success,
    )
