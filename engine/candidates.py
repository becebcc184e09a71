"""Candidate sources for a batch of requests: each returns catalog positions with a score in [0, 1], per request.

A batch is one placement's requests (one recipient each for an email batch, one for a web request). Each
source answers for all of them at once in flat arrays grouped by request ("row"), best first within a row,
so the cost of a numpy call is paid per batch and not per request. A row's candidates are exactly those a
one-request batch would get for it; only the ALS product may differ in the last bit of a float32 (a matrix
product of many users is summed in another order than one user's, and a folded-in customer's small system
is solved padded to the batch's widest), as any BLAS kernel choice would.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.catalog import FloatArray, IntArray
from engine.fastinit import fast_init
from engine.state import ServingState
from engine.types import Context, Profile

# How much each kind of interaction says about taste when folding in a customer the model lacks.
FOLD_IN_WEIGHTS = {"purchase": 8.0, "cart": 4.0, "view": 1.0}
RECENCY_DECAY = 0.85  # weight of the n-th most recent view relative to the one before
RECENT_SEEDS = 10  # cart and recent views that seed "similar to recent"
# The seed weights of k recent seeds, as numpy computes 0.85 ** arange(k) for each k (kept bit for bit).
_DECAY = tuple((RECENCY_DECAY ** np.arange(k)).astype(np.float32) for k in range(RECENT_SEEDS + 1))
_SAMPLE_FROM = 8  # the ALS top-n samples a threshold when a row has this many times n items or more
_SAMPLE_SIZE = 256
_PRODUCT_CELLS = 4_000_000  # float32 scores of one matrix product block (16 MB): rows × catalog items
_TINY = np.finfo(np.float32).smallest_subnormal  # scores at least this are positive
_EMPTY_I = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float32)


@fast_init
@dataclass(frozen=True, slots=True)
class Candidates:
    """One source's candidates for a batch: rows ascending, best first within a row."""

    source: str
    row: IntArray
    idx: IntArray
    score: FloatArray

    @classmethod
    def empty(cls, source: str) -> Candidates:
        return cls(source, _EMPTY_I, _EMPTY_I, _EMPTY_F)

    def __len__(self) -> int:
        return len(self.idx)


def row_starts(rows: IntArray, n_rows: int) -> IntArray:
    """Where each row begins in an array grouped by row (n_rows + 1 boundaries)."""
    if n_rows == 1:
        return np.array([0, len(rows)], dtype=np.int64)
    return np.searchsorted(rows, np.arange(n_rows + 1)).astype(np.int64)


def row_first(rows: IntArray) -> IntArray:
    """For each entry of an array grouped by row, the position of its row's first entry."""
    n = len(rows)
    if n == 0 or rows[0] == rows[-1]:
        return np.zeros(n, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    change = np.flatnonzero(rows[1:] != rows[:-1]) + 1
    first[change] = change
    return np.maximum.accumulate(first)


def split_cells(cells: IntArray, n_rows: int, m: int) -> tuple[IntArray, IntArray]:
    """(row, column) of ascending positions in a row-major n_rows × m array: integer division is slow in
    numpy (no SIMD), so each row's run is found by a binary search instead."""
    if n_rows == 1:
        return np.zeros(len(cells), dtype=np.int64), cells
    starts = np.searchsorted(cells, np.arange(n_rows, dtype=np.int64) * m)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(np.append(starts, len(cells))))
    return rows, cells - rows * m


def rank_in_row(rows: IntArray) -> IntArray:
    """Each entry's position within its row, for an array grouped by row."""
    return np.arange(len(rows)) - row_first(rows)


def best_first(rows: IntArray, scores: FloatArray, n: int) -> IntArray:
    """Entries (grouped by row, in tie-break order within a row) ordered best first per row, the first n kept."""
    if len(rows) == 0 or rows[0] == rows[-1]:  # one row: a plain sort is cheaper than building keys
        return np.argsort(-scores, kind="stable")[:n]
    order = _by_row_then_score(rows, scores)
    return order if n >= len(rows) else order[rank_in_row(rows[order]) < n]  # (no row can have more than all)


