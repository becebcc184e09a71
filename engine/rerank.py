"""Re-ranking stages over a batch's candidates: value blend, diversity cap, and backfill.

Candidates are flat arrays grouped by request ("row"), so a stage is a few numpy calls per batch.
"""

from __future__ import annotations

import numpy as np

from engine.candidates import best_first, row_starts
from engine.catalog import BoolArray, FloatArray, IntArray
from engine.rules import Rerank
from engine.state import ServingState

_WALK_SLICE = 48  # ranked entries a diversity walk converts to Python at a time


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

    Entries are grouped by row, in tie-break order within a row (ties go to the earlier entry). Returns
    positions into the entries, grouped by row and best first: (within the cap, beyond it). All rows are
    ranked in one sort; each is then walked in plain Python, a slice at a time, until `need` are taken:
    the walk stops after a few dozen entries where a vectorised cap would have to rank every candidate.
    """
    order = best_first(rows, scores, len(rows))
    bounds = row_starts(rows[order], n_rows)
    within: list[int] = []
    beyond: list[int] = []
    for r in range(n_rows):
        want, extra = int(need[r]), int(spare[r])
        if want <= 0:
            continue
        counts: dict[int, int] = {}
        taken = 0
        start, end = int(bounds[r]), int(bounds[r + 1])
        while start < end and taken < want:
            part = order[start : min(start + _WALK_SLICE, end)]
            start += _WALK_SLICE
            for entry, cat in zip(part.tolist(), categories[part].tolist(), strict=True):
                seen = counts.get(cat, 0)
                if seen < max_per_category:
                    counts[cat] = seen + 1
                    within.append(entry)
                    taken += 1
                    if taken == want:
                        break
                elif extra > 0:
                    beyond.append(entry)
                    extra -= 1
    return np.asarray(within, dtype=np.int64), np.asarray(beyond, dtype=np.int64)


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
