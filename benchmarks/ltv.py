"""`nextbest bench ltv`: each customer's spend in a holdout period, predicted from a calibration period.

Three predictors see only the calibration transactions: our LightGBM value model (the project's point-in-time
DuckDB features and Tweedie booster, scored through its ONNX export in ONNX Runtime), BG/NBD + Gamma-Gamma
(`benchmarks.ltv_baselines`) and the past average. Defaults follow the literature on CDNOW: 39 calibration
weeks, 39 holdout weeks. Reported: MAE, RMSE, Spearman and top-decile lift with bootstrap intervals, a decile
plot, the RFM segment table, and the BG/NBD fit against the published CDNOW parameters.

The value model's label window cannot be the holdout's length: its labels must end inside the calibration
period and its as-of dates need history before them. It learns spend over `label_weeks` (default: half the
calibration period, at most the holdout) and its prediction is scaled by holdout weeks / label weeks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import typer
from matplotlib.figure import Figure
from rich.console import Console

from api.console import print_error
from benchmarks.ltv_baselines import BgNbd, GammaGamma, bgnbd_gamma_gamma, past_average, published_cdnow_check
from benchmarks.ltv_data import (
    CalibrationSummary,
    Windows,
    read_cdnow,
    read_purchase_events,
    read_transactions_csv,
    split,
    windows_for,
)
from benchmarks.public_data import CDNOW, fetch
from benchmarks.report import Report
from engine.types import SECONDS_PER_DAY
from training.datafiles import DataError

F64 = npt.NDArray[np.float64]
MODELS = ("LightGBM value model", "BG/NBD + Gamma-Gamma", "past average")
METRICS = ("mae", "rmse", "spearman", "top_decile_lift")
QUICK_CUSTOMERS = 2500
RFM_HEADERS: tuple[str, ...] = ("segment", "customers", "% customers", "mean calibration spend")
RFM_HEADERS += ("mean holdout spend", "% of holdout spend", "% buying in holdout")


# ---------------------------------------------------------------- our value model


def write_shop(calibration: pd.DataFrame, shop: Path) -> None:
    """The calibration transactions as the project's shop files: one purchase event per line, customers created
    at their first purchase, one catalog category."""
    first = calibration.groupby("customer_id", sort=True)["ts"].min()
    stamp = pa.timestamp("us", tz="UTC")
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array(first.index.astype(str)),
                "created_at": pa.array(first.to_numpy() * 1_000_000, stamp),
            }
        ),
        shop / "customers.parquet",
    )
    items = np.unique(calibration["item_id"].to_numpy(dtype=str))
    pq.write_table(
        pa.table({"item_id": pa.array(items), "category": pa.array(["all"] * len(items))}), shop / "catalog.parquet"
    )
    qty = calibration["quantity"].to_numpy(dtype=np.int64)
    events = {
        "event_id": pa.array([f"e{i}" for i in range(len(calibration))]),
        "customer_id": pa.array(calibration["customer_id"].to_numpy(dtype=str)),
        "type": pa.array(["purchase"] * len(calibration)),
        "item_id": pa.array(calibration["item_id"].to_numpy(dtype=str)),
        "quantity": pa.array(qty),
        "price": pa.array(calibration["amount"].to_numpy(dtype=np.float64) / qty),
        "timestamp": pa.array(calibration["ts"].to_numpy(dtype=np.int64) * 1_000_000, stamp),
    }
    pq.write_table(pa.table(events), shop / "events.parquet")


def training_as_of_dates(calibration: pd.DataFrame, w: Windows, label_days: int) -> list[int]:
    """As-of dates whose label window ends by the last calibration day, 14 days apart, after 30 days of history."""
    from training.offer_models import AS_OF_STEP_DAYS, MIN_HISTORY_DAYS

    last_day = int(calibration["ts"].max()) // SECONDS_PER_DAY * SECONDS_PER_DAY
    latest, earliest = last_day - label_days * SECONDS_PER_DAY, w.start + MIN_HISTORY_DAYS * SECONDS_PER_DAY
    return sorted(range(latest, earliest - 1, -AS_OF_STEP_DAYS * SECONDS_PER_DAY))


def lightgbm_value(
    calibration: pd.DataFrame, summary: CalibrationSummary, w: Windows, label_weeks: int, seed: int
) -> tuple[F64, pd.DataFrame, dict[str, object]]:
    """(predicted holdout spend per summary customer, features at the calibration end, facts about the fit)."""
    from engine.scoring import load_scoring_model
    from training.features import FEATURE_COLUMNS, customer_features, training_examples
    from training.propensity import LgbmParams, ModelSpec, export_onnx, feature_matrix, fit_booster, split_examples

    label_days = label_weeks * 7
    dates = training_as_of_dates(calibration, w, label_days)
    if not dates:
        raise ValueError(
            f"a {w.calibration_weeks}-week calibration period leaves no training as-of date with 30 days of history "
            f"before it and {label_weeks} label weeks after it: lengthen the calibration or shorten the label weeks"
        )
    with tempfile.TemporaryDirectory(prefix="nextbest-ltv-") as tmp:
        shop = Path(tmp)
        write_shop(calibration, shop)
        examples = training_examples(shop, dates, label_window_days=label_days)
        valid, method = split_examples(examples)
        x = feature_matrix(examples, FEATURE_COLUMNS)
        y = examples["value_next_90d"].to_numpy(dtype=np.float64)
        booster, best = fit_booster(
            x[~valid], y[~valid], x[valid], y[valid], "regression", FEATURE_COLUMNS, LgbmParams(seed=seed)
        )
        now = customer_features(shop, w.calibration_end).set_index("customer_id").reindex(summary.customer_id)
        if now["segment"].isna().any():
            raise RuntimeError("the feature SQL lost customers of the calibration summary")
        x_now = feature_matrix(now, FEATURE_COLUMNS)
        spec = ModelSpec("value_ltv", "value_next_90d", "regression")
        export_onnx(booster, shop / "value_ltv.onnx", spec, FEATURE_COLUMNS)
        served = load_scoring_model(shop / "value_ltv.onnx", spec.name, spec.kind, FEATURE_COLUMNS).predict(x_now)
    native = booster.predict(x_now)
    scale = w.holdout_weeks / label_weeks
    info: dict[str, object] = {
        "as_of_dates": [str(pd.Timestamp(d, unit="s").date()) for d in dates],
        "label_weeks": label_weeks,
        "scale": scale,
        "examples": len(examples),
        "validation": method,
        "best_iteration": best,
        "onnx_max_rel_diff": float(np.max(np.abs(served - native) / np.maximum(1.0, np.abs(native)))),
    }
    return served * scale, now.reset_index(), info


# ---------------------------------------------------------------- metrics


def metrics(actual: F64, predicted: F64) -> dict[str, float]:
    """MAE, RMSE, Spearman and top-decile lift (share of actual value in the top 10 % predicted ÷ 10 %)."""
    from training.propensity import regression_metrics

    got = regression_metrics(actual, predicted)  # None where undefined (e.g. Spearman of a constant)
    return {k: float(v) if isinstance(v := got[k], float) else float("nan") for k in METRICS}


def bootstrap(
    actual: F64, predictions: dict[str, F64], rounds: int, seed: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """95 % percentile intervals of each metric, resampling customers (the same resamples for every model)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[dict[str, float]]] = {name: [] for name in predictions}
    for _ in range(rounds):
        idx = rng.integers(0, len(actual), len(actual))
        for name, pred in predictions.items():
            draws[name].append(metrics(actual[idx], pred[idx]))
    return {
        name: {
            m: (float(np.nanpercentile([d[m] for d in ds], 2.5)), float(np.nanpercentile([d[m] for d in ds], 97.5)))
            for m in METRICS
        }
        for name, ds in draws.items()
    }


