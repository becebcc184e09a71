"""The recommenders of the benchmark, fit on the training side of a time split: ALS (the training code of
`nextbest train`) with its default parameters and tuned on a validation split carved out of the training
data, item-to-item co-occurrence, popularity and each user's own most-frequent items."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from benchmarks.rec_data import RecData, Split, SplitRule
from benchmarks.rec_metrics import per_user
from engine.types import SECONDS_PER_DAY
from training.als import AlsFit, AlsParams, fit_als, fit_matrix
from training.evaluate import _popular, _top_k_als


@dataclass(frozen=True)
class ModelParams:
    recent_items: int = 10  # item-to-item: the user's last distinct items it starts from
    neighbours: int = 100  # item-to-item: co-occurrence neighbours kept per item
    popularity_days: int = 30  # popularity: positives in this window before the cut rank first
    als: AlsParams = field(default_factory=AlsParams)  # the project's defaults


@dataclass(frozen=True)
class Models:
    """Everything fit on the training side of one split."""

    items: npt.NDArray[np.str_]  # the catalog: items with a training interaction, sorted
    als: AlsFit
    cosine: sp.csr_matrix  # items × items co-occurrence cosine, top `neighbours` per row
    recent_users: npt.NDArray[np.str_]  # sorted; rows of `recent`
    recent: sp.csr_matrix  # users × items: the user's last `recent_items` distinct items
    popular: list[str]
    own: dict[str, list[str]]  # user -> positive items, most frequent first (ties: most recent)
    seen: dict[str, set[str]]  # user -> items with a positive training interaction
    fit_seconds: float
    tuned: AlsFit | None = None  # ALS refit on the whole training side with the parameters `tune_als` chose


def fit_als_on(data: RecData, train: pd.DataFrame, items: npt.NDArray[np.str_], cut: int, params: AlsParams) -> AlsFit:
    """ALS on `train`, time-decayed towards `cut` (`half_life_days` = inf: no decay)."""
    if data.event_types:  # exactly what `nextbest train` fits: event weights, time decay
        return fit_als(train, items, cut, params)
    # Same time decay as training.als.interaction_matrix, but with the interactions' own weights.
    users, user_codes = np.unique(train["customer_id"].to_numpy(dtype=str), return_inverse=True)
    item_codes = np.searchsorted(items, train["item_id"].to_numpy(dtype=str))
    age = (cut - train["timestamp"].to_numpy()) / SECONDS_PER_DAY
    w = train["weight"].to_numpy(dtype=np.float32) * np.exp2(-np.maximum(age, 0) / params.half_life_days)
    matrix = sp.coo_matrix((w.astype(np.float32), (user_codes, item_codes)), shape=(len(users), len(items))).tocsr()
    matrix.sum_duplicates()
    uf, itf, seconds = fit_matrix(matrix, params)
    return AlsFit(users, items, uf, itf, matrix, seconds)


def item_cosine(train: pd.DataFrame, items: npt.NDArray[np.str_], neighbours: int) -> sp.csr_matrix:
    """cos(i, j) = users with both / sqrt(users with i × users with j), self excluded, top `neighbours` a row."""
    pairs = train[["customer_id", "item_id"]].drop_duplicates()
    user_codes, _ = pd.factorize(pairs["customer_id"])
    item_codes = np.searchsorted(items, pairs["item_id"].to_numpy(dtype=str))
    x = sp.csr_matrix(
        (np.ones(len(pairs), dtype=np.float32), (user_codes, item_codes)), shape=(user_codes.max() + 1, len(items))
    )
    co = (x.T @ x).tocsr()
    counts = co.diagonal()
    co.setdiag(0)
    co.eliminate_zeros()
    inv = sp.diags(np.where(counts > 0, 1 / np.sqrt(np.maximum(counts, 1)), 0).astype(np.float32))
    co = (inv @ co @ inv).tocsr()
    rows, cols, vals = [], [], []
    for i in range(co.shape[0]):
        lo, hi = co.indptr[i], co.indptr[i + 1]
        keep = np.argsort(-co.data[lo:hi], kind="stable")[:neighbours]
        rows.append(np.full(len(keep), i))
        cols.append(co.indices[lo:hi][keep])
        vals.append(co.data[lo:hi][keep])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=co.shape)


def fit_models(data: RecData, split: Split, params: ModelParams) -> Models:
    t0 = time.perf_counter()
    train = split.train
    items = np.unique(train["item_id"].to_numpy(dtype=str))
    als = fit_als_on(data, train, items, split.cut, params.als)
    cosine = item_cosine(train, items, params.neighbours)
    last = train.drop_duplicates(["customer_id", "item_id"], keep="last")  # train is in time order
    recent = last.groupby("customer_id", sort=False).tail(params.recent_items)
    recent_users, rows = np.unique(recent["customer_id"].to_numpy(dtype=str), return_inverse=True)
    cols = np.searchsorted(items, recent["item_id"].to_numpy(dtype=str))
    recent_m = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(recent_users), len(items))
    )
    pos = train[train["positive"]]
    # Per-user split: users' test times are spread over the whole period, so a window before the end of
    # training would mostly count interactions after them; popularity is then all-time training counts.
    in_window = pos["timestamp"] >= split.cut - params.popularity_days * SECONDS_PER_DAY
    window = pos[in_window & (split.kind == "global")]["item_id"].value_counts()
    rank = pd.DataFrame(
        {
            "recent": window.reindex(items, fill_value=0).to_numpy(),
            "positive": pos["item_id"].value_counts().reindex(items, fill_value=0).to_numpy(),
            "any": train["item_id"].value_counts().reindex(items, fill_value=0).to_numpy(),
            "item": items,
        }
    ).sort_values(["recent", "positive", "any", "item"], ascending=[False, False, False, True])
    counts = pos.groupby(["customer_id", "item_id"], sort=False)["timestamp"].agg(["size", "max"]).reset_index()
    counts = counts.sort_values(["customer_id", "size", "max"], ascending=[True, False, False])
    own = {str(u): g.tolist() for u, g in counts.groupby("customer_id", sort=False)["item_id"]}
    return Models(
        items=items,
        als=als,
        cosine=cosine,
        recent_users=recent_users,
        recent=recent_m,
        popular=rank["item"].tolist(),
        own=own,
        seen={u: set(v) for u, v in own.items()},
        fit_seconds=time.perf_counter() - t0,
    )


def recommend_item_to_item(models: Models, users: list[str], exclude: dict[str, set[str]], k: int) -> list[list[str]]:
    """Sum of cosine similarities to the user's recent items; only items with a positive score qualify."""
    rows = np.searchsorted(models.recent_users, users)
    item_pos = {str(i): n for n, i in enumerate(models.items)}
    out: list[list[str]] = []
    for start in range(0, len(users), 512):
        batch = users[start : start + 512]
        scores = (models.recent[rows[start : start + 512]] @ models.cosine).toarray()
        scores[scores <= 0] = -np.inf
        for r, u in enumerate(batch):
            scores[r, [item_pos[i] for i in exclude.get(u, ()) if i in item_pos]] = -np.inf
        kk = min(k, scores.shape[1] - 1)
        top = np.argpartition(-scores, kk, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        for r, row in enumerate(top):
            out.append([str(models.items[j]) for j in row if np.isfinite(scores[r, j])])
    return out


def recommend_als(fit: AlsFit, users: list[str], exclude: dict[str, set[str]], k: int) -> list[list[str]]:
    return _top_k_als(fit, users, exclude, k)


def recommend_popular(models: Models, users: list[str], exclude: dict[str, set[str]], k: int) -> list[list[str]]:
    return [_popular(models.popular, exclude.get(u, set()), k) for u in users]


def recommend_own_frequent(models: Models, users: list[str], k: int) -> list[list[str]]:
    """Not padded: a user with fewer than k earlier items gets a shorter list."""
    return [models.own.get(u, [])[:k] for u in users]


def decay_text(params: AlsParams) -> str:
    return "off" if math.isinf(params.half_life_days) else f"half-life {params.half_life_days:g} d"


def als_json(params: AlsParams) -> dict[str, object]:
    """The parameters as plain JSON (no infinity): `half_life_days` is None when time decay is off."""
    return {
        "factors": params.factors,
        "regularization": params.regularization,
        "alpha": params.alpha,
        "iterations": params.iterations,
        "half_life_days": None if math.isinf(params.half_life_days) else params.half_life_days,
        "seed": params.seed,
    }


@dataclass(frozen=True)
class TuningGrid:
    """Two stages from the default parameters: every regularization × alpha × time decay (on = the
    default half-life, off = every interaction at full weight) at the default factors, then every
    number of factors at the best of those. The defaults themselves are always a candidate."""

    factors: tuple[int, ...] = (32, 64, 128)
    regularization: tuple[float, ...] = (0.05, 0.5, 5.0)
    alpha: tuple[float, ...] = (1.0, 5.0, 20.0)
    decay: tuple[bool, ...] = (True, False)

    def stage_one(self, base: AlsParams) -> list[AlsParams]:
        points = [base] + [
            replace(base, regularization=r, alpha=a, half_life_days=base.half_life_days if on else math.inf)
            for on in self.decay
            for a in self.alpha
            for r in self.regularization
        ]
        return list(dict.fromkeys(points))

    def stage_two(self, best: AlsParams, done: list[AlsParams]) -> list[AlsParams]:
        return [p for f in self.factors if (p := replace(best, factors=f)) not in done]

    def edges(self, chosen: AlsParams) -> list[str]:
        """The parameters whose chosen value is the grid's smallest or largest (a wider grid might do better)."""
        out = []
        for name, values in (
            ("factors", self.factors),
            ("regularization", self.regularization),
            ("alpha", self.alpha),
        ):
            value = getattr(chosen, name)
            if len(values) > 1 and value in (min(values), max(values)):
                out.append(f"{name} {value:g}")
        return out


FULL_GRID = TuningGrid()
# Two points for CI-sized runs: the defaults, and the defaults without time decay.
QUICK_GRID = TuningGrid(factors=(), regularization=(AlsParams().regularization,), alpha=(AlsParams().alpha,))


@dataclass(frozen=True)
class GridPoint:
    params: AlsParams
    recall: float  # mean over validation users at the tuning k
    ndcg: float
    seconds: float
    user_recall: npt.NDArray[np.float64] = field(repr=False, compare=False)  # per validation user, in user order


@dataclass(frozen=True)
class Tuning:
    """The grid's validation scores and the point chosen (highest recall@k, then NDCG@k, then grid order)."""

    chosen: AlsParams
    points: tuple[GridPoint, ...]
    k: int
    validation: Split  # carved out of the training side only
    validation_users: int
    seconds: float


def tune_als(
    data: RecData,
    split: Split,
    rule: SplitRule,
    base: AlsParams,
    grid: TuningGrid,
    k: int,
    progress: Callable[[int, AlsParams], None] | None = None,
) -> Tuning:
    """Choose ALS parameters on a validation split: `rule` applied again to `split.train` (never
    `split.test`). Validation users have a positive validation interaction of an item they had no positive
    of before, and inner-training history; they are scored on those new items, seen ones excluded.
    Raises ValueError when the training side cannot be split or leaves no validation user."""
    t0 = time.perf_counter()
    val = rule.apply(split.train)
    items = np.unique(val.train["item_id"].to_numpy(dtype=str))
    if len(items) <= k:
        raise ValueError(f"the validation split leaves {len(items)} training items; need more than k={k}")
    pos_train = val.train[val.train["positive"]]
    seen = {str(u): set(g.tolist()) for u, g in pos_train.groupby("customer_id", sort=False)["item_id"]}
    pos_val = val.test[val.test["positive"]]
    known = set(val.train["customer_id"].unique().tolist())
    truth = {
        str(u): t
        for u, g in pos_val.groupby("customer_id", sort=False)["item_id"]
        if u in known and (t := set(g.tolist()) - seen.get(str(u), set()))
    }
    users = sorted(truth)
    if not users:
        raise ValueError("the validation split leaves no user with new positive items and training history")
    truths = [truth[u] for u in users]
    points: list[GridPoint] = []

    def score(candidates: list[AlsParams]) -> None:
        for params in candidates:
            if progress is not None:
                progress(len(points), params)
            fit = fit_als_on(data, val.train, items, val.cut, params)
            values = per_user(_top_k_als(fit, users, seen, k), truths, k)
            recall, ndcg = values["recall"], values["ndcg"]
            points.append(GridPoint(params, float(recall.mean()), float(ndcg.mean()), fit.fit_seconds, recall))

    def best() -> AlsParams:
        order = sorted(range(len(points)), key=lambda n: (-points[n].recall, -points[n].ndcg, n))
        return points[order[0]].params

    score(grid.stage_one(base))
    score(grid.stage_two(best(), [p.params for p in points]))
    return Tuning(best(), tuple(points), k, val, len(users), time.perf_counter() - t0)


def grid_size(grid: TuningGrid, base: AlsParams) -> int:
    """Fits `tune_als` makes with this grid (stage one keeps the base factors, so stage two's size is fixed)."""
    first = grid.stage_one(base)
    return len(first) + len(grid.stage_two(first[0], first))
