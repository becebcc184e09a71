"""POST /v1/admin/reload: re-read the rules file, the registry's live version and the catalog now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.deps import get_runtime
from api.runtime import Runtime

router = APIRouter(tags=["admin"])


@router.post(
    "/v1/admin/reload",
    summary="Reload rules, model and catalog now instead of at the next refresh; 409 if the rules file is invalid",
    responses={409: {"description": "the rules file on disk is invalid; the previous rules keep serving"}},
)
async def reload(runtime: Annotated[Runtime, Depends(get_runtime)]) -> JSONResponse:
    await runtime.refresh()
    body = await runtime.readiness()
    return JSONResponse(status_code=409 if body["rules_error"] else 200, content=body)
