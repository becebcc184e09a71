"""The propensity and value models inside a training job: which as-of dates, training them into a version's
`propensity/` folder with its models.json, and metrics fit for the manifest. With an offer exposures file
(`training.datafiles.read_exposures`) the job adds one response model per offer type, `response_<type>`.

Features are rounded to their stored precision (`feature_store.profiles.quantise_features`, float16) before
training, so the trees split on exactly the values serving reads back from a profile: a threshold never falls
between a customer's true feature and its stored value.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from engine.scoring import MODELS_JSON, PROPENSITY_DIR
from engine.types import SECONDS_PER_DAY
from feature_store.profiles import quantise_features
from training.datafiles import find_exposures, read_exposures
from training.features import FEATURE_COLUMNS, LABEL_WINDOW_DAYS, customer_features, training_examples
from training.propensity import DEFAULT_SPECS, LgbmParams, ModelSpec, auc, log_loss, split_examples, train_models

AS_OF_STEP_DAYS = 14
MAX_AS_OF_DATES = 4
MIN_HISTORY_DAYS = 30  # the earliest as-of date has at least this much history before it
# Response models: the label window after each as-of date. It equals the step between dates, so the
# windows tile the period and no exposure labels two examples of one customer and type.
RESPONSE_WINDOW_DAYS = AS_OF_STEP_DAYS
MAX_RESPONSE_AS_OF_DATES = 10
RESPONSE_PREFIX = "response_"
RESPONSE_LABEL = "responded"
MIN_RESPONSE_EXAMPLES = 200
MIN_RESPONSE_POSITIVES = 20

Progress = Callable[[str], None]


def as_of_dates(first_ts: int, last_ts: int) -> list[int]:
    """Training as-of dates (unix seconds at 00:00 UTC), oldest first; empty when the events span too little.

    The latest leaves a full label window before the last event's day; earlier ones step back
    AS_OF_STEP_DAYS at a time, at most MAX_AS_OF_DATES, none within MIN_HISTORY_DAYS of the first event's day.
    """
    day = SECONDS_PER_DAY
    first_day, last_day = first_ts // day * day, last_ts // day * day
    latest = last_day - LABEL_WINDOW_DAYS * day
    earliest = first_day + MIN_HISTORY_DAYS * day
    return sorted(d for d in (latest - i * AS_OF_STEP_DAYS * day for i in range(MAX_AS_OF_DATES)) if d >= earliest)


def quantised_features(examples: pd.DataFrame, feature_names: Sequence[str] = FEATURE_COLUMNS) -> pd.DataFrame:
    """A copy of `examples` with the feature columns rounded as profiles store them."""
    out = examples.copy()
    names = list(feature_names)
    out[names] = quantise_features(out[names].to_numpy(dtype=np.float64)).astype(np.float64)
    return out


def train_propensity(
    data_dir: Path,
    staging: Path,
    first_ts: int,
    last_ts: int,
    params: LgbmParams,
    progress: Progress | None = None,
    specs: Sequence[ModelSpec] = DEFAULT_SPECS,
    customers: pd.Series | None = None,
) -> dict[str, object]:
    """Train the models into `<staging>/propensity/` and return their metrics (JSON-safe), or
    ``{"skipped": reason}`` when the events are too short for one as-of date.

    The offer response models (under "offer_response") train beside them when the shop has an exposures
    file; `customers` (ids) lets the exposures be checked against the known customers."""
    say = progress or (lambda _msg: None)
    dates = as_of_dates(first_ts, last_ts)
    if not dates:
        span = (last_ts // SECONDS_PER_DAY) - (first_ts // SECONDS_PER_DAY) + 1
        need = MIN_HISTORY_DAYS + LABEL_WINDOW_DAYS + 1
        return {
            "skipped": f"the events span {span} days; propensity models need at least {need} "
            f"({MIN_HISTORY_DAYS} days of history before a {LABEL_WINDOW_DAYS}-day label window)"
        }
    t0 = time.perf_counter()
    say(f"building propensity examples at {len(dates)} as-of date(s)")
    examples = quantised_features(training_examples(data_dir, dates))
    t1 = time.perf_counter()
    say(f"training {len(specs)} propensity models on {len(examples):,} examples")
    folder = staging / PROPENSITY_DIR
    metrics = train_models(examples, FEATURE_COLUMNS, folder, specs=specs, params=params)
    t2 = time.perf_counter()
    response_specs, response = train_response_models(data_dir, folder, first_ts, params, say, customers)
    doc = {
        "feature_names": list(FEATURE_COLUMNS),
        "models": {s.name: {"kind": s.kind, "label": s.label} for s in (*specs, *response_specs)},
    }
    (folder / MODELS_JSON).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    for name, m in metrics.items():
        m["path"] = f"{PROPENSITY_DIR}/{name}.onnx"  # relative to the version, not the staging folder
    return json_safe(
        {
            "as_of": [_day(d) for d in dates],
            "examples": len(examples),
            "models": metrics,
            "offer_response": response,
            "examples_seconds": round(t1 - t0, 3),
            "fit_seconds": round(t2 - t1, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )


# ---------------------------------------------------------------- offer response models


def response_as_of_dates(first_ts: int, last_exposure_ts: int) -> list[int]:
    """As-of dates for the response models, oldest first: the latest leaves a full RESPONSE_WINDOW_DAYS window
    before the last exposure's day; earlier ones step back a window at a time, at most MAX_RESPONSE_AS_OF_DATES,
    none within MIN_HISTORY_DAYS of the first event's day."""
    day = SECONDS_PER_DAY
    latest = last_exposure_ts // day * day - RESPONSE_WINDOW_DAYS * day
    earliest = first_ts // day * day + MIN_HISTORY_DAYS * day
    candidates = (latest - i * RESPONSE_WINDOW_DAYS * day for i in range(MAX_RESPONSE_AS_OF_DATES))
    return sorted(d for d in candidates if d >= earliest)


