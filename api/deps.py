"""Shared FastAPI dependencies (async: a sync dependency would cost a thread hop per request)."""

from __future__ import annotations

from fastapi import Request

from api.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
