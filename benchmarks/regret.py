"""`nextbest bench regret`: exploration policies against the oracle, on a synthetic shop whose truth is known.

The ranker is the one we serve: ALS (plus the home placement's other sources, filters, value blend and
category cap) trained on the generated shop, run through `engine.pipeline.recommend`; its top P items
are the pool. Each policy picks k of them with `engine.policies.choose`, clicks come from the shop's
true click probabilities, and the bandit state learns as in production (benchmarks.regret_sim).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from api.console import print_error
from benchmarks.regret_sim import (
    Contender,
    FloatArray,
    IntArray,
    Pools,
    ServedRanker,
    Trace,
    cumulative_bands,
    greedy_reference,
    served_workload,
    simulate,
    summarize,
)
from benchmarks.report import Report, new_figure

PLACEMENT = "home"
ASSUMED_DECISIONS_PER_S = 20.0  # traffic of the placement, to turn arms_refresh_s into decisions


@dataclass(frozen=True)
class RegretSpec:
    customers: int
    items: int
    days: int
    rounds: int
    seeds: int
    k: int = 4
    shop_seed: int = 42


FULL = RegretSpec(100_000, 5_000, 180, rounds=20_000, seeds=10)
QUICK = RegretSpec(3_000, 400, 60, rounds=2_000, seeds=3)


def default_refresh_every() -> int:
    """Decisions between two reads of the bandit state: the workers' `arms_refresh_s` at the assumed traffic."""
    from api.settings import Settings

    refresh_s = float(Settings.model_fields["arms_refresh_s"].default)
    return max(1, round(refresh_s * ASSUMED_DECISIONS_PER_S))


def default_contenders(pool: int) -> list[Contender]:
    """The served policy of the placement, the other placements' settings and a few alternatives, all on one pool."""
    from engine.rules import EpsilonGreedy, Greedy, Softmax, Thompson, ThompsonLift, load_rules

    served = load_rules().placement(PLACEMENT).exploration
    contenders = [Contender("greedy", Greedy(pool=pool))]
    contenders += [Contender(f"epsilon {e:g}", EpsilonGreedy(epsilon=e, pool=pool)) for e in (0.05, 0.1, 0.2)]
    contenders += [Contender(f"softmax T={t:g}", Softmax(temperature=t, pool=pool)) for t in (0.03, 0.05, 0.1)]
    if isinstance(served, Thompson):
        contenders.append(Contender(f"thompson served (s={served.prior_strength:g})", served))
    base = served if isinstance(served, Thompson) else Thompson(pool=pool)
    for strength in (100.0, 1000.0, 0.0):
        contenders.append(Contender(f"thompson s={strength:g}", base.model_copy(update={"prior_strength": strength})))
    if isinstance(served, ThompsonLift):
        contenders.append(Contender(f"thompson_lift served (k={served.prior_strength:g})", served))
    lift = served if isinstance(served, ThompsonLift) else ThompsonLift(pool=pool)
    for strength in (3.0, 10.0, 30.0):
        name = f"thompson_lift k={strength:g}"
        contenders.append(Contender(name, lift.model_copy(update={"prior_strength": strength})))
    return [*contenders, Contender("oracle (pool)", None)]


