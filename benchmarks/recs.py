"""`nextbest bench recs`: recommendation quality on a time split — ALS (the training code of `nextbest
train`, with its default parameters and tuned on a validation split carved out of the training data)
against item-to-item, popularity and each customer's own most-frequent items — on the synthetic shop,
MovieLens 100K and the user's own files, with bootstrap confidence intervals over users.

Two splits: `global` (one cut in time: train before, test after; the default) and `per-user` (each user's
last interactions are test; MovieLens runs both by default). Two protocols on each, both on users with
positive interactions in the test set and some training history:
- new items: truth = positive test items the user had no positive training interaction with;
  those earlier items are excluded from every model's candidates.
- repeats count: truth = every positive test item, nothing excluded. Only here can the own-most-frequent
  baseline score, and only on data where test positives repeat training ones at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import pandas as pd
import typer
from matplotlib.figure import Figure
from rich.console import Console

from api.console import print_error
from benchmarks.rec_data import (
    SPLIT_KINDS,
    RecData,
    Split,
    SplitKind,
    SplitRule,
    load_interactions,
    movielens,
    shop_events,
)
from benchmarks.rec_metrics import METRICS, Bootstrap, Estimate, per_user, recommended_matrix
from benchmarks.rec_models import (
    FULL_GRID,
    QUICK_GRID,
    ModelParams,
    Models,
    Tuning,
    TuningGrid,
    als_json,
    decay_text,
    fit_als_on,
    fit_models,
    grid_size,
    recommend_als,
    recommend_item_to_item,
    recommend_own_frequent,
    recommend_popular,
    tune_als,
)
from benchmarks.report import Report
from training.als import AlsParams

KS = (5, 10, 20)
MODELS = ("ALS", "ALS (tuned)", "item-to-item", "popularity", "own most-frequent")
ALS_MODELS = ("ALS", "ALS (tuned)")
METRIC_NAMES = {"recall": "recall", "ndcg": "NDCG", "hit": "hit rate", "coverage": "coverage"}
PER_USER_FRACTION = 0.2  # the per-user split's default test share, whatever the data


@dataclass(frozen=True)
class RecsParams:
    ks: tuple[int, ...] = KS
    resamples: int = 1000  # bootstrap resamples of the test users
    level: float = 0.95
    seed: int = 0
    max_users: int = 20_000  # a larger test population is sampled down (seeded)
    models: ModelParams = field(default_factory=ModelParams)
    grid: TuningGrid = FULL_GRID  # ALS (tuned): the candidates scored on the validation split

    @property
    def ref_k(self) -> int:
        """The k of the headline figures, the paired differences and the tuning."""
        return 10 if 10 in self.ks else self.ks[len(self.ks) // 2]


@dataclass(frozen=True)
class ProtocolResult:
    key: str
    title: str
    users: int
    truth_items: int
    catalog: int
    estimates: dict[str, dict[int, dict[str, Estimate]]]  # model -> k -> metric -> estimate
    diffs: dict[tuple[str, str], dict[str, Estimate]]  # (model, baseline) -> metric -> model minus baseline
    notes: tuple[str, ...]


def _sample(users: list[str], params: RecsParams) -> list[str]:
    if len(users) <= params.max_users:
        return users
    return sorted(np.random.default_rng(params.seed).choice(users, params.max_users, replace=False).tolist())


def _als_lists(models: Models, users: list[str], exclude: dict[str, set[str]], k: int) -> dict[str, list[list[str]]]:
    lists = {"ALS": recommend_als(models.als, users, exclude, k)}
    if models.tuned is not None:
        lists["ALS (tuned)"] = recommend_als(models.tuned, users, exclude, k)
    return lists


def evaluate_split(data: RecData, split: Split, models: Models, params: RecsParams) -> list[ProtocolResult]:
    test_pos = split.test[split.test["positive"]]
    truth = {str(u): set(g.tolist()) for u, g in test_pos.groupby("customer_id", sort=False)["item_id"]}
    known = set(models.als.user_ids.tolist())
    users = sorted(u for u in truth if u in known)
    k = max(params.ks)
    label = data.positive_label
    when = "in the test set" if split.kind == "per-user" else "after the cut"
    before = "in training" if split.kind == "per-user" else "before the cut"
    results = []
    new_users = _sample([u for u in users if truth[u] - models.seen.get(u, set())], params)
    new_truth = [truth[u] - models.seen.get(u, set()) for u in new_users]
    lists = {
        **_als_lists(models, new_users, models.seen, k),
        "item-to-item": recommend_item_to_item(models, new_users, models.seen, k),
        "popularity": recommend_popular(models, new_users, models.seen, k),
    }
    notes: tuple[str, ...] = (
        f"Truth: each user's {label}s {when} of items they had no {label} of {before}. Items the user "
        f"already had a {label} of {before} are excluded from every model's candidates.",
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
                    f"Skipped: {share} repeat an item the user already had {before}, so the own "
                    f"most-frequent baseline would score 0 by construction"
                    + (" (a user rates a movie once)." if label == "rating" else "."),
                ),
            )
        )
        return results
    rep_users = _sample(users, params)
    lists = {
        **_als_lists(models, rep_users, {}, k),
        "item-to-item": recommend_item_to_item(models, rep_users, {}, k),
        "popularity": recommend_popular(models, rep_users, {}, k),
        "own most-frequent": recommend_own_frequent(models, rep_users, k),
    }
    notes = (
        f"Truth: every item of each user's {label}s {when}, repeats included; nothing is excluded. "
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
    at_ref: dict[str, dict[str, npt.NDArray[np.float64]]] = {}
    for model, recs in lists.items():
        est[model] = {}
        for k in params.ks:
            values = per_user(recs, truths, k)
            if k == params.ref_k:
                at_ref[model] = values
            est[model][k] = {m: boot.mean(values[m]) for m in METRICS}
            est[model][k]["coverage"] = boot.coverage(recommended_matrix(recs, k, catalog))
    pairs = [(m, base) for m in ALS_MODELS if m in at_ref for base in at_ref if base not in ALS_MODELS]
    if "ALS (tuned)" in at_ref:
        pairs.append(("ALS (tuned)", "ALS"))
    diffs = {(m, base): {x: boot.mean(at_ref[m][x] - at_ref[base][x]) for x in ("recall", "ndcg")} for m, base in pairs}
    return ProtocolResult(key, title, len(users), sum(map(len, truths)), len(catalog), est, diffs, notes)


@dataclass(frozen=True)
class DatasetResult:
    data: RecData
    rule: SplitRule
    split: Split
    models: Models
    tuning: Tuning | None
    tuning_note: str  # why there is no tuned row, when there is none
    refit_seconds: float  # ALS refit on the whole training side with the chosen parameters
    protocols: list[ProtocolResult]
    eval_seconds: float


def _params_text(p: AlsParams) -> str:
    return f"factors {p.factors}, regularization {p.regularization:g}, alpha {p.alpha:g}, time decay {decay_text(p)}"


def run_dataset(data: RecData, rule: SplitRule, params: RecsParams, console: Console) -> DatasetResult:
    split = rule.apply(data.frame)
    n_items = split.train["item_id"].nunique()
    if n_items <= max(params.ks):
        raise ValueError(f"{data.name}: {n_items} training items; need more than k")
    what = f"{data.name}, {rule.kind} split"
    with console.status(f"{what}: fitting ALS, item-to-item and baselines on {len(split.train):,} interactions"):
        models = fit_models(data, split, params.models)
    tuning: Tuning | None = None
    note, refit = "", 0.0
    fits = grid_size(params.grid, params.models.als)
    with console.status(f"{what}: tuning ALS on a validation split of the training side ({fits} fits)") as status:

        def progress(done: int, p: AlsParams) -> None:
            status.update(f"{what}: tuning ALS on the validation split, fit {done + 1}/{fits}: {_params_text(p)}")

        try:
            tuning = tune_als(data, split, rule, params.models.als, params.grid, params.ref_k, progress)
        except ValueError as exc:
            note = f"ALS (tuned) left out: {exc}."
        if tuning is not None:
            status.update(f"{what}: refitting ALS with the chosen parameters on the whole training side")
            if tuning.chosen == params.models.als:
                tuned = models.als  # the same fit: same data, parameters and seed
            else:
                tuned = fit_als_on(data, split.train, models.items, split.cut, tuning.chosen)
                refit = tuned.fit_seconds
            models = replace(models, tuned=tuned)
    t0 = time.perf_counter()
    with console.status(f"{what}: recommending and bootstrapping ({params.resamples} resamples)"):
        protocols = evaluate_split(data, split, models, params)
    return DatasetResult(data, rule, split, models, tuning, note, refit, protocols, time.perf_counter() - t0)


def _utc(ts: int) -> str:
    return str(pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M UTC"))


def _add_data_intro(report: Report, data: RecData) -> None:
    report.add_text(
        f"## {data.name}\n\n"
        f"{len(data.frame):,} interactions ({int(data.frame['positive'].sum()):,} {data.positive_label}s) from "
        f"{_utc(int(data.frame['timestamp'].min()))} to {_utc(int(data.frame['timestamp'].max()))}."
    )


def _leak_text(data: RecData) -> str:
    """The per-user split's leak, named; on MovieLens also why it is still the standard comparison."""
    what = f"{data.positive_label}s"
    text = (
        f"Leak: the per-user split holds out each user's own last interactions and trains on everybody's "
        f"earlier ones, so training contains other users' {what} made after a given user's test {what}: when "
        "the models score that user they already know what the rest of the audience went on to do — the "
        "future of the catalogue's popularity and co-occurrences. No deployed model has that; it favours the "
        "models that learn from other users (ALS, item-to-item, popularity), and the global split has no such "
        "leak."
    )
    if data.positive_label == "rating":
        text += (
            " It is still the standard comparison: most published MovieLens 100K results hold out a share of "
            "each user's own ratings (the last ones, or random ones) rather than cutting the calendar, and it "
            "tests every user, where the global cut leaves most of them with either no history or no future. "
            "Read its figures as the ones comparable with papers, and as optimistic for production; the global "
            "split is the deployment-like one."
        )
    return text


