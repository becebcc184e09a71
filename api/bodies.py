"""Request bodies parsed straight from bytes by pydantic-core (the hot path skips FastAPI's body machinery).

Errors keep FastAPI's 422 shape: `{"detail": [{"loc": ["body", ...], "msg": ..., "type": ...}]}`.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Operation:
    """The OpenAPI description of a hand-mounted route (FastAPI only documents its own routes)."""

    path: str
    method: str
    summary: str
    tag: str
    request: type[BaseModel] | None  # None: no body (a GET, its input in `parameters`)
    response: type[BaseModel]
    error: type[BaseModel]
    status: str = "200"
    media_type: str = "application/json"  # of the successful answer; for NDJSON, `response` is one line
    parameters: tuple[dict[str, Any], ...] = ()  # OpenAPI parameter objects (path and query)
    also_returns: tuple[str, ...] = ()  # other media types of the successful answer (e.g. text/html)

    def spec(self) -> dict[str, Any]:
        def ref(model: type[BaseModel], media_type: str = "application/json") -> dict[str, Any]:
            return {media_type: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}

        unavailable = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
        success = ref(self.response, self.media_type) | {media_type: {} for media_type in self.also_returns}
        spec: dict[str, Any] = {
            "tags": [self.tag],
            "summary": self.summary,
            "operationId": f"{self.method}_{self.path.strip('/').replace('/', '_')}",
        }
        if self.parameters:
            spec["parameters"] = [dict(p) for p in self.parameters]
        if self.request is not None:
            spec["requestBody"] = {"required": True, "content": ref(self.request)}
        return spec | {
            "responses": {
                self.status: {"description": "Successful Response", "content": success},
                "422": {"description": "Invalid request; `loc` names the field", "content": ref(self.error)},
                "503": {
                    "description": "Not ready (no model or catalog loaded yet) or the store is unavailable; "
                    "nothing was changed, retry",
                    "content": {"application/json": {"schema": unavailable}},
                },
            },
        }

    @property
    def models(self) -> tuple[type[BaseModel], ...]:
        return tuple(m for m in (self.request, self.response, self.error) if m is not None)


def install_openapi(app: FastAPI, operations: list[Operation]) -> None:
    """Add hand-mounted operations and their models (with what they reference) to the OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for op in operations:
            schema.setdefault("paths", {}).setdefault(op.path, {})[op.method] = op.spec()
            for model in op.models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
