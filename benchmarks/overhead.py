"""`nextbest bench overhead`: what the learning loop costs a recommendation request.

The same request mix at the same open-loop arrival rate against two `nextbest serve` (2 workers each)
running at the same time on one Redis: one with both off, the other with the decision log and
exploration both on (the default), or each alone. Side by side, a slow spell of the shared machine hits
both, so the difference is the cost of the feature. Also timed in-process, without HTTP: the engine's
decision with the placement's policy (Thompson sampling with its shadow on `home`) against greedy, so
the CPU part of the overhead is seen apart from the extra Redis write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console

from benchmarks.latency import (
    bench_root,
    free_port,
    load_shop_into,
    prepare_shop,
    requests_mix,
    start_server,
    trained_registry,
)
from benchmarks.loadgen import LoadResult, Request, run_side_by_side
from benchmarks.report import Report

BUDGET_MS = 1.0  # allowed p99 overhead of logging + exploration
CONFIGS: dict[str, dict[str, str]] = {
    "log + exploration (default)": {"NEXTBEST_DECISION_LOG": "true", "NEXTBEST_EXPLORATION": "true"},
    "log only": {"NEXTBEST_DECISION_LOG": "true", "NEXTBEST_EXPLORATION": "false"},
    "exploration only": {"NEXTBEST_DECISION_LOG": "false", "NEXTBEST_EXPLORATION": "true"},
    "both off": {"NEXTBEST_DECISION_LOG": "false", "NEXTBEST_EXPLORATION": "false"},
}
BASELINE = "both off"
PAIRS = tuple((name, BASELINE) for name in CONFIGS if name != BASELINE)


@dataclass(frozen=True)
class OverheadSpec:
    customers: int
    items: int
    days: int
    rate: float
    duration_s: float
    rounds: int
    engine_calls: int
    seed: int = 42


FULL = OverheadSpec(100_000, 5_000, 180, 200.0, 20.0, 3, 5_000)
QUICK = OverheadSpec(5_000, 500, 60, 50.0, 4.0, 1, 500)


def _engine_timings(spec: OverheadSpec, shop_dir: Path, registry_dir: Path, ids: list[str]) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    """Per-call time (ms) of the engine's decision for home, greedy vs the placement's own policies."""
    from engine.catalog import CatalogState
    from engine.pipeline import Request, recommend
    from engine.recmodel import load_rec_model
    from engine.registry import Registry
    from engine.rules import load_rules
    from engine.state import build_state
    from training.datafiles import read_shop
    from training.profiles import build_profiles

    registry = Registry(registry_dir)
    version = registry.live_version()
    assert version is not None
    model = load_rec_model(registry.verify(version))
    shop = read_shop(shop_dir)
    rng = np.random.default_rng(spec.seed)
    wanted = set(rng.choice(ids, spec.engine_calls).tolist())
    profiles = [p for p in build_profiles(shop) if p.customer_id in wanted]
    state = build_state(CatalogState.from_items(model.catalog_snapshot, "bench"), model, load_rules())
    out: dict[str, np.ndarray] = {}  # type: ignore[type-arg]
    for label, explore in (("greedy", False), ("thompson + shadow softmax", True)):
        times = np.empty(len(profiles))
        for k, p in enumerate(profiles):
            t0 = time.perf_counter()
            recommend(state, Request(p.customer_id, "home", 10), p, explore=explore)
            times[k] = (time.perf_counter() - t0) * 1000
        out[label] = times
    return out


def _pair(
    server_url: str, registry_dir: Path, root: Path, reqs: list[Request], spec: OverheadSpec, names: tuple[str, str]
) -> list[LoadResult]:
    """Both configurations served at once, each driven at `spec.rate`, side by side on one event loop."""
    procs, ports = [], []
    try:
        for name in names:
            ports.append(free_port())
            procs.append(start_server(server_url, registry_dir, ports[-1], root, CONFIGS[name]))
        targets = [("127.0.0.1", port) for port in ports]
        return run_side_by_side(targets, reqs, spec.rate, spec.duration_s, warmup_s=2.0)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)


def run_overhead_bench(console: Console, *, quick: bool, out_dir: Path) -> Path:
    from feature_store.server import EmbeddedRedis

    spec = QUICK if quick else FULL
    root = bench_root()
    report = Report(
        name="overhead-quick" if quick else "overhead",
        title="Overhead of the decision log and exploration on POST /v1/recommendations",
        params={**spec.__dict__, "budget_p99_ms": BUDGET_MS, "workers_per_server": 2, "open_loop": True},
    )
    shop_dir = prepare_shop(spec.customers, spec.items, spec.days, spec.seed, root, console)
    report.add_dataset("events", shop_dir / "events.parquet")
    registry_dir = trained_registry(root / f"registry-{spec.customers}", shop_dir, console)
    server = EmbeddedRedis(root / "redis", appendonly=False).start()
    runs: dict[tuple[str, str], list[list[LoadResult]]] = {pair: [] for pair in PAIRS}
    try:
        ids = load_shop_into(server.url, shop_dir, console)
        reqs = requests_mix(ids, shop_dir, spec.seed)
        for round_no in range(spec.rounds):
            for pair in PAIRS:
                console.print(f"round {round_no + 1}/{spec.rounds}: {pair[0]} | {pair[1]}, {spec.rate:g} req/s each")
                runs[pair].append(_pair(server.url, registry_dir, root, reqs, spec, pair))
        with console.status("timing the engine alone"):
            engine = _engine_timings(spec, shop_dir, registry_dir, ids)
    finally:
        server.stop()

    # The raw figures first, so a run is never lost to a formatting problem below.
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {f"{a} | {b}": [[r.summary() for r in pair] for pair in rounds] for (a, b), rounds in runs.items()}
    (out_dir / f"{report.name}.results.json").write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))

    rows = []
    for (a, _), rounds in runs.items():
        lat_a = np.concatenate([r[0].latencies_ms for r in rounds])
        lat_b = np.concatenate([r[1].latencies_ms for r in rounds])
        deltas = [r[0].p99 - r[1].p99 for r in rounds]
        errors = sum(x.errors + x.timeouts for r in rounds for x in r)
        rows.append(
            [
                a,
                round(float(np.percentile(lat_a, 50)), 2),
                round(float(np.percentile(lat_a, 99)), 2),
                round(float(np.percentile(lat_b, 50)), 2),
                round(float(np.percentile(lat_b, 99)), 2),
                f"{float(np.percentile(lat_a, 50) - np.percentile(lat_b, 50)):+.2f}",
                f"{float(np.percentile(lat_a, 99) - np.percentile(lat_b, 99)):+.2f}",
                f"{float(np.median(deltas)):+.2f}",
                " / ".join(f"{d:+.2f}" for d in deltas),
                errors,
            ]
        )
    report.add_table(
        f"Side by side against '{BASELINE}', {spec.rate:g} req/s each, {spec.rounds} round(s) of {spec.duration_s:g} s",
        [
            "configuration",
            "p50 ms",
            "p99 ms",
            "off: p50 ms",
            "off: p99 ms",
            "Δ p50",
            "Δ p99",
            "median round Δ p99",
            "Δ p99 per round",
            "errors",
        ],
        rows,
        note=f"budget: logging + exploration add at most {BUDGET_MS:g} ms at p99. Each configuration runs at the same "
        f"time as a server with both off (two `nextbest serve`, 2 workers each, one Redis, one load generator), so "
        "a slow spell of this shared 2-core VM hits both sides of a comparison alike.",
    )
    report.add_table(
        "The engine alone (in-process, no HTTP, no Redis): one home decision of 10 items",
        ["policy", "calls", "p50 ms", "p99 ms", "mean ms"],
        [
            [
                label,
                len(t),
                round(float(np.percentile(t, 50)), 3),
                round(float(np.percentile(t, 99)), 3),
                round(float(t.mean()), 3),
            ]
            for label, t in engine.items()
        ],
        note="thompson: 64 posterior draws × a pool of 20, probabilities per slot by Monte Carlo; the shadow "
        "softmax is evaluated on the same pool.",
    )
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path