def _add_side_by_side(report: Report, data: RecData, results: list[DatasetResult], params: RecsParams) -> None:
    ref = params.ref_k
    news = [next(p for p in r.protocols if p.key == "new") for r in results]
    models = [m for m in MODELS if any(m in p.estimates for p in news)]
    headers = ["model"]
    for r, p in zip(results, news, strict=True):
        headers += [f"{r.rule.kind} ({p.users:,} users): recall@{ref}", f"{r.rule.kind}: NDCG@{ref}"]
    rows = []
    for m in models:
        row: list[object] = [m]
        for p in news:
            est = p.estimates.get(m)
            row += [est[ref]["recall"].text(), est[ref]["ndcg"].text()] if est else ["–", "–"]
        rows.append(row)
    tuned = "; ".join(f"{r.rule.kind}: {_params_text(r.tuning.chosen)}" for r in results if r.tuning is not None)
    report.add_table(
        f"{data.name}: both splits side by side, new items, k={ref} [95% CI]",
        headers,
        rows,
        note=f"ALS (tuned) chose — {tuned}. Per-user figures are optimistic: see the leak named in the per-user "
        "split's section below.",
    )


def _add_split(report: Report, res: DatasetResult, params: RecsParams) -> None:
    data, split, models = res.data, res.split, res.models
    label = data.positive_label
    test_ids = np.asarray(split.test.loc[split.test["positive"], "customer_id"].unique(), dtype=str)
    test_users, with_history = len(test_ids), int(np.isin(test_ids, models.als.user_ids).sum())
    if split.kind == "per-user":
        how = (
            f"Test: {res.rule.describe()}; everything earlier of every user trains "
            f"({len(split.train):,} training and {len(split.test):,} test interactions). Time decay and "
            f"popularity look back from the end of training ({_utc(split.cut)}); popularity is all-time "
            "training counts here, since users' test times spread over the whole period. "
        )
        how += _leak_text(data) + " "
    else:
        how = (
            f"Test: the {res.rule.describe()}, cut at {_utc(split.cut)}: {len(split.train):,} training and "
            f"{len(split.test):,} test interactions. "
        )
    report.add_text(
        f"### {data.name}: {split.kind} split\n\n{how}"
        f"Catalog (items with a training interaction, the coverage denominator): {len(models.items):,}. "
        f"Users with training history: {len(models.als.user_ids):,}; users with a test {label}: "
        f"{test_users:,}, of whom {with_history:,} have training history (only those are tested). "
        f"Fitting took {models.fit_seconds:.1f} s (ALS {models.als.fit_seconds:.1f} s), tuning "
        f"{res.tuning.seconds if res.tuning else 0:.1f} s and the tuned refit {res.refit_seconds:.1f} s, "
        f"recommending and {params.resamples} bootstrap resamples {res.eval_seconds:.1f} s."
    )
    _add_tuning(report, res, params.grid)
    for proto in res.protocols:
        head = f"{data.name}, {split.kind} split, {proto.title}: {proto.users:,} test users"
        head += f", {proto.truth_items:,} truth items"
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
        ref = params.ref_k
        diff_rows = [
            [f"{m} − {base}", d["recall"].text(), d["ndcg"].text(), _verdict(m, d["recall"]), _verdict(m, d["ndcg"])]
            for (m, base), d in proto.diffs.items()
        ]
        report.add_table(
            f"{data.name}, {split.kind} split, {proto.title}: ALS minus baselines, tuned minus default, at k={ref} "
            "(paired bootstrap)",
            ["difference", f"Δ recall@{ref}", f"Δ NDCG@{ref}", "recall", "NDCG"],
            diff_rows,
        )


