"""Customer propensity (purchase, churn, email click) and value models: LightGBM on point-in-time examples,
exported to ONNX and refused unless ONNX Runtime scores the validation rows as LightGBM does.

Examples come from `training.features` (one row per customer and as-of date, feature columns, forward-looking
labels). The latest as-of date validates, earlier ones train, so the metrics measure the future, not the past.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import onnx
import pandas as pd
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType
from scipy import stats

from engine.scoring import META_FEATURES, META_KIND, META_NAME, load_scoring_model

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

PARITY_TOLERANCE = 1e-5
PARITY_NAN_SHARE = 0.2  # share of entries blanked in the extra parity probe (missing values at serving time)
# The highest ONNX opset onnxmltools 1.16's LightGBM converter accepts (it refuses 17 with that message).
TARGET_OPSET = 15
INPUT_NAME = "features"
# Tweedie with 1 < p < 2 is a compound Poisson-gamma: a point mass at zero (no purchase) plus a skewed positive
# amount, which is what 90-day spend looks like. Its log link keeps predictions positive and effects
# multiplicative; l2 on the raw value chases the few big spenders and can predict negative values.
# onnxmltools exports the log link as an Exp node after the tree sum.
TWEEDIE_VARIANCE_POWER = 1.5
ECE_BINS = 10
RECENCY_PATTERNS = ("recency", "days_since_last")
SPEND_PATTERNS = ("spend_90d", "monetary_90d", "revenue_90d")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str
    kind: Literal["binary", "regression"]


DEFAULT_SPECS = (
    ModelSpec("purchase_30d", "purchased_next_30d", "binary"),
    ModelSpec("churn_90d", "churned_next_90d", "binary"),
    ModelSpec("email_click_30d", "email_click_next_30d", "binary"),
    ModelSpec("value_90d", "value_next_90d", "regression"),
)


@dataclass(frozen=True)
class LgbmParams:
    num_leaves: int = 31
    learning_rate: float = 0.05
    n_estimators: int = 300
    min_child_samples: int = 50
    num_threads: int = 2
    seed: int = 42
    early_stopping_rounds: int = 30


@dataclass(frozen=True)
class Baselines:
    """Which features the simple baselines use; None picks the first feature whose name matches the patterns."""

    recency_feature: str | None = None  # binary baseline: observed rate per quantile bin of this feature
    spend_feature: str | None = None  # value baseline: past spend over spend_window_days, scaled to the horizon
    spend_window_days: float = 90.0
    horizon_days: float = 90.0


class ParityError(RuntimeError):
    """ONNX Runtime and LightGBM disagree on a model beyond the tolerance; the ONNX file was not written."""

    def __init__(self, name: str, max_diff: float, metrics: dict[str, object]) -> None:
        super().__init__(
            f"model {name!r}: ONNX Runtime differs from LightGBM by {max_diff:.3g} > {PARITY_TOLERANCE:g}; not exported"
        )
        self.name = name
        self.max_diff = max_diff
        self.metrics = metrics


# ---------------------------------------------------------------- metrics


def auc(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties count half."""
    yb = np.asarray(y, dtype=np.float64) > 0.5
    n_pos = int(yb.sum())
    n_neg = len(yb) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(np.asarray(score, dtype=np.float64))  # average ranks for ties
    return float((ranks[yb].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: npt.ArrayLike, p: npt.ArrayLike, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of 0/1 labels under probabilities `p` (clipped to [eps, 1 − eps])."""
    yf = np.asarray(y, dtype=np.float64)
    pc = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return float(-np.mean(yf * np.log(pc) + (1.0 - yf) * np.log1p(-pc)))


def brier(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Mean squared difference between probability and 0/1 outcome."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def reliability_table(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Mean predicted probability against the observed rate in equal-width bins of [0, 1]; empty bins left out."""
    yf = np.asarray(y, dtype=np.float64)
    pf = np.asarray(p, dtype=np.float64)
    idx = np.minimum((pf * bins).astype(np.int64), bins - 1)  # p = 1 belongs to the last bin
    count = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=pf, minlength=bins)
    sum_y = np.bincount(idx, weights=yf, minlength=bins)
    return [
        {
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "count": float(count[b]),
            "mean_predicted": float(sum_p[b] / count[b]),
            "observed_rate": float(sum_y[b] / count[b]),
        }
        for b in range(bins)
        if count[b] > 0
    ]


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = ECE_BINS) -> float:
    """Σ over equal-width bins of (rows in bin / rows) × |mean predicted − observed rate|."""
    table = reliability_table(y, p, bins)
    n = sum(row["count"] for row in table)
    if n == 0:
        return math.nan
    return float(sum(row["count"] / n * abs(row["mean_predicted"] - row["observed_rate"]) for row in table))


