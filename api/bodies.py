"""Request bodies parsed straight from bytes by pydantic-core (the hot path skips FastAPI's body machinery).

Errors keep FastAPI's 422 shape: `{"detail": [{"loc": ["body", ...], "msg": ..., "type": ...}]}`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class BodyError(Exception):
    """A request body that failed validation; carries FastAPI-shaped error entries."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors


def parse_body(raw: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise BodyError(
            [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]
        ) from exc


def body_spec(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself, so the docs still show the schema."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the hand-parsed body models (and what they reference) to the OpenAPI components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