def _validation_gain(t: Tuning) -> Estimate:
    """Chosen minus default validation recall, paired bootstrap over the validation users."""
    chosen = next(p for p in t.points if p.params == t.chosen)
    return Bootstrap(t.validation_users, 1000, 0).mean(chosen.user_recall - t.points[0].user_recall)


def _add_tuning(report: Report, res: DatasetResult, grid: TuningGrid) -> None:
    t = res.tuning
    if t is None:
        report.add_text(f"**{res.data.name}, {res.split.kind} split.** {res.tuning_note}")
        return
    default = t.points[0]
    chosen = next(p for p in t.points if p.params == t.chosen)
    rows = [
        [
            "default" if n == 0 else ("1" if p.params.factors == default.params.factors else "2"),
            p.params.factors,
            f"{p.params.regularization:g}",
            f"{p.params.alpha:g}",
            decay_text(p.params),
            f"{p.recall:.4f}",
            f"{p.ndcg:.4f}",
            f"{p.seconds:.2f}",
            "chosen" if p.params == t.chosen else "",
        ]
        for n, p in enumerate(t.points)
    ]
    v = t.validation
    gain = _validation_gain(t)
    edges = grid.edges(t.chosen)
    edge = f" The chosen {' and '.join(edges)} sit at the edge of the grid." if edges else ""
    report.add_table(
        f"{res.data.name}, {res.split.kind} split: ALS (tuned), grid scored on the validation split",
        ["stage", "factors", "regularization", "alpha", "time decay", f"recall@{t.k}", f"NDCG@{t.k}", "fit s", ""],
        rows,
        note=(
            f"Chosen on a validation split carved out of the training side only: the same split rule applied "
            f"again to the {len(res.split.train):,} training interactions ({len(v.train):,} inner-training, "
            f"{len(v.test):,} validation interactions; {t.validation_users:,} validation users, scored on new "
            f"items with seen ones excluded). Stage 1: every regularization × alpha × time decay at "
            f"{default.params.factors} factors, plus the defaults; stage 2: the other factor counts at stage 1's "
            f"best. Highest validation recall@{t.k} wins (then NDCG). {len(t.points)} fits, {t.seconds:.1f} s. "
            f"Chosen: {_params_text(t.chosen)}, {t.chosen.iterations} iterations: validation recall@{t.k} "
            f"{chosen.recall:.4f} against {default.recall:.4f} for the defaults, a gain of {gain.text(4)} (paired "
            f"bootstrap over the validation users; selecting the best of {len(t.points)} also flatters it).{edge} "
            "Then refit once on the whole training side and scored on the test set once."
        ),
    )