def _by_row_then_score(rows: IntArray, scores: FloatArray) -> IntArray:
    """Positions of the entries (grouped by row) sorted by row, then score descending, ties in entry order.

    Row, score and position packed into one uint64 make every key distinct, so sorting the keys themselves
    (a SIMD sort, about four times faster than a stable argsort) gives the stable order.
    """
    n = len(rows)
    index_bits = max(n - 1, 1).bit_length()
    row_bits = int(rows[-1] - rows[0]).bit_length()
    if row_bits + 32 + index_bits > 64:  # too many entries to pack: two stable sorts instead
        return np.lexsort((-scores, rows)).astype(np.int64)
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    key = ((rows - rows[0]).astype(np.uint64) << np.uint64(32 + index_bits)) | (
        (~ascending).astype(np.uint64) << np.uint64(index_bits)
    )
    key |= np.arange(n, dtype=np.uint64)
    return (np.sort(key) & np.uint64((1 << index_bits) - 1)).astype(np.int64)


def top_per_row(
    rows: IntArray, items: IntArray, scores: FloatArray, n: int, m: int
) -> tuple[IntArray, IntArray, FloatArray]:
    """The n best entries of each row as (row, item, score): rows ascending, best first, ties to the lower item.

    Entries may come in any order, each (row, item) at most once, with positive float32 scores (items < m).
    Row, score and item packed into one uint64 sort as one key, and the sorted keys are the answer: no
    permutation is gathered (the packing that `best_first` does with entry positions instead of items).
    """
    if len(rows) == 0:
        return rows, items, scores
    item_bits = max(m - 1, 1).bit_length()
    if scores.dtype != np.float32 or int(rows.max()).bit_length() + 32 + item_bits > 64:  # a lexsort instead
        order = np.lexsort((items, -scores, rows))
        order = order[rank_in_row(rows[order]) < n]
        return rows[order], items[order], scores[order]
    shift = np.uint64(item_bits)
    # A positive float's bits ascend with its value; inverted, a larger score sorts first.
    key = (rows.astype(np.uint64) << np.uint64(32 + item_bits)) | ((~scores.view(np.uint32)).astype(np.uint64) << shift)
    key |= items.astype(np.uint64)
    key.sort()
    row = (key >> np.uint64(32 + item_bits)).astype(np.int64)
    if len(row) > n:  # some row may have more than n
        kept = rank_in_row(row) < n
        key, row = key[kept], row[kept]
    item = (key & np.uint64((1 << item_bits) - 1)).astype(np.int64)
    score = (~(key >> shift)).astype(np.uint32).view(np.float32)
    return row, item, score


def distinct(cells: IntArray, size: int) -> IntArray:
    """The distinct values of `cells` (each < size), in no particular order: each value's last occurrence is
    found by writing positions into a scratch array of `size` and reading them back, linear where a sort
    (np.unique) is not."""
    at = np.empty(size, dtype=np.int32 if len(cells) < 2**31 else np.int64)
    k = np.arange(len(cells), dtype=at.dtype)
    at[cells] = k
    out: IntArray = cells[at[cells] == k]
    return out


