"""Property-based fuzzing of the whole OpenAPI (schemathesis) against the real app, Redis and models.

For every documented operation, generated requests (valid and invalid) must never get a 5xx, every
response must be documented (status code, content type, body schema, NDJSON lines included), and a
request the API rejects with a 4xx must not have written anything to Redis.

"Nothing written" is observed, not guessed: Redis keyspace notifications report every write to a key
of this test's prefix. Around each request the app's pending writes (decision log replies checked off
the request path) are awaited, then a barrier message is published and the notification channel read
up to it. Redis sends a notification while it runs the command, on the subscriber's one connection, so
everything the app wrote before the barrier was published is seen before the barrier comes back.
"""

from __future__ import annotations

import collections
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jsonschema_rs
import orjson
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi as st_asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from api.runtime import Runtime
from api.settings import Settings
from feature_store.keys import Keys
from tests.conftest import Trained, load_shop

EXAMPLES = 30  # per operation; keeps the whole file at about half a minute on 2 cores

# 422s that a schema-valid request may get: the field's validity depends on the rules file (placements
# and their limits) or on stored state (logged decisions, existing items), which no static schema says.
DEPENDS_ON_STATE: dict[str, set[tuple[str | int, ...]]] = {
    "POST /v1/recommendations": {("body", "placement"), ("body", "limit")},
    "GET /v1/email/slots/{campaign_id}/{customer_id}": {("query", "placement"), ("query", "slots")},
    "POST /v1/email/slots:batch": {("body", "placement"), ("body", "slots")},
    "POST /v1/feedback": {("body", "decision_id"), ("body", "action")},
    "POST /v1/catalog/items": {("body", "items", 0)},  # a new item without its required fields
}


@dataclass
class WriteWatch:
    """Sees every write to the keys under a prefix, through Redis keyspace notifications."""

    client: redis.Redis
    prefix: str
    runtime: Runtime
    pubsub: Any = None
    barrier: str = field(default_factory=lambda: f"fuzz-barrier:{uuid.uuid4().hex}")
    previous_config: str = ""

    def start(self) -> None:
        self.previous_config = str(self.client.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))
        self.client.config_set("notify-keyspace-events", "KA")
        db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@{db}__:{self.prefix}:*")
        self.pubsub.subscribe(self.barrier)

    def stop(self) -> None:
        self.pubsub.close()
        self.client.config_set("notify-keyspace-events", self.previous_config)

    def _settle(self) -> None:
        """Wait until the app has the replies of the writes it checks off the request path."""
        deadline = time.monotonic() + 5.0
        while self.runtime._log_writes and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not self.runtime._log_writes, "decision log writes did not complete within 5 s"

    def drain(self) -> list[tuple[str, str]]:
        """Every write since the last drain, as (key, event) pairs; expirations are Redis's doing."""
        self._settle()
        token = uuid.uuid4().hex
        self.client.publish(self.barrier, token)
        writes: list[tuple[str, str]] = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=0.5)
            if msg is None:
                continue
            channel, data = _text(msg["channel"]), _text(msg["data"])
            if channel == self.barrier:
                if data == token:
                    return writes
            elif data not in ("expired", "evicted"):
                writes.append((channel.split(":", 1)[1], data))
        raise AssertionError("the barrier message did not come back within 5 s")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document. It depends on the code alone, so an app that never starts can give it
    (schemathesis needs it when the tests are collected, before any fixture exists)."""
    return create_app(Settings(registry_dir=Path("/nonexistent")), redis_url="redis://127.0.0.1:1").openapi()


SPEC = _openapi_document()
STATUSES: dict[str, collections.Counter[int]] = {}  # what the fuzzing got, per operation
schema = schemathesis.openapi.from_dict(SPEC)


@dataclass
class Target:
    app: Any
    watch: WriteWatch


@pytest.fixture(scope="module")
def target(
    redis_url: str, shop_dir: Path, trained: Trained, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    keys = Keys(f"fz{uuid.uuid4().hex[:10]}")
    registry = tmp_path_factory.mktemp("fuzz") / "registry"
    shutil.copytree(trained.registry.root, registry)
    load_shop(redis_url, keys, shop_dir)
    # No background refresh while fuzzing: it writes bandit impressions of earlier decisions at any time.
    config = Settings(registry_dir=registry, key_prefix=keys.prefix, refresh_interval_s=3600, arms_refresh_s=3600)
    app = create_app(config, redis_url=redis_url)
    assert app.openapi() == SPEC
    with st_asgi.get_client(cast(Any, app)) as http:  # starts the app's lifespan (model, catalog, signing key) first
        assert http.get(f"http://{st_asgi.HOST}/readyz").json()["ready"] is True
    client = redis.Redis.from_url(redis_url)
    watch = WriteWatch(client, keys.prefix, app.state.runtime)
    watch.start()
    try:
        yield Target(app, watch)
    finally:
        watch.stop()
        st_asgi.shutdown_lifespans()
        for key in client.scan_iter(f"{keys.prefix}:*", count=1000):
            client.delete(key)
        client.close()


def schema_valid_requests_are_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's own check, except for a 422 naming only fields that depend on rules or state."""
    if case.meta is not None and case.meta.generation.mode.is_positive and response.status_code == 422:
        named = {tuple(issue["loc"]) for issue in orjson.loads(response.content)["detail"]}
        if named and named <= DEPENDS_ON_STATE.get(case.operation.label, set()):
            return None
    return positive_data_acceptance(ctx, response, case)


