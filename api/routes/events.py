"""POST /v1/events: live shop events into profiles, idempotent by event id, visible to the next decision."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.routing import Route

from api.bodies import BodyError, Operation
from api.runtime import Runtime
from api.schemas import MAX_EVENTS_PER_REQUEST, EventIn, EventsRequest, EventsResponse, ValidationErrorBody
from feature_store.ingest import LiveEvent


def _issues(exc: ValidationError, prefix: list[str | int]) -> list[dict[str, Any]]:
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]


def _split(raw: bytes) -> tuple[list[Any], bool]:
    """The event objects in a body, and whether it was a batch; a malformed envelope is a BodyError."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError([{"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}]) from exc
    if isinstance(doc, dict) and set(doc) == {"events"}:
        events = doc["events"]
        if not isinstance(events, list) or not events:
            raise BodyError([{"loc": ["body", "events"], "msg": "a non-empty list of events", "type": "list_type"}])
        if len(events) > MAX_EVENTS_PER_REQUEST:
            raise BodyError(
                [
                    {
                        "loc": ["body", "events"],
                        "msg": f"at most {MAX_EVENTS_PER_REQUEST} events per request",
                        "type": "too_long",
                    }
                ]
            )
        return events, True
    if isinstance(doc, dict):
        return [doc], False
    raise BodyError([{"loc": ["body"], "msg": "an event object or {'events': [...]}", "type": "model_type"}])


def _live(e: EventIn) -> LiveEvent:
    return LiveEvent(
        event_id=e.event_id,
        customer_id=e.customer_id,
        type=e.type,
        item_id=e.item_id or "",
        quantity=e.quantity,
        price=e.price,
        timestamp=int(e.timestamp.timestamp()),
    )


async def events(request: HttpRequest) -> Response:
    runtime: Runtime = request.app.state.runtime
    docs, batch = _split(await request.body())
    good: list[LiveEvent] = []
    rejected: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        try:
            good.append(_live(EventIn.model_validate(doc)))
        except ValidationError as exc:
            if not batch:
                raise BodyError(_issues(exc, ["body"])) from exc
            event_id = doc.get("event_id") if isinstance(doc, dict) else None
            rejected.append(
                {
                    "index": i,
                    "event_id": event_id if isinstance(event_id, str) else None,
                    "errors": _issues(exc, ["body", "events", i]),
                }
            )
    statuses = await runtime.ingest(good) if good else []
    if statuses is None:
        # Nothing was written: the caller retries the whole request (event ids make that safe).
        return JSONResponse(
            status_code=503, content={"detail": "event store unavailable; retry"}, headers={"Retry-After": "1"}
        )
    accepted = sum(statuses)
    body = {"accepted": accepted, "duplicates": len(statuses) - accepted, "rejected": rejected}
    return Response(orjson.dumps(body), status_code=202, media_type="application/json")


ROUTES = [Route("/v1/events", events, methods=["POST"])]
OPENAPI = [
    Operation(
        path="/v1/events",
        method="post",
        summary="Ingest one event or a batch; idempotent by event_id",
        tag="ingest",
        request=EventsRequest,
        response=EventsResponse,
        error=ValidationErrorBody,
        status="202",
    )
]
