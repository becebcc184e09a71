"""`nextbest bench recs`: metrics against hand-computed cases, bootstrap intervals, the time split, input
validation and a quick end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from benchmarks.public_data import MOVIELENS_100K
from benchmarks.rec_data import (
    RecData,
    Split,
    SplitRule,
    _frame,
    cut_time,
    load_interactions,
    per_user_split,
    time_split,
)
from benchmarks.rec_metrics import Bootstrap, catalog_coverage, per_user, recommended_matrix
from benchmarks.rec_models import ModelParams, TuningGrid, fit_models, item_cosine, tune_als
from benchmarks.recs import RecsParams, _Input, _rules, evaluate_split, run_recs_bench
from tests.conftest import public_dataset
from training.als import AlsParams
from training.datafiles import DataError

DAY = 86_400


def _interactions(rows: list[tuple[str, str, int]]) -> RecData:
    users, items, ts = zip(*rows, strict=True)
    n = len(rows)
    return RecData("t", _frame(users, items, ["interaction"] * n, ts, np.ones(n), np.ones(n, dtype=bool)), False, "x")


def test_recall_ndcg_and_hit_match_hand_computed_values() -> None:
    lists = [["a", "b", "c"], ["d", "e", "f"]]
    truths = [{"a", "c", "x", "y"}, {"z"}]
    at2 = per_user(lists, truths, 2)
    at3 = per_user(lists, truths, 3)
    assert at2["recall"].tolist() == [0.25, 0.0]
    assert at3["recall"].tolist() == [0.5, 0.0]
    # DCG@2 = 1/log2(2) (hit at rank 1); ideal DCG@2 with 4 truth items = 1 + 1/log2(3).
    assert at2["ndcg"][0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    # DCG@3 = 1 + 1/log2(4); ideal DCG@3 = 1 + 1/log2(3) + 1/log2(4).
    assert at3["ndcg"][0] == pytest.approx(1.5 / (1 + 1 / math.log2(3) + 0.5))
    assert at2["ndcg"][1] == 0.0
    assert at3["hit"].tolist() == [1.0, 0.0]


def test_ndcg_is_one_when_all_truth_items_lead_the_list() -> None:
    assert per_user([["b", "a", "c"]], [{"a", "b"}], 3)["ndcg"][0] == pytest.approx(1.0)


def test_catalog_coverage_counts_distinct_items_in_the_top_k() -> None:
    lists = [["a", "b"], ["b", "c"]]
    assert catalog_coverage(lists, 1, 4) == 0.5
    assert catalog_coverage(lists, 2, 4) == 0.75
    matrix = recommended_matrix(lists, 2, ["a", "b", "c", "d"])
    assert Bootstrap(2, 50, seed=1).coverage(matrix).value == 0.75


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_users() -> None:
    rng = np.random.default_rng(3)
    small = (rng.random(100) < 0.3).astype(float)
    large = (rng.random(10_000) < 0.3).astype(float)
    a = Bootstrap(len(small), 500, seed=0).mean(small)
    b = Bootstrap(len(large), 500, seed=0).mean(large)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert a.value == pytest.approx(small.mean())
    assert (b.high - b.low) < (a.high - a.low) / 5  # ~ 1/sqrt(100): 10× narrower in theory


def test_bootstrap_is_reproducible_with_its_seed() -> None:
    values = np.random.default_rng(0).random(300)
    assert Bootstrap(300, 200, seed=7).mean(values) == Bootstrap(300, 200, seed=7).mean(values)
    assert Bootstrap(300, 200, seed=7).mean(values) != Bootstrap(300, 200, seed=8).mean(values)


def test_coverage_interval_contains_the_estimate_even_when_every_user_gets_the_same_list() -> None:
    rng = np.random.default_rng(0)
    varied = [[f"i{j}" for j in rng.choice(50, 5, replace=False)] for _ in range(40)]
    same = [["i1", "i2", "i3"]] * 40
    catalog = [f"i{j}" for j in range(50)]
    for lists in (varied, same):
        est = Bootstrap(40, 300, seed=0).coverage(recommended_matrix(lists, 5, catalog))
        assert est.low <= est.value <= est.high
    assert Bootstrap(40, 300, seed=0).coverage(recommended_matrix(same, 5, catalog)).value == 3 / 50


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=4, max_size=200),
    st.floats(0.05, 0.95),
)
def test_time_split_puts_every_interaction_before_the_cut_in_train_and_none_after(
    times: list[int], fraction: float
) -> None:
    data = _interactions([(f"u{t % 7}", f"i{t % 11}", t) for t in times])
    cut = cut_time(data.frame, None, fraction)
    try:
        split = time_split(data.frame, cut)
    except ValueError:
        assert (data.frame["timestamp"] < cut).all() or (data.frame["timestamp"] >= cut).all()
        return
    assert (split.train["timestamp"] < cut).all()
    assert (split.test["timestamp"] >= cut).all()
    assert len(split.train) + len(split.test) == len(data.frame)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 40)), min_size=2, max_size=150),
    st.floats(0.05, 0.95),
)
def test_per_user_split_puts_each_users_test_interactions_after_all_their_training_ones(
    rows: list[tuple[int, int]], fraction: float
) -> None:
    data = _interactions([(f"u{u}", f"i{t % 13}", t) for u, t in rows])  # few distinct times: many ties
    frame = data.frame
    try:
        split = per_user_split(frame, fraction)
    except ValueError:  # only when no user has two different times
        assert (frame.groupby("customer_id")["timestamp"].nunique() < 2).all()
        return
    assert len(split.train) + len(split.test) == len(frame)
    assert split.kind == "per-user" and split.cut > split.train["timestamp"].max()
    train_last = split.train.groupby("customer_id")["timestamp"].max()
    test_first = split.test.groupby("customer_id")["timestamp"].min()
    assert (train_last.reindex(test_first.index) < test_first).all()  # a test user always has training too
    distinct_times = frame.groupby("customer_id")["timestamp"].nunique()
    assert set(test_first.index) == set(distinct_times[distinct_times >= 2].index)


def test_per_user_split_holds_out_each_users_last_fraction_rounded_and_at_least_one() -> None:
    counts = {"a": 10, "b": 7, "c": 2, "d": 1}
    rows = [(u, f"i{j}", 1_000 * j + ord(u)) for u, n in counts.items() for j in range(n)]
    split = per_user_split(_interactions(rows).frame, 0.2)
    held_out = split.test.groupby("customer_id").size().to_dict()
    assert held_out == {"a": 2, "b": 1, "c": 1}  # 2, 1.4 -> 1, 0.4 -> at least 1; "d" cannot be split
    last_of_a = sorted(t for u, _, t in rows if u == "a")[-2:]
    assert sorted(split.test.loc[split.test["customer_id"] == "a", "timestamp"]) == last_of_a


def test_per_user_split_rejects_test_days() -> None:
    with pytest.raises(ValueError, match="test fraction"):
        SplitRule("per-user", test_days=14.0)


def _taste_data() -> RecData:
    """Two groups of users with disjoint tastes over 40 items, each user's items in random time order."""
    rng = np.random.default_rng(5)
    rows = []
    for u in range(60):
        group = u % 2
        liked = rng.choice(np.arange(20) + 20 * group, 12, replace=False)
        for j, item in enumerate(liked):
            rows.append((f"u{u}", f"i{item}", int(j * DAY + rng.integers(0, DAY))))
    return _interactions(rows)