def ndjson_lines_conform(ctx: Any, response: Any, case: Any) -> bool | None:
    """A streamed NDJSON body: every line must match the schema documented for one line."""
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("application/x-ndjson"):
        return None
    responses = SPEC["paths"][case.operation.path][case.method.lower()]["responses"]
    media = responses.get(str(response.status_code), {}).get("content", {}).get("application/x-ndjson")
    assert media is not None, f"NDJSON with status {response.status_code} is not documented"
    validator = jsonschema_rs.validator_for({**media["schema"], "components": SPEC["components"]})
    lines = response.content.splitlines()
    assert lines, "an empty NDJSON stream"
    for n, line in enumerate(lines, start=1):
        errors = [e.message for e in validator.iter_errors(orjson.loads(line))]
        assert not errors, f"NDJSON line {n} does not match its documented schema: {errors}"
    return True


@schema.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_no_request_gets_a_5xx_an_undocumented_answer_or_writes_when_rejected(case: Any, target: Target) -> None:
    target.watch.drain()  # what earlier, accepted requests wrote is not this request's doing
    response = case.call(app=target.app)
    writes = target.watch.drain()
    STATUSES.setdefault(case.operation.label, collections.Counter())[response.status_code] += 1
    if 400 <= response.status_code < 500:
        assert not writes, f"{case.operation.label} answered {response.status_code} but wrote to Redis: {writes}"
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[schema_valid_requests_are_accepted, ndjson_lines_conform],
    )


def _checked(target: Target, path: str, method: str, **data: Any) -> tuple[Any, list[tuple[str, str]]]:
    """One hand-made request through the same checks as the fuzzing; its answer and what it wrote."""
    case = schema[path][method].Case(**data)
    target.watch.drain()
    response = case.call(app=target.app)
    writes = target.watch.drain()
    case.validate_response(response, additional_checks=[ndjson_lines_conform])
    return response, writes


def test_the_write_watch_sees_what_an_accepted_request_writes(target: Target) -> None:
    body = {"event_id": f"e-{uuid.uuid4().hex}", "customer_id": "watch-1", "type": "email_open", "timestamp": 0}
    response, writes = _checked(target, "/v1/events", "POST", body=body)
    assert response.status_code == 202
    assert any(key.endswith(":{c:watch-1}:profile") for key, _ in writes), writes


def test_feedback_rejected_for_an_action_not_shown_writes_nothing(target: Target) -> None:
    shown, _ = _checked(target, "/v1/recommendations", "POST", body={"customer_id": "fb-1", "placement": "home"})
    decision = shown.json()
    bad, writes = _checked(
        target,
        "/v1/feedback",
        "POST",
        body={"decision_id": decision["decision_id"], "action": "never-shown", "reward": "click"},
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "action"]
    assert writes == []
    item = decision["items"][0]["item_id"]
    body = {"decision_id": decision["decision_id"], "action": item, "reward": "purchase", "value": 12.5}
    good, writes = _checked(target, "/v1/feedback", "POST", body=body)
    assert good.status_code == 202 and good.json()["status"] == "accepted" and writes


def test_a_signed_click_link_redirects_and_a_tampered_one_is_refused_unwritten(target: Target) -> None:
    path = "/v1/email/slots/{campaign_id}/{customer_id}"
    slots, _ = _checked(target, path, "GET", path_parameters={"campaign_id": "fuzz-1", "customer_id": "click-1"})
    token = slots.json()["slots"][0]["click_url"].rsplit("/", 1)[1]
    click, _ = _checked(target, "/v1/email/click/{token}", "GET", path_parameters={"token": token})
    assert click.status_code == 302
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    refused, writes = _checked(target, "/v1/email/click/{token}", "GET", path_parameters={"token": forged})
    assert refused.status_code == 403 and writes == []


def test_every_operation_was_fuzzed_with_rejected_requests() -> None:
    operations = {f"{m.upper()} {p}" for p, ops in SPEC["paths"].items() for m in ops}
    if set(STATUSES) != operations:
        pytest.skip("only with the whole fuzz run")
    never_rejected = [op for op, seen in STATUSES.items() if not any(400 <= code < 500 for code in seen)]
    assert not never_rejected
