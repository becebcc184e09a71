"""POST /v1/offers/next-best: the best offers for a customer on a channel, with their explanations."""

from __future__ import annotations

import orjson
from fastapi import Request as HttpRequest
from fastapi.responses import Response
from starlette.routing import Route

from api.bodies import Operation, parse_body
from api.offers import OfferAnswer, OfferRequest, next_best_offers
from api.runtime import NotReadyError, Runtime
from api.schemas import OffersRequest, OffersResponse, ValidationErrorBody
from engine.types import Context


def _body(answer: OfferAnswer, runtime: Runtime) -> bytes:
    offers = runtime.rules.offers
    return orjson.dumps(
        {
            "decision_id": answer.decision_id,
            "offers": [
                {
                    "offer_id": r.offer_id,
                    "title": offers[r.offer_id].title,
                    "priority_class": r.priority_class,
                    "position": pos,
                    "priority": round(r.priority, 6),
                    "explanation": {
                        "propensity": round(r.propensity, 6),
                        "propensity_source": r.propensity_source,
                        "value": r.value,
                        "lever": r.lever,
                        "context_weight": r.context_weight,
                        "segment": answer.segment,
                    },
                }
                for pos, r in enumerate(answer.offers, start=1)
            ],
            "holdout": answer.holdout,
            "held_out": list(answer.held_out),
            "not_shown": answer.refused,
            "fallback": answer.fallback,
            "fallback_reason": answer.fallback_reason,
        }
    )


async def next_best(request: HttpRequest) -> Response:
    runtime: Runtime = request.app.state.runtime
    body = parse_body(await request.body(), OffersRequest)  # a bad body is a 422 before any cap is touched
    if runtime.state is None:
        raise NotReadyError("no catalog loaded yet")
    req = OfferRequest(
        body.customer_id, body.channel, body.limit, Context(body.context.item_id, tuple(body.context.cart))
    )
    answer = await next_best_offers(runtime, req)
    return Response(_body(answer, runtime), media_type="application/json")


ROUTES = [Route("/v1/offers/next-best", next_best, methods=["POST"])]
OPENAPI = [
    Operation(
        path="/v1/offers/next-best",
        method="post",
        summary="The next best offers for a customer on a channel, with explanations",
        tag="decisions",
        request=OffersRequest,
        response=OffersResponse,
        error=ValidationErrorBody,
    )
]
