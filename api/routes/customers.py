"""Customers: consent per channel (kept as evidence, applied to the next decision) and erasure."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path

from api.deps import get_runtime
from api.runtime import Runtime
from api.schemas import ID_PATTERN, ConsentState, ConsentUpdate, ErasureOut, ValidationErrorBody
from engine.types import CONSENT_CHANNELS

router = APIRouter(tags=["customers"])


@router.put(
    "/v1/customers/{customer_id}/consent",
    response_model=ConsentState,
    responses={
        400: {"description": "the body is not UTF-8 text"},
        422: {"model": ValidationErrorBody},
        503: {"description": "store unavailable; nothing changed"},
    },
    summary="Record a consent decision (only the channels given change)",
)
async def put_consent(
    customer_id: Annotated[str, Path(pattern=ID_PATTERN)],
    body: ConsentUpdate,
    runtime: Annotated[Runtime, Depends(get_runtime)],
) -> ConsentState:
    when = body.timestamp or dt.datetime.now(dt.UTC)
    changes = {str(k): v for k, v in body.channels.items()}
    evidence: dict[str, object] = {
        "channels": changes,
        "source": body.source,
        "at": when.isoformat(),
        "recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    held = await runtime.set_consent(customer_id, changes, evidence)
    if held is None:
        raise HTTPException(status_code=503, detail="consent store unavailable; nothing changed, retry")
    return ConsentState(customer_id=customer_id, consents={c: c in held for c in CONSENT_CHANNELS})


@router.delete(
    "/v1/customers/{customer_id}",
    response_model=ErasureOut,
    responses={422: {"model": ValidationErrorBody}, 503: {"description": "store unavailable; nothing erased"}},
    summary="Erase a customer: profile (with the log pseudonym), consent evidence, event history",
)
async def delete_customer(
    customer_id: Annotated[str, Path(pattern=ID_PATTERN)],
    runtime: Annotated[Runtime, Depends(get_runtime)],
) -> ErasureOut:
    erased = await runtime.erase(customer_id)
    if erased is None:
        raise HTTPException(status_code=503, detail="store unavailable; nothing erased, retry")
    return ErasureOut(
        customer_id=customer_id,
        erased=erased,
        decision_log="pseudonymised: entries carry only a random pseudonym, and its link to the customer was deleted"
        if "profile" in erased
        else "no entries: the customer had no profile",
    )