SMALL_GRID = TuningGrid(factors=(4, 8), regularization=(0.01, 1.0), alpha=(1.0,), decay=(True, False))


@pytest.mark.parametrize("kind", ["global", "per-user"])
def test_als_tuning_chooses_the_same_parameters_whatever_the_test_set_holds(kind: str) -> None:
    data = _taste_data()
    rule = SplitRule(kind, None, 0.2)  # type: ignore[arg-type]
    split = rule.apply(data.frame)
    base = AlsParams(factors=8, iterations=5)
    tuned = tune_als(data, split, rule, base, SMALL_GRID, k=5)
    garbage = _interactions([("nobody", f"i{j}", 10**9 + j) for j in range(50)]).frame
    swapped = tune_als(data, Split(split.cut, split.train, garbage, split.kind), rule, base, SMALL_GRID, k=5)
    assert swapped.chosen == tuned.chosen
    assert [p.recall for p in swapped.points] == [p.recall for p in tuned.points]
    assert len(tuned.points) == 1 + 4 + 1  # the defaults, reg × decay at 8 factors, then 4 factors
    # The validation split is carved out of the training side: its rows are exactly the training rows.
    v = tuned.validation
    assert len(v.train) + len(v.test) == len(split.train)
    assert v.test["timestamp"].max() < split.cut if kind == "global" else True


