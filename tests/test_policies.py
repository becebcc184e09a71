import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from engine.policies import Arms, Selection, choose, evaluate, softmax_many
from engine.rules import EpsilonGreedy, Exploration, Greedy, Softmax, Thompson, ThompsonLift


def ranked(values: list[float]) -> np.ndarray:
    """A pool's scores as the pipeline hands them over: float64, sorted descending."""
    return np.sort(np.asarray(values, dtype=np.float64))[::-1].copy()


specs = st.one_of(
    st.builds(Greedy),
    st.builds(EpsilonGreedy, epsilon=st.floats(0.001, 1.0)),
    st.builds(Softmax, temperature=st.floats(0.01, 100.0)),
    st.builds(Thompson, prior_strength=st.floats(0.0, 50.0), samples=st.integers(10, 200)),
)


@settings(max_examples=300, deadline=None)
@given(
    spec=specs,
    values=st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=40),
    k=st.integers(0, 45),
    seed=st.integers(0, 2**32 - 1),
    with_arms=st.booleans(),
)
def test_propensities_are_probabilities_and_distributions_sum_to_one(spec, values, k, seed, with_arms):
    scores = ranked(values)
    arms = None
    if with_arms:
        gen = np.random.default_rng(seed)
        trials = gen.integers(0, 100, len(scores)).astype(np.float64)
        arms = Arms(trials, np.floor(trials * gen.random(len(scores))))
    sel = choose(spec, scores, k, np.random.default_rng(seed), arms, keep_distributions=True)

    assert len(sel.order) == min(k, len(scores)) == len(sel.propensities) == len(sel.distributions)
    assert len(set(sel.order.tolist())) == len(sel.order)
    assert np.all((sel.propensities > 0) & (sel.propensities <= 1))
    for j, dist in enumerate(sel.distributions):
        assert dist.shape == scores.shape
        assert np.all(dist >= 0)
        assert abs(dist.sum() - 1.0) <= 1e-9
        assert np.all(dist[sel.order[:j]] == 0)
        assert dist[sel.order[j]] == sel.propensities[j]