def _verdict(model: str, d: Estimate) -> str:
    if d.low > 0:
        return f"{model} better"
    if d.high < 0:
        return f"{model} worse"
    return "no clear difference"


def _figure(res: DatasetResult, params: RecsParams) -> Figure | None:
    ref = params.ref_k
    protos = [p for p in res.protocols if p.estimates]
    if not protos:
        return None
    fig = Figure(figsize=(10.0, 3.4 * len(protos)), layout="constrained")
    axes = fig.subplots(len(protos), 2, squeeze=False)
    for row, proto in zip(axes, protos, strict=True):
        models = list(proto.estimates)
        for ax, metric in zip(row, ("recall", "ndcg"), strict=True):
            est = [proto.estimates[m][ref][metric] for m in models]
            vals = np.array([e.value for e in est])
            err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
            ax.bar(range(len(models)), vals, yerr=err, capsize=4, color=[f"C{MODELS.index(m)}" for m in models])
            ax.set_xticks(range(len(models)), models, fontsize=7)
            ax.set_ylabel(f"{METRIC_NAMES[metric]}@{ref}")
            ax.set_title(f"{proto.title}: {METRIC_NAMES[metric]}@{ref}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{res.data.name}, {res.split.kind} split: 95% bootstrap CI over {params.resamples} user resamples",
        fontsize=10,
    )
    return fig


