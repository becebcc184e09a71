"""`nextbest bench overhead`: what the learning loop costs a recommendation request.

The same request mix at the same open-loop arrival rate against `nextbest serve` (2 workers) in four
configurations: decision log and exploration both on (the default), each alone, and both off. The
configurations take turns for several rounds, so a slow minute of the machine does not land on one of
them. Also timed in-process, without HTTP: the engine's decision with the placement's policy (Thompson
sampling with its shadow on `home`) against greedy, so the CPU part of the overhead is seen apart from
the extra Redis write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from benchmarks.latency import bench_root, free_port, prepare_shop, requests_mix, start_server
from benchmarks.loadgen import LoadResult, run_rate_sweep
from benchmarks.report import Report

BUDGET_MS = 1.0  # allowed p99 overhead of logging + exploration
CONFIGS: dict[str, dict[str, str]] = {
    "log + exploration (default)": {"NEXTBEST_DECISION_LOG": "true", "NEXTBEST_EXPLORATION": "true"},
    "log only": {"NEXTBEST_DECISION_LOG": "true", "NEXTBEST_EXPLORATION": "false"},
    "exploration only": {"NEXTBEST_DECISION_LOG": "false", "NEXTBEST_EXPLORATION": "true"},
    "both off": {"NEXTBEST_DECISION_LOG": "false", "NEXTBEST_EXPLORATION": "false"},
}
BASELINE = "both off"


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


FULL = OverheadSpec(100_000, 5_000, 180, 400.0, 15.0, 4, 5_000)
QUICK = OverheadSpec(5_000, 500, 60, 100.0, 4.0, 1, 500)


def _registry(spec: OverheadSpec, shop_dir: Path, root: Path, console: Console) -> Path:
    """The latency benchmark's trained model for this shop when there is one; otherwise train it."""
    from engine.registry import Registry
    from engine.rules import load_rules
    from training.train import TrainParams, train

    registry_dir = root / f"registry-{spec.customers}"
    if Registry(registry_dir).live_version() is None:
        with console.status("training the model to serve"):
            train(shop_dir, Registry(registry_dir), load_rules(), TrainParams())
    return registry_dir


def _load(shop_dir: Path, url: str) -> list[str]:
    from feature_store.store import RedisStore
    from training.datafiles import read_shop
    from training.load import catalog_items
    from training.profiles import build_profiles

    shop = read_shop(shop_dir)
    store = RedisStore(url)
    store.client.flushdb()
    store.write_profiles(build_profiles(shop))
    store.write_catalog(catalog_items(shop))
    store.close()
    return [str(c) for c in shop.customers["customer_id"]]


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


def run_overhead_bench(console: Console, *, quick: bool, out_dir: Path) -> Path:
    from feature_store.server import EmbeddedRedis

    spec = QUICK if quick else FULL
    root = bench_root()
    report = Report(
        name="overhead-quick" if quick else "overhead",
        title="Overhead of the decision log and exploration on POST /v1/recommendations",
        params={**spec.__dict__, "budget_p99_ms": BUDGET_MS, "workers": 2, "open_loop": True},
    )
    shop_dir = prepare_shop(spec.customers, spec.items, spec.days, spec.seed, root, console)
    report.add_dataset("events", shop_dir / "events.parquet")
    registry_dir = _registry(spec, shop_dir, root, console)
    server = EmbeddedRedis(root / "redis", appendonly=False).start()
    runs: dict[str, list[LoadResult]] = {name: [] for name in CONFIGS}
    try:
        with console.status("loading profiles and catalog"):
            ids = _load(shop_dir, server.url)
        reqs = requests_mix(ids, shop_dir, spec.seed)
        for round_no in range(spec.rounds):
            for name, env in CONFIGS.items():
                console.print(f"round {round_no + 1}/{spec.rounds}: {name} at {spec.rate:g} req/s")
                port = free_port()
                proc = start_server(server.url, registry_dir, port, root, env)
                try:
                    runs[name] += run_rate_sweep("127.0.0.1", port, reqs, [spec.rate], spec.duration_s, warmup_s=2.0)
                finally:
                    proc.terminate()
                    proc.wait(20)
        with console.status("timing the engine alone"):
            engine = _engine_timings(spec, shop_dir, registry_dir, ids)
    finally:
        server.stop()

    def pooled(name: str) -> np.ndarray:  # type: ignore[type-arg]
        return np.concatenate([r.latencies_ms for r in runs[name]])

    def median_p99(name: str) -> float:
        return float(np.median([r.p99 for r in runs[name]]))

    base = pooled(BASELINE)
    rows = []
    for name in CONFIGS:
        lat = pooled(name)
        p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
        errors = sum(r.errors + r.timeouts for r in runs[name])
        delta_p50 = p50 - float(np.percentile(base, 50))
        delta = median_p99(name) - median_p99(BASELINE)
        rows.append(
            [
                name,
                len(lat),
                round(p50, 2),
                round(p95, 2),
                round(p99, 2),
                round(float(lat.max()), 2),
                errors,
                "-" if name == BASELINE else f"{delta_p50:+.2f}",
                round(median_p99(name), 2),
                "-" if name == BASELINE else f"{delta:+.2f}",
                " / ".join(f"{r.p99:.2f}" for r in runs[name]),
            ]
        )
    report.add_table(
        f"Open loop at {spec.rate:g} req/s, {spec.rounds} round(s) of {spec.duration_s:g} s per configuration",
        [
            "configuration",
            "requests",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "errors",
            "Δ p99 vs off",
            "p99 per round",
        ],
        rows,
        note=f"budget: logging + exploration add at most {BUDGET_MS:g} ms at p99. The configurations take turns "
        "each round; the load generator shares the 2 cores with the server and Redis.",
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
        note="thompson: 100 posterior draws × a pool of 20, probabilities per slot by Monte Carlo; the shadow "
        "softmax is evaluated on the same pool.",
    )
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path