@pytest.mark.parametrize("spec", [Greedy(), EpsilonGreedy(epsilon=0.5), Softmax(temperature=1.0), Thompson()])
def test_same_seed_replays_the_same_selection(spec):
    scores = ranked(np.random.default_rng(7).random(40).tolist())
    arms = Arms(np.full(40, 50.0), np.arange(40, dtype=np.float64))
    first = choose(spec, scores, 10, np.random.default_rng(123), arms, keep_distributions=True)
    again = choose(spec, scores, 10, np.random.default_rng(123), arms, keep_distributions=True)
    np.testing.assert_array_equal(first.order, again.order)
    np.testing.assert_array_equal(first.propensities, again.propensities)
    for a, b in zip(first.distributions, again.distributions, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", [Softmax(temperature=1.0), Thompson()])
def test_different_seeds_choose_differently_among_equal_items(spec):
    scores = np.ones(20)
    orders = {tuple(choose(spec, scores, 5, np.random.default_rng(seed)).order.tolist()) for seed in range(10)}
    assert len(orders) > 1


def test_greedy_reproduces_the_ranker_order_with_certainty():
    scores = ranked(np.random.default_rng(3).random(50).tolist())
    for keep in (False, True):
        sel = choose(Greedy(), scores, 10, np.random.default_rng(0), keep_distributions=keep)
        np.testing.assert_array_equal(sel.order, np.arange(10))
        np.testing.assert_array_equal(sel.propensities, np.ones(10))


def test_greedy_breaks_ties_towards_the_lower_pool_index():
    scores = np.array([2.0, 1.0, 2.0, 1.0, 3.0])
    fast = choose(Greedy(), scores, 5, np.random.default_rng(0))
    slow = choose(Greedy(), scores, 5, np.random.default_rng(0), keep_distributions=True)
    assert fast.order.tolist() == slow.order.tolist() == [4, 0, 2, 1, 3]


def test_limit_above_the_pool_size_fills_only_the_pool():
    sel = choose(EpsilonGreedy(), ranked([3.0, 2.0, 1.0]), 10, np.random.default_rng(0))
    assert sorted(sel.order.tolist()) == [0, 1, 2]
    assert choose(Thompson(), np.empty(0), 10, np.random.default_rng(0)).order.size == 0


def hand_epsilon_greedy(order: list[int], epsilon: float) -> list[float]:
    """Pool sorted descending, so the best remaining item is the lowest remaining index."""
    remaining = [0, 1, 2]
    out = []
    for item in order:
        p = epsilon / len(remaining) + (1 - epsilon if item == min(remaining) else 0.0)
        out.append(p)
        remaining.remove(item)
    return out


def hand_softmax(order: list[int], scores: list[float], temperature: float) -> list[float]:
    remaining = [0, 1, 2]
    out = []
    for item in order:
        out.append(math.exp(scores[item] / temperature) / sum(math.exp(scores[r] / temperature) for r in remaining))
        remaining.remove(item)
    return out


def test_epsilon_greedy_propensities_match_the_closed_form():
    scores = [3.0, 2.0, 1.0]
    seen = set()
    for seed in range(60):
        sel = choose(EpsilonGreedy(epsilon=0.6), np.array(scores), 3, np.random.default_rng(seed))
        seen.add(tuple(sel.order.tolist()))
        np.testing.assert_allclose(sel.propensities, hand_epsilon_greedy(sel.order.tolist(), 0.6), rtol=1e-12)
    assert len(seen) > 1  # exploration happened, so non-greedy orders were checked too
    np.testing.assert_allclose(hand_epsilon_greedy([0, 1, 2], 0.6), [0.6, 0.7, 1.0])


def test_softmax_propensities_match_the_closed_form():
    scores = [0.9, 0.5, 0.2]
    seen = set()
    for seed in range(60):
        sel = choose(Softmax(temperature=0.3), np.array(scores), 3, np.random.default_rng(seed))
        seen.add(tuple(sel.order.tolist()))
        np.testing.assert_allclose(sel.propensities, hand_softmax(sel.order.tolist(), scores, 0.3), rtol=1e-12)
    assert len(seen) > 1


def test_softmax_is_stable_for_huge_score_gaps():
    scores = np.array([1000.0, 0.0, -1000.0])
    sel = choose(Softmax(temperature=0.01), scores, 3, np.random.default_rng(0), keep_distributions=True)
    assert sel.order.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(sel.propensities, [1.0, 1.0, 1.0])
    assert all(np.isfinite(d).all() for d in sel.distributions)


@pytest.mark.parametrize("spec", [Greedy(), EpsilonGreedy(epsilon=0.4), Softmax(temperature=0.2)])
def test_evaluate_on_the_chosen_order_gives_the_chosen_propensities(spec):
    scores = ranked(np.random.default_rng(11).random(30).tolist())
    for seed in range(5):
        sel = choose(spec, scores, 8, np.random.default_rng(seed))
        np.testing.assert_allclose(evaluate(spec, scores, sel.order, np.random.default_rng(99)), sel.propensities)


def test_greedy_gives_zero_probability_where_an_order_deviates_from_it():
    scores = ranked([0.9, 0.8, 0.7, 0.6])
    probs = evaluate(Greedy(), scores, np.array([0, 2, 1, 3]), np.random.default_rng(0))
    assert probs.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_epsilon_greedy_can_explain_any_order():
    scores = ranked([0.9, 0.8, 0.7, 0.6])
    probs = evaluate(EpsilonGreedy(epsilon=0.2), scores, np.array([3, 2, 1, 0]), np.random.default_rng(0))
    np.testing.assert_allclose(probs, [0.05, 0.2 / 3, 0.1, 1.0])


def test_evaluate_rejects_repeated_or_foreign_items():
    scores = ranked([0.9, 0.8, 0.7])
    for taken in ([0, 0], [0, 3], [-1]):
        with pytest.raises(ValueError, match="distinct indices"):
            evaluate(Greedy(), scores, np.array(taken), np.random.default_rng(0))


def test_arms_must_align_with_the_pool():
    with pytest.raises(ValueError, match="align"):
        choose(Thompson(), ranked([0.9, 0.8]), 1, np.random.default_rng(0), Arms(np.ones(3), np.zeros(3)))


def exact_first_beats_second(a0: float, b0: float, a1: float, b1: float) -> float:
    """P(θ0 > θ1) for independent Beta draws: ∫ pdf0(x)·cdf1(x) dx."""
    value, _ = integrate.quad(lambda x: stats.beta.pdf(x, a0, b0) * stats.beta.cdf(x, a1, b1), 0, 1)
    return float(value)


def test_thompson_probabilities_match_the_exact_posterior():
    # Prior means prior_ctr·score/max = [0.3, 0.15] worth 10 impressions: α = 10·mean + clicks,
    # β = 10·(1 − mean) + misses.
    scores = np.array([2.0, 1.0])
    arms = Arms(trials=np.array([10.0, 20.0]), successes=np.array([1.0, 6.0]))
    exact = exact_first_beats_second(3 + 1, 7 + 9, 1.5 + 6, 8.5 + 14)
    assert 0.2 < exact < 0.8  # a case where the two arms genuinely compete
    spec = Thompson(prior_ctr=0.3, prior_strength=10, samples=4000)

    first_slot = choose(spec, scores, 2, np.random.default_rng(5), arms, keep_distributions=True).distributions[0]
    assert first_slot[0] == pytest.approx(exact, abs=0.05)
    assert first_slot[1] == pytest.approx(1 - exact, abs=0.05)
    assert evaluate(spec, scores, np.array([1, 0]), np.random.default_rng(6), arms).tolist() == pytest.approx(
        [1 - exact, 1.0], abs=0.05
    )


@pytest.mark.parametrize("k", [1, 5, 20, 30])
def test_thompson_all_slots_at_once_matches_slot_by_slot(k):
    scores = ranked(np.random.default_rng(4).random(25).tolist())
    arms = Arms(np.full(25, 30.0), np.random.default_rng(5).integers(0, 5, 25).astype(np.float64))
    spec = Thompson(samples=12)  # fewer draws than slots: rows are reused
    for seed in range(10):
        fast = choose(spec, scores, k, np.random.default_rng(seed), arms)
        slow = choose(spec, scores, k, np.random.default_rng(seed), arms, keep_distributions=True)
        np.testing.assert_array_equal(fast.order, slow.order)
        np.testing.assert_allclose(fast.propensities, slow.propensities, rtol=1e-12)


def test_thompson_converges_to_the_best_arm():
    true_ctr = np.array([0.02, 0.03, 0.05, 0.04, 0.08, 0.03, 0.06, 0.01])
    spec = Thompson(prior_strength=0, samples=10)
    scores = np.ones(len(true_ctr))
    world = np.random.default_rng(2024)
    trials = np.zeros(len(true_ctr))
    successes = np.zeros(len(true_ctr))
    chosen = []
    for round_ in range(4000):
        sel: Selection = choose(spec, scores, 1, np.random.default_rng([2024, round_]), Arms(trials, successes))
        item = int(sel.order[0])
        trials[item] += 1
        successes[item] += float(world.random() < true_ctr[item])
        chosen.append(item)
    assert int(np.argmax(trials)) == 4
    assert np.mean(np.array(chosen[-1000:]) == 4) > 0.5


def test_one_click_multiplies_a_low_ranked_items_chance_to_lead():
    # On the click-rate scale a click is strong evidence: the last candidate, clicked once in one
    # impression, leads far more often than before, against a leader shown 20 times without a click.
    scores = ranked([1.0, 0.9, 0.8, 0.3])
    spec = Thompson(prior_ctr=0.05, prior_strength=50, samples=4000)
    before = Arms(np.array([20.0, 0, 0, 0]), np.zeros(4))
    after = Arms(np.array([20.0, 0, 0, 1]), np.array([0.0, 0, 0, 1]))
    first = [
        choose(spec, scores, 1, np.random.default_rng(1), a, keep_distributions=True).distributions[0]
        for a in (before, after)
    ]
    assert first[0][3] < 0.1 and first[1][3] > 2.5 * first[0][3]


@pytest.mark.parametrize("spec", [Greedy(), EpsilonGreedy(), Softmax(), Thompson()])
def test_params_name_what_to_log(spec: Exploration):
    params = spec.params()
    assert "policy" not in params
    assert params["pool"] == 30


def test_thompson_lift_probabilities_match_the_exact_gamma_posterior():
    # Expected rates prior_ctr·score/max = [0.1, 0.05]; lifts Gamma(k + clicks, k + expected clicks):
    # item 0: Gamma(5 + 2, 5 + 4) (clicked half as often as expected), item 1: Gamma(5 + 3, 5 + 1).
    scores = np.array([2.0, 1.0])
    arms = Arms(np.array([40.0, 20.0]), np.array([2.0, 3.0]), expected=np.array([4.0, 1.0]))
    spec = ThompsonLift(prior_ctr=0.1, prior_strength=5, samples=4000)
    x = np.linspace(1e-6, 12, 20001)
    # P(0.1·λ0 > 0.05·λ1) = ∫ pdf1(y) · P(λ0 > y/2) dy
    exact = float(np.trapezoid(stats.gamma.pdf(x, 8, scale=1 / 6) * stats.gamma.sf(x / 2, 7, scale=1 / 9), x))
    assert 0.2 < exact < 0.8
    first_slot = choose(spec, scores, 2, np.random.default_rng(5), arms, keep_distributions=True).distributions[0]
    assert first_slot[0] == pytest.approx(exact, abs=0.05)


def test_thompson_lift_keeps_the_ranking_when_every_item_beats_its_estimate_alike():
    # The ranker is off by the same factor for all items (clicks 6× what it expected): the lifts grow
    # alike and the personal order stands, where per-item click rates would rank by raw popularity.
    scores = ranked([1.0, 0.8, 0.6, 0.4, 0.2])
    spec = ThompsonLift(prior_ctr=0.05, prior_strength=10, samples=2000)
    expected = np.array([50.0, 40.0, 30.0, 20.0, 10.0])
    arms = Arms(np.full(5, 1000.0), 6 * expected, expected=expected)
    dist = choose(spec, scores, 1, np.random.default_rng(1), arms, keep_distributions=True).distributions[0]
    assert int(np.argmax(dist)) == 0 and dist[0] > 0.9


def test_thompson_lift_moves_up_an_item_that_beats_its_estimate():
    scores = ranked([1.0, 0.9, 0.5])
    spec = ThompsonLift(prior_ctr=0.05, prior_strength=10, samples=4000)
    calm = Arms(np.zeros(3), np.zeros(3), expected=np.zeros(3))
    hot = Arms(np.array([0.0, 0, 400]), np.array([0.0, 0, 60]), expected=np.array([0.0, 0, 5.0]))  # 12× its estimate
    before = choose(spec, scores, 1, np.random.default_rng(2), calm, keep_distributions=True).distributions[0]
    after = choose(spec, scores, 1, np.random.default_rng(2), hot, keep_distributions=True).distributions[0]
    assert after[2] > 0.9 > before[2]
    assert evaluate(spec, scores, np.array([2, 0, 1]), np.random.default_rng(3), hot)[0] == pytest.approx(
        after[2], abs=0.03
    )


@settings(max_examples=150, deadline=None)
@given(
    pools=st.lists(
        st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0, -3.0, 7.5]), min_size=0, max_size=30),
        min_size=1,
        max_size=6,
    ),
    ks=st.lists(st.integers(0, 12), min_size=6, max_size=6),
    temperature=st.sampled_from([0.05, 0.5, 2.0]),
    seed=st.integers(0, 2**32),
)
def test_softmax_for_many_pools_is_each_pools_choice_bit_for_bit(pools, ks, temperature, seed):
    """A batch's softmax (pools side by side, padded) picks and weighs exactly what `choose` does for
    each pool with the same generator: same order, same propensities to the last bit (replayable)."""
    spec = Softmax(temperature=temperature)
    arrays = [np.asarray(p, dtype=np.float32) for p in pools]
    limits = ks[: len(pools)]
    gumbels = [np.random.default_rng([seed, r]).gumbel(size=len(p)) for r, p in enumerate(arrays)]
    many = softmax_many(spec, arrays, limits, gumbels)
    for r, (scores, k) in enumerate(zip(arrays, limits, strict=True)):
        alone = choose(spec, scores.astype(np.float64), k, np.random.default_rng([seed, r]))
        assert many[r].order.tolist() == alone.order.tolist()
        assert many[r].propensities.tolist() == alone.propensities.tolist()