def user_vectors(
    state: ServingState, customer_ids: Sequence[str], profiles: Sequence[Profile | None]
) -> tuple[IntArray, FloatArray]:
    """The entries (positions into the inputs) that have a user factor, and their factors: the trained one
    for a customer the model knows, else one folded in from the profile's purchases, cart and recent views
    (nothing for an unknown customer who touched no item the model knows)."""
    model = state.model
    if model is None or not customer_ids:
        return _EMPTY_I, np.empty((0, 0), dtype=np.float32)
    factor_rows = model.factor_rows(customer_ids)
    if factor_rows.min() >= 0:  # every customer known (a web request for a known customer)
        return np.arange(len(factor_rows)), np.asarray(model.user_factors)[factor_rows]
    known = np.flatnonzero(factor_rows >= 0)
    trained = np.asarray(model.user_factors)[factor_rows[known]]
    new = [k for k in np.flatnonzero(factor_rows < 0).tolist() if profiles[k] is not None]
    if not new:
        return known, trained
    touched_ids: list[str] = []
    touched_weights: list[float] = []
    bounds = [0]
    for k in new:
        profile = profiles[k]
        assert profile is not None
        for bought in profile.purchases:
            touched_ids.append(bought.item_id)
            touched_weights.append(FOLD_IN_WEIGHTS["purchase"] * min(bought.count, 5))
        touched_ids += profile.cart
        touched_weights += [FOLD_IN_WEIGHTS["cart"]] * len(profile.cart)
        touched_ids += profile.recent_views
        touched_weights += [FOLD_IN_WEIGHTS["view"] * RECENCY_DECAY**rank for rank in range(len(profile.recent_views))]
        bounds.append(len(touched_ids))
    # Items the model does not know are left out; a customer left with none gets no factor.
    item_rows = model.item_rows(touched_ids)
    seen = item_rows >= 0
    owner = np.repeat(np.arange(len(new)), np.diff(bounds))[seen]
    counts = np.bincount(owner, minlength=len(new))
    folded = np.asarray(new, dtype=np.int64)[counts > 0]
    starts = np.concatenate([[0], np.cumsum(counts[counts > 0])])
    weights = np.asarray(touched_weights, dtype=np.float32)[seen]
    which = np.concatenate([known, folded])
    vectors = np.concatenate([trained, model.fold_in_many(item_rows[seen], weights, starts)])
    order = np.argsort(which, kind="stable")
    return which[order], vectors[order]


