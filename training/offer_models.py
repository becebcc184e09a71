"""The propensity and value models inside a training job: which as-of dates, training them into a version's
`propensity/` folder with its models.json, and metrics fit for the manifest.

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
from training.features import FEATURE_COLUMNS, LABEL_WINDOW_DAYS, training_examples
from training.propensity import DEFAULT_SPECS, LgbmParams, ModelSpec, train_models

AS_OF_STEP_DAYS = 14
MAX_AS_OF_DATES = 4
MIN_HISTORY_DAYS = 30  # the earliest as-of date has at least this much history before it

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
) -> dict[str, object]:
    """Train the models into `<staging>/propensity/` and return their metrics (JSON-safe), or
    ``{"skipped": reason}`` when the events are too short for one as-of date."""
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
    doc = {
        "feature_names": list(FEATURE_COLUMNS),
        "models": {s.name: {"kind": s.kind, "label": s.label} for s in specs},
    }
    (folder / MODELS_JSON).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    for name, m in metrics.items():
        m["path"] = f"{PROPENSITY_DIR}/{name}.onnx"  # relative to the version, not the staging folder
    t2 = time.perf_counter()
    return json_safe(
        {
            "as_of": [time.strftime("%Y-%m-%d", time.gmtime(d)) for d in dates],
            "examples": len(examples),
            "models": metrics,
            "examples_seconds": round(t1 - t0, 3),
            "fit_seconds": round(t2 - t1, 3),
            "seconds": round(t2 - t0, 3),
        }
    )


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
