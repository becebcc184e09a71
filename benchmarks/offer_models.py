"""`nextbest bench offer-models`: the offer response models (`response_<type>`) against the generator's truth.

Per offer type, LightGBM → ONNX is trained on point-in-time examples before a cut and scored on the
exposures of the as-of dates after it (held out: neither fitted nor used for early stopping). Because the
synthetic shop logs each exposure's true response probability, the learned p̂ is compared with p_true
itself, not only with the 0/1 outcomes: AUC of the model, of the truth (the ceiling any model can reach)
and of the recency baseline; log loss; calibration; mean |p̂ − p_true|; Pearson and Spearman of p̂ vs
p_true; and a binned plot of learned vs true probability. Also timed in-process: the propensity call of
one offer request with every model of the version against only the models the offers reference.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import pandas as pd
import typer
from matplotlib.figure import Figure
from rich.console import Console
from scipy import stats

from api.console import print_error
from benchmarks.report import Report
from engine.scoring import PropensityModels, load_propensity_models, load_scoring_model
from training.datafiles import DataError, find_exposures, read_exposures, read_table
from training.features import FEATURE_COLUMNS
from training.offer_models import (
    RESPONSE_LABEL,
    RESPONSE_WINDOW_DAYS,
    response_as_of_dates,
    response_examples,
    response_spec,
    train_propensity,
)
from training.propensity import (
    DEFAULT_SPECS,
    LgbmParams,
    auc,
    expected_calibration_error,
    feature_matrix,
    log_loss,
    rate_table_baseline,
    train_models,
)

F64 = npt.NDArray[np.float64]
TEST_DATES = 2  # the latest as-of dates are held out; their windows follow the training period
BINS = 10
TIMING_CALLS = 3000
BATCH_ROWS = 200


@dataclass(frozen=True)
class OfferModelsSpec:
    customers: int
    items: int
    days: int
    lgbm: LgbmParams


FULL = OfferModelsSpec(100_000, 5_000, 180, LgbmParams(num_threads=2))
QUICK = OfferModelsSpec(5_000, 500, 150, LgbmParams(num_threads=2, learning_rate=0.1, n_estimators=80))


@dataclass(frozen=True)
class TypeResult:
    offer_type: str
    n_train: int
    n_test: int
    rate: float
    y: F64
    p_hat: F64
    p_true: F64  # NaN where the log has no true_p
    p_base: F64  # recency rate-table baseline
    figures: dict[str, float]


def _pearson(a: F64, b: F64) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a, b).statistic)


def _spearman(a: F64, b: F64) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def type_figures(y: F64, p_hat: F64, p_true: F64, p_base: F64) -> dict[str, float]:
    """The comparison of one offer type on its held-out rows (truth figures NaN without true_p)."""
    has_truth = bool(len(p_true)) and bool(np.isfinite(p_true).all())
    nan = float("nan")
    return {
        "auc_model": auc(y, p_hat),
        "auc_truth": auc(y, p_true) if has_truth else nan,
        "auc_baseline": auc(y, p_base),
        "log_loss_model": log_loss(y, p_hat),
        "log_loss_truth": log_loss(y, p_true) if has_truth else nan,
        "log_loss_baseline": log_loss(y, p_base),
        "ece_model": expected_calibration_error(y, p_hat),
        "ece_truth": expected_calibration_error(y, p_true) if has_truth else nan,
        "mean_abs_error": float(np.mean(np.abs(p_hat - p_true))) if has_truth else nan,
        "pearson": _pearson(p_hat, p_true) if has_truth else nan,
        "spearman": _spearman(p_hat, p_true) if has_truth else nan,
        "mean_p_hat": float(p_hat.mean()),
        "mean_p_true": float(p_true.mean()) if has_truth else nan,
    }


def compare_with_truth(
    examples: pd.DataFrame, lgbm: LgbmParams, test_dates: int = TEST_DATES, progress: Callable[[str], None] = print
) -> list[TypeResult]:
    """Train each type's model on the as-of dates before the last `test_dates` (the latest of those for early
    stopping, as the train job does), score the held-out dates with the exported ONNX model."""
    dates = sorted(examples["as_of"].unique())
    if len(dates) < test_dates + 2:
        raise ValueError(f"{len(dates)} as-of dates: need {test_dates} to hold out and 2 to train and validate")
    cut = dates[-test_dates]
    results = []
    with tempfile.TemporaryDirectory(prefix="nextbest-offer-models-") as tmp:
        for offer_type in sorted(examples["offer_type"].unique()):
            rows = examples[examples["offer_type"] == offer_type]
            train, test = rows[rows["as_of"] < cut].reset_index(drop=True), rows[rows["as_of"] >= cut]
            if train[RESPONSE_LABEL].nunique() < 2 or test[RESPONSE_LABEL].nunique() < 2:
                progress(f"offer type {offer_type!r} skipped: one class only in its training or test rows")
                continue
            spec = response_spec(offer_type)
            progress(f"training {spec.name} on {len(train):,} examples before {_day(cut)}")
            train_models(train, FEATURE_COLUMNS, Path(tmp), specs=[spec], params=lgbm)
            served = load_scoring_model(Path(tmp) / f"{spec.name}.onnx", spec.name, "binary", FEATURE_COLUMNS)
            x_test = feature_matrix(test, FEATURE_COLUMNS)
            y = test[RESPONSE_LABEL].to_numpy(dtype=np.float64)
            p_hat = served.predict(x_test)
            rec = FEATURE_COLUMNS.index("recency_days")
            x_train = feature_matrix(train, FEATURE_COLUMNS)
            y_train = train[RESPONSE_LABEL].to_numpy(dtype=np.float64)
            p_base = rate_table_baseline(x_train[:, rec], y_train, x_test[:, rec])
            p_true = test["true_p"].to_numpy(dtype=np.float64)
            results.append(
                TypeResult(
                    offer_type,
                    len(train),
                    len(test),
                    float(y.mean()),
                    y,
                    p_hat,
                    p_true,
                    p_base,
                    type_figures(y, p_hat, p_true, p_base),
                )
            )
    return results


def binned_means(key: F64, values: tuple[F64, ...], bins: int = BINS) -> list[F64]:
    """The mean of each of `values` in quantile bins of `key` (empty bins left out)."""
    edges = np.unique(np.quantile(key, np.linspace(0, 1, bins + 1)))
    b = np.clip(np.searchsorted(edges, key, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(b, minlength=max(len(edges) - 1, 1))
    ok = count > 0
    return [np.asarray(np.bincount(b, weights=v, minlength=len(count))[ok] / count[ok], np.float64) for v in values]


def calibration_figure(results: list[TypeResult]) -> Figure:
    """Per type: mean learned p̂ against mean p_true in deciles of p_true, with the observed response rate."""
    fig = Figure(figsize=(3.2 * max(len(results), 1), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(results), 1), sharey=True))
    for ax, r in zip(axes, results, strict=False):
        truth = bool(np.isfinite(r.p_true).all())
        key = r.p_true if truth else r.p_hat
        x, p_hat, rate, base = binned_means(key, (key, r.p_hat, r.y, r.p_base))
        top = float(max(x.max(), p_hat.max(), rate.max()) * 1.1)
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="p̂ = p_true")
        ax.plot(x, p_hat, "o-", label="learned p̂ (ONNX)")
        ax.plot(x, rate, "s", alpha=0.6, label="observed rate")
        ax.plot(x, base, "^:", alpha=0.6, label="recency baseline")
        ax.set_title(f"response_{r.offer_type}")
        ax.set_xlabel("mean true p (decile)" if truth else "mean p̂ (decile)")
    axes[0].set_ylabel("mean probability / rate")
    axes[0].legend(fontsize=7)
    return fig


def serving_cost(
    models: PropensityModels, rows: F64, configs: dict[str, Collection[str] | None], calls: int = TIMING_CALLS
) -> list[list[object]]:
    """Median µs of one request's `predict` (one customer) and of a `predict_rows` batch (every row the same
    models) per set of models; the configurations are interleaved so a slow spell of the machine hits them all."""
    one: dict[str, list[float]] = {name: [] for name in configs}
    batch: dict[str, list[float]] = {name: [] for name in configs}
    x = np.ascontiguousarray(rows, dtype=np.float32)
    block = [list(map(float, r)) for r in x[:BATCH_ROWS]]
    for k in range(calls):
        row = x[k % len(x)]
        for name, only in configs.items():
            t0 = time.perf_counter()
            models.predict(row, only)
            one[name].append(time.perf_counter() - t0)
            if k % 20 == 0:
                t0 = time.perf_counter()
                models.predict_rows(block, only)
                batch[name].append(time.perf_counter() - t0)
    out: list[list[object]] = []
    for name, only in configs.items():
        n = len(models.models) if only is None else sum(1 for m in models.models if m in only)
        out.append([name, n, statistics.median(one[name]) * 1e6, statistics.median(batch[name]) * 1e6])
    return out


def _referenced(rules_doc: dict[str, object] | None = None) -> frozenset[str]:
    from engine.offers import referenced_models
    from engine.rules import load_rules, parse_rules

    if rules_doc is None:
        rules = load_rules()
    else:
        import yaml

        rules = parse_rules(yaml.safe_dump(rules_doc), Path("bench-rules.yaml"))
    return referenced_models(rules.offers)


def add_truth_tables(report: Report, results: list[TypeResult], cut_note: str) -> None:
    f = [r.figures for r in results]
    report.add_table(
        "Offer response models on held-out exposures: learned vs true probability",
        [
            "model",
            "train",
            "test",
            "rate",
            "AUC model",
            "AUC truth",
            "AUC recency",
            "LL model",
            "LL truth",
            "LL recency",
            "ECE model",
            "ECE truth",
            "mean |p̂−p|",
            "Pearson",
            "Spearman",
        ],
        [
            [
                f"response_{r.offer_type}",
                r.n_train,
                r.n_test,
                r.rate,
                m["auc_model"],
                m["auc_truth"],
                m["auc_baseline"],
                m["log_loss_model"],
                m["log_loss_truth"],
                m["log_loss_baseline"],
                m["ece_model"],
                m["ece_truth"],
                m["mean_abs_error"],
                m["pearson"],
                m["spearman"],
            ]
            for r, m in zip(results, f, strict=True)
        ],
        note=f"{cut_note} AUC truth = the true probability as a score, the ceiling any model can reach with "
        "the customer's hidden traits and state at exposure time; the model sees only the profile's features "
        "at the as-of date. LL = log loss; ECE = expected calibration error (10 bins); mean |p̂−p|, Pearson and "
        "Spearman compare p̂ with p_true row by row. Recency = observed rate per recency decile.",
    )
    report.add_figure(
        calibration_figure(results),
        "offer_response_vs_truth.png",
        "Learned response probability (ONNX) against the generator's true probability, deciles of p_true, "
        "per offer type; squares are the observed response rate, the dashed line is p̂ = p_true.",
    )


def truth_comparison(
    report: Report, data_dir: Path, lgbm: LgbmParams, console: Console, test_dates: int = TEST_DATES
) -> tuple[pd.DataFrame, list[TypeResult]]:
    """Build the examples of `data_dir`, compare every type with the truth, and add the tables to `report`."""
    exposures_path = find_exposures(data_dir)
    if exposures_path is None:
        raise ValueError(f"{data_dir} has no offer_exposures.parquet or .csv: nothing to compare")
    report.add_dataset("offer_exposures", exposures_path)
    customers = read_table(_file(data_dir, "customers"), "customers")["customer_id"]
    with console.status("reading the exposures"):
        exposures = read_exposures(exposures_path, customers)
        first = int(read_table(_file(data_dir, "events"), "events")["timestamp"].min())
    dates = response_as_of_dates(first, int(exposures["timestamp"].max()))
    with console.status("building point-in-time examples") as status:
        examples = response_examples(data_dir, exposures, dates, progress=status.update)
    with console.status("training and scoring per offer type") as status:
        results = compare_with_truth(examples, lgbm, test_dates, progress=status.update)
    cut = sorted(examples["as_of"].unique())[-test_dates]
    note = (
        f"{len(exposures):,} exposures; examples at {len(dates)} as-of dates, {RESPONSE_WINDOW_DAYS}-day windows "
        f"(first exposure of the type per customer); trained before {_day(cut)}, tested on the {test_dates} "
        "later as-of dates."
    )
    add_truth_tables(report, results, note)
    return examples, results


def _file(data_dir: Path, name: str) -> Path:
    for ext in (".parquet", ".csv"):
        if (data_dir / f"{name}{ext}").exists():
            return data_dir / f"{name}{ext}"
    raise DataError(data_dir / f"{name}.csv", None, None, f"missing: expected {name}.csv or {name}.parquet")


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(int(ts)))


def _shop(spec: OfferModelsSpec, seed: int, console: Console) -> Path:
    from benchmarks.latency import bench_root
    from training.generator import ShopSpec, generate_shop

    shop = bench_root() / f"shop-offers-{spec.customers}x{spec.items}x{spec.days}-s{seed}"
    if find_exposures(shop) is None:
        with console.status(f"generating {spec.customers:,} customers × {spec.items:,} items × {spec.days} days"):
            generate_shop(ShopSpec(spec.customers, spec.items, spec.days, seed), shop)
    return shop


def run_offer_models_bench(
    console: Console, *, quick: bool, out_dir: Path, seed: int = 0, data: Path | None = None
) -> Path:
    from benchmarks.offers import offers_rules

    spec = QUICK if quick else FULL
    lgbm = LgbmParams(**{**spec.lgbm.__dict__, "seed": seed})
    shop = Path(data) if data is not None else _shop(spec, seed, console)
    report = Report(
        name="offer-models-quick" if quick else "offer-models",
        title="Offer response models against the generator's true response probabilities",
        params={
            "data": str(shop),
            "generated": None
            if data is not None
            else {"customers": spec.customers, "items": spec.items, "days": spec.days, "seed": seed},
            "seed": seed,
            "test_dates": TEST_DATES,
            "lgbm": dict(lgbm.__dict__),
        },
    )
    report.add_dataset("events", _file(shop, "events"))
    examples, _ = truth_comparison(report, shop, lgbm, console)

    with tempfile.TemporaryDirectory(prefix="nextbest-offer-version-") as tmp, console.status("") as status:
        events = read_table(_file(shop, "events"), "events")["timestamp"]
        customers = read_table(_file(shop, "customers"), "customers")["customer_id"]
        train_propensity(
            shop, Path(tmp), int(events.min()), int(events.max()), lgbm, status.update, customers=customers
        )
        models = load_propensity_models(Path(tmp) / "propensity")
        if models is None:
            raise ValueError("the train job wrote no propensity models (the events span too little time)")
        status.update("timing the propensity call of an offer request")
        latest = examples[examples["as_of"] == examples["as_of"].max()]
        rows = feature_matrix(latest.drop_duplicates("customer_id"), FEATURE_COLUMNS).astype(np.float64)
        configs: dict[str, Collection[str] | None] = {
            "before: every model of a version without response models": {s.name for s in DEFAULT_SPECS},
            "every model of this version (what the request ran)": None,
            "only the bundled rules' models (now)": _referenced(),
            "only the 50-offer latency rules' models (now)": _referenced(offers_rules(50, 42)),
        }
        timing = serving_cost(models, rows, configs, TIMING_CALLS // 6 if quick else TIMING_CALLS)
    report.add_table(
        "Propensity call of one offer request, in process (one thread)",
        ["models run", "models", "µs / customer (predict)", f"µs / batch of {BATCH_ROWS} (predict_rows)"],
        timing,
        note="Median time of PropensityModels.predict on real feature rows; api/offers.py now passes the names "
        "the rules' offers reference (offer_models), so models no offer uses cost a request nothing.",
    )
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def register(bench_app: typer.Typer, console: Console) -> None:
    @bench_app.command("offer-models")
    def bench_offer_models(
        quick: Annotated[bool, typer.Option(help="a CI-sized run: 5,000 customers, 150 days")] = False,
        out: Annotated[Path, typer.Option(help="where reports go")] = Path("benchmarks/reports"),
        seed: int = 0,
        data: Annotated[
            Path | None,
            typer.Option(help="your own shop folder (catalog, customers, events, offer_exposures; CSV or Parquet)"),
        ] = None,
    ) -> None:
        """Offer response models (one per offer type) vs the true response probabilities, on held-out exposures."""
        try:
            run_offer_models_bench(console, quick=quick, out_dir=out, seed=seed, data=data)
        except (DataError, ValueError) as exc:
            print_error(console, exc)
            raise typer.Exit(code=2) from exc