def response_examples(
    data_dir: Path,
    exposures: pd.DataFrame,
    dates: Sequence[int],
    window_days: int = RESPONSE_WINDOW_DAYS,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """One row per as-of date, offer type and customer exposed to that type in [as_of, as_of + window).

    Features are the customer's `customer_features` at as_of (events before it only; exposures are never
    read into features), quantised as profiles store them. The label `responded` (0/1), `true_p` (NaN
    when the log has none), `channel` and `exposed_at` are those of the customer's first exposure of the
    type in the window. Customers created after as_of have no features and no row. Sorted by as_of,
    offer_type, customer_id.
    """
    say = progress or (lambda _msg: None)
    ts = exposures["timestamp"].to_numpy()
    frames = []
    for k, d in enumerate(sorted(dates)):
        say(f"response examples at {_day(d)} ({k + 1}/{len(dates)})")
        inside = exposures[(ts >= d) & (ts < d + window_days * SECONDS_PER_DAY)]
        first = inside.sort_values("timestamp", kind="stable").drop_duplicates(["customer_id", "offer_type"])
        first = first.rename(columns={"timestamp": "exposed_at"})[
            ["customer_id", "offer_type", "channel", "exposed_at", "responded", "true_p"]
        ]
        features = customer_features(data_dir, d)
        frames.append(features.merge(first, on="customer_id", how="inner"))
    if not frames:
        return pd.DataFrame(columns=["customer_id", "as_of", *FEATURE_COLUMNS, "offer_type", RESPONSE_LABEL])
    out = pd.concat(frames, ignore_index=True)
    out[RESPONSE_LABEL] = out["responded"].astype(np.int64)
    out = quantised_features(out)
    return out.sort_values(["as_of", "offer_type", "customer_id"], kind="stable").reset_index(drop=True)


def response_spec(offer_type: str) -> ModelSpec:
    return ModelSpec(f"{RESPONSE_PREFIX}{offer_type}", RESPONSE_LABEL, "binary")


def train_response_models(
    data_dir: Path,
    folder: Path,
    first_ts: int,
    params: LgbmParams,
    progress: Progress | None = None,
    customers: pd.Series | None = None,
) -> tuple[list[ModelSpec], dict[str, object]]:
    """One binary `response_<type>` model per offer type of the exposures file, into `folder`.

    Returns the specs trained and their metrics (with the true probability's AUC and log loss on the
    validation rows when the log carries true_p). Without an exposures file, or without an as-of date
    that fits, nothing is trained and the metrics say why under "skipped"; a type with too few examples
    or responses is listed under "skipped_types".
    """
    say = progress or (lambda _msg: None)
    path = find_exposures(Path(data_dir))
    if path is None:
        reason = f"no offer_exposures.parquet or offer_exposures.csv in {data_dir}: no offer response models"
        say(reason)
        return [], {"skipped": reason}
    t0 = time.perf_counter()
    exposures = read_exposures(path, customers)
    dates = response_as_of_dates(first_ts, int(exposures["timestamp"].max()))
    if not dates:
        reason = f"the exposures end too early for a {RESPONSE_WINDOW_DAYS}-day window after {MIN_HISTORY_DAYS} days"
        say(reason)
        return [], {"skipped": reason}
    examples = response_examples(data_dir, exposures, dates, progress=say)
    t1 = time.perf_counter()
    specs: list[ModelSpec] = []
    models: dict[str, dict[str, object]] = {}
    skipped: dict[str, str] = {}
    for offer_type in sorted(examples["offer_type"].unique()):
        rows = examples[examples["offer_type"] == offer_type].reset_index(drop=True)
        positives = int(rows[RESPONSE_LABEL].sum())
        if len(rows) < MIN_RESPONSE_EXAMPLES or positives < MIN_RESPONSE_POSITIVES:
            skipped[offer_type] = (
                f"{len(rows)} examples with {positives} responses; a model needs {MIN_RESPONSE_EXAMPLES} "
                f"and {MIN_RESPONSE_POSITIVES}"
            )
            continue
        spec = response_spec(offer_type)
        say(f"training {spec.name} on {len(rows):,} examples")
        m = train_models(rows, FEATURE_COLUMNS, folder, specs=[spec], params=params)[spec.name]
        m["path"] = f"{PROPENSITY_DIR}/{spec.name}.onnx"
        m["offer_type"] = offer_type
        truth = _truth_on_validation(rows)
        if truth is not None:
            m["truth"] = truth
        models[spec.name] = m
        specs.append(spec)
    for offer_type, why in skipped.items():
        say(f"offer type {offer_type!r} skipped: {why}")
    return specs, {
        "exposures_file": path.name,
        "exposures": len(exposures),
        "as_of": [_day(d) for d in dates],
        "window_days": RESPONSE_WINDOW_DAYS,
        "examples": len(examples),
        "models": models,
        "skipped_types": skipped,
        "examples_seconds": round(t1 - t0, 3),
        "fit_seconds": round(time.perf_counter() - t1, 3),
    }


def _truth_on_validation(rows: pd.DataFrame) -> dict[str, object] | None:
    """The oracle on the validation as-of date (the ceiling for the model's figures beside it)."""
    mask, _ = split_examples(rows)
    valid = rows[mask]
    p = valid["true_p"].to_numpy(dtype=np.float64)
    if not len(p) or not np.isfinite(p).all():
        return None
    y = valid[RESPONSE_LABEL].to_numpy(dtype=np.float64)
    return {"auc": auc(y, p), "log_loss": log_loss(y, p), "mean_true_p": float(p.mean())}


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def json_safe(value: object) -> dict[str, object]:
    """`value` (a mapping) with numpy scalars made Python numbers and NaN/inf made None, as a manifest needs."""
    out = _safe(value)
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping, got {type(value).__name__}")
    return out


def _safe(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
