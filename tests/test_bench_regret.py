"""The regret benchmark: its simulation's invariants, learning behaviour, and the end-to-end quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from benchmarks.regret import run_regret_bench
from benchmarks.regret_sim import Contender, Pools, ServedRanker, Trace, simulate, summarize
from engine.rules import EpsilonGreedy, Greedy, Softmax, Thompson

POOL = 8
K = 3
# The served home placement's Thompson parameters: prior at a 5 % click rate, worth 20 impressions.
SERVED_THOMPSON = Thompson(prior_ctr=0.05, prior_strength=20, samples=64, pool=POOL)


@pytest.fixture
def random_pools() -> Pools:
    """40 customers, each with a pool whose scores are only loosely related to the true click rates."""
    rng = np.random.default_rng(3)
    n_items, customers = 30, 40
    items = np.stack([rng.choice(n_items, POOL, replace=False) for _ in range(customers)]).astype(np.int64)
    click = rng.uniform(0.01, 0.4, (customers, POOL))
    scores = -np.sort(-(click + rng.normal(0, 0.15, click.shape)), axis=1)
    return Pools(items, scores, click, click * rng.uniform(5, 50, click.shape), n_items)


def every_policy() -> list[Contender]:
    return [
        Contender("greedy", Greedy(pool=POOL)),
        Contender("epsilon", EpsilonGreedy(epsilon=0.2, pool=POOL)),
        Contender("softmax", Softmax(temperature=0.05, pool=POOL)),
        Contender("thompson", SERVED_THOMPSON),
        Contender("thompson uniform", Thompson(prior_strength=0, samples=32, pool=POOL)),
        Contender("oracle", None),
    ]


def misleading_ranker() -> Pools:
    """One customer, five items: the ranker puts the three poor items (2–4 % clicks) above the two good ones."""
    click = np.array([[0.02, 0.03, 0.04, 0.25, 0.30]])
    scores = np.array([[1.0, 0.9, 0.8, 0.5, 0.4]])
    return Pools(np.arange(5, dtype=np.int64)[None, :], scores, click, click * 10, 5)


def halves(trace: Trace) -> tuple[float, float]:
    """Regret accumulated in the first and in the second half of the rounds."""
    half = len(trace.regret) // 2
    return float(trace.regret[:half].sum()), float(trace.regret[half:].sum())


def test_the_oracle_has_zero_regret(random_pools: Pools) -> None:
    arrivals = np.random.default_rng(0).integers(0, 40, 500)
    trace = simulate(random_pools, [Contender("oracle", None)], arrivals, K, 10, seed=1)["oracle"]
    assert np.all(trace.regret == 0)
    assert np.allclose(trace.expected_clicks, random_pools.oracle_clicks(K)[arrivals])


def test_every_policy_has_non_negative_regret_in_every_round_against_the_same_pool(random_pools: Pools) -> None:
    arrivals = np.random.default_rng(1).integers(0, 40, 400)
    runs = simulate(random_pools, every_policy(), arrivals, K, 25, seed=2)
    best = random_pools.oracle_clicks(K)[arrivals]
    for name, trace in runs.items():
        assert trace.regret.min() >= -1e-12, name  # the oracle's k items are the pool's best: nothing beats them
        assert np.allclose(trace.regret, best - trace.expected_clicks), name
    assert runs["greedy"].regret.sum() > 0  # the scores are noisy: the ranker alone is not the oracle


def test_greedy_on_perfect_scores_has_zero_regret(random_pools: Pools) -> None:
    order = np.argsort(-random_pools.click, axis=1)  # the ranker's order is the truth's
    click = np.take_along_axis(random_pools.click, order, axis=1)
    perfect = Pools(
        np.take_along_axis(random_pools.items, order, axis=1),
        click.copy(),
        click,
        np.take_along_axis(random_pools.revenue, order, axis=1),
        random_pools.n_items,
    )
    arrivals = np.random.default_rng(2).integers(0, 40, 500)
    trace = simulate(perfect, [Contender("greedy", Greedy(pool=POOL))], arrivals, K, 10, seed=3)["greedy"]
    assert trace.regret.max() == 0


def test_thompson_regret_grows_sublinearly_where_greedy_follows_a_misleading_ranker_forever() -> None:
    pools = misleading_ranker()
    contenders = [Contender("greedy", Greedy(pool=5)), Contender("thompson", SERVED_THOMPSON)]
    runs = simulate(pools, contenders, np.zeros(2_000, dtype=np.int64), 2, 10, seed=11)
    greedy_first, greedy_second = halves(runs["greedy"])
    first, second = halves(runs["thompson"])
    assert greedy_first == greedy_second == pytest.approx(1_000 * 0.50)  # 0.55 best − 0.05 shown, every round
    assert second < 0.2 * first  # learned: the second half adds little
    assert first + second < 0.15 * (greedy_first + greedy_second)


def test_thompson_learns_nothing_before_its_bandit_state_is_refreshed() -> None:
    rounds = 1_000
    contender = Contender("thompson", SERVED_THOMPSON)
    stale = simulate(misleading_ranker(), [contender], np.zeros(rounds, dtype=np.int64), 2, rounds, seed=5)
    first, second = halves(stale["thompson"])
    assert second > 0.8 * first  # never refreshed within the run: still sampling from the ranker's prior


def test_summary_pairs_each_seed_with_the_reference() -> None:
    def trace(clicks: list[float], regret: list[float]) -> Trace:
        c = np.array(clicks)
        return Trace(c, 2 * c, np.ones(len(c), dtype=np.int64), np.array(regret))

    runs = [
        {"greedy": trace([1.0, 1.0], [0.5, 0.5]), "explore": trace([1.5, 1.5], [0.0, 0.0])},
        {"greedy": trace([2.0, 2.0], [0.5, 0.5]), "explore": trace([2.5, 2.5], [0.0, 0.0])},
    ]
    greedy, explore = summarize(runs, k=2, reference="greedy")
    assert explore.vs_reference_per_1k == pytest.approx(500.0)
    assert explore.vs_reference_ci == pytest.approx(0.0)  # the same gain on both seeds, despite their spread
    assert greedy.final_regret == pytest.approx(1.0) and greedy.final_regret_ci == pytest.approx(0.0)
    assert greedy.expected_ctr == pytest.approx(1.5 / 2) and greedy.revenue_per_1k == pytest.approx(3_000.0)


def test_pools_refuse_scores_out_of_the_rankers_order() -> None:
    with pytest.raises(ValueError, match="descending"):
        Pools(np.array([[0, 1]]), np.array([[0.2, 0.9]]), np.array([[0.1, 0.1]]), np.zeros((1, 2)), 2)


def test_a_shop_without_its_truth_is_refused_naming_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"truth\.json"):
        ServedRanker(tmp_path)


def test_quick_run_writes_the_report_table_and_regret_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTBEST_DATA_DIR", str(tmp_path / "data"))  # the quick shop is generated here
    path = run_regret_bench(Console(quiet=True), quick=True, out_dir=tmp_path / "reports", seed=1)
    assert path == tmp_path / "reports" / "regret-quick.md"
    for png in ("regret-quick_cumulative.png", "regret-quick_rate.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "reports" / "regret-quick.json").read_text())
    table = doc["tables"][0]
    rows = {row[0]: dict(zip(table["headers"], row, strict=True)) for row in table["rows"]}
    assert {"greedy", "oracle (pool)"} <= rows.keys() and any(n.startswith("thompson") for n in rows)
    assert rows["oracle (pool)"]["final cum. regret (clicks)"] == 0
    assert all(r["final cum. regret (clicks)"] > 0 for n, r in rows.items() if n != "oracle (pool)")
    assert doc["params"]["rounds"] == 2_000 and doc["params"]["seeds"] == 3