def _split_json(r: DatasetResult) -> dict[str, object]:
    tuning: dict[str, object] | None = None
    if r.tuning is not None:
        t = r.tuning
        tuning = {
            "chosen": als_json(t.chosen),
            "k": t.k,
            "validation_train": len(t.validation.train),
            "validation_test": len(t.validation.test),
            "validation_users": t.validation_users,
            "validation_recall_gain_over_default": asdict(_validation_gain(t)),
            "seconds": t.seconds,
            "grid": [
                {**als_json(p.params), "recall": p.recall, "ndcg": p.ndcg, "fit_seconds": p.seconds} for p in t.points
            ],
        }
    return {
        "cut_utc": _utc(r.split.cut),
        "split": r.rule.describe(),
        "train": len(r.split.train),
        "test": len(r.split.test),
        "catalog": len(r.models.items),
        "als_tuning": tuning,
        "als_tuning_note": r.tuning_note,
        "seconds": {
            "fit": r.models.fit_seconds,
            "tune": r.tuning.seconds if r.tuning else 0.0,
            "refit": r.refit_seconds,
            "evaluate": r.eval_seconds,
        },
        "protocols": {
            p.key: {
                "users": p.users,
                "notes": p.notes,
                "metrics": {
                    m: {str(k): {name: asdict(e) for name, e in by_k.items()} for k, by_k in ks.items()}
                    for m, ks in p.estimates.items()
                },
                "differences": {
                    f"{m} minus {b}": {n: asdict(e) for n, e in d.items()} for (m, b), d in p.diffs.items()
                },
            }
            for p in r.protocols
        },
    }


def _results_json(results: list[DatasetResult]) -> dict[str, dict[str, object]]:
    """data set name -> split kind -> results."""
    out: dict[str, dict[str, object]] = {}
    for r in results:
        out.setdefault(r.data.name, {})[r.rule.kind] = _split_json(r)
    return out


SHOP_FULL = (50_000, 3_000, 180)
SHOP_QUICK = (5_000, 300, 60)


@dataclass(frozen=True)
class _Input:
    data: RecData
    test_days: float | None  # the global split's defaults for this kind of data
    test_fraction: float | None
    both_splits: bool  # run the per-user split beside the global one unless --split says otherwise
    checksum_name: str  # name of the data file recorded in the report