def run_regret_bench(
    console: Console,
    *,
    quick: bool,
    out_dir: Path,
    seed: int = 0,
    rounds: int | None = None,
    seeds: int | None = None,
    shop: Path | None = None,
    refresh_every: int | None = None,
    k: int | None = None,
) -> Path:
    """Simulate every policy on the served pools, write the report with its plots; returns the report's path."""
    from benchmarks.latency import bench_root, prepare_shop

    spec = QUICK if quick else FULL
    rounds, seeds, k = rounds or spec.rounds, seeds or spec.seeds, k or spec.k
    refresh_every = refresh_every or default_refresh_every()
    t_start, started_at = time.perf_counter(), time.time()
    shop_dir = shop or prepare_shop(spec.customers, spec.items, spec.days, spec.shop_seed, bench_root(), console)
    with console.status(f"reading {shop_dir} and training ALS on it"):
        ranker = ServedRanker(shop_dir, PLACEMENT)
    size = ranker.spec.exploration.pool
    if k > size:
        raise ValueError(f"--slots {k} exceeds the {PLACEMENT} placement's pool of {size}")
    contenders = default_contenders(size)
    reference = greedy_reference(contenders)
    t_ready = time.perf_counter()
    with console.status("building the served pool of every arriving customer"):
        work = served_workload(ranker, rounds, seed, seeds)
        catalog_best = ranker.catalog_oracle_clicks(work.customers, k)
    t_pools = time.perf_counter()

    runs: list[dict[str, Trace]] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"simulating {rounds:,} decisions × {seeds} seeds", total=seeds * len(contenders))
        for s, rows in enumerate(work.arrivals):
            runs.append(
                simulate(work.pools, contenders, rows, k, refresh_every, seed * 1_000 + s, lambda: bar.advance(task))
            )
    t_sim = time.perf_counter()

    report = Report(
        name="regret-quick" if quick else "regret",
        title="Exploration policies against the oracle: regret on a synthetic shop with known truth",
        started_at=started_at,
        params={
            "rounds": rounds,
            "seeds": seeds,
            "seed": seed,
            "slots_k": k,
            "pool": size,
            "placement": PLACEMENT,
            "refresh_every_decisions": refresh_every,
            "shop": str(shop_dir),
            "shop_spec": asdict(spec) if shop is None else "user shop",
            "als": asdict(ranker.train_params.als),
            "policies": {c.name: (c.spec.model_dump() if c.spec is not None else "oracle") for c in contenders},
        },
    )
    report.add_dataset("events", next(shop_dir.glob("events.*")))
    report.add_dataset("truth", shop_dir / "truth.npz")
    _tables(report, runs, k, reference, work.arrivals, work.pools, catalog_best)
    _plots(report, runs, contenders)
    report.add_text(
        f"Setup: {len(work.customers):,} distinct customers arrived (drawn by activity rate among customers still "
        f"active at the window's end); each decision's pool is the top {size} of the `{PLACEMENT}` placement's ranking "
        f"(`recommend` with its sources, filters, value blend and category cap, on ALS trained on the shop), and "
        f"each policy shows {k} of them via `engine.policies.choose`. Clicks: the truth's P(click | shown) per "
        "customer × item; the truth has no position effect, so every shown slot counts alike. Revenue: "
        "P(purchase | shown) × catalog price. Thompson sampling reads the bandit state (impressions of every "
        f"shown item, a success per clicked item) as of its last refresh, every {refresh_every} decisions "
        f"(`arms_refresh_s` at an assumed {ASSUMED_DECISIONS_PER_S:g} decisions/s). Seeds vary arrivals, policy "
        "draws and clicks; the shop and the model are fixed. Regret uses expected clicks from the truth; CI = 95 % "
        f"t interval over seeds. Timings: shop + ALS {t_ready - t_start:.1f} s, pools {t_pools - t_ready:.1f} s, "
        f"simulation {t_sim - t_pools:.1f} s."
    )
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def _tables(
    report: Report,
    runs: list[dict[str, Trace]],
    k: int,
    reference: str,
    rows: list[IntArray],
    pools: Pools,
    catalog_best: FloatArray,
) -> None:
    summaries = summarize(runs, k, reference)
    report.add_table(
        f"Per policy, mean over {len(runs)} seeds of {len(rows[0]):,} decisions",
        [
            "policy",
            "CTR % (expected)",
            "CTR % (sampled)",
            "clicks / 1k decisions",
            "revenue / 1k decisions",
            "final cum. regret (clicks)",
            "± 95 % CI",
            "regret / 1k, last 25 %",
            f"Δ clicks / 1k vs {reference}",
            "± 95 % CI ",
        ],
        [
            [
                s.name,
                round(100 * s.expected_ctr, 3),
                round(100 * s.sampled_ctr, 3),
                round(s.clicks_per_1k, 2),
                round(s.revenue_per_1k, 2),
                round(s.final_regret, 1),
                round(s.final_regret_ci, 1),
                round(s.late_regret_per_1k, 2),
                round(s.vs_reference_per_1k, 2),
                round(s.vs_reference_ci, 2),
            ]
            for s in summaries
        ],
        note=f"regret per decision = expected clicks of the pool's {k} truly best items − the policy's; "
        f"{reference} is the no-exploration reference (Δ paired by seed: same arrivals).",
    )
    pool_best = float(np.mean([pools.oracle_clicks(k)[r].mean() for r in rows]))
    whole = float(np.mean([catalog_best[r].mean() for r in rows]))
    ref = next(s for s in summaries if s.name == reference)
    report.add_table(
        "Oracles: how much the ranker's pool leaves on the table",
        ["oracle", "clicks / 1k decisions", f"{reference} as % of it"],
        [
            [
                "pool oracle (k best of the pool)",
                round(1000 * pool_best, 2),
                round(100 * ref.clicks_per_1k / 1000 / pool_best, 1),
            ],
            [
                "catalog oracle (k best available items)",
                round(1000 * whole, 2),
                round(100 * ref.clicks_per_1k / 1000 / whole, 1),
            ],
        ],
        note="the catalog oracle ignores the placement's filters (an upper bound); the gap between the two oracles "
        "is candidate generation's loss, which no exploration inside the pool can recover.",
    )


