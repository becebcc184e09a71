"""`nextbest bench ingest`: POST /v1/events under open-loop load, and a count that nothing accepted was lost.

Every event id in the run is unique, so after each rate the events stored in Redis (the per-customer
dedupe sets, pipelined ZCARDs) must equal the events the server answered 202 for.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import redis
from rich.console import Console

from benchmarks.latency import free_port, start_server
from benchmarks.loadgen import LoadResult, Request, run_rate_sweep
from benchmarks.report import Report
from feature_store.keys import Keys

P99_BUDGET_MS = 50.0
TYPES = ("view_item", "view_item", "view_item", "add_to_cart", "purchase", "email_click")


@dataclass(frozen=True)
class IngestSpec:
    events_per_s: tuple[float, ...]
    batch: int
    duration_s: float
    customers: int
    items: int
    seed: int = 7


FULL = IngestSpec((2_500, 5_000, 10_000, 15_000, 20_000), 50, 15.0, 100_000, 5_000)
QUICK = IngestSpec((1_000,), 50, 3.0, 5_000, 500)


def _bodies(spec: IngestSpec, rate: float, n_requests: int, rng: np.random.Generator) -> tuple[list[Request], set[str]]:
    now = int(time.time())
    customers: set[str] = set()
    out = []
    for r in range(n_requests):
        events = []
        for k in range(spec.batch):
            cid = f"c{rng.integers(spec.customers)}"
            customers.add(cid)
            events.append(
                {
                    "event_id": f"b{int(rate)}-{r}-{k}",
                    "customer_id": cid,
                    "type": TYPES[int(rng.integers(len(TYPES)))],
                    "item_id": f"i{rng.integers(spec.items)}",
                    "price": 9.99,
                    "timestamp": now,
                }
            )
        body = orjson.dumps({"events": events})
        out.append(Request("POST", "/v1/events", body, (("content-type", "application/json"),)))
    return out, customers


def _stored(url: str, keys: Keys, customers: set[str]) -> int:
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for c in customers:
        pipe.zcard(keys.seen_events(c))
    return int(sum(pipe.execute()))


def run_ingest_bench(console: Console, *, quick: bool, out_dir: Path) -> Path:
    from engine.registry import Registry
    from engine.rules import load_rules
    from feature_store.server import EmbeddedRedis
    from training.als import AlsParams
    from training.generator import ShopSpec, generate_shop
    from training.train import TrainParams, train

    spec = QUICK if quick else FULL
    root = Path(os.environ.get("NEXTBEST_DATA_DIR", "var")) / "bench-ingest"
    report = Report(
        name="ingest-quick" if quick else "ingest",
        title="Event ingest: throughput and nothing lost",
        params={**spec.__dict__, "workers": 2, "open_loop": True, "appendonly": "everysec"},
    )
    shop = root / "shop"
    registry = root / "registry"
    if Registry(registry).live_version() is None:
        with console.status("a small model so the server is ready (ingest itself needs none)"):
            generate_shop(ShopSpec(2_000, 200, 30, spec.seed), shop)
            train(
                shop,
                Registry(registry),
                load_rules(),
                TrainParams(als=AlsParams(factors=16, iterations=3), evaluate=False),
            )
    server = EmbeddedRedis(root / "redis", appendonly=True).start()
    redis.Redis.from_url(server.url).flushdb()
    keys = Keys()
    rng = np.random.default_rng(spec.seed)
    rows = []
    results: list[LoadResult] = []
    proc = None
    try:
        port = free_port()
        proc = start_server(server.url, registry, port, root)
        for rate in spec.events_per_s:
            req_rate = rate / spec.batch
            n_requests = int(req_rate * spec.duration_s * 1.2) + 10  # margin: no body is ever sent twice
            with console.status(f"{rate:,.0f} events/s: preparing {n_requests * spec.batch:,} unique events"):
                bodies, customers = _bodies(spec, rate, n_requests, rng)
            console.print(f"{rate:,.0f} events/s ({req_rate:,.0f} requests of {spec.batch})")
            before = _stored(server.url, keys, customers)
            # No warm-up: every request sent is in the result, so 202s and stored events are comparable.
            res = run_rate_sweep("127.0.0.1", port, bodies, [req_rate], spec.duration_s, timeout_s=5.0, warmup_s=0.0)[0]
            results.append(res)
            time.sleep(0.5)
            stored = _stored(server.url, keys, customers) - before
            sent_ok = res.status_counts.get(202, 0) * spec.batch
            rows.append(
                [
                    rate,
                    round(req_rate, 1),
                    round(res.achieved_rate * spec.batch, 0),
                    round(res.p50, 2),
                    round(res.p99, 2),
                    round(res.max, 1),
                    res.errors + res.timeouts + sum(v for k, v in res.status_counts.items() if k != 202),
                    sent_ok,
                    stored,
                    sent_ok - stored if stored <= sent_ok else f"+{stored - sent_ok}",
                ]
            )
            if res.p99 > 20 * P99_BUDGET_MS:
                break
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        server.stop()
    ok = [r[0] for r, res in zip(rows, results, strict=True) if res.sustained(P99_BUDGET_MS) and r[9] == 0]
    report.add_table(
        "POST /v1/events (batches, open loop), then a recount in Redis",
        [
            "events/s",
            "req/s",
            "achieved events/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "failed",
            "events 202",
            "stored",
            "lost",
        ],
        rows,
        note=f"maximum sustained rate (rate held, no failed request, p99 ≤ {P99_BUDGET_MS:g} ms per batch, "
        f"nothing lost): {max(ok) if ok else 'none'} events/s. Requests that did not get 202 may be retried "
        "safely (idempotent by event id); 'stored' counts the new distinct event ids in Redis.",
    )
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path
