"""`nextbest bench latency --endpoint all`: every serving benchmark, then one report that puts them side by side.

Runs the recommendations, offers, email (first decision and read-back), email batch and ingest
benchmarks — each writes its own report — and collects their latency tables into `serving.md` with
p50/p95/p99/max per arrival rate, the maximum sustained rate per endpoint, and a latency-vs-rate plot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from benchmarks.report import Report, new_figure

P99_BUDGET_MS = 10.0
Runner = Callable[..., Path]


def _runners() -> list[tuple[str, Runner]]:
    from benchmarks.email import run_email_batch_bench, run_email_latency_bench
    from benchmarks.ingest import run_ingest_bench
    from benchmarks.latency import run_latency_bench
    from benchmarks.offers import run_offers_bench

    return [
        ("recommendations", run_latency_bench),
        ("offers", run_offers_bench),
        ("email", run_email_latency_bench),
        ("email batch", run_email_batch_bench),
        ("ingest", run_ingest_bench),
    ]


def _col(headers: list[str], *names: str) -> int | None:
    for k, h in enumerate(headers):
        if any(h.startswith(n) for n in names):
            return k
    return None


def latency_rows(name: str, doc: dict[str, object]) -> list[dict[str, object]]:
    """Rows (endpoint, phase, rate, p50, p95, p99, max, failed) from a report's tables with a rate and a p99."""
    out: list[dict[str, object]] = []
    tables = doc.get("tables")
    assert isinstance(tables, list)
    for table in tables:
        headers = [str(h) for h in table["headers"]]
        rate, p99 = _col(headers, "rate", "events/s"), _col(headers, "p99")
        if rate is None or p99 is None:
            continue
        phase_col = _col(headers, "phase")
        p50, p95, mx = _col(headers, "p50"), _col(headers, "p95"), _col(headers, "max")
        failed = _col(headers, "errors", "failed")
        achieved = _col(headers, "achieved")
        for row in table["rows"]:
            out.append(
                {
                    "endpoint": name,
                    "phase": row[phase_col] if phase_col is not None else "",
                    "rate": row[rate],
                    "achieved": row[achieved] if achieved is not None else None,
                    "p50": row[p50] if p50 is not None else None,
                    "p95": row[p95] if p95 is not None else None,
                    "p99": row[p99],
                    "max": row[mx] if mx is not None else None,
                    "failed": row[failed] if failed is not None else None,
                }
            )
    return out


def _sustained(row: dict[str, object]) -> bool:
    rate, achieved, p99, failed = row["rate"], row["achieved"], row["p99"], row["failed"]
    if not isinstance(rate, int | float) or not isinstance(p99, int | float):
        return False
    kept_up = achieved is None or (isinstance(achieved, int | float) and achieved >= 0.97 * rate)
    return kept_up and not failed and p99 <= P99_BUDGET_MS


def run_serving_bench(console: Console, *, quick: bool, out_dir: Path) -> Path:
    report = Report(
        name="serving-quick" if quick else "serving",
        title="Serving benchmarks side by side: latency per arrival rate and maximum sustained rate",
        params={"quick": quick, "p99_budget_ms": P99_BUDGET_MS, "workers": 2},
    )
    rows: list[dict[str, object]] = []
    batch_rows: list[list[object]] = []
    sources: list[list[object]] = []
    for name, run in _runners():
        console.rule(f"serving: {name}")
        path = run(console, quick=quick, out_dir=out_dir)
        doc = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        sources.append([name, path.name])
        if name == "email batch":
            table = doc["tables"][0]
            batch_rows += [[r[0], r[headers_index(table, "recipients/s")]] for r in table["rows"]]
            continue
        rows += latency_rows(name, doc)
    report.add_table(
        "Latency per arrival rate (open loop; from each benchmark's own report)",
        ["endpoint", "phase", "rate (/s)", "achieved", "p50 ms", "p95 ms", "p99 ms", "max ms", "failed"],
        [
            [r["endpoint"], r["phase"], r["rate"], r["achieved"], r["p50"], r["p95"], r["p99"], r["max"], r["failed"]]
            for r in rows
        ],
        note="ingest rates are events per second (in batches); the others requests per second.",
    )
    best: dict[tuple[object, object], float] = {}
    for r in rows:
        if _sustained(r) and isinstance(r["rate"], int | float):
            key = (r["endpoint"], r["phase"])
            best[key] = max(best.get(key, 0.0), float(r["rate"]))
    keys = list(dict.fromkeys((r["endpoint"], r["phase"]) for r in rows))
    report.add_table(
        "Maximum sustained rate (achieved ≥ 97 % of the offered rate, nothing failed, p99 ≤ 10 ms)",
        ["endpoint", "phase", "max sustained (/s)"],
        [[e, p, best.get((e, p), "none of the rates tried")] for e, p in keys]
        + [["email batch", phase, f"{rate} recipients/s"] for phase, rate in batch_rows],
    )
    report.add_table("Reports", ["benchmark", "file"], sources)
    fig, ax = new_figure(7.5, 4.5)
    for endpoint, phase in keys:
        pts = [r for r in rows if (r["endpoint"], r["phase"]) == (endpoint, phase) and r["endpoint"] != "ingest"]
        if pts:
            label = f"{endpoint} ({phase})" if phase else str(endpoint)
            ax.plot([float(str(r["rate"])) for r in pts], [float(str(r["p99"])) for r in pts], "o-", label=label)
    ax.axhline(P99_BUDGET_MS, color="grey", linestyle="--", label="10 ms budget")
    ax.set_xlabel("arrival rate (requests/s, open loop)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    report.add_figure(fig, "serving_latency_vs_rate.png", "p99 latency per arrival rate, every endpoint")
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def headers_index(table: dict[str, list[object]], name: str) -> int:
    headers = [str(h) for h in table["headers"]]
    k = _col(headers, name)
    if k is None:
        raise KeyError(f"no column {name!r} in {headers}")
    return k
