"""POST /v1/catalog/items: price, stock, cost and active flags from the shop, live on the next request."""

from __future__ import annotations

import orjson
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from api.bodies import Operation
from api.routes.batches import split_batch, validate_each
from api.runtime import Runtime
from api.schemas import ItemPatch, ItemsRequest, ItemsResponse, ValidationErrorBody


async def upsert_items(request: HttpRequest) -> Response:
    runtime: Runtime = request.app.state.runtime
    docs, batch = split_batch(await request.body(), "items")
    good, rejected = validate_each(docs, batch, ItemPatch, "items", "item_id")
    patches = [(p.item_id, p.changes()) for _, p in good]
    result = await runtime.upsert_items(patches) if patches else None
    if patches and result is None:
        return JSONResponse(
            status_code=503, content={"detail": "catalog store unavailable; retry"}, headers={"Retry-After": "1"}
        )
    unknown = set(result.unknown) if result else set()
    for i, p in good:
        if p.item_id in unknown:
            msg = "new item: title, category, price, cost and stock are required"
            rejected.append(
                {
                    "index": i,
                    "item_id": p.item_id,
                    "errors": [{"loc": ["body", "items", i], "msg": msg, "type": "missing"}],
                }
            )
    if not batch and rejected:
        return JSONResponse(status_code=422, content={"detail": rejected[0]["errors"]})
    body = {
        "catalog_version": result.version if result else 0,
        "created": result.created if result else [],
        "updated": result.updated if result else [],
        "rejected": sorted(rejected, key=lambda r: int(r["index"])),
    }
    return Response(orjson.dumps(body), media_type="application/json")


ROUTES = [Route("/v1/catalog/items", upsert_items, methods=["POST"])]
OPENAPI = [
    Operation(
        path="/v1/catalog/items",
        method="post",
        summary="Upsert catalog items (one or a batch); every worker sees the change on its next request",
        tag="ingest",
        request=ItemsRequest,
        response=ItemsResponse,
        error=ValidationErrorBody,
    )
]
