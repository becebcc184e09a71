"""Candidate sources: each returns catalog positions with a score in [0, 1], best first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.catalog import FloatArray, IntArray
from engine.state import ServingState
from engine.types import Context, Profile

# How much each kind of interaction says about taste when folding in a customer the model lacks.
FOLD_IN_WEIGHTS = {"purchase": 8.0, "cart": 4.0, "view": 1.0}
RECENCY_DECAY = 0.85  # weight of the n-th most recent view relative to the one before
_SAMPLE_FROM = 8  # _top samples a threshold when the scores are this many times n or more
_SAMPLE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Candidates:
    source: str
    idx: IntArray
    score: FloatArray

    @classmethod
    def empty(cls, source: str) -> Candidates:
        return cls(source, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))


def _top(scores: FloatArray, n: int) -> IntArray:
    """The best n positions by score, best first; ties to the lower position.

    Partitioning a whole catalog costs far more than the top needs: a strided sample's quantile first
    gives a threshold that keeps about 2n positions (if it keeps fewer than n, nothing is skipped).
    """
    m = len(scores)
    cand: IntArray | None = None
    if m > _SAMPLE_FROM * n:
        sample = scores[:: max(m // _SAMPLE_SIZE, 1)]
        kth = len(sample) - 1 - (2 * n * len(sample)) // m
        if kth > 0:
            above = np.flatnonzero(scores >= np.partition(sample, kth)[kth])
            if len(above) >= n:
                cand = above
    if cand is None:
        cand = np.arange(m)
    if len(cand) > n:
        part = np.argpartition(-scores[cand], n - 1)[:n]
        cand = np.sort(cand[part])  # position order, so the stable sort below breaks ties as before
    return cand[np.argsort(-scores[cand], kind="stable")].astype(np.int64)


def user_vector(state: ServingState, customer_id: str, profile: Profile | None) -> FloatArray | None:
    """The customer's trained factor, or one folded in from their profile's interactions."""
    model = state.model
    if model is None:
        return None
    vec = model.user_vector(customer_id)
    if vec is not None:
        return np.asarray(vec, dtype=np.float32)
    if profile is None:
        return None
    ids, weights = [], []
    for p in profile.purchases:
        ids.append(p.item_id)
        weights.append(FOLD_IN_WEIGHTS["purchase"] * min(p.count, 5))
    for i in profile.cart:
        ids.append(i)
        weights.append(FOLD_IN_WEIGHTS["cart"])
    for rank, i in enumerate(profile.recent_views):
        ids.append(i)
        weights.append(FOLD_IN_WEIGHTS["view"] * RECENCY_DECAY**rank)
    pos = np.searchsorted(model.item_ids, ids) if ids else np.empty(0, dtype=np.int64)
    pos = np.clip(pos, 0, max(model.n_items - 1, 0))
    ok = np.array([model.n_items > 0 and model.item_ids[p] == i for p, i in zip(pos, ids, strict=True)], dtype=bool)
    if not ok.any():
        return None
    return model.fold_in(pos[ok].astype(np.int64), np.asarray(weights, dtype=np.float32)[ok])


def als(state: ServingState, user_vec: FloatArray | None, n: int) -> Candidates:
    if user_vec is None or not state.any_in_model:
        return Candidates.empty("als")
    scores = state.item_factors @ user_vec  # items outside the model have zero factors: score 0
    idx = _top(scores, n)
    idx = idx[scores[idx] > 0]
    if len(idx) == 0:
        return Candidates.empty("als")
    s = scores[idx]
    return Candidates("als", idx, (s / s[0]).astype(np.float32))


def neighbours(state: ServingState, seeds: IntArray, seed_weights: FloatArray, n: int, source: str) -> Candidates:
    """Items similar to the seeds; an item near several seeds keeps its best weighted similarity."""
    if len(seeds) == 0:
        return Candidates.empty(source)
    nb = state.neighbours_idx[seeds]
    sim = state.neighbours_sim[seeds] * seed_weights[:, None]
    flat_idx, flat_sim = nb.ravel(), sim.ravel()
    keep = (flat_idx >= 0) & (flat_sim > 0)
    flat_idx, flat_sim = flat_idx[keep], flat_sim[keep]
    if len(flat_idx) == 0:
        return Candidates.empty(source)
    # Each item's best weighted similarity, then best first with ties to the lower position.
    best = np.zeros(len(state.catalog), dtype=np.float32)
    np.maximum.at(best, flat_idx, flat_sim.astype(np.float32, copy=False))
    idx = (best > 0).nonzero()[0]  # a mask first: nonzero on float32 itself is four times slower
    score = best[idx]
    top = np.argsort(-score, kind="stable")[:n]
    idx, score = idx[top], score[top]
    return Candidates(source, idx.astype(np.int64), (score / score[0]).astype(np.float32))


def context_neighbours(state: ServingState, context: Context, n: int) -> Candidates:
    seeds = state.catalog.indices(context.item_ids)
    # The current item counts more than what already sits in the cart.
    weights = np.array([1.0 if i == 0 and context.item_id else 0.8 for i in range(len(seeds))], dtype=np.float32)
    return neighbours(state, seeds, weights, n, "neighbours")


def recent_neighbours(state: ServingState, profile: Profile | None, n: int) -> Candidates:
    if profile is None:
        return Candidates.empty("recent_neighbours")
    seeds = state.catalog.indices((profile.cart + profile.recent_views)[:10])
    weights = (RECENCY_DECAY ** np.arange(len(seeds))).astype(np.float32)
    return neighbours(state, seeds, weights, n, "recent_neighbours")


def buy_again(state: ServingState, profile: Profile | None, now_day: int, allow_all: bool, n: int) -> Candidates:
    """Items the customer bought before and is due to buy again, scored by how due and how habitual.

    The expected gap is the customer's own average gap for that item when they bought it at least
    twice, else the category's typical repurchase interval learned in training.
    """
    if profile is None or not profile.purchases:
        return Candidates.empty("buy_again")
    cat = state.catalog
    bought = [p for p in profile.purchases if p.item_id in cat.index]
    if not bought:
        return Candidates.empty("buy_again")
    idx = np.array([cat.index[p.item_id] for p in bought], dtype=np.int64)
    count = np.array([p.count for p in bought], dtype=np.float32)
    first = np.array([p.first_day for p in bought], dtype=np.float32)
    last = np.array([p.last_day for p in bought], dtype=np.float32)
    codes = cat.category[idx]
    allowed = np.ones(len(idx), dtype=bool) if allow_all else state.repurchase_category[codes]
    own_gap = np.where(count >= 2, (last - first) / np.maximum(count - 1, 1), 0.0)
    gap = np.where(own_gap > 0, own_gap, state.repurchase_days[codes])
    due = (now_day - last) / np.maximum(gap, 1.0)
    # Close to due (ratio near 1) is best; long overdue decays slowly, just bought scores low.
    dueness = np.where(due < 1.0, np.exp(-0.5 * ((due - 1.0) / 0.45) ** 2), np.exp(-(due - 1.0) / 3.0))
    habit = 1.0 - np.exp(-count / 2.0)
    score = (habit * (0.35 + 0.65 * dueness)).astype(np.float32)
    keep = np.flatnonzero(allowed & (score > 0))
    order = keep[np.argsort(-score[keep], kind="stable")][:n]
    return Candidates("buy_again", idx[order], score[order])


def focus_categories(state: ServingState, profile: Profile | None, context: Context) -> list[int]:
    """Categories to draw bestsellers from: the context's, else the customer's strongest affinities."""
    cat = state.catalog
    ctx = cat.indices(context.item_ids)
    if len(ctx):
        return list(dict.fromkeys(int(c) for c in cat.category[ctx]))
    if profile is not None:
        return [cat.category_index[c] for c, _ in profile.category_affinity[:3] if c in cat.category_index]
    return []


def bestsellers(state: ServingState, categories: list[int], n: int) -> Candidates:
    if categories:
        per_cat = max(n // len(categories), 5)
        parts = [state.bestsellers_by_category.get(c, np.empty(0, dtype=np.int64))[:per_cat] for c in categories]
        idx = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        if len(idx):
            ranks = np.concatenate([np.arange(len(p)) for p in parts]).astype(np.float32)
            return Candidates("category_bestseller", idx, (1.0 - ranks / (ranks.max() + 1.0)).astype(np.float32))
    idx = state.bestsellers[:n]
    if len(idx) == 0:
        return Candidates.empty("bestseller")
    return Candidates("bestseller", idx, (1.0 - np.arange(len(idx)) / len(idx)).astype(np.float32))