def _datasets(
    dataset: str | None,
    events: Path | None,
    interactions: Path | None,
    quick: bool,
    seed: int,
    min_rating: float,
    console: Console,
) -> list[_Input]:
    from training.datafiles import read_shop, read_table

    choice = dataset or ("file" if events or interactions else "all")
    if choice not in ("all", "synthetic", "movielens", "file"):
        raise ValueError(f"unknown dataset {choice!r}; choose synthetic, movielens, file or all")
    if choice == "file" and not (events or interactions):
        raise ValueError("--dataset file needs --events PATH or --interactions PATH")
    out: list[_Input] = []
    if choice in ("all", "synthetic"):
        from benchmarks.latency import bench_root, prepare_shop

        customers, items, days = SHOP_QUICK if quick else SHOP_FULL
        shop_dir = prepare_shop(customers, items, days, seed, bench_root(), console)
        shop = read_shop(shop_dir)
        name = f"synthetic shop ({customers:,} customers × {items:,} items × {days} days, seed {seed})"
        data = shop_events(shop.events, name, shop_dir / "events.parquet")
        out.append(_Input(data, 14.0, None, False, "synthetic events"))
    if choice in ("all", "movielens"):
        from benchmarks.public_data import MOVIELENS_100K, fetch

        with console.status("fetching MovieLens 100K"):
            path = fetch(MOVIELENS_100K, "ml-100k.inter")
        out.append(_Input(movielens(path, min_rating), None, 0.2, True, "MovieLens 100K ml-100k.inter"))
    if choice in ("all", "file") and events is not None:
        with console.status(f"reading and validating {events}"):
            frame = read_table(events, "events")
        data = shop_events(frame, f"events file {events.name}", events)
        out.append(_Input(data, 14.0, None, False, f"events {events.name}"))
    if choice in ("all", "file") and interactions is not None:
        with console.status(f"reading and validating {interactions}"):
            data = load_interactions(interactions)
        out.append(_Input(data, None, 0.2, False, f"interactions {interactions.name}"))
    return out


def _rules(inp: _Input, split: str | None, test_days: float | None, test_fraction: float | None) -> list[SplitRule]:
    kinds: tuple[SplitKind, ...]
    if split is None:
        kinds = SPLIT_KINDS if inp.both_splits else ("global",)
    elif split == "both":
        kinds = SPLIT_KINDS
    elif split == "global":
        kinds = ("global",)
    elif split == "per-user":
        kinds = ("per-user",)
    else:
        raise ValueError(f"unknown split {split!r}; choose global, per-user or both")
    given = test_days is not None or test_fraction is not None
    days, fraction = (test_days, test_fraction) if given else (inp.test_days, inp.test_fraction)
    rules = []
    for kind in kinds:
        if kind == "global":
            rules.append(SplitRule("global", days, fraction))
        elif split is None:  # the default companion split takes its own default unless a fraction is given
            rules.append(SplitRule("per-user", None, test_fraction or PER_USER_FRACTION))
        else:
            rules.append(SplitRule("per-user", test_days, test_fraction if given else PER_USER_FRACTION))
    return rules


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
    split: str | None = None,
) -> Path:
    """Measure every dataset chosen, print the tables and write reports/recs.md (+ .json, PNGs).

    `split`: global, per-user or both; by default global, and both on MovieLens."""
    if test_days is not None and test_fraction is not None:
        raise ValueError("give --test-days or --test-fraction, not both")
    if split is not None and split not in (*SPLIT_KINDS, "both"):
        raise ValueError(f"unknown split {split!r}; choose global, per-user or both")
    if not ks or min(ks) < 1:
        raise ValueError("k must be positive integers")
    params = RecsParams(
        ks=tuple(sorted(set(ks))), resamples=200 if quick else 1000, seed=seed, grid=QUICK_GRID if quick else FULL_GRID
    )
    report = Report("recs-quick" if quick else "recs", "Recommendation quality on a time split")
    report.params = {
        "quick": quick,
        "seed": seed,
        "k": list(params.ks),
        "bootstrap": f"{params.resamples} resamples of the test users, {params.level:.0%} percentile intervals",
        "als": als_json(params.models.als),
        "als_tuning_grid": {
            **{k: list(v) for k, v in asdict(params.grid).items()},
            "fits": grid_size(params.grid, params.models.als),
            "chosen_by": f"validation recall@{params.ref_k} (then NDCG)",
        },
        "item_to_item": {"recent_items": params.models.recent_items, "neighbours_per_item": params.models.neighbours},
        "popularity_window_days": params.models.popularity_days,
        "max_test_users": params.max_users,
        "movielens_min_rating": min_rating,
        "split": split or "global (MovieLens: global and per-user)",
        "test_days": test_days,
        "test_fraction": test_fraction,
    }
    report.add_text(_METHOD)
    results = []
    for inp in _datasets(dataset, events, interactions, quick, seed, min_rating, console):
        rules = _rules(inp, split, test_days, test_fraction)  # bad combinations fail before any work
        data_results = [run_dataset(inp.data, rule, params, console) for rule in rules]
        results += data_results
        if inp.data.source is not None:
            report.add_dataset(inp.checksum_name, inp.data.source)
        _add_data_intro(report, inp.data)
        if len(data_results) > 1:
            _add_side_by_side(report, inp.data, data_results, params)
        for res in data_results:
            _add_split(report, res, params)
            fig = _figure(res, params)
            if fig is not None:
                slug = "".join(c if c.isalnum() else "_" for c in inp.data.name.split(" (")[0].lower()).strip("_")
                kind = "" if res.rule.kind == "global" else "_per_user"
                caption = f"{inp.data.name}, {res.rule.kind} split: recall and NDCG with 95% bootstrap CIs"
                report.add_figure(fig, f"{report.name}_{slug}{kind}_at10.png", caption)
    report.print(console)
    path = report.write(out_dir)
    results_doc = json.dumps(_results_json(results), indent=2, allow_nan=False) + "\n"
    (out_dir / f"{report.name}_results.json").write_text(results_doc, encoding="utf-8")
    console.print(f"report: {path}")
    return path


