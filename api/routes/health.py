"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from api import metrics
from api.deps import get_runtime
from api.runtime import Runtime

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis reachable and a model loaded",
    responses={503: {"description": "not ready: the same body, saying what is missing"}},
)
async def readyz(runtime: Annotated[Runtime, Depends(get_runtime)]) -> JSONResponse:
    body = await runtime.readiness()
    return JSONResponse(status_code=200 if body["ready"] else 503, content=body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def prometheus() -> Response:
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)