def spearman(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Rank correlation (ties averaged); NaN when either side is constant."""
    a = np.asarray(y, dtype=np.float64)
    b = np.asarray(score, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def top_decile_lift(y: npt.ArrayLike, score: npt.ArrayLike, fraction: float = 0.1) -> float:
    """Mean outcome of the top `fraction` of rows by score ÷ mean outcome of all rows.

    The top group has ceil(fraction × n) rows; rows tied at the cut share the remaining places equally
    (the expectation under random tie-breaking), so a constant score has a lift of exactly 1.
    """
    yf = np.asarray(y, dtype=np.float64)
    sf = np.asarray(score, dtype=np.float64)
    if len(yf) == 0 or yf.mean() <= 0:
        return math.nan
    k = max(1, math.ceil(fraction * len(yf)))
    cut = np.sort(sf)[::-1][k - 1]
    above = sf > cut
    tied = sf == cut
    top_sum = yf[above].sum() + (k - int(above.sum())) * yf[tied].mean()
    return float(top_sum / k / yf.mean())


def binary_metrics(y: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, object]:
    return {
        "auc": _num(auc(y, p)),
        "log_loss": _num(log_loss(y, p)),
        "brier": _num(brier(y, p)),
        "ece": _num(expected_calibration_error(y, p)),
        "reliability": reliability_table(y, p),
    }


def regression_metrics(y: npt.ArrayLike, pred: npt.ArrayLike) -> dict[str, object]:
    err = np.asarray(pred, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return {
        "mae": _num(float(np.mean(np.abs(err)))),
        "rmse": _num(float(np.sqrt(np.mean(err**2)))),
        "spearman": _num(spearman(y, pred)),
        "top_decile_lift": _num(top_decile_lift(y, pred)),
    }


def _num(x: float) -> float | None:
    """Metrics go into JSON manifests, where NaN is not a number: undefined becomes None."""
    return None if math.isnan(x) else x


# ---------------------------------------------------------------- data


def feature_matrix(examples: pd.DataFrame, feature_names: Sequence[str]) -> F32:
    """The features as float32 (what ONNX tree ensembles compare in), NaN for missing."""
    names = list(feature_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"feature names must be non-empty and distinct, got {names}")
    missing = [c for c in names if c not in examples.columns]
    if missing:
        raise ValueError(f"examples lack the feature columns {missing}")
    try:
        return np.asarray(examples.loc[:, names].to_numpy(dtype=np.float32, na_value=np.nan), dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"feature columns must be numeric: {exc}") from exc


def split_examples(examples: pd.DataFrame) -> tuple[Mask, str]:
    """(validation mask, method): the latest as-of date validates; with one date, a fifth of customers by hash."""
    for col in ("customer_id", "as_of"):
        if col not in examples.columns:
            raise ValueError(f"examples lack the column {col!r}")
    as_of = examples["as_of"]
    if as_of.isna().any():
        raise ValueError("as_of has missing values")
    if as_of.nunique() > 1:
        valid = (as_of == as_of.max()).to_numpy()
        method = "time"
    else:
        # hash_pandas_object uses a fixed key, so the split is the same on every run and machine.
        hashed = pd.util.hash_pandas_object(examples["customer_id"].astype(str), index=False).to_numpy()
        valid = hashed % np.uint64(5) == 0
        method = "customer_hash"
    if valid.all() or not valid.any():
        raise ValueError(f"the {method} split left no training or no validation rows ({len(valid)} examples)")
    return valid, method


def rate_table_baseline(x_train: F32, y_train: F64, x_valid: F32, bins: int = 10) -> F64:
    """Observed label rate per quantile bin of one feature (missing values are a bin of their own).

    Rates are shrunk toward the base rate by one pseudo-row, so a bin with few rows does not predict 0 or 1.
    """
    base = float(y_train.mean())
    finite = x_train[~np.isnan(x_train)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])) if finite.size else np.empty(0)
    nan_bin = len(edges) + 1

    def bin_of(x: F32) -> npt.NDArray[np.int64]:
        return np.where(np.isnan(x), nan_bin, np.searchsorted(edges, x, side="right")).astype(np.int64)

    b_train = bin_of(x_train)
    count = np.bincount(b_train, minlength=nan_bin + 1)
    hits = np.bincount(b_train, weights=y_train, minlength=nan_bin + 1)
    rate = (hits + base) / (count + 1.0)
    return rate[bin_of(x_valid)].astype(np.float64)


def _pick_feature(names: Sequence[str], chosen: str | None, patterns: Sequence[str]) -> str | None:
    if chosen is not None:
        if chosen not in names:
            raise ValueError(f"baseline feature {chosen!r} is not among the features")
        return chosen
    return next((n for n in names if any(p in n.lower() for p in patterns)), None)


# ---------------------------------------------------------------- training and export


def objective_of(kind: str) -> str:
    return "binary" if kind == "binary" else "tweedie"


def fit_booster(
    x_train: F32,
    y_train: F64,
    x_valid: F32,
    y_valid: F64,
    kind: str,
    feature_names: Sequence[str],
    params: LgbmParams = LgbmParams(),
) -> tuple[lgb.Booster, int]:
    """Train with early stopping on the validation rows; return the booster cut at the best iteration."""
    objective = objective_of(kind)
    lgb_params: dict[str, object] = {
        "objective": objective,
        "metric": "binary_logloss" if kind == "binary" else "tweedie",
        "num_leaves": params.num_leaves,
        "learning_rate": params.learning_rate,
        "min_data_in_leaf": params.min_child_samples,
        "num_threads": params.num_threads,
        "seed": params.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }
    if objective == "tweedie":
        lgb_params["tweedie_variance_power"] = TWEEDIE_VARIANCE_POWER
    train_set = lgb.Dataset(x_train, y_train, feature_name=list(feature_names))
    valid_set = lgb.Dataset(x_valid, y_valid, reference=train_set)
    booster = lgb.train(
        lgb_params,
        train_set,
        num_boost_round=params.n_estimators,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, first_metric_only=True, verbose=False)],
    )
    best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
    # Cut explicitly so LightGBM, the converter and the tree count all mean the same trees.
    return lgb.Booster(model_str=booster.model_to_string(num_iteration=best)), best


def floor_to_float32(values: F64) -> F64:
    """The largest float32 ≤ each value: for every float32 x, x ≤ t exactly when x ≤ floor_to_float32(t)."""
    with np.errstate(over="ignore"):  # beyond the float32 range becomes ±inf, then +inf steps down to the max
        f = np.asarray(values, dtype=np.float64).astype(np.float32)
    over = f.astype(np.float64) > values
    f[over] = np.nextafter(f[over], np.float32(-np.inf))
    return f.astype(np.float64)


def float32_thresholds(booster: lgb.Booster) -> lgb.Booster:
    """The same model with every split threshold moved down to a float32 (see floor_to_float32).

    LightGBM compares features with double thresholds, ONNX tree ensembles with float32 ones, which the
    converter gets by rounding to nearest. A threshold between two adjacent float32 values (LightGBM puts
    it halfway between two values seen in training) can round up onto the upper value, which then takes
    the other branch in ONNX. Rounding down instead changes no decision for float32 input, so LightGBM
    predicts exactly as before and ONNX compares exactly as LightGBM.
    """
    lines = booster.model_to_string().split("\n")
    out: list[str] = []
    for line in lines:
        if line.startswith("tree_sizes="):
            continue  # byte sizes of the tree blocks, which change; LightGBM parses trees without it
        if line.startswith("num_cat=") and line != "num_cat=0":
            raise ValueError("categorical splits are not supported by the float32 threshold rewrite")
        if line.startswith("threshold="):
            values = np.array([float(v) for v in line.removeprefix("threshold=").split()], dtype=np.float64)
            out.append("threshold=" + " ".join(repr(float(v)) for v in floor_to_float32(values)))
        else:
            out.append(line)
    return lgb.Booster(model_str="\n".join(out))


def export_onnx(booster: lgb.Booster, path: Path, spec: ModelSpec, feature_names: Sequence[str]) -> None:
    """Convert to ONNX (float32 input `features`, zipmap off) with the feature order recorded in the metadata.

    Thresholds are first moved to float32 values (float32_thresholds), so ONNX branches as LightGBM does.
    """
    model = convert_lightgbm(
        float32_thresholds(booster),
        name=spec.name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, len(feature_names)]))],
        zipmap=False,
        target_opset=TARGET_OPSET,
    )
    for output in model.graph.output:
        # The converter declares the class label output as shape [1]; ONNX Runtime warns on every batch.
        if output.name == "label" and output.type.tensor_type.shape.dim:
            output.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.helper.set_model_props(
        model,
        {
            META_NAME: spec.name,
            META_KIND: spec.kind,
            META_FEATURES: json.dumps(list(feature_names)),
            "nextbest.label": spec.label,
            "nextbest.objective": objective_of(spec.kind),
        },
    )
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _parity_probe(x_valid: F32, seed: int) -> F32:
    """The validation rows plus a copy with a fifth of the entries blanked: missing values at serving time must
    follow the same branches, also in features that had none in training."""
    rng = np.random.default_rng(seed)
    blanked = x_valid[: min(len(x_valid), 5000)].copy()
    blanked[rng.random(blanked.shape) < PARITY_NAN_SHARE] = np.nan
    return np.concatenate([x_valid, blanked])


def train_models(
    examples: pd.DataFrame,
    feature_names: Sequence[str],
    out_dir: Path,
    specs: Sequence[ModelSpec] = DEFAULT_SPECS,
    params: LgbmParams = LgbmParams(),
    baselines: Baselines = Baselines(),
) -> dict[str, dict[str, object]]:
    """Train each spec, write `<out_dir>/<name>.onnx`, return metrics per model name.

    An ONNX file is written only after ONNX Runtime matched LightGBM on the validation rows (and on a copy of
    them with missing values) within PARITY_TOLERANCE: absolute for probabilities, relative to max(1, value)
    for values (float32 cannot hold a value of a few hundred to 1e-5 absolute). Raises ParityError otherwise.
    """
    names = list(feature_names)
    x = feature_matrix(examples, names)
    valid, method = split_examples(examples)
    x_train, x_valid = x[~valid], x[valid]
    recency = _pick_feature(names, baselines.recency_feature, RECENCY_PATTERNS)
    spend = _pick_feature(names, baselines.spend_feature, SPEND_PATTERNS)
    probe = _parity_probe(x_valid, params.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, object]] = {}
    for spec in specs:
        y = _labels(examples, spec)
        y_train, y_valid = y[~valid], y[valid]
        if spec.kind == "binary" and len(np.unique(y_train)) < 2:
            raise ValueError(f"label {spec.label!r} has a single class in the {len(y_train)} training rows")
        booster, best = fit_booster(x_train, y_train, x_valid, y_valid, spec.kind, names, params)

        path = out_dir / f"{spec.name}.onnx"
        staging = out_dir / f".{spec.name}.onnx.{os.getpid()}.tmp"
        try:
            export_onnx(booster, staging, spec, names)
            served = load_scoring_model(staging, spec.name, spec.kind, names)
            expected = booster.predict(probe)
            got = served.predict(probe)
            abs_diff = np.abs(got - expected)
            rel_diff = abs_diff / np.maximum(1.0, np.abs(expected))
            gate = float((abs_diff if spec.kind == "binary" else rel_diff).max())
            pred = got[: len(x_valid)]
            metrics: dict[str, object] = {
                "kind": spec.kind,
                "label": spec.label,
                "objective": objective_of(spec.kind),
                "path": str(path),
                "split": method,
                "valid_as_of": str(examples["as_of"][valid].max()) if method == "time" else None,
                "n_train": len(y_train),
                "n_valid": len(y_valid),
                "train_label_mean": float(y_train.mean()),
                "valid_label_mean": float(y_valid.mean()),
                "n_trees": booster.num_trees(),
                "best_iteration": best,
                "feature_importance_gain": _top_gain(booster, names),
                "parity_rows": len(probe),
                "parity_max_abs_diff": float(abs_diff.max()),
                "parity_max_rel_diff": float(rel_diff.max()),
                "parity_measure": "abs" if spec.kind == "binary" else "abs / max(1, |value|)",
                "parity_tolerance": PARITY_TOLERANCE,
            }
            if spec.kind == "binary":
                metrics["model"] = binary_metrics(y_valid, pred)
                metrics["baselines"] = _binary_baselines(x_train, y_train, x_valid, y_valid, names, recency)
            else:
                metrics["model"] = regression_metrics(y_valid, pred)
                metrics["baselines"] = _value_baselines(y_train, x_valid, y_valid, names, spend, baselines)
            if not gate <= PARITY_TOLERANCE:
                raise ParityError(spec.name, gate, metrics)
            staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)
        results[spec.name] = metrics
    return results


def _labels(examples: pd.DataFrame, spec: ModelSpec) -> F64:
    if spec.label not in examples.columns:
        raise ValueError(f"examples lack the label column {spec.label!r} of model {spec.name!r}")
    y = np.asarray(examples[spec.label].to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    if spec.kind == "binary" and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"label {spec.label!r} must be 0 or 1 on every row")
    if spec.kind == "regression" and not (np.isfinite(y).all() and (y >= 0).all()):
        raise ValueError(f"label {spec.label!r} must be finite and >= 0 on every row")
    return y


def _top_gain(booster: lgb.Booster, names: Sequence[str], k: int = 10) -> dict[str, float]:
    gain = booster.feature_importance(importance_type="gain")
    order = np.argsort(-gain, kind="stable")[:k]
    return {names[i]: float(gain[i]) for i in order}


def _binary_baselines(
    x_train: F32, y_train: F64, x_valid: F32, y_valid: F64, names: Sequence[str], recency: str | None
) -> dict[str, object]:
    out: dict[str, object] = {"base_rate": binary_metrics(y_valid, np.full(len(y_valid), y_train.mean()))}
    if recency is not None:
        col = names.index(recency)
        pred = rate_table_baseline(x_train[:, col], y_train, x_valid[:, col])
        out["recency_rate_table"] = {"feature": recency, **binary_metrics(y_valid, pred)}
    return out


def _value_baselines(
    y_train: F64, x_valid: F32, y_valid: F64, names: Sequence[str], spend: str | None, baselines: Baselines
) -> dict[str, object]:
    out: dict[str, object] = {"train_mean": regression_metrics(y_valid, np.full(len(y_valid), y_train.mean()))}
    if spend is not None:
        scale = baselines.horizon_days / baselines.spend_window_days
        past = np.nan_to_num(x_valid[:, names.index(spend)].astype(np.float64), nan=0.0) * scale
        out["past_spend"] = {"feature": spend, "scale": scale, **regression_metrics(y_valid, past)}
    return out


# ---------------------------------------------------------------- speed


def inference_speed(
    model_path: Path,
    booster: lgb.Booster,
    rows: Sequence[int] = (1, 50, 500),
    *,
    features: F32 | None = None,
    feature_names: Sequence[str] | None = None,
    repeats: int = 200,
) -> list[dict[str, float]]:
    """Median time per call of the served ONNX model (ScoringModel.predict, one thread) and of LightGBM's own
    predict (one thread) at each batch size, with rows per second.

    `features` supplies realistic rows (repeated to fill a batch); by default standard-normal ones.
    """
    model_path = Path(model_path)
    names = list(feature_names or booster.feature_name())
    kind = "binary" if str(booster.dump_model(num_iteration=1)["objective"]).startswith("binary") else "regression"
    served = load_scoring_model(model_path, model_path.stem, kind, names)
    if features is None:
        features = np.random.default_rng(0).standard_normal((max(rows), len(names))).astype(np.float32)
    table: list[dict[str, float]] = []
    for n in rows:
        x = np.ascontiguousarray(np.resize(features, (n, len(names))), dtype=np.float32)
        onnx_s = _median_call(functools.partial(served.predict, x), repeats)
        lgb_s = _median_call(functools.partial(booster.predict, x, num_threads=1), repeats)
        table.append(
            {
                "rows": float(n),
                "onnx_us_per_call": onnx_s * 1e6,
                "onnx_rows_per_s": n / onnx_s,
                "lightgbm_us_per_call": lgb_s * 1e6,
                "lightgbm_rows_per_s": n / lgb_s,
            }
        )
    return table


def _median_call(call: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up: first calls allocate
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
