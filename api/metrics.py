"""Prometheus metrics; aggregated across uvicorn workers when PROMETHEUS_MULTIPROC_DIR is set."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)

DECISION_LATENCY = Histogram(
    "nextbest_decision_seconds", "Time to answer a decision request", ["placement"], buckets=LATENCY_BUCKETS
)
DECISIONS = Counter("nextbest_decisions_total", "Decisions served", ["placement"])
FALLBACKS = Counter("nextbest_fallbacks_total", "Decisions answered with fallback content", ["placement", "reason"])
REDIS_ERRORS = Counter("nextbest_redis_errors_total", "Failed or timed-out Redis calls", ["operation"])
UNLOGGED = Counter(
    "nextbest_decisions_unlogged_total", "Decisions answered but not in the decision log", ["placement", "reason"]
)
FEEDBACK = Counter("nextbest_feedback_total", "Feedback received by POST /v1/feedback", ["result"])
EVENTS = Counter("nextbest_events_total", "Events received by POST /v1/events", ["result"])
EMAIL_SLOTS = Counter(
    "nextbest_email_slots_total",
    "Email slot answers: decided (first call), stored (read back), replaced, race_lost, fallback",
    ["result"],
)
EMAIL_BATCH_CHUNKS = Counter(
    "nextbest_email_batch_chunks_total",
    "Pre-send batch chunks by where they were decided (here, on a peer worker, here after the peer failed)",
    ["decided_by"],
)
EMAIL_CLICKS = Counter("nextbest_email_clicks_total", "Email click links followed", ["result"])
RULES_LOADS = Counter("nextbest_rules_loads_total", "Rules file reloads", ["result"])
MODEL_LOADS = Counter("nextbest_model_loads_total", "Model version loads", ["result"])
MODEL_INFO = Gauge("nextbest_model_info", "1 for the model version being served", ["version"], multiprocess_mode="max")
CATALOG_ITEMS = Gauge("nextbest_catalog_items", "Items in the in-memory catalog", multiprocess_mode="max")
BREAKER_OPEN = Gauge(
    "nextbest_redis_circuit_open", "1 while the Redis circuit breaker is open", multiprocess_mode="max"
)


def start_metrics_server(port: int, host: str) -> None:
    """/metrics on its own port (no API key: bind it where only the scraper reaches), summed over workers."""
    from prometheus_client import REGISTRY, start_http_server

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


_current_version: str | None = None


def set_model_version(version: str | None) -> None:
    global _current_version
    if _current_version is not None:
        MODEL_INFO.labels(_current_version).set(0)
    if version is not None:
        MODEL_INFO.labels(version).set(1)
    _current_version = version
