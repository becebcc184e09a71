"""Re-ranking stages over dense score arrays: value blend, diversity cap, and backfill."""

from __future__ import annotations

import numpy as np

from engine.catalog import BoolArray, FloatArray, IntArray
from engine.rules import Rerank
from engine.state import ServingState


def blend(state: ServingState, affinity: FloatArray, rerank: Rerank) -> tuple[FloatArray, FloatArray]:
    """Final score = affinity·w + margin·w + stock level·w; also returns each item's margin term."""
    cat = state.catalog
    peak = float(affinity.max()) if len(affinity) else 0.0
    aff = affinity / peak if peak > 0 else affinity
    stock_level = np.minimum(cat.stock.astype(np.float32) / rerank.stock_reference, 1.0)
    margin_term = rerank.margin * cat.margin
    final = rerank.affinity * aff + margin_term + rerank.stock * stock_level
    return final.astype(np.float32), margin_term.astype(np.float32)


def diversify(order: IntArray, categories: IntArray, max_per_category: int) -> tuple[IntArray, IntArray]:
    """Split a ranked list into items within the per-category cap and the ones beyond it (both ranked).

    Vectorised: a stable sort by category keeps the score order inside each category, so an item's
    rank in its category is its position minus the start of its category's run.
    """
    if len(order) == 0:
        return order, order
    cats = categories[order]
    by_cat = np.argsort(cats, kind="stable")
    sorted_cats = cats[by_cat]
    starts = np.flatnonzero(np.r_[True, sorted_cats[1:] != sorted_cats[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(sorted_cats)]))
    rank_in_cat = np.empty(len(order), dtype=np.int64)
    rank_in_cat[by_cat] = np.arange(len(order)) - run_start
    within = rank_in_cat < max_per_category
    return order[within], order[~within]


def rank(scores: FloatArray, candidates: BoolArray) -> IntArray:
    idx = np.flatnonzero(candidates)
    return idx[np.argsort(-scores[idx], kind="stable")].astype(np.int64)