def decile_figure(actual: F64, predictions: dict[str, F64]) -> Figure:
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, len(predictions), sharey=True)
    for ax, (name, pred) in zip(np.atleast_1d(axes), predictions.items(), strict=True):
        order = np.argsort(-pred, kind="stable")
        groups = np.array_split(order, 10)
        deciles = np.arange(1, 11)
        ax.plot(deciles, [pred[g].mean() for g in groups], "o--", label="mean predicted")
        ax.plot(deciles, [actual[g].mean() for g in groups], "s-", label="mean actual")
        ax.set_title(name)
        ax.set_xlabel("decile of predicted holdout spend (1 = highest)")
        ax.set_xticks(deciles)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("holdout spend per customer")
    np.atleast_1d(axes)[0].legend()
    return fig


# ---------------------------------------------------------------- report sections


def _rfm_rows(
    now: pd.DataFrame, summary: CalibrationSummary, actual: F64, predictions: dict[str, F64]
) -> list[list[object]]:
    """Per RFM segment at the calibration end (training.features' scores and SEGMENT_RULES): size and value."""
    from training.features import SEGMENTS

    seg = now["segment"].to_numpy(dtype=object)
    rows: list[list[object]] = []
    for name in [s for s in SEGMENTS if (seg == s).any()]:
        m = seg == name
        rows.append(
            [
                name,
                int(m.sum()),
                round(100 * m.mean(), 2),
                round(float(summary.spend[m].mean()), 2),
                round(float(actual[m].mean()), 2),
                round(100 * float(actual[m].sum() / max(actual.sum(), 1e-12)), 1),
                round(100 * float((actual[m] > 0).mean()), 1),
                *(round(float(p[m].mean()), 2) for p in predictions.values()),
            ]
        )
    return rows


