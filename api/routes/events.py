"""POST /v1/events: live shop events into profiles, idempotent by event id, visible to the next decision."""

from __future__ import annotations

import orjson
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from api.bodies import Operation
from api.routes.batches import split_batch, validate_each
from api.runtime import Runtime
from api.schemas import EventIn, EventsRequest, EventsResponse, ValidationErrorBody
from feature_store.ingest import LiveEvent


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
    docs, batch = split_batch(await request.body(), "events")
    good, rejected = validate_each(docs, batch, EventIn, "events", "event_id")
    statuses = await runtime.ingest([_live(e) for _, e in good]) if good else []
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
