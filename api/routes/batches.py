"""Bodies that carry one object or a batch of them, each validated on its own (a bad one never blocks the rest)."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from api.bodies import BodyError
from api.schemas import MAX_EVENTS_PER_REQUEST

M = TypeVar("M", bound=BaseModel)


def issues(exc: ValidationError, prefix: list[str | int]) -> list[dict[str, Any]]:
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]


def split_batch(raw: bytes, key: str) -> tuple[list[Any], bool]:
    """The objects in a body and whether it was a batch `{key: [...]}`; a malformed envelope is a BodyError."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError([{"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}]) from exc
    if isinstance(doc, dict) and set(doc) == {key}:
        objects = doc[key]
        if not isinstance(objects, list) or not objects:
            raise BodyError([{"loc": ["body", key], "msg": "a non-empty list", "type": "list_type"}])
        if len(objects) > MAX_EVENTS_PER_REQUEST:
            msg = f"at most {MAX_EVENTS_PER_REQUEST} per request"
            raise BodyError([{"loc": ["body", key], "msg": msg, "type": "too_long"}])
        return objects, True
    if isinstance(doc, dict):
        return [doc], False
    raise BodyError([{"loc": ["body"], "msg": f"an object or {{'{key}': [...]}}", "type": "model_type"}])


def validate_each(
    docs: list[Any], batch: bool, model: type[M], key: str, id_field: str
) -> tuple[list[tuple[int, M]], list[dict[str, Any]]]:
    """Valid objects with their index, and the rejected ones named by index and id.

    A single (non-batch) invalid object is a BodyError: the whole request is a 422.
    """
    good: list[tuple[int, M]] = []
    rejected: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        try:
            good.append((i, model.model_validate(doc)))
        except ValidationError as exc:
            if not batch:
                raise BodyError(issues(exc, ["body"])) from exc
            ident = doc.get(id_field) if isinstance(doc, dict) else None
            rejected.append(
                {
                    "index": i,
                    id_field: ident if isinstance(ident, str) else None,
                    "errors": issues(exc, ["body", key, i]),
                }
            )
    return good, rejected
