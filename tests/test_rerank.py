"""The re-ranking stages and a decision's random generator, against plain reference implementations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ids import decision_rng, decision_seed, new_decision_id
from engine.rerank import diversify


def _walk(scores, candidates, categories, cap, need, spare):
    """The reference: rank every candidate (ties to the lower position), then skip items whose category is full."""
    order = sorted(np.flatnonzero(candidates).tolist(), key=lambda i: (-scores[i], i))
    counts: dict[int, int] = {}
    within, beyond = [], []
    for i in order:
        c = int(categories[i])
        if counts.get(c, 0) < cap:
            counts[c] = counts.get(c, 0) + 1
            within.append(i)
        else:
            beyond.append(i)
    return within[:need], beyond[:spare]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 80),
    n_categories=st.integers(1, 6),
    cap=st.integers(1, 4),
    need=st.integers(0, 30),
    spare=st.integers(0, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_diversify_equals_walking_the_whole_ranking(n, n_categories, cap, need, spare, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, n).astype(np.float32) / 4  # many ties
    categories = rng.integers(0, n_categories, n)
    candidates = rng.random(n) < 0.7
    within, beyond = diversify(scores, candidates, categories, cap, need, spare)
    ref_within, ref_beyond = _walk(scores, candidates, categories, cap, need, spare)
    assert within.tolist() == ref_within
    if len(within) < need:  # the spares are only needed (and only promised) when the cap leaves the pool short
        assert beyond.tolist() == ref_beyond


def test_diversify_keeps_the_cap_and_the_score_order():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
    categories = np.array([0, 0, 0, 1, 1, 2])
    within, beyond = diversify(scores, np.ones(6, dtype=bool), categories, 2, 6, 2)
    assert within.tolist() == [0, 1, 3, 4, 5] and beyond.tolist() == [2]


def test_a_decision_generator_depends_on_the_id_alone():
    a, b = new_decision_id(), new_decision_id()
    first = decision_rng(a).random(8)
    decision_rng(b).random(3)  # another decision on the same thread in between
    assert np.array_equal(decision_rng(a).random(8), first)
    assert not np.array_equal(decision_rng(b).random(8), first)


def test_decision_seed_reads_crockford_base32_and_refuses_anything_else():
    assert decision_seed("0000000000000000000000000Z") == 31
    assert decision_seed("00000000000000000000000010") == 32
    for bad in ("01KAQ3TV0X8B6D6M0R8N6C3Y7I", "01kaq3", "01KAQ 3", "٣٣"):
        with pytest.raises(ValueError, match="not Crockford base32"):
            decision_seed(bad)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 90), min_size=1, max_size=6),
    n_categories=st.integers(1, 4),
    cap=st.integers(1, 3),
    needs=st.lists(st.integers(0, 12), min_size=6, max_size=6),
    spares=st.lists(st.integers(0, 5), min_size=6, max_size=6),
    clustered=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_many_rows_are_diversified_each_as_alone(sizes, n_categories, cap, needs, spares, clustered, seed):
    """One sort for every row, then each row's walk: the same as each row diversified on its own, whatever each
    row needs and spares, and when the best entries share few categories (walks that run long)."""
    from engine.rerank import diversify_rows

    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    scores = (rng.integers(0, 4, len(rows)) / 3).astype(np.float32)  # many ties, inside rows and across them
    categories = rng.integers(0, n_categories, len(rows))
    if clustered:  # the best entries of the batch share the first categories: walks run long
        categories[np.argsort(-scores, kind="stable")] = np.sort(categories)
    need = np.asarray(needs[: len(sizes)], dtype=np.int64)
    spare = np.asarray(spares[: len(sizes)], dtype=np.int64)
    within, beyond = diversify_rows(rows, scores, categories, cap, need, spare, len(sizes))
    assert (np.diff(rows[within]) >= 0).all() and (np.diff(rows[beyond]) >= 0).all()  # grouped by row
    for r in range(len(sizes)):
        mine = np.flatnonzero(rows == r)
        everything = np.ones(len(mine), dtype=bool)
        alone_within, alone_beyond = diversify(
            scores[mine], everything, categories[mine], cap, int(need[r]), int(spare[r])
        )
        assert within[rows[within] == r].tolist() == mine[alone_within].tolist()
        assert beyond[rows[beyond] == r].tolist() == mine[alone_beyond].tolist()


def test_a_row_whose_best_entries_share_one_category_is_walked_far_down():
    """A row whose best 50 entries are all of one category finds its pool far down its ranking, beside rows
    whose walks end early."""
    from engine.rerank import diversify_rows

    rng = np.random.default_rng(3)
    sizes = [60, 40, 5]
    rows = np.repeat(np.arange(3), sizes).astype(np.int64)
    scores = np.concatenate([np.linspace(1, 0.01, 60), rng.random(45)]).astype(np.float32)
    categories = np.concatenate([np.zeros(50), np.arange(1, 11), rng.integers(0, 20, 45)]).astype(np.int64)
    need, spare = np.array([4, 4, 4]), np.array([2, 2, 2])
    within, beyond = diversify_rows(rows, scores, categories, 1, need, spare, 3)
    for r in range(3):
        mine = np.flatnonzero(rows == r)
        alone_within, alone_beyond = diversify(scores[mine], np.ones(len(mine), bool), categories[mine], 1, 4, 2)
        assert within[rows[within] == r].tolist() == mine[alone_within].tolist()
        assert beyond[rows[beyond] == r].tolist() == mine[alone_beyond].tolist()
    # Row 0's pool: the best of category 0, then the first of each category after the run of 50.
    assert within[rows[within] == 0].tolist() == [0, 50, 51, 52]


def test_rows_out_of_order_are_refused():
    from engine.rerank import diversify_rows

    rows = np.array([1, 1, 0, 0])
    with pytest.raises(ValueError, match="ascending row order"):
        diversify_rows(
            rows, np.ones(4, np.float32), np.zeros(4, np.int64), 1, np.ones(2, np.int64), np.ones(2, np.int64), 2
        )