def _validation(report: Report, console: Console) -> None:
    """BG/NBD and Gamma-Gamma on Fader & Hardie's own CDNOW sample, against the published estimates."""
    with console.status("checking BG/NBD and Gamma-Gamma against the published CDNOW parameters"):
        check = published_cdnow_check()
    report.add_dataset("CDNOW 1/10 sample (Fader & Hardie)", check.paths[0])
    report.add_dataset("CDNOW sample, 39-week summary (Fader & Hardie)", check.paths[1])
    report.add_table(
        f"BG/NBD and Gamma-Gamma fitted here vs published, on Fader & Hardie's {check.customers:,}-customer sample",
        ["model", "parameter", "fitted here", "published"],
        check.rows,
        note="BG/NBD: Fader, Hardie & Lee (2005), 39-week calibration; Gamma-Gamma: Fader, Hardie & Lee (2005), "
        "RFM and CLV, on the repeat buyers' mean repeat spend.",
    )
    d = check.summary_diff
    report.add_text(
        "The calibration summary this benchmark computes from the sample's transactions against Fader & Hardie's "
        f"own (largest absolute difference over the {check.customers:,} customers): x {d['x']:g}, "
        f"t_x {d['t_x']:.4f} weeks, T {d['T']:.4f} weeks, z̄ {d['zbar']:.4f} (theirs is rounded to 2 decimals)."
    )


def _load(console: Console, report: Report, transactions: Path | None, events: Path | None) -> tuple[pd.DataFrame, str]:
    if transactions is not None and events is not None:
        raise ValueError("give --transactions or --events, not both")
    if transactions is not None:
        report.add_dataset("transactions", transactions)
        return read_transactions_csv(transactions), f"transactions file {transactions.name}"
    if events is not None:
        report.add_dataset("events (purchases)", events)
        return read_purchase_events(events), f"events file {events.name}"
    with console.status("fetching CDNOW"):
        path = fetch(CDNOW, "CDNOW_master.txt")
    report.add_dataset("CDNOW master", path)
    return read_cdnow(path), "CDNOW master (23,570 customers who first bought in Q1 1997)"