def als(state: ServingState, rows: IntArray, vectors: FloatArray, n: int) -> Candidates:
    """The n items with the highest positive affinity per row (ties to the lower position), scaled by the best.

    `vectors` holds one user factor per entry of `rows`. The product runs in blocks of rows (one matrix
    product each: the item factors are read once per block, not once per user).
    """
    if len(rows) == 0 or not state.any_in_model:
        return Candidates.empty("als")
    factors_t = state.item_factors.T
    block = max(1, _PRODUCT_CELLS // max(len(state.catalog), 1))
    parts = []
    for start in range(0, len(rows), block):
        scores = vectors[start : start + block] @ factors_t  # items outside the model have zero factors: 0
        r, c, v = _top_cells(scores, n)
        parts.append((rows[start : start + block][r], c, v))
    if len(parts) == 1:
        row, idx, score = parts[0]
    else:
        row, idx, score = (np.concatenate([p[k] for p in parts]) for k in range(3))
    if len(vectors) == 1:  # one row, in item order: a plain sort costs less than packing keys
        order = best_first(row, score, n)
        row, idx, score = row[order], idx[order], score[order]
    else:
        row, idx, score = top_per_row(row, idx, score, n, len(state.catalog))
    if len(row) == 0:
        return Candidates.empty("als")
    return Candidates("als", row, idx, _scaled_by_row_best(row, score))


def _top_cells(scores: FloatArray, n: int) -> tuple[IntArray, IntArray, FloatArray]:
    """(row, column, score) of every positive score that can be among its row's n best, in row-major order.

    Comparing a whole catalog is cheap; sorting it is not: a strided sample's quantile per row gives a
    threshold that keeps about 2n columns (a row it leaves with fewer than n keeps every positive score).
    """
    m = scores.shape[1]
    if len(scores) == 1:  # one row (a web request): the same in 1-d calls, which cost less
        return _top_cells_of_one(scores[0], n)
    cut = np.full(len(scores), _TINY, dtype=np.float32)
    if m > _SAMPLE_FROM * n:
        sample = scores[:, :: max(m // _SAMPLE_SIZE, 1)]
        kth = sample.shape[1] - 1 - (2 * n * sample.shape[1]) // m
        if kth > 0:
            cut = np.maximum(np.partition(sample, kth, axis=1)[:, kth], _TINY)
    kept = scores >= cut[:, None]
    short = np.count_nonzero(kept, axis=1) < n
    if short.any():
        kept[short] = scores[short] >= _TINY
    cells = np.flatnonzero(kept)
    rows, columns = split_cells(cells, len(scores), m)
    return rows, columns, scores.ravel()[cells]


def _top_cells_of_one(scores: FloatArray, n: int) -> tuple[IntArray, IntArray, FloatArray]:
    m = len(scores)
    cut = _TINY
    if m > _SAMPLE_FROM * n:
        sample = scores[:: max(m // _SAMPLE_SIZE, 1)]
        kth = len(sample) - 1 - (2 * n * len(sample)) // m
        if kth > 0:
            cut = max(np.partition(sample, kth)[kth], _TINY)
    cells = np.flatnonzero(scores >= cut)
    if len(cells) < n:
        cells = np.flatnonzero(scores >= _TINY)
    return np.zeros(len(cells), dtype=np.int64), cells, scores[cells]


def _scaled_by_row_best(rows: IntArray, score: FloatArray) -> FloatArray:
    """Scores divided by their row's first (best) score, in float32."""
    best = score[0] if len(rows) and rows[0] == rows[-1] else score[row_first(rows)]
    scaled: FloatArray = (score / best).astype(np.float32)
    return scaled


def neighbours(
    state: ServingState, n_rows: int, rows: IntArray, seeds: IntArray, seed_weights: FloatArray, n: int, source: str
) -> Candidates:
    """Items similar to each row's seeds; an item near several seeds keeps its best weighted similarity.

    `rows`, `seeds` and `seed_weights` are parallel, grouped by row (rows < n_rows). Ties go to the lower position.
    """
    if len(seeds) == 0:
        return Candidates.empty(source)
    m = len(state.catalog)
    nb = state.neighbours_idx[seeds]
    sim = state.neighbours_sim[seeds] * seed_weights[:, None]
    # In float32 before the test: a similarity that rounds to 0 there is no candidate (top_per_row takes positives).
    flat_idx, flat_sim = nb.ravel(), sim.ravel().astype(np.float32, copy=False)
    keep = (flat_idx >= 0) & (flat_sim > 0)
    flat_cell = (flat_idx if n_rows == 1 else np.repeat(rows, nb.shape[1]) * m + flat_idx)[keep]
    if len(flat_cell) == 0:
        return Candidates.empty(source)
    # Each (row, item)'s best weighted similarity, in a row × catalog array.
    best = np.zeros(n_rows * m, dtype=np.float32)
    np.maximum.at(best, flat_cell, flat_sim[keep])
    if n_rows == 1:  # one catalog-long row: scanning it is cheap, and so is a plain sort of its few hundred
        cells = (best > 0).nonzero()[0]  # a mask first: nonzero on float32 itself is four times slower
        idx = cells[np.argsort(-best[cells], kind="stable")[:n]]
        row, score = np.zeros(len(idx), dtype=np.int64), best[idx]
    else:
        cells = distinct(flat_cell, n_rows * m)
        row = cells // m
        row, idx, score = top_per_row(row, cells - row * m, best[cells], n, m)
    return Candidates(source, row, idx, _scaled_by_row_best(row, score))


def context_neighbours(state: ServingState, contexts: Sequence[Context], rows: Sequence[int], n: int) -> Candidates:
    """Items similar to the context (current item and cart) of each of `rows`."""
    seed_rows: list[int] = []
    seeds: list[int] = []
    weights: list[float] = []
    index = state.catalog.index
    for r in rows:
        context = contexts[r]
        if not context.item_ids:
            continue
        known = [index[i] for i in context.item_ids if i in index]
        # The current item counts more than what already sits in the cart.
        weights += [1.0 if k == 0 and context.item_id else 0.8 for k in range(len(known))]
        seeds += known
        seed_rows += [r] * len(known)
    return neighbours(
        state,
        len(contexts),
        np.asarray(seed_rows, dtype=np.int64),
        np.asarray(seeds, dtype=np.int64),
        np.asarray(weights, dtype=np.float32),
        n,
        "neighbours",
    )


def recent_neighbours(
    state: ServingState, profiles: Sequence[Profile | None], rows: Sequence[int], n: int
) -> Candidates:
    """Items similar to what each of `rows` has in the cart and viewed last (the more recent, the more)."""
    seed_rows: list[int] = []
    seeds: list[int] = []
    weights: list[FloatArray] = []
    index = state.catalog.index
    for r in rows:
        profile = profiles[r]
        if profile is None:
            continue
        known = [index[i] for i in (profile.cart + profile.recent_views)[:RECENT_SEEDS] if i in index]
        if known:
            seeds += known
            seed_rows += [r] * len(known)
            weights.append(_DECAY[len(known)])
    return neighbours(
        state,
        len(profiles),
        np.asarray(seed_rows, dtype=np.int64),
        np.asarray(seeds, dtype=np.int64),
        np.concatenate(weights) if weights else _EMPTY_F,
        n,
        "recent_neighbours",
    )


def buy_again(
    state: ServingState, profiles: Sequence[Profile | None], rows: Sequence[int], now_day: int, allow_all: bool, n: int
) -> Candidates:
    """Items each customer bought before and is due to buy again, scored by how due and how habitual.

    The expected gap is the customer's own average gap for that item when they bought it at least
    twice, else the category's typical repurchase interval learned in training. Ties keep purchase order.
    """
    cat = state.catalog
    index = cat.index
    row_l: list[int] = []
    idx_l: list[int] = []
    count_l: list[int] = []
    first_l: list[int] = []
    last_l: list[int] = []
    for r in rows:
        profile = profiles[r]
        if profile is None:
            continue
        for p in profile.purchases:
            i = index.get(p.item_id)
            if i is not None:
                row_l.append(r)
                idx_l.append(i)
                count_l.append(p.count)
                first_l.append(p.first_day)
                last_l.append(p.last_day)
    if not idx_l:
        return Candidates.empty("buy_again")
    row = np.asarray(row_l, dtype=np.int64)
    idx = np.asarray(idx_l, dtype=np.int64)
    count = np.asarray(count_l, dtype=np.float32)
    first = np.asarray(first_l, dtype=np.float32)
    last = np.asarray(last_l, dtype=np.float32)
    codes = cat.category[idx]
    allowed = np.ones(len(idx), dtype=bool) if allow_all else state.repurchase_category[codes]
    own_gap = np.where(count >= 2, (last - first) / np.maximum(count - 1, 1), 0.0)
    gap = np.where(own_gap > 0, own_gap, state.repurchase_days[codes])
    due = (now_day - last) / np.maximum(gap, 1.0)
    # Close to due (ratio near 1) is best; long overdue decays slowly, just bought scores low.
    # (Both sides are computed: the overdue one is clipped where it is not used, so a purchase dated after now
    # cannot overflow it.)
    dueness = np.where(due < 1.0, np.exp(-0.5 * ((due - 1.0) / 0.45) ** 2), np.exp(-np.maximum(due - 1.0, 0.0) / 3.0))
    habit = 1.0 - np.exp(-count / 2.0)
    score = (habit * (0.35 + 0.65 * dueness)).astype(np.float32)
    keep = np.flatnonzero(allowed & (score > 0))
    order = keep[best_first(row[keep], score[keep], n)]
    return Candidates("buy_again", row[order], idx[order], score[order])


def focus_categories(state: ServingState, profile: Profile | None, context: Context) -> tuple[int, ...]:
    """Categories to draw bestsellers from: the context's, else the customer's strongest affinities."""
    cat = state.catalog
    ctx = cat.indices(context.item_ids) if context.item_id or context.cart else _EMPTY_I
    if len(ctx):
        return tuple(dict.fromkeys(int(c) for c in cat.category[ctx]))
    if profile is not None:
        return tuple(cat.category_index[c] for c, _ in profile.category_affinity[:3] if c in cat.category_index)
    return ()


# The overall bestseller list depends on the state and n only: built once per serving state (held weakly,
# so a state replaced by a refresh goes with its lists).
_OVERALL: weakref.WeakKeyDictionary[ServingState, dict[int, tuple[IntArray, FloatArray]]] = weakref.WeakKeyDictionary()


def _overall_bestsellers(state: ServingState, n: int) -> tuple[IntArray, FloatArray]:
    lists = _OVERALL.get(state)
    if lists is None:
        lists = _OVERALL[state] = {}
    found = lists.get(n)
    if found is None:
        idx = state.bestsellers[:n].astype(np.int64)
        score = (1.0 - np.arange(len(idx)) / len(idx)).astype(np.float32) if len(idx) else _EMPTY_F
        found = lists[n] = (idx, score)
    return found


@functools.lru_cache(maxsize=1024)
def _rank_scores(length: int, longest: int) -> FloatArray:
    """The scores of a category's first `length` bestsellers in a list whose longest category part has
    `longest`: 1 - rank / longest, in float32 (the best of each category part scores 1)."""
    scores: FloatArray = (1.0 - np.arange(length, dtype=np.float32) / np.float32(longest)).astype(np.float32)
    scores.flags.writeable = False  # shared by every row that uses it
    return scores


def bestsellers(
    state: ServingState,
    profiles: Sequence[Profile | None],
    contexts: Sequence[Context],
    rows: Sequence[int],
    n: int,
) -> list[Candidates]:
    """Bestsellers of each row's focus categories (source `category_bestseller`: each category's first
    n / (number of categories), at least 5, scored by rank within its category), else overall (`bestseller`).

    A row's list is made of views of the per-category lists, joined once for the whole batch: nothing is
    built per mix of categories (a shop of 20 categories has about 7,000 mixes of three).
    """
    by_category = state.bestsellers_by_category
    overall_idx, overall_score = _overall_bestsellers(state, n)
    cat_rows: list[int] = []
    cat_counts: list[int] = []
    cat_idx: list[IntArray] = []
    cat_score: list[FloatArray] = []
    top_rows: list[int] = []
    for r in rows:
        categories = focus_categories(state, profiles[r], contexts[r])
        if categories:
            per_cat = max(n // len(categories), 5)
            parts = [by_category.get(c, _EMPTY_I)[:per_cat] for c in categories]
            longest = max(len(part) for part in parts)
            if longest:
                cat_rows.append(r)
                cat_counts.append(sum(len(part) for part in parts))
                cat_idx += parts
                cat_score += [_rank_scores(len(part), longest) for part in parts]
                continue
        if len(overall_idx):
            top_rows.append(r)
    out = []
    if cat_rows:
        row = np.repeat(np.asarray(cat_rows, dtype=np.int64), cat_counts)
        idx = np.concatenate(cat_idx).astype(np.int64, copy=False)
        out.append(Candidates("category_bestseller", row, idx, np.concatenate(cat_score)))
    if top_rows:
        k = len(overall_idx)
        row = np.repeat(np.asarray(top_rows, dtype=np.int64), k)
        out.append(
            Candidates("bestseller", row, np.tile(overall_idx, len(top_rows)), np.tile(overall_score, len(top_rows)))
        )
    return out