def test_models_fit_on_the_split_never_see_a_test_interaction() -> None:
    rows = [(f"u{u}", f"i{(u + j) % 30}", j * DAY + u) for u in range(20) for j in range(10)]
    rows += [(f"u{u}", "late_item", 20 * DAY + u) for u in range(20)]  # exists only after the cut
    data = _interactions(rows)
    split = time_split(data.frame, cut_time(data.frame, 5.0, None))
    models = fit_models(data, split, ModelParams())
    assert "late_item" not in set(models.items.tolist()) | set(models.popular)
    assert all("late_item" not in seen for seen in models.seen.values())
    assert len(split.train) == 200 and models.als.matrix.nnz == 200
    assert models.als.matrix.shape == (20, split.train["item_id"].nunique())


def test_item_cosine_is_co_occurrence_over_the_root_of_both_counts() -> None:
    train = _interactions(
        [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3), ("u2", "b", 4), ("u3", "a", 5), ("u3", "c", 6)]
    )
    sim = item_cosine(train.frame, np.array(["a", "b", "c"]), neighbours=10).toarray()
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(3 * 2))
    assert sim[0, 2] == pytest.approx(1 / math.sqrt(3 * 1))
    assert sim[1, 2] == 0 and sim[0, 0] == 0


def test_repeat_baseline_is_reported_as_inapplicable_when_test_items_never_repeat() -> None:
    rows = [(f"u{u}", f"i{(u * 3 + j) % 40}", j * DAY + u) for u in range(30) for j in range(12)]
    data = _interactions(rows)
    split = time_split(data.frame, cut_time(data.frame, None, 0.25))
    params = RecsParams(resamples=50)
    results = {p.key: p for p in evaluate_split(data, split, fit_models(data, split, params.models), params)}
    assert results["new"].users > 0 and "own most-frequent" not in results["new"].estimates
    assert results["repeat"].estimates == {}
    assert "0 of" in results["repeat"].notes[0]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("user_id,item_id,timestamp\nu1,i1,1700000000\nu2,,1700000001\n", 3, "item_id"),
        ("user_id,item_id,timestamp\nu1,i1,1700000000\nu2,i2,yesterday\n", 3, "timestamp"),
        ("user_id,item_id,timestamp,weight\nu1,i1,1700000000,1\nu1,i2,1700000001,-2\n", 3, "weight"),
        ("user_id,item_id,timestamp\nu1,i1\n", 2, "timestamp"),
        ("user_id,item_id\nu1,i1\n", 1, "timestamp"),
        ("user_id,item_id,timestamp,wieght\nu1,i1,1,1\n", 1, "wieght"),
        ("user_id,item_id,timestamp\nu 1,i1,1700000000\n", 2, "user_id"),
    ],
)
def test_bad_interactions_file_is_rejected_naming_file_line_and_column(
    tmp_path: Path, text: str, line: int, column: str
) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_interactions(path)
    assert (err.value.file, err.value.line, err.value.column) == (path, line, column)
    assert str(path) in str(err.value) and f"line {line}" in str(err.value)


def test_interactions_file_accepts_unix_seconds_and_iso_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("user_id,item_id,timestamp,weight\nu1,i1,86400,2\nu2,i2,1970-01-03T00:00:00Z,0.5\n")
    frame = load_interactions(path).frame
    assert frame["timestamp"].tolist() == [86_400, 2 * 86_400]
    assert frame["weight"].tolist() == [2.0, 0.5]