@dataclass(frozen=True)
class HoldoutPredictions:
    summary: CalibrationSummary  # the customers, sorted by id
    actual: F64  # their holdout spend
    by_model: dict[str, F64]  # predicted holdout spend per model (MODELS order)
    segments: pd.DataFrame  # training.features' features, RFM scores and segment at the calibration end
    bg: BgNbd
    gg: GammaGamma
    lightgbm: dict[str, object]


def predict_holdout(
    data: pd.DataFrame, w: Windows, label_weeks: int, seed: int, console: Console
) -> HoldoutPredictions:
    """Split, then fit and predict each model from the calibration transactions alone."""
    calibration, summary, actual = split(data, w)
    with console.status("training the LightGBM value model on calibration-period examples"):
        ours, segments, info = lightgbm_value(calibration, summary, w, label_weeks, seed)
    with console.status("fitting BG/NBD and Gamma-Gamma"):
        bg_pred, bg, gg = bgnbd_gamma_gamma(summary, w.holdout_weeks)
    naive = past_average(summary, w.calibration_weeks, w.holdout_weeks)
    predictions = dict(zip(MODELS, (ours, bg_pred, naive), strict=True))
    return HoldoutPredictions(summary, actual, predictions, segments, bg, gg, info)


def _day(ts: int) -> str:
    return str(pd.Timestamp(ts, unit="s").date())


def _fit_rows(bg: BgNbd, gg: GammaGamma, info: dict[str, object], repeat_buyers: int) -> list[list[object]]:
    dates = info["as_of_dates"]
    assert isinstance(dates, list)
    held_out = "the latest as-of date" if info["validation"] == "time" else "a fifth of the customers (one as-of date)"
    return [
        ["BG/NBD", f"r={bg.r:.3f} α={bg.alpha:.3f} a={bg.a:.3f} b={bg.b:.3f} (log-likelihood {bg.log_likelihood:.1f})"],
        ["Gamma-Gamma", f"p={gg.p:.3f} q={gg.q:.3f} γ={gg.gamma:.3f} (on {repeat_buyers} repeat buyers)"],
        [
            "LightGBM",
            f"{info['examples']} examples at {len(dates)} as-of dates {dates[0]}..{dates[-1]}, label window "
            f"{info['label_weeks']} weeks, prediction × {info['scale']:.3f}; {info['best_iteration']} trees (early "
            f"stopping on {held_out}); ONNX Runtime vs LightGBM: max relative difference "
            f"{info['onnx_max_rel_diff']:.1e}",
        ],
    ]


