"""Implicit-feedback ALS on event-weighted, time-decayed interactions, plus item neighbours."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from engine.types import SECONDS_PER_DAY

F32 = npt.NDArray[np.float32]
EVENT_WEIGHT = {"view_item": 1.0, "add_to_cart": 4.0, "purchase": 8.0, "email_click": 2.0, "email_open": 0.0}


@dataclass(frozen=True)
class AlsParams:
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15
    half_life_days: float = 45.0
    seed: int = 42


@dataclass(frozen=True)
class AlsFit:
    user_ids: npt.NDArray[np.str_]  # row order of user_factors
    item_ids: npt.NDArray[np.str_]  # row order of item_factors (sorted)
    user_factors: F32
    item_factors: F32
    matrix: sp.csr_matrix  # users × items confidence-weight matrix it was fit on
    fit_seconds: float


def interaction_matrix(
    events: pd.DataFrame, item_ids: npt.NDArray[np.str_], now: int, half_life_days: float
) -> tuple[npt.NDArray[np.str_], sp.csr_matrix]:
    """Users × items matrix of summed event weights, each halved every `half_life_days` of age.

    Hash-based codes (pandas factorize / get_indexer) instead of sorting millions of id strings.
    """
    type_codes, type_names = pd.factorize(events["type"], sort=False)
    type_weight = np.array([EVENT_WEIGHT.get(str(t), 0.0) for t in type_names], dtype=np.float32)
    w_type = type_weight[type_codes] if len(type_names) else np.zeros(len(events), dtype=np.float32)
    # Factorise the (Arrow-backed) id columns, then map only the few distinct items to catalog rows.
    item_local, item_uniques = pd.factorize(events["item_id"], sort=False)
    item_map = pd.Index(item_ids).get_indexer(pd.Index(item_uniques))
    item_codes = np.where(item_local >= 0, item_map[np.maximum(item_local, 0)], -1) if len(item_map) else item_local
    keep = (w_type > 0) & (item_codes >= 0)
    user_all, user_uniques = pd.factorize(events["customer_id"], sort=False)
    used = np.zeros(len(user_uniques), dtype=bool)
    used[user_all[keep]] = True
    row_of = np.cumsum(used) - 1  # compact: customers with no weighted event get no row
    users = np.asarray(user_uniques, dtype=str)[used]
    order = np.argsort(users)  # rows sorted by customer id, so lookups can binary-search
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    users = users[order]
    user_codes = rank[row_of[user_all[keep]]]
    age = (now - events["timestamp"].to_numpy()[keep]) / SECONDS_PER_DAY
    w = w_type[keep] * np.exp2(-np.maximum(age, 0) / half_life_days).astype(np.float32)
    m = sp.coo_matrix((w.astype(np.float32), (user_codes, item_codes[keep])), shape=(len(users), len(item_ids)))
    csr = m.tocsr()
    csr.sum_duplicates()
    return users, csr


def new_implicit_model(params: AlsParams) -> Any:
    """implicit's CPU ALS with our parameters (the benchmark fits a bare one of these too)."""
    from implicit.cpu.als import AlternatingLeastSquares

    return AlternatingLeastSquares(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        random_state=params.seed,
    )


def fit_matrix(matrix: sp.csr_matrix, params: AlsParams) -> tuple[F32, F32, float]:
    """A plain implicit fit; the caller's matrix is the one a bare `implicit` run would get."""
    import implicit.cpu.als  # noqa: F401 — loads SciPy's own OpenBLAS before the limit below applies

    t0 = time.perf_counter()
    # implicit parallelises itself; a threaded BLAS underneath only oversubscribes the cores.
    with threadpool_limits(1, "blas"):
        model = new_implicit_model(params)
        model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - t0
    return np.asarray(model.user_factors, dtype=np.float32), np.asarray(model.item_factors, dtype=np.float32), seconds


def fit_als(events: pd.DataFrame, item_ids: npt.NDArray[np.str_], now: int, params: AlsParams) -> AlsFit:
    users, matrix = interaction_matrix(events, item_ids, now, params.half_life_days)
    uf, itf, seconds = fit_matrix(matrix, params)
    return AlsFit(users, item_ids, uf, itf, matrix, seconds)


def item_neighbours(item_factors: F32, k: int, block: int = 2048) -> tuple[npt.NDArray[np.int32], F32]:
    """Top-k cosine neighbours of every item (itself excluded), computed in blocks to bound memory."""
    n = item_factors.shape[0]
    k = min(k, max(n - 1, 1))
    norms = np.linalg.norm(item_factors, axis=1, keepdims=True)
    unit = item_factors / np.maximum(norms, 1e-9)
    idx = np.full((n, k), -1, dtype=np.int32)
    sim = np.zeros((n, k), dtype=np.float32)
    for start in range(0, n, block):
        s = unit[start : start + block] @ unit.T
        rows = np.arange(s.shape[0])
        s[rows, rows + start] = -np.inf
        if n - 1 <= k:
            top = np.argsort(-s, axis=1)[:, :k]
        else:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
            top = np.take_along_axis(part, order, axis=1)
        vals = np.take_along_axis(s, top, axis=1)
        ok = np.isfinite(vals) & (vals > 0)
        idx[start : start + block] = np.where(ok, top, -1)
        sim[start : start + block] = np.where(ok, vals, 0.0)
    return idx, sim