def test_quick_run_on_a_small_synthetic_shop_writes_the_report_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEXTBEST_DATA_DIR", str(tmp_path / "var"))
    out = tmp_path / "reports"
    path = run_recs_bench(Console(quiet=True), quick=True, out_dir=out, dataset="synthetic", seed=1)
    text = path.read_text(encoding="utf-8")
    assert path == out / "recs-quick.md" and (out / "recs-quick_synthetic_shop_at10.png").stat().st_size > 10_000
    assert (
        "synthetic events" in text
        and "ALS minus baselines, tuned minus default" in text
        and "grid scored on the validation" in text
    )
    results = json.loads((out / "recs-quick_results.json").read_text())
    (shop,) = results.values()
    assert set(shop) == {"global"}  # the shop runs the global split only unless asked
    als = shop["global"]["protocols"]["new"]["metrics"]["ALS"]["10"]["recall"]
    assert als["low"] <= als["value"] <= als["high"]
    assert set(shop["global"]["protocols"]["repeat"]["metrics"]) == {
        "ALS",
        "ALS (tuned)",
        "item-to-item",
        "popularity",
        "own most-frequent",
    }
    tuning = shop["global"]["als_tuning"]
    assert len(tuning["grid"]) == 2 and tuning["chosen"] in [
        {k: g[k] for k in tuning["chosen"]} for g in tuning["grid"]
    ]
    assert json.loads((out / "recs-quick.json").read_text())["datasets"][0]["sha256"]


def test_quick_run_on_movielens_per_user_tests_every_user_and_skips_the_repeat_protocol_honestly(
    tmp_path: Path,
) -> None:
    public_dataset(MOVIELENS_100K, "ml-100k.inter")
    path = run_recs_bench(Console(quiet=True), quick=True, out_dir=tmp_path, dataset="movielens", split="per-user")
    (ml,) = json.loads((tmp_path / "recs-quick_results.json").read_text()).values()
    assert set(ml) == {"per-user"}
    split = ml["per-user"]
    assert split["protocols"]["repeat"]["metrics"] == {}
    assert "0 of" in split["protocols"]["repeat"]["notes"][0]
    assert split["protocols"]["new"]["users"] == 943  # every MovieLens user has 20+ ratings
    assert pd.notna(split["protocols"]["new"]["metrics"]["ALS (tuned)"]["10"]["ndcg"]["value"])
    assert "most published MovieLens 100K results" in path.read_text(encoding="utf-8")


def test_movielens_runs_both_splits_by_default_and_other_data_only_the_global_one() -> None:
    ml = _Input(_taste_data(), None, 0.2, True, "ml")
    shop = _Input(_taste_data(), 14.0, None, False, "shop")
    assert [r.kind for r in _rules(ml, None, None, None)] == ["global", "per-user"]
    assert [r.kind for r in _rules(shop, None, None, None)] == ["global"]
    assert _rules(shop, "both", None, 0.3) == [SplitRule("global", None, 0.3), SplitRule("per-user", None, 0.3)]
    assert _rules(ml, "global", 7.0, None) == [SplitRule("global", 7.0, None)]
    with pytest.raises(ValueError, match="test fraction"):
        _rules(shop, "per-user", 7.0, None)


def test_both_splits_of_an_interactions_file_are_reported_side_by_side_with_the_leak_named(tmp_path: Path) -> None:
    data = _taste_data().frame
    csv_path = tmp_path / "mine.csv"
    data.rename(columns={"customer_id": "user_id"})[["user_id", "item_id", "timestamp"]].to_csv(csv_path, index=False)
    out = tmp_path / "reports"
    path = run_recs_bench(Console(quiet=True), quick=True, out_dir=out, interactions=csv_path, split="both", ks=(5,))
    text = path.read_text(encoding="utf-8")
    assert "both splits side by side" in text and "Leak: the per-user split" in text
    (mine,) = json.loads((out / "recs-quick_results.json").read_text()).values()
    assert set(mine) == {"global", "per-user"}
    assert mine["per-user"]["protocols"]["new"]["users"] == 60  # every user of the file has 12 interactions
    assert (out / "recs-quick_mine_csv_per_user_at10.png").exists()
