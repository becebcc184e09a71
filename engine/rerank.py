"""Re-ranking stages over a batch's candidates: value blend, diversity cap, and backfill.

Candidates are flat arrays grouped by request ("row"), so a stage is a few numpy calls per batch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engine.candidates import best_first
from engine.catalog import BoolArray, FloatArray, IntArray
from engine.rules import Rerank
from engine.state import ServingState

_WALK_SLICE = 48  # ranked entries a single row's walk converts to Python at a time


def blend(
    state: ServingState,
    placement: str,
    rows: IntArray,
    items: IntArray,
    affinity: FloatArray,
    peak: FloatArray,
    rerank: Rerank,
) -> FloatArray:
    """Final score = affinity·w + margin·w + stock level·w, each row's affinity scaled by its `peak` (its largest
    affinity over the whole catalog, 0 for items it did not gather).

    The margin and stock terms depend only on the catalog and the placement, so they are precomputed
    in the serving state; a request adds its affinity.
    """
    value, _ = state.value_terms[placement]
    if len(peak) == 1:  # one row: a scalar scale
        top = float(peak[0])
        return (affinity * np.float32(rerank.affinity / top if top > 0 else 0.0) + value[items]).astype(np.float32)
    safe = np.where(peak > 0, peak, np.float32(1.0)).astype(np.float64)
    scale = np.where(peak > 0, rerank.affinity / safe, 0.0).astype(np.float32)
    return (affinity * scale[rows] + value[items]).astype(np.float32, copy=False)


def diversify_rows(
    rows: IntArray,
    scores: FloatArray,
    categories: IntArray,
    max_per_category: int,
    need: IntArray,
    spare: IntArray,
    n_rows: int,
) -> tuple[IntArray, IntArray]:
    """Per row, the best `need[row]` entries within the per-category cap, and the best `spare[row]` of those the
    cap left out while walking the ranking to that point.

    Entries are grouped by row, rows ascending, in tie-break order within a row (ties go to the earlier entry)
    (ValueError otherwise). Returns
    positions into the entries, grouped by row and best first: (within the cap, beyond it). The walk is
    computed, not stepped: an entry is within the cap when fewer than `max_per_category` of its category
    rank above it in its row, and the walk stops after the need-th such entry.
    """
    order = best_first(rows, scores, len(rows))
    if n_rows == 1:
        return _walk(order, categories[order], max_per_category, int(need[0]), int(spare[0]))
    if not bool((rows[1:] >= rows[:-1]).all()):
        raise ValueError("diversify_rows needs its entries grouped by row in ascending row order")
    r, c = rows, categories[order]  # best_first reorders entries within their rows only
    # How many of the same category rank above each entry: a stable sort by (row, category), radix on 16 bits.
    n_cat = int(c.max(initial=0)) + 1
    group = r * n_cat + c
    if n_rows * n_cat <= 1 << 16:
        group = group.astype(np.uint16)
    by_group = np.argsort(group, kind="stable")
    above = np.empty(len(order), dtype=np.int64)
    above[by_group] = np.arange(len(order)) - _first_of_value(group[by_group], n_rows * n_cat)
    within = above < max_per_category
    # The walk stops right after the need-th entry within the cap: later entries are never looked at.
    first = _first_of_value(r, n_rows)
    taken = _running_count(first, within)
    want = need[r]
    looked_at = taken - within < want
    pool = within & looked_at
    left_out = ~within & looked_at
    left_out &= _running_count(first, left_out) <= spare[r]
    return order[pool], order[left_out]


def _walk(order: IntArray, categories: IntArray, cap: int, need: int, spare: int) -> tuple[IntArray, IntArray]:
    """One row's walk, stepped in plain Python: for a single request it stops after a few dozen entries,
    cheaper than computing every entry's place (the vectorised walk pays off from a few rows up)."""
    counts: dict[int, int] = {}
    within: list[int] = []
    beyond: list[int] = []
    if need > 0:
        for start in range(0, len(order), _WALK_SLICE):
            part = order[start : start + _WALK_SLICE]
            for entry, cat in zip(part.tolist(), categories[start : start + _WALK_SLICE].tolist(), strict=True):
                seen = counts.get(cat, 0)
                if seen < cap:
                    counts[cat] = seen + 1
                    within.append(entry)
                    if len(within) == need:
                        return np.asarray(within, dtype=np.int64), np.asarray(beyond, dtype=np.int64)
                elif len(beyond) < spare:
                    beyond.append(entry)
    return np.asarray(within, dtype=np.int64), np.asarray(beyond, dtype=np.int64)


def _first_of_value(values: npt.NDArray[np.integer], size: int) -> IntArray:
    """For each entry of an ascending array of integers below `size`, the position of its value's first entry
    (`row_first` for rows known to ascend: a count per value instead of a scan of every entry for changes)."""
    counts = np.bincount(values, minlength=size)
    first: IntArray = np.repeat(np.cumsum(counts) - counts, counts)
    return first


def _running_count(first: IntArray, flags: BoolArray) -> IntArray:
    """Per entry, how many flagged entries its row has up to and including it (`first`: each entry's row's
    first position, entries grouped by row)."""
    total = np.cumsum(flags, dtype=np.int64)
    counts: IntArray = total - (total - flags)[first]
    return counts


def diversify(
    scores: FloatArray, candidates: BoolArray, categories: IntArray, max_per_category: int, need: int, spare: int
) -> tuple[IntArray, IntArray]:
    """`diversify_rows` for one row over a dense score array: the best `need` candidates within the cap and
    the best `spare` of those the cap left out, both as catalog positions (ties to the lower position)."""
    idx = np.flatnonzero(candidates)
    rows = np.zeros(len(idx), dtype=np.int64)
    one = np.ones(1, dtype=np.int64)
    within, beyond = diversify_rows(rows, scores[idx], categories[idx], max_per_category, one * need, one * spare, 1)
    return idx[within], idx[beyond]
