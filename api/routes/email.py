"""Email connected content: slots per recipient (JSON or HTML), signed click links, NDJSON batch."""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from api import metrics
from api.bodies import Operation, parse_body
from api.deps import get_runtime
from api.email import SlotsRequest
from api.email_batch import batch_lines
from api.email_render import target_url
from api.runtime import Runtime
from api.schemas import (
    CAMPAIGN_PATTERN,
    ID_PATTERN,
    EmailBatchIn,
    EmailBatchLine,
    EmailSlotsOut,
    ValidationErrorBody,
)
from api.signing import InvalidTokenError

router = APIRouter(tags=["email"])
_ID = re.compile(ID_PATTERN)
_CAMPAIGN = re.compile(CAMPAIGN_PATTERN)
_INTEGER = re.compile(r"[+-]?[0-9]{1,6}")
MAX_SLOTS = 100
DEFAULT_EMAIL_PLACEMENT = "email:weekly"


def _invalid(where: str, field: str, msg: str) -> JSONResponse:
    return JSONResponse(
        status_code=422, content={"detail": [{"loc": [where, field], "msg": msg, "type": "value_error"}]}
    )


def _check_placement(runtime: Runtime, where: str, placement: str, slots: int | None) -> JSONResponse | int:
    p = runtime.rules.placements.get(placement)
    if p is None:
        return _invalid(
            where, "placement", f"unknown placement {placement!r}; known: {', '.join(sorted(runtime.rules.placements))}"
        )
    n = slots or p.default_limit
    if n > p.max_limit:
        return _invalid(where, "slots", f"at most {p.max_limit} for placement {placement!r}")
    return n


def _slots_count(text: str | None) -> int | JSONResponse | None:
    """The `slots` query parameter: absent, or an integer within [1, 100]."""
    if text is None:
        return None
    if not _INTEGER.fullmatch(text):
        return _invalid("query", "slots", "Input should be a valid integer")
    n = int(text)
    if not 1 <= n <= MAX_SLOTS:
        return _invalid("query", "slots", f"Input should be between 1 and {MAX_SLOTS}")
    return n


async def email_slots(request: HttpRequest) -> Response:
    """The connected-content call. A plain Starlette route: ESPs call it thousands of times a second at
    send time, and FastAPI's parameter machinery would cost a tenth of the call; the checks below are
    the documented parameter schemas (`SLOTS_PARAMETERS`), and the fuzzing test holds them to it."""
    runtime: Runtime = request.app.state.runtime
    campaign_id, customer_id = request.path_params["campaign_id"], request.path_params["customer_id"]
    if not _CAMPAIGN.fullmatch(campaign_id):
        return _invalid("path", "campaign_id", f"String should match pattern '{CAMPAIGN_PATTERN}'")
    if not _ID.fullmatch(customer_id):
        return _invalid("path", "customer_id", "1-128 characters, no spaces or braces")
    query = request.query_params
    placement = query.get("placement", DEFAULT_EMAIL_PLACEMENT)
    if not 1 <= len(placement) <= 64:
        return _invalid("query", "placement", "String should have 1 to 64 characters")
    fmt = query.get("format", "json")
    if fmt not in ("json", "html"):
        return _invalid("query", "format", "Input should be 'json' or 'html'")
    slots = _slots_count(query.get("slots"))
    if isinstance(slots, JSONResponse):
        return slots
    checked = _check_placement(runtime, "query", placement, slots)
    if isinstance(checked, JSONResponse):
        return checked
    answer = await runtime.email.slots(SlotsRequest(campaign_id, customer_id, placement, checked))
    state = runtime.state
    assert state is not None  # email.slots raised NotReadyError otherwise
    body = runtime.email_renderer.body(answer, state)
    if fmt == "html":
        return HTMLResponse(runtime.email_renderer.html(body))
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/v1/email/click/{token}",
    status_code=302,
    response_class=RedirectResponse,  # documents the 302 without a body
    responses={
        302: {"description": "to the product page with UTM parameters"},
        403: {
            "description": "bad link (forged, altered or signed with a retired key)",
            "content": {"application/json": {"schema": {"properties": {"detail": {"type": "string"}}}}},
        },
    },
    summary="Follow a signed email link: records the click, then redirects",
)
async def email_click(
    token: Annotated[str, Path(max_length=1024)], runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    try:
        click = runtime.email_signer.verify(token)
    except InvalidTokenError as exc:
        metrics.EMAIL_CLICKS.labels("refused").inc()
        return JSONResponse(status_code=403, content={"detail": f"invalid link: {exc}"})
    state = runtime.state
    if state is None:
        return RedirectResponse(runtime.rules.email.shop_url, status_code=302)
    if click.decision_id:
        result = await runtime.feedback(click.decision_id, click.target, "click", 1.0)
        # The customer always gets to the shop; what happened to the click is counted.
        metrics.EMAIL_CLICKS.labels(result.status if result is not None else "store_unavailable").inc()
    return RedirectResponse(target_url(runtime.rules, state, click), status_code=302)


async def email_batch(request: HttpRequest) -> Response:
    runtime: Runtime = request.app.state.runtime
    body = parse_body(await request.body(), EmailBatchIn)
    checked = _check_placement(runtime, "body", body.placement, body.slots)
    if isinstance(checked, JSONResponse):
        return checked
    lines = batch_lines(runtime, body.campaign_id, body.placement, checked, body.recipients)
    return StreamingResponse(lines, media_type="application/x-ndjson")


SLOTS_PATH = "/v1/email/slots/{campaign_id}/{customer_id}"
SLOTS_PARAMETERS: tuple[dict[str, Any], ...] = (
    {"name": "campaign_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": CAMPAIGN_PATTERN}},
    {"name": "customer_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN}},
    {
        "name": "placement",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 64, "default": DEFAULT_EMAIL_PLACEMENT},
    },
    {
        "name": "slots",
        "in": "query",
        "required": False,
        "description": "product slots (default: the placement's)",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SLOTS},
    },
    {
        "name": "format",
        "in": "query",
        "required": False,
        "description": "json (default), or html: a ready table-based block for ESPs that cannot loop",
        "schema": {"type": "string", "enum": ["json", "html"], "default": "json"},
    },
)
ROUTES = [
    Route(SLOTS_PATH, email_slots, methods=["GET"]),
    Route("/v1/email/slots:batch", email_batch, methods=["POST"]),
]
OPENAPI = [
    Operation(
        path=SLOTS_PATH,
        method="get",
        summary="Personalised email slots for one recipient (the same content on every later call)",
        tag="email",
        request=None,
        response=EmailSlotsOut,
        error=ValidationErrorBody,
        parameters=SLOTS_PARAMETERS,
        also_returns=("text/html",),
    ),
    Operation(
        path="/v1/email/slots:batch",
        method="post",
        summary="Email slots for many recipients of a campaign, streamed as NDJSON (one line per recipient)",
        tag="email",
        request=EmailBatchIn,
        response=EmailBatchLine,
        error=ValidationErrorBody,
        media_type="application/x-ndjson",
    ),
]
