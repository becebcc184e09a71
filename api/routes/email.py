"""Email connected content: slots per recipient (JSON or HTML), signed click links, NDJSON batch."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from api import metrics
from api.bodies import Operation, parse_body
from api.deps import get_runtime
from api.email import SlotsRequest
from api.email_render import target_url
from api.runtime import Runtime
from api.schemas import (
    CAMPAIGN_PATTERN,
    ID_PATTERN,
    EmailBatchIn,
    EmailBatchLine,
    EmailSlotsOut,
    ValidationErrorBody,
)
from api.signing import InvalidTokenError

router = APIRouter(tags=["email"])
BATCH_CHUNK = 256  # recipients per round trip
CHUNKS_IN_FLIGHT = 2  # a batch decides one chunk while the one before waits on Redis
_RUNNING: set[asyncio.Task[bytes]] = set()  # chunks in flight, held until done (the loop keeps weak references)
_ID = re.compile(ID_PATTERN)


def _invalid(where: str, field: str, msg: str) -> JSONResponse:
    return JSONResponse(
        status_code=422, content={"detail": [{"loc": [where, field], "msg": msg, "type": "value_error"}]}
    )


def _check_placement(runtime: Runtime, where: str, placement: str, slots: int | None) -> JSONResponse | int:
    p = runtime.rules.placements.get(placement)
    if p is None:
        return _invalid(
            where, "placement", f"unknown placement {placement!r}; known: {', '.join(sorted(runtime.rules.placements))}"
        )
    n = slots or p.default_limit
    if n > p.max_limit:
        return _invalid(where, "slots", f"at most {p.max_limit} for placement {placement!r}")
    return n


@router.get(
    "/v1/email/slots/{campaign_id}/{customer_id}",
    response_model=EmailSlotsOut,
    responses={
        200: {"content": {"text/html": {}}, "description": "JSON by default; an HTML table with format=html"},
        422: {"model": ValidationErrorBody},
        503: {"description": "not ready: no model or catalog loaded yet"},
    },
    summary="Personalised email slots for one recipient (the same content on every later call)",
)
async def email_slots(
    campaign_id: Annotated[str, Path(pattern=CAMPAIGN_PATTERN)],
    customer_id: Annotated[str, Path(pattern=ID_PATTERN)],
    runtime: Annotated[Runtime, Depends(get_runtime)],
    placement: Annotated[str, Query(min_length=1, max_length=64)] = "email:weekly",
    slots: Annotated[int | None, Query(ge=1, le=100, description="product slots (default: the placement's)")] = None,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> Response:
    checked = _check_placement(runtime, "query", placement, slots)
    if isinstance(checked, JSONResponse):
        return checked
    answer = await runtime.email.slots(SlotsRequest(campaign_id, customer_id, placement, checked))
    state = runtime.state
    assert state is not None  # email.slots raised NotReadyError otherwise
    body = runtime.email_renderer.body(answer, state)
    if format == "html":
        return HTMLResponse(runtime.email_renderer.html(body))
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/v1/email/click/{token}",
    status_code=302,
    response_class=RedirectResponse,  # documents the 302 without a body
    responses={
        302: {"description": "to the product page with UTM parameters"},
        403: {
            "description": "bad link (forged, altered or signed with a retired key)",
            "content": {"application/json": {"schema": {"properties": {"detail": {"type": "string"}}}}},
        },
    },
    summary="Follow a signed email link: records the click, then redirects",
)
async def email_click(
    token: Annotated[str, Path(max_length=1024)], runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    try:
        click = runtime.email_signer.verify(token)
    except InvalidTokenError as exc:
        metrics.EMAIL_CLICKS.labels("refused").inc()
        return JSONResponse(status_code=403, content={"detail": f"invalid link: {exc}"})
    state = runtime.state
    if state is None:
        return RedirectResponse(runtime.rules.email.shop_url, status_code=302)
    if click.decision_id:
        result = await runtime.feedback(click.decision_id, click.target, "click", 1.0)
        # The customer always gets to the shop; what happened to the click is counted.
        metrics.EMAIL_CLICKS.labels(result.status if result is not None else "store_unavailable").inc()
    return RedirectResponse(target_url(runtime.rules, state, click), status_code=302)


def _recipient(entry: Any) -> str:
    if isinstance(entry, dict):
        extra = set(entry) - {"customer_id"}
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)}")
        entry = entry.get("customer_id")
    if not isinstance(entry, str) or not _ID.fullmatch(entry):  # fullmatch: `$` also matches before a final \n
        raise ValueError('a customer id (1-128 characters, no spaces or braces) or {"customer_id": ...}')
    return entry


async def email_batch(request: HttpRequest) -> Response:
    runtime: Runtime = request.app.state.runtime
    body = parse_body(await request.body(), EmailBatchIn)
    checked = _check_placement(runtime, "body", body.placement, body.slots)
    if isinstance(checked, JSONResponse):
        return checked
    n_slots = checked

    async def chunk_lines(start: int, chunk: list[Any]) -> bytes:
        good: list[tuple[int, SlotsRequest]] = []
        out: dict[int, bytes] = {}
        for k, entry in enumerate(chunk, start=start):
            try:
                cid = _recipient(entry)
            except ValueError as exc:
                out[k] = orjson.dumps(
                    {"index": k, "customer_id": None, "error": f"recipients[{k}]: {exc}", "content": None}
                )
                continue
            good.append((k, SlotsRequest(body.campaign_id, cid, body.placement, n_slots)))
        answers = await runtime.email.slots_many([r for _, r in good])
        state = runtime.state
        assert state is not None
        for (k, r), answer in zip(good, answers, strict=True):
            content = runtime.email_renderer.body(answer, state)
            out[k] = orjson.dumps({"index": k, "customer_id": r.customer_id, "error": None, "content": content})
        return b"".join(out[k] + b"\n" for k in sorted(out))

    async def lines() -> AsyncIterator[bytes]:
        # Chunks overlap: while one waits on Redis (read, caps, store, log), the next one is decided. Lines
        # still go out in recipient order. A chunk in flight when the client goes away still finishes, so
        # what it decided is stored and logged (a later call reads it back).
        in_flight: deque[asyncio.Task[bytes]] = deque()
        for start in range(0, len(body.recipients), BATCH_CHUNK):
            task = asyncio.create_task(chunk_lines(start, body.recipients[start : start + BATCH_CHUNK]))
            _RUNNING.add(task)
            task.add_done_callback(_RUNNING.discard)
            in_flight.append(task)
            if len(in_flight) >= CHUNKS_IN_FLIGHT:
                yield await in_flight.popleft()
        while in_flight:
            yield await in_flight.popleft()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


ROUTES = [Route("/v1/email/slots:batch", email_batch, methods=["POST"])]
OPENAPI = [
    Operation(
        path="/v1/email/slots:batch",
        method="post",
        summary="Email slots for many recipients of a campaign, streamed as NDJSON (one line per recipient)",
        tag="email",
        request=EmailBatchIn,
        response=EmailBatchLine,
        error=ValidationErrorBody,
        media_type="application/x-ndjson",
    )
]
