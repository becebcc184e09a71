"""Re-ranking stages over dense score arrays: value blend, diversity cap, and backfill."""

from __future__ import annotations

import numpy as np

from engine.catalog import BoolArray, FloatArray, IntArray
from engine.rules import Rerank
from engine.state import ServingState


def blend(state: ServingState, placement: str, affinity: FloatArray, rerank: Rerank) -> tuple[FloatArray, FloatArray]:
    """Final score = affinity·w + margin·w + stock level·w; also returns each item's margin term.

    The margin and stock terms depend only on the catalog and the placement, so they are precomputed
    in the serving state; a request adds its affinity.
    """
    value, margin_term = state.value_terms[placement]
    peak = float(affinity.max()) if len(affinity) else 0.0
    scale = rerank.affinity / peak if peak > 0 else 0.0
    return (affinity * np.float32(scale) + value).astype(np.float32, copy=False), margin_term


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
    boundary = np.empty(len(sorted_cats), dtype=np.bool_)
    boundary[0] = True
    np.not_equal(sorted_cats[1:], sorted_cats[:-1], out=boundary[1:])
    starts = np.flatnonzero(boundary)
    run_start = np.repeat(starts, np.diff(np.append(starts, len(sorted_cats))))
    rank_in_cat = np.empty(len(order), dtype=np.int64)
    rank_in_cat[by_cat] = np.arange(len(order)) - run_start
    within = rank_in_cat < max_per_category
    return order[within], order[~within]


def rank(scores: FloatArray, candidates: BoolArray, top: int | None = None) -> IntArray:
    """Candidate positions by descending score; only the best `top` when given (partial sort)."""
    idx = np.flatnonzero(candidates)
    if top is not None and len(idx) > top:
        idx = idx[np.argpartition(-scores[idx], top - 1)[:top]]
    return idx[np.argsort(-scores[idx], kind="stable")].astype(np.int64)