def _styles(contenders: list[Contender]) -> dict[str, dict[str, object]]:
    """A distinct colour per policy (more policies than the default cycle has colours); Thompson dashed."""
    from matplotlib import colormaps

    policies = [c for c in contenders if c.spec is not None]
    palette = colormaps["tab20"].colors  # type: ignore[attr-defined]
    return {
        c.name: {"color": palette[(2 * n) % 20 + (2 * n) // 20], "linestyle": "--" if c.learns else "-"}
        for n, c in enumerate(policies)
    }


def _plots(report: Report, runs: list[dict[str, Trace]], contenders: list[Contender]) -> None:
    styles = _styles(contenders)
    fig, ax = new_figure(8.0, 5.0)
    for name, style in styles.items():
        mean, sd = cumulative_bands(runs, name)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, label=name, linewidth=1.4, **style)  # type: ignore[arg-type]
        ax.fill_between(x, mean - sd, mean + sd, color=style["color"], alpha=0.15, linewidth=0)
    ax.set_xlabel("decisions")
    ax.set_ylabel("cumulative regret (expected clicks vs pool oracle)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    report.add_figure(
        fig, f"{report.name}_cumulative.png", f"Cumulative regret per policy, mean ± 1 sd over {len(runs)} seeds"
    )

    fig, ax = new_figure(8.0, 4.0)
    rounds = len(next(iter(runs[0].values())).regret)
    window = max(rounds // 20, 1)
    for name, style in styles.items():
        per_round = np.mean([run[name].regret for run in runs], axis=0)
        smooth = np.convolve(per_round, np.ones(window) / window, mode="valid") * 1000
        ax.plot(np.arange(window, rounds + 1), smooth, label=name, linewidth=1.2, **style)  # type: ignore[arg-type]
    ax.set_xlabel("decisions")
    ax.set_ylabel("regret per 1,000 decisions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    report.add_figure(
        fig,
        f"{report.name}_rate.png",
        f"Regret rate over time ({window}-decision moving mean over seeds): a learning policy's curve falls, "
        "a fixed one stays flat",
    )


def register(bench_app: typer.Typer, console: Console) -> None:
    @bench_app.command("regret")
    def bench_regret(
        quick: Annotated[bool, typer.Option(help="a small, CI-sized run")] = False,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
        seed: Annotated[int, typer.Option(help="seed of the simulation (arrivals, policy draws, clicks)")] = 0,
        rounds: Annotated[
            int | None, typer.Option(min=1, help="decisions per seed (default 20,000; quick 2,000)")
        ] = None,
        seeds: Annotated[int | None, typer.Option(min=1, help="simulation seeds (default 10; quick 3)")] = None,
        shop: Annotated[
            Path | None, typer.Option(help="a shop folder from `nextbest generate` (with truth.json and truth.npz)")
        ] = None,
        refresh_every: Annotated[
            int | None,
            typer.Option(min=1, help="decisions between bandit-state refreshes (default: arms_refresh_s × 20/s)"),
        ] = None,
        slots: Annotated[int, typer.Option(min=1, help="items shown per decision (k)")] = 4,
    ) -> None:
        """Exploration policies (greedy, epsilon, softmax, Thompson) against the oracle: regret, CTR, revenue."""
        try:
            run_regret_bench(
                console,
                quick=quick,
                out_dir=out,
                seed=seed,
                rounds=rounds,
                seeds=seeds,
                shop=shop,
                refresh_every=refresh_every,
                k=slots,
            )
        except (FileNotFoundError, ValueError) as exc:
            print_error(console, exc)
            raise typer.Exit(2) from exc
