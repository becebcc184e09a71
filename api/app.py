"""The FastAPI application factory (uvicorn runs `api.app:create_app` with factory=True)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.auth import ApiKeyAuth, document_security, parse_keys
from api.bodies import BodyError, install_openapi
from api.routes import admin, catalog, customers, email, events, feedback, health, offers, recommendations
from api.runtime import NotReadyError, Runtime
from api.settings import Settings, get_settings

log = logging.getLogger("nextbest")


def create_app(settings: Settings | None = None, redis_url: str | None = None) -> FastAPI:
    settings = settings or get_settings()
    url = redis_url or settings.redis_url
    if url is None:
        raise RuntimeError("REDIS_URL is not set (`nextbest serve` starts the embedded Redis and sets it)")
    runtime = Runtime(settings, url)  # invalid rules fail here, before the port opens
    keys = parse_keys(settings.api_keys.get_secret_value() if settings.api_keys else None)
    if not keys:
        log.warning("NEXTBEST_API_KEYS is not set: the API is open to every caller (fine for a local demo only)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        yield
        await runtime.stop()

    app = FastAPI(
        title="nextbest",
        version="0.1.0",
        description="Real-time personalization decisions for online shops.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.router.routes.extend([*recommendations.ROUTES, *offers.ROUTES, *events.ROUTES, *catalog.ROUTES, *email.ROUTES])
    app.include_router(customers.router)
    app.include_router(feedback.router)
    app.include_router(email.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    install_openapi(app, [*recommendations.OPENAPI, *offers.OPENAPI, *events.OPENAPI, *catalog.OPENAPI, *email.OPENAPI])

    @app.exception_handler(BodyError)
    async def invalid_body(_request: Request, exc: BodyError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": exc.errors})

    @app.exception_handler(NotReadyError)
    async def not_ready(_request: Request, exc: NotReadyError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"not ready: {exc}"})

    if keys:
        app.add_middleware(ApiKeyAuth, keys=keys)  # type: ignore[arg-type]
        plain_openapi = app.openapi
        app.openapi = lambda: document_security(plain_openapi())  # type: ignore[method-assign]
    return app