def run_ltv_bench(
    console: Console,
    *,
    quick: bool,
    out_dir: Path,
    seed: int = 0,
    transactions: Path | None = None,
    events: Path | None = None,
    calibration_weeks: int = 39,
    holdout_weeks: int = 39,
    label_weeks: int | None = None,
    bootstrap_rounds: int | None = None,
) -> Path:
    """Run the benchmark, print it, write the report; returns the Markdown path.

    CDNOW by default, or the user's `transactions` CSV or `events` file. `quick` keeps QUICK_CUSTOMERS random
    customers and 200 bootstrap rounds.
    """
    label_weeks = label_weeks or max(5, min(holdout_weeks, calibration_weeks // 2))
    rounds = bootstrap_rounds or (200 if quick else 1000)
    params: dict[str, object] = {"seed": seed, "calibration_weeks": calibration_weeks, "holdout_weeks": holdout_weeks}
    params |= {"label_weeks": label_weeks, "bootstrap_rounds": rounds, "quick": quick}
    report = Report(
        name="ltv-quick" if quick else "ltv",
        title="Customer value: holdout spend predicted from a calibration period",
        params=params,
    )
    data, source = _load(console, report, transactions, events)
    if quick:
        ids = np.unique(data["customer_id"].to_numpy(dtype=str))
        keep = np.random.default_rng(seed).choice(ids, size=min(QUICK_CUSTOMERS, len(ids)), replace=False)
        data = data[data["customer_id"].isin(keep)].reset_index(drop=True)
    w = windows_for(data, calibration_weeks, holdout_weeks)
    result = predict_holdout(data, w, label_weeks, seed, console)
    summary, actual, predictions = result.summary, result.actual, result.by_model
    report.params |= {"customers": len(actual), "calibration_end": _day(w.calibration_end)}
    report.params |= {"holdout_end": _day(w.holdout_end)}
    with console.status(f"bootstrap: {rounds} resamples of customers"):
        point = {name: metrics(actual, pred) for name, pred in predictions.items()}
        ci = bootstrap(actual, predictions, rounds, seed)

    def cell(name: str, m: str) -> str:
        lo, hi = ci[name][m]
        return f"{point[name][m]:.3f} [{lo:.3f}, {hi:.3f}]"

    report.add_text(
        f"Data: {source}; {len(actual):,} customers who bought in the calibration period ({_day(w.start)} to "
        f"{_day(w.calibration_end - 1)}, {calibration_weeks} weeks); holdout {holdout_weeks} weeks to "
        f"{_day(w.holdout_end - 1)}. Actual holdout spend per customer: mean {actual.mean():.2f}; "
        f"{100 * (actual > 0).mean():.1f} % of the customers bought in the holdout."
    )
    report.add_table(
        "Holdout spend per customer: error and ranking (95 % bootstrap intervals over customers)",
        ["model", "MAE", "RMSE", "Spearman", "top-decile lift", "mean predicted"],
        [[name, *(cell(name, m) for m in METRICS), round(float(predictions[name].mean()), 2)] for name in MODELS],
        note="top-decile lift = share of the actual holdout spend captured by the 10 % of customers predicted "
        f"highest ÷ 10 %. Bootstrap: {rounds} resamples of customers, seed {seed}.",
    )
    report.add_figure(
        decile_figure(actual, predictions),
        f"{report.name}_deciles.png",
        "Mean predicted and actual holdout spend per decile of each model's prediction",
    )
    report.add_table(
        "RFM segments at the calibration end (training.features scores and SEGMENT_RULES)",
        [*RFM_HEADERS, *(f"mean predicted: {m}" for m in MODELS)],
        _rfm_rows(result.segments, summary, actual, predictions),
    )
    repeat_buyers = int(((summary.x > 0) & (summary.zbar > 0)).sum())
    report.add_table("Fitted models", ["model", "fit"], _fit_rows(result.bg, result.gg, result.lightgbm, repeat_buyers))
    if transactions is None and events is None:
        _validation(report, console)
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def register(bench_app: typer.Typer, console: Console) -> None:
    @bench_app.command("ltv")
    def bench_ltv(
        quick: Annotated[
            bool, typer.Option(help=f"a CI-sized run: {QUICK_CUSTOMERS} customers, 200 bootstrap rounds")
        ] = False,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
        seed: int = 0,
        transactions: Annotated[Path | None, typer.Option(help="your own CSV: customer_id,timestamp,amount")] = None,
        events: Annotated[
            Path | None, typer.Option(help="your own events file (CSV or Parquet); purchases are read")
        ] = None,
        calibration_weeks: Annotated[int, typer.Option(min=6)] = 39,
        holdout_weeks: Annotated[int, typer.Option(min=1)] = 39,
        label_weeks: Annotated[
            int | None, typer.Option(min=5, help="value model label window; default half the calibration")
        ] = None,
    ) -> None:
        """Customer value: LightGBM vs BG/NBD + Gamma-Gamma vs past average on a holdout period (CDNOW by default)."""
        try:
            run_ltv_bench(
                console,
                quick=quick,
                out_dir=out,
                seed=seed,
                transactions=transactions,
                events=events,
                calibration_weeks=calibration_weeks,
                holdout_weeks=holdout_weeks,
                label_weeks=label_weeks,
            )
        except (DataError, ValueError) as exc:
            print_error(console, exc)
            raise typer.Exit(code=2) from exc