_METHOD = (
    "Time splits: models are fit on the training side and tested on the rest. **Global split** (the default, "
    "and the deployment-like one): one cut in time, train strictly before it, test at or after it. "
    "**Per-user split** (MovieLens runs both): each user's last 20 % of interactions in time order (at least "
    "one) are test, everything earlier of every user trains — see the leak this lets in under MovieLens. "
    "Test users have a positive test interaction (a purchase in a shop, a rating in MovieLens, any row of an "
    "interactions file) and some training history. MovieLens: every rating, whatever its value, is one "
    "implicit interaction (a user rated what they watched); `--min-rating 4` keeps only liked movies. "
    "**ALS** is `training.als` with the project's default parameters (shop events weighted and time-decayed "
    "exactly as `nextbest train` does; other data by their weight with the same decay), ranked by "
    "`training.evaluate`'s top-k. **ALS (tuned)**: the same code with parameters chosen from a small grid "
    "(factors, regularization, alpha, time decay on/off) on a validation split carved out of the training "
    "side only (the same split applied again inside it), then refit on the whole training side and scored "
    "on the test set once; the test set is never used to choose. Item-to-item: sum of item-item cosine "
    "co-occurrence (users who interacted with both) with the user's last distinct items. Popularity: "
    "positives in the 30 days before the cut, then all-time (per-user split: all-time). Coverage: share of "
    "the catalog (items with a training interaction) in at least one top-k list; its interval is the "
    "bootstrap spread shifted to the estimate (resamples repeat users, so their raw coverage is biased low). "
    "Intervals: percentile bootstrap over users, the same seeded resamples for every model, so the "
    "differences between models get paired intervals."
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
        split: Annotated[
            str | None,
            typer.Option(help="global | per-user | both (default: global, and both on MovieLens)"),
        ] = None,
        test_days: Annotated[float | None, typer.Option(help="test on the last N days (shop default 14)")] = None,
        test_fraction: Annotated[
            float | None,
            typer.Option(help="test on the last fraction of interactions (MovieLens/file/per-user default 0.2)"),
        ] = None,
        k: Annotated[str, typer.Option(help="cut-offs, comma-separated")] = "5,10,20",
        min_rating: Annotated[float, typer.Option(help="MovieLens: keep ratings of at least this")] = 0.0,
        seed: int = 0,
        quick: Annotated[bool, typer.Option(help="a small, CI-sized run (ALS tuning: 2 grid points)")] = False,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
    ) -> None:
        """Recommendation quality on a time split: ALS (default and tuned) vs item-to-item, popularity,
        own most-frequent."""
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
                split=split,
            )
        except (DataError, ValueError) as exc:
            print_error(console, exc)
            raise typer.Exit(code=2) from exc
