"""`nextbest train`: read the shop's files, evaluate on a time split, fit on everything, train the propensity
models (training.offer_models) when the history is long enough, publish a version."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine import recmodel as rm
from engine.catalog import CatalogItem
from engine.recmodel import RecModel
from engine.registry import Artifact, Registry
from engine.rules import Rules
from training.als import AlsFit, AlsParams, fit_als, item_neighbours
from training.artifacts import bestsellers, catalog_snapshot, popularity, repurchase_days
from training.datafiles import ShopData, read_shop
from training.evaluate import EvalParams, evaluate, split_time
from training.offer_models import train_propensity
from training.propensity import LgbmParams

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainParams:
    als: AlsParams = field(default_factory=AlsParams)
    evaluation: EvalParams = field(default_factory=EvalParams)
    neighbours: int = 50
    bestseller_window_days: int = 30
    evaluate: bool = True
    # purchase / churn / email click / value models, when the events span enough time, and the offer
    # response models when the shop also has an offer_exposures file
    propensity: bool = True
    lgbm: LgbmParams = field(default_factory=lambda: LgbmParams(num_threads=2))


@dataclass(frozen=True)
class ModelParts:
    """A trained model in memory, before (or instead of) being written to the registry."""

    fit: AlsFit
    neighbours_idx: np.ndarray  # type: ignore[type-arg]
    neighbours_sim: np.ndarray  # type: ignore[type-arg]
    bestsellers: list[str]
    bestsellers_by_category: dict[str, list[str]]
    repurchase_days: dict[str, float]
    catalog: list[CatalogItem]

    def write(self, folder: Path) -> None:
        order = np.argsort(self.fit.user_ids)
        rm.save_array(folder / rm.ITEM_IDS, self.fit.item_ids)
        rm.save_array(folder / rm.ITEM_FACTORS, self.fit.item_factors)
        rm.save_array(folder / rm.USER_IDS, self.fit.user_ids[order])
        rm.save_array(folder / rm.USER_ROWS, order.astype(np.int32))
        rm.save_array(folder / rm.USER_FACTORS, self.fit.user_factors)
        rm.save_array(folder / rm.NEIGHBOURS_IDX, self.neighbours_idx)
        rm.save_array(folder / rm.NEIGHBOURS_SIM, self.neighbours_sim)
        best = {"global": self.bestsellers, "by_category": self.bestsellers_by_category}
        (folder / rm.BESTSELLERS).write_text(json.dumps(best), encoding="utf-8")
        (folder / rm.CATALOG_SNAPSHOT).write_text(json.dumps([asdict(i) for i in self.catalog]), encoding="utf-8")

    def rec_model(self, version: str, regularization: float) -> RecModel:
        order = np.argsort(self.fit.user_ids)
        return RecModel(
            version=version,
            item_ids=self.fit.item_ids,
            item_factors=self.fit.item_factors,
            user_ids=self.fit.user_ids[order],
            user_rows=order.astype(np.int32),
            user_factors=self.fit.user_factors,
            neighbours_idx=self.neighbours_idx.astype(np.int32),
            neighbours_sim=self.neighbours_sim.astype(np.float32),
            bestsellers=tuple(self.bestsellers),
            bestsellers_by_category={k: tuple(v) for k, v in self.bestsellers_by_category.items()},
            repurchase_days=self.repurchase_days,
            regularization=regularization,
            catalog_snapshot=tuple(self.catalog),
            manifest={},
        )


def fit_parts(catalog: pd.DataFrame, events: pd.DataFrame, now: int, params: TrainParams) -> ModelParts:
    item_ids = np.sort(catalog["item_id"].to_numpy(dtype=str))
    fit = fit_als(events, item_ids, now, params.als)
    nb_idx, nb_sim = item_neighbours(fit.item_factors, params.neighbours)
    best, by_cat = bestsellers(events, catalog, now, params.bestseller_window_days)
    pop = popularity(events, now, params.bestseller_window_days)
    return ModelParts(
        fit=fit,
        neighbours_idx=nb_idx,
        neighbours_sim=nb_sim,
        bestsellers=best,
        bestsellers_by_category=by_cat,
        repurchase_days=repurchase_days(events, catalog),
        catalog=catalog_snapshot(catalog, pop),
    )


def train(
    data_dir: Path,
    registry: Registry,
    rules: Rules,
    params: TrainParams | None = None,
    progress: Progress | None = None,
    activate: bool = True,
) -> tuple[Artifact, dict[str, object]]:
    """The whole offline job. Returns the published version and its metrics."""
    params = params or TrainParams()
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    say("reading and validating data")
    shop: ShopData = read_shop(data_dir)
    events = shop.events
    now = int(events["timestamp"].max()) + 1 if len(events) else int(time.time())
    metrics: dict[str, object] = {}
    if params.evaluate and len(events):
        split = split_time(shop, params.evaluation.test_days)
        say(f"evaluating on the last {params.evaluation.test_days} days")
        parts = fit_parts(shop.catalog, events[events["timestamp"] < split], split, params)
        model = parts.rec_model("eval", params.als.regularization)
        metrics = evaluate(shop, parts.fit, model, rules, split, params.evaluation)
        metrics["eval_fit_seconds"] = round(parts.fit.fit_seconds, 3)
    say("fitting ALS on all events")
    parts = fit_parts(shop.catalog, events, now, params)
    staging = registry.stage()
    say("writing the model version")
    parts.write(staging)
    als_seconds = time.perf_counter() - t_start
    if params.propensity and len(events):
        first, last = int(events["timestamp"].min()), int(events["timestamp"].max())
        metrics["propensity"] = train_propensity(
            data_dir, staging, first, last, params.lgbm, say, customers=shop.customers["customer_id"]
        )
    elif params.propensity:
        metrics["propensity"] = {"skipped": "no events"}
    meta = {
        "kind": "recommendations",
        "data": {
            "dir": str(data_dir),
            "events": len(events),
            "customers": len(shop.customers),
            "items": len(shop.catalog),
            "from": _iso(int(events["timestamp"].min())) if len(events) else None,
            "to": _iso(now - 1) if len(events) else None,
        },
        "params": {
            **asdict(params.als),
            "neighbours": params.neighbours,
            "bestseller_window_days": params.bestseller_window_days,
            "propensity": asdict(params.lgbm) if params.propensity else None,
        },
        "metrics": {
            **metrics,
            "fit_seconds": round(parts.fit.fit_seconds, 3),
            "als_seconds": round(als_seconds, 3),
            "train_seconds": round(time.perf_counter() - t_start, 3),
        },
        "repurchase_days": parts.repurchase_days,
        "users": len(parts.fit.user_ids),
    }
    artifact = registry.commit(staging, meta, activate=activate)
    return artifact, dict(meta["metrics"])  # type: ignore[call-overload]


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
