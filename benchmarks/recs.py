"""`nextbest bench recs`: recommendation quality on a time split — ALS (the training code of `nextbest
train`) against item-to-item, popularity and each customer's own most-frequent items — on the synthetic
shop, MovieLens 100K and the user's own files, with bootstrap confidence intervals over users.

Two protocols, both on users with positive interactions after the cut and some history before it:
- new items: truth = positive items after the cut the user had no positive interaction with before;
  those earlier items are excluded from every model's candidates.
- repeats count: truth = every positive item after the cut, nothing excluded. Only here can the
  own-most-frequent baseline score, and only on data where test positives repeat training ones at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import pandas as pd
import typer
from matplotlib.figure import Figure
from rich.console import Console

from benchmarks.rec_data import RecData, Split, cut_time, load_interactions, movielens, shop_events, time_split
from benchmarks.rec_metrics import METRICS, Bootstrap, Estimate, per_user, recommended_matrix
from benchmarks.rec_models import (
    ModelParams,
    Models,
    fit_models,
    recommend_als,
    recommend_item_to_item,
    recommend_own_frequent,
    recommend_popular,
)
from benchmarks.report import Report

KS = (5, 10, 20)
MODELS = ("ALS", "item-to-item", "popularity", "own most-frequent")
METRIC_NAMES = {"recall": "recall", "ndcg": "NDCG", "hit": "hit rate", "coverage": "coverage"}


@dataclass(frozen=True)
class RecsParams:
    ks: tuple[int, ...] = KS
    resamples: int = 1000  # bootstrap resamples of the test users
    level: float = 0.95
    seed: int = 0
    max_users: int = 20_000  # a larger test population is sampled down (seeded)
    models: ModelParams = field(default_factory=ModelParams)


@dataclass(frozen=True)
class ProtocolResult:
    key: str
    title: str
    users: int
    truth_items: int
    catalog: int
    estimates: dict[str, dict[int, dict[str, Estimate]]]  # model -> k -> metric -> estimate
    diffs: dict[str, dict[str, Estimate]]  # baseline -> metric -> ALS minus baseline at the reference k
    notes: tuple[str, ...]


def _sample(users: list[str], params: RecsParams) -> list[str]:
    if len(users) <= params.max_users:
        return users
    return sorted(np.random.default_rng(params.seed).choice(users, params.max_users, replace=False).tolist())


def evaluate_split(data: RecData, split: Split, models: Models, params: RecsParams) -> list[ProtocolResult]:
    test_pos = split.test[split.test["positive"]]
    truth = {str(u): set(g.tolist()) for u, g in test_pos.groupby("customer_id", sort=False)["item_id"]}
    known = set(models.als.user_ids.tolist())
    users = sorted(u for u in truth if u in known)
    k = max(params.ks)
    label = data.positive_label
    results = []
    new_users = _sample([u for u in users if truth[u] - models.seen.get(u, set())], params)
    new_truth = [truth[u] - models.seen.get(u, set()) for u in new_users]
    lists = {
        "ALS": recommend_als(models, new_users, models.seen, k),
        "item-to-item": recommend_item_to_item(models, new_users, models.seen, k),
        "popularity": recommend_popular(models, new_users, models.seen, k),
    }
    notes: tuple[str, ...] = (
        f"Truth: each user's {label}s after the cut of items they had no {label} of before. Items the user "
        f"already had a {label} of before the cut are excluded from every model's candidates.",
        "Own most-frequent items: not applicable here: it recommends only items the user already had, "
        "and those are excluded by this protocol's definition (see the next protocol).",
    )
    results.append(
        _measure("new", "new items (seen items excluded)", new_users, new_truth, lists, models, params, notes)
    )
    pairs = sum(len(t) for u, t in truth.items() if u in known)
    repeats = sum(len(truth[u] & models.seen.get(u, set())) for u in users)
    share = f"{repeats:,} of {pairs:,} test (user, item) {label} pairs ({repeats / max(pairs, 1):.1%})"
    if repeats == 0:
        results.append(
            ProtocolResult(
                "repeat",
                "repeats count",
                len(users),
                pairs,
                len(models.items),
                {},
                {},
                (
                    f"Skipped: {share} repeat an item the user already had before the cut, so the own "
                    f"most-frequent baseline would score 0 by construction"
                    + (" (a user rates a movie once)." if label == "rating" else "."),
                ),
            )
        )
        return results
    rep_users = _sample(users, params)
    lists = {
        "ALS": recommend_als(models, rep_users, {}, k),
        "item-to-item": recommend_item_to_item(models, rep_users, {}, k),
        "popularity": recommend_popular(models, rep_users, {}, k),
        "own most-frequent": recommend_own_frequent(models, rep_users, k),
    }
    notes = (
        f"Truth: every item of each user's {label}s after the cut, repeats included; nothing is excluded. "
        f"{share} are repeats. Own most-frequent lists are not padded: a user with fewer than k earlier items "
        "gets a shorter list.",
    )
    rep_truth = [truth[u] for u in rep_users]
    results.append(_measure("repeat", "repeats count", rep_users, rep_truth, lists, models, params, notes))
    return results


def _measure(
    key: str,
    title: str,
    users: list[str],
    truths: list[set[str]],
    lists: dict[str, list[list[str]]],
    models: Models,
    params: RecsParams,
    notes: tuple[str, ...],
) -> ProtocolResult:
    if not users:
        return ProtocolResult(key, title, 0, 0, len(models.items), {}, {}, (*notes, "No test users: nothing measured."))
    boot = Bootstrap(len(users), params.resamples, params.seed, params.level)
    catalog = models.items.tolist()
    est: dict[str, dict[int, dict[str, Estimate]]] = {}
    ref = 10 if 10 in params.ks else params.ks[len(params.ks) // 2]
    at_ref: dict[str, dict[str, npt.NDArray[np.float64]]] = {}
    for model, recs in lists.items():
        est[model] = {}
        for k in params.ks:
            values = per_user(recs, truths, k)
            if k == ref:
                at_ref[model] = values
            est[model][k] = {m: boot.mean(values[m]) for m in METRICS}
            est[model][k]["coverage"] = boot.coverage(recommended_matrix(recs, k, catalog))
    diffs = {
        base: {m: boot.mean(at_ref["ALS"][m] - at_ref[base][m]) for m in ("recall", "ndcg")}
        for base in at_ref
        if base != "ALS"
    }
    return ProtocolResult(key, title, len(users), sum(map(len, truths)), len(catalog), est, diffs, notes)


@dataclass(frozen=True)
class DatasetResult:
    data: RecData
    split: Split
    split_rule: str
    models: Models
    protocols: list[ProtocolResult]
    eval_seconds: float


def run_dataset(
    data: RecData, test_days: float | None, test_fraction: float | None, params: RecsParams, console: Console
) -> DatasetResult:
    cut = cut_time(data.frame, test_days, test_fraction)
    split = time_split(data.frame, cut)
    rule = f"last {test_days:g} days" if test_days is not None else f"last {test_fraction:.0%} of interactions"
    if split.train["item_id"].nunique() <= max(params.ks):
        raise ValueError(f"{data.name}: {split.train['item_id'].nunique()} training items; need more than k")
    with console.status(f"{data.name}: fitting ALS, item-to-item and baselines on {len(split.train):,} interactions"):
        models = fit_models(data, split, params.models)
    t0 = time.perf_counter()
    with console.status(f"{data.name}: recommending and bootstrapping ({params.resamples} resamples)"):
        protocols = evaluate_split(data, split, models, params)
    return DatasetResult(data, split, rule, models, protocols, time.perf_counter() - t0)


def _utc(ts: int) -> str:
    return str(pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M UTC"))


def _add_dataset(report: Report, res: DatasetResult, params: RecsParams) -> None:
    data, split, models = res.data, res.split, res.models
    label = data.positive_label
    test_ids = np.asarray(split.test.loc[split.test["positive"], "customer_id"].unique(), dtype=str)
    test_users, with_history = len(test_ids), int(np.isin(test_ids, models.als.user_ids).sum())
    report.add_text(
        f"## {data.name}\n\n"
        f"{len(data.frame):,} interactions ({int(data.frame['positive'].sum()):,} {label}s) from "
        f"{_utc(int(data.frame['timestamp'].min()))} to {_utc(int(data.frame['timestamp'].max()))}. "
        f"Test: the {res.split_rule}, cut at {_utc(split.cut)}: {len(split.train):,} training and "
        f"{len(split.test):,} test interactions. Catalog (items with a training interaction, the coverage "
        f"denominator): {len(models.items):,}. Users with training history: {len(models.als.user_ids):,}; "
        f"users with a {label} after the cut: {test_users:,}, of whom {with_history:,} have training history "
        "(only those are tested). "
        f"Fitting took {models.fit_seconds:.1f} s (ALS {models.als.fit_seconds:.1f} s), "
        f"recommending and {params.resamples} bootstrap resamples {res.eval_seconds:.1f} s."
    )
    for proto in res.protocols:
        head = f"{data.name}, {proto.title}: {proto.users:,} test users, {proto.truth_items:,} truth items"
        if not proto.estimates:
            report.add_text(f"**{head}.** " + " ".join(proto.notes))
            continue
        rows = [
            [model, k, *(proto.estimates[model][k][m].text() for m in (*METRICS, "coverage"))]
            for model in proto.estimates
            for k in params.ks
        ]
        report.add_table(
            head,
            ["model", "k", *(f"{METRIC_NAMES[m]} [95% CI]" for m in (*METRICS, "coverage"))],
            rows,
            note=" ".join(proto.notes),
        )
        ref = 10 if 10 in params.ks else params.ks[len(params.ks) // 2]
        diff_rows = [
            [base, d["recall"].text(), d["ndcg"].text(), _verdict(d["recall"]), _verdict(d["ndcg"])]
            for base, d in proto.diffs.items()
        ]
        report.add_table(
            f"{data.name}, {proto.title}: ALS minus baseline at k={ref} (paired bootstrap)",
            ["baseline", f"Δ recall@{ref}", f"Δ NDCG@{ref}", "recall", "NDCG"],
            diff_rows,
        )


def _verdict(d: Estimate) -> str:
    if d.low > 0:
        return "ALS better"
    if d.high < 0:
        return "ALS worse"
    return "no clear difference"


def _figure(res: DatasetResult, params: RecsParams) -> Figure | None:
    ref = 10 if 10 in params.ks else params.ks[len(params.ks) // 2]
    protos = [p for p in res.protocols if p.estimates]
    if not protos:
        return None
    fig = Figure(figsize=(9.0, 3.4 * len(protos)), layout="constrained")
    axes = fig.subplots(len(protos), 2, squeeze=False)
    for row, proto in zip(axes, protos, strict=True):
        models = list(proto.estimates)
        for ax, metric in zip(row, ("recall", "ndcg"), strict=True):
            est = [proto.estimates[m][ref][metric] for m in models]
            vals = np.array([e.value for e in est])
            err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
            ax.bar(range(len(models)), vals, yerr=err, capsize=4, color=[f"C{MODELS.index(m)}" for m in models])
            ax.set_xticks(range(len(models)), models, fontsize=8)
            ax.set_ylabel(f"{METRIC_NAMES[metric]}@{ref}")
            ax.set_title(f"{proto.title}: {METRIC_NAMES[metric]}@{ref}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{res.data.name}: 95% bootstrap CI over {params.resamples} user resamples", fontsize=10)
    return fig


def _results_json(results: list[DatasetResult]) -> dict[str, object]:
    return {
        r.data.name: {
            "cut_utc": _utc(r.split.cut),
            "split": r.split_rule,
            "train": len(r.split.train),
            "test": len(r.split.test),
            "catalog": len(r.models.items),
            "protocols": {
                p.key: {
                    "users": p.users,
                    "notes": p.notes,
                    "metrics": {
                        m: {str(k): {name: asdict(e) for name, e in by_k.items()} for k, by_k in ks.items()}
                        for m, ks in p.estimates.items()
                    },
                    "als_minus_baseline": {b: {n: asdict(e) for n, e in d.items()} for b, d in p.diffs.items()},
                }
                for p in r.protocols
            },
        }
        for r in results
    }


SHOP_FULL = (50_000, 3_000, 180)
SHOP_QUICK = (5_000, 300, 60)


def _datasets(
    dataset: str | None,
    events: Path | None,
    interactions: Path | None,
    quick: bool,
    seed: int,
    min_rating: float,
    console: Console,
) -> list[tuple[RecData, float | None, float | None, str]]:
    """(data, default test days, default test fraction, checksum name and path recorded in the report)."""
    from training.datafiles import read_shop, read_table

    choice = dataset or ("file" if events or interactions else "all")
    if choice not in ("all", "synthetic", "movielens", "file"):
        raise ValueError(f"unknown dataset {choice!r}; choose synthetic, movielens, file or all")
    if choice == "file" and not (events or interactions):
        raise ValueError("--dataset file needs --events PATH or --interactions PATH")
    out: list[tuple[RecData, float | None, float | None, str]] = []
    if choice in ("all", "synthetic"):
        from benchmarks.latency import bench_root, prepare_shop

        customers, items, days = SHOP_QUICK if quick else SHOP_FULL
        shop_dir = prepare_shop(customers, items, days, seed, bench_root(), console)
        shop = read_shop(shop_dir)
        name = f"synthetic shop ({customers:,} customers × {items:,} items × {days} days, seed {seed})"
        out.append((shop_events(shop.events, name, shop_dir / "events.parquet"), 14.0, None, "synthetic events"))
    if choice in ("all", "movielens"):
        from benchmarks.public_data import MOVIELENS_100K, fetch

        with console.status("fetching MovieLens 100K"):
            path = fetch(MOVIELENS_100K, "ml-100k.inter")
        out.append((movielens(path, min_rating), None, 0.2, "MovieLens 100K ml-100k.inter"))
    if choice in ("all", "file") and events is not None:
        with console.status(f"reading and validating {events}"):
            frame = read_table(events, "events")
        out.append((shop_events(frame, f"events file {events.name}", events), 14.0, None, f"events {events.name}"))
    if choice in ("all", "file") and interactions is not None:
        with console.status(f"reading and validating {interactions}"):
            data = load_interactions(interactions)
        out.append((data, None, 0.2, f"interactions {interactions.name}"))
    return out


def run_recs_bench(
    console: Console,
    *,
    quick: bool,
    out_dir: Path,
    seed: int = 0,
    dataset: str | None = None,
    events: Path | None = None,
    interactions: Path | None = None,
    test_days: float | None = None,
    test_fraction: float | None = None,
    ks: tuple[int, ...] = KS,
    min_rating: float = 0.0,
) -> Path:
    """Measure every dataset chosen, print the tables and write reports/recs.md (+ .json, PNGs)."""
    if test_days is not None and test_fraction is not None:
        raise ValueError("give --test-days or --test-fraction, not both")
    if not ks or min(ks) < 1:
        raise ValueError("k must be positive integers")
    params = RecsParams(ks=tuple(sorted(set(ks))), resamples=200 if quick else 1000, seed=seed)
    report = Report("recs-quick" if quick else "recs", "Recommendation quality on a time split")
    report.params = {
        "quick": quick,
        "seed": seed,
        "k": list(params.ks),
        "bootstrap": f"{params.resamples} resamples of the test users, {params.level:.0%} percentile intervals",
        "als": asdict(params.models.als),
        "item_to_item": {"recent_items": params.models.recent_items, "neighbours_per_item": params.models.neighbours},
        "popularity_window_days": params.models.popularity_days,
        "max_test_users": params.max_users,
        "movielens_min_rating": min_rating,
        "test_days": test_days,
        "test_fraction": test_fraction,
    }
    report.add_text(_METHOD)
    results = []
    for data, default_days, default_fraction, checksum_name in _datasets(
        dataset, events, interactions, quick, seed, min_rating, console
    ):
        given = test_days is not None or test_fraction is not None
        days, fraction = (test_days, test_fraction) if given else (default_days, default_fraction)
        res = run_dataset(data, days, fraction, params, console)
        results.append(res)
        if data.source is not None:
            report.add_dataset(checksum_name, data.source)
        _add_dataset(report, res, params)
        fig = _figure(res, params)
        if fig is not None:
            slug = "".join(c if c.isalnum() else "_" for c in data.name.split(" (")[0].lower()).strip("_")
            caption = f"{data.name}: recall and NDCG with 95% bootstrap CIs"
            report.add_figure(fig, f"{report.name}_{slug}_at10.png", caption)
    report.print(console)
    path = report.write(out_dir)
    results_doc = json.dumps(_results_json(results), indent=2) + "\n"
    (out_dir / f"{report.name}_results.json").write_text(results_doc, encoding="utf-8")
    console.print(f"report: {path}")
    return path


_METHOD = (
    "Time split: models are fit on interactions before the cut and tested on those after it. Test users "
    "have a positive interaction after the cut (a purchase in a shop, a rating in MovieLens, any row of an "
    "interactions file) and some training history. MovieLens: every rating, whatever its value, is one implicit "
    "interaction (a user rated what they watched); `--min-rating 4` keeps only liked movies. ALS is "
    "`training.als` with the project's default parameters (shop events weighted and time-decayed exactly as "
    "`nextbest train` does; other data by their weight with the same decay), ranked by "
    "`training.evaluate`'s top-k. Item-to-item: sum of item-item cosine co-occurrence (users who interacted "
    "with both) with the user's last distinct items. Popularity: positives in the 30 days before the cut, then "
    "all-time. Coverage: share of the catalog (items with a training interaction) in at least one top-k list; "
    "its interval is the bootstrap spread shifted to the estimate (resamples repeat users, so their raw "
    "coverage is biased low). Intervals: percentile bootstrap over users, the same seeded resamples for "
    "every model, so the ALS-minus-baseline intervals are paired."
)


def register(bench_app: typer.Typer, console: Console) -> None:
    @bench_app.command("recs")
    def bench_recs(
        dataset: Annotated[
            str | None, typer.Option(help="synthetic | movielens | file | all (default: all, or file if given)")
        ] = None,
        events: Annotated[Path | None, typer.Option(help="your events file (CSV/Parquet, documented format)")] = None,
        interactions: Annotated[
            Path | None, typer.Option(help="your CSV with user_id,item_id,timestamp[,weight]")
        ] = None,
        test_days: Annotated[float | None, typer.Option(help="test on the last N days (shop default 14)")] = None,
        test_fraction: Annotated[
            float | None, typer.Option(help="test on the last fraction of interactions (MovieLens/file default 0.2)")
        ] = None,
        k: Annotated[str, typer.Option(help="cut-offs, comma-separated")] = "5,10,20",
        min_rating: Annotated[float, typer.Option(help="MovieLens: keep ratings of at least this")] = 0.0,
        seed: int = 0,
        quick: Annotated[bool, typer.Option(help="a small, CI-sized run")] = False,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
    ) -> None:
        """Recommendation quality on a time split: ALS vs item-to-item, popularity, own most-frequent."""
        from training.datafiles import DataError

        try:
            try:
                ks = tuple(int(x) for x in k.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"--k takes comma-separated whole numbers like 5,10,20, not {k!r}") from None
            run_recs_bench(
                console,
                quick=quick,
                out_dir=out,
                seed=seed,
                dataset=dataset,
                events=events,
                interactions=interactions,
                test_days=test_days,
                test_fraction=test_fraction,
                ks=ks,
                min_rating=min_rating,
            )
        except (DataError, ValueError) as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(code=2) from exc
