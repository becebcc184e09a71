"""Off-policy estimators (engine/ope.py) and the `bench ope` inputs and report (benchmarks/ope.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from benchmarks.ope import read_decision_log, read_feedback_file, run_ope_bench
from engine import ope, policies
from engine.rules import Softmax
from feature_store.log_export import SCHEMA
from training.datafiles import DataError


def _single(reward, logging, target, **extra) -> ope.SlateLog:
    n = len(reward)
    return ope.SlateLog.from_rows(np.arange(n), np.ones(n), reward, logging, target, **extra)


def test_ips_with_uniform_logging_equals_the_mean_reward_where_the_target_agrees():
    # 3 actions logged uniformly, twice each; the target always picks action 0.
    actions = np.array([0, 1, 2, 0, 1, 2])
    reward = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    target = (actions == 0).astype(float)
    log = _single(reward, np.full(6, 1 / 3), target)
    assert ope.InverseProbabilityWeighting().estimate_policy_value(log) == pytest.approx(reward[actions == 0].mean())


def test_ips_is_unbiased_on_a_hand_built_example():
    mu, pi, r = np.array([0.8, 0.2]), np.array([0.3, 0.7]), np.array([0.5, 0.9])
    # The expectation over the logging policy of the one-row IPS estimate, outcome by outcome.
    expected = sum(
        mu[a] * ope.InverseProbabilityWeighting().estimate_policy_value(_single([r[a]], [mu[a]], [pi[a]]))
        for a in range(2)
    )
    assert expected == pytest.approx(float(pi @ r))


def _slates(spec, scores, k):
    for order in itertools.permutations(range(len(scores)), k):
        o = np.asarray(order, dtype=np.int64)
        yield o, policies.evaluate(spec, scores, o, np.random.default_rng(0))


def _expected_over_slates(weighting: ope.Weighting) -> tuple[float, float]:
    """E over every 2-slot slate of a softmax logging policy of the IPS estimate, and the target's true value."""
    scores, item_reward = np.array([1.0, 0.6, 0.2]), np.array([0.9, 0.5, 0.1])
    logging, target = Softmax(temperature=0.5), Softmax(temperature=0.2)
    truth = sum(float(np.prod(p)) * float(item_reward[o].sum()) for o, p in _slates(target, scores, 2))
    expected = 0.0
    for o, p in _slates(logging, scores, 2):
        t = policies.evaluate(target, scores, o, np.random.default_rng(0))
        log = ope.SlateLog.from_rows([0, 0], [1, 2], item_reward[o], p, t)
        expected += float(np.prod(p)) * ope.InverseProbabilityWeighting(weighting).estimate_policy_value(log)
    return expected, truth


def test_cascade_weights_on_logged_per_slot_propensities_are_unbiased_for_slates():
    expected, truth = _expected_over_slates("cascade")
    assert expected == pytest.approx(truth, rel=1e-9)


def test_per_slot_conditional_ratios_alone_are_biased_beyond_the_first_slot():
    expected, truth = _expected_over_slates("item_position")
    assert abs(expected - truth) > 1e-3


def test_doubly_robust_with_a_perfect_reward_model_equals_the_truth_exactly():
    rng = np.random.default_rng(3)
    q = np.array([0.1, 0.4, 0.7])
    pi = np.array([0.2, 0.5, 0.3])
    actions = rng.integers(0, 3, 50)
    log = _single(
        q[actions], rng.uniform(0.1, 1.0, 50), pi[actions], reward_hat=q[actions], target_reward_hat=np.full(50, pi @ q)
    )
    assert ope.DoublyRobust().estimate_policy_value(log) == pytest.approx(float(pi @ q), abs=1e-12)


def test_direct_method_with_a_perfect_model_equals_the_truth():
    pi, q = np.array([0.6, 0.4]), np.array([0.25, 0.75])
    log = _single(
        [1.0, 0.0, 1.0],
        [0.5, 0.5, 0.5],
        [0.6, 0.4, 0.6],
        reward_hat=[0.25, 0.75, 0.25],
        target_reward_hat=np.full(3, pi @ q),
    )
    assert ope.DirectMethod().estimate_policy_value(log) == pytest.approx(float(pi @ q))


def test_snips_with_all_weights_equal_is_the_mean_reward():
    reward = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    log = _single(reward, np.full(5, 0.4), np.full(5, 0.7))
    snips = ope.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(log)
    assert snips == pytest.approx(reward.mean())


@pytest.mark.parametrize("method", ["normal", "bootstrap"])
def test_confidence_interval_contains_the_estimate(method):
    rng = np.random.default_rng(1)
    log = _single(rng.random(200) < 0.3, rng.uniform(0.2, 1, 200), rng.uniform(0, 1, 200))
    for est in (ope.InverseProbabilityWeighting(), ope.SelfNormalizedInverseProbabilityWeighting()):
        ci = est.estimate_interval(log, method=method, n_bootstrap=300)
        assert ci.low < ci.estimate < ci.high


def test_weight_clipping_caps_every_weight():
    log = _single([1.0, 1.0], [0.01, 0.5], [1.0, 0.5])
    assert ope.importance_weights(log, "item_position", max_weight=10.0).max() == 10.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 5.0)), min_size=1, max_size=30))
def test_ips_with_the_target_equal_to_the_logging_policy_is_the_sample_mean(rows):
    prob = np.array([p for p, _ in rows])
    reward = np.array([r for _, r in rows])
    log = _single(reward, prob, prob)
    assert ope.InverseProbabilityWeighting().estimate_policy_value(log) == pytest.approx(reward.mean())


def test_a_bad_row_in_a_feedback_file_is_named_by_file_line_and_column(tmp_path):
    path = tmp_path / "feedback.csv"
    path.write_text(
        "context_age,action,position,reward,logging_probability,target_probability\n"
        "0.3,a,1,1,0.5,0.2\n"
        "0.1,b,1,0,1.5,0.2\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        read_feedback_file(path, None, "item_position")
    assert (err.value.file, err.value.line, err.value.column) == (path, 3, "logging_probability")
    assert "feedback.csv, line 3, column 'logging_probability'" in str(err.value)


def test_a_target_file_enables_the_direct_method_and_doubly_robust(tmp_path):
    log_path, target_path = tmp_path / "log.csv", tmp_path / "target.csv"
    rows = ["context_x,action,reward,logging_probability"]
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = int(rng.integers(0, 2))
        rows.append(f"{rng.normal():.3f},{'ab'[a]},{int(rng.random() < (0.2, 0.6)[a])},0.5")
    log_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    target_path.write_text(
        "row,action,probability\n" + "".join(f"{i},b,1.0\n" for i in range(1, 201)), encoding="utf-8"
    )
    feedback = read_feedback_file(log_path, target_path, "item_position")
    assert feedback.has_model
    dr = ope.DoublyRobust().estimate_policy_value(feedback.log)
    assert 0.45 < dr < 0.75  # action b's click rate is 0.6


def _export(tmp_path: Path) -> Path:
    """A decision-log export: two decisions of 2 slots with a shadow softmax, and one click."""
    base = {"ts": 1795400000000, "placement": "home", "channel": "web", "stream_id": "1-0", "customer": "c"}
    rows = []
    for d, (props, targets, shadow) in enumerate((([0.5, 0.4], [0.8, 0.5], "x"), ([0.25, 0.5], [0.1, 0.9], "y"))):
        for j, (p, t) in enumerate(zip(props, targets, strict=True)):
            rows.append(base | {"kind": "decision", "decision_id": f"d{d}", "policy": "thompson", "position": j + 1,
                                "action": f"i{d}{j}", "score": 0.5, "propensity": p, "target_policy": "softmax",
                                "target_propensity": t})  # fmt: skip
            rows.append(base | {"kind": "shadow", "decision_id": f"d{d}", "policy": "softmax", "position": j + 1,
                                "action": shadow + str(j), "propensity": 0.5})  # fmt: skip
    rows.append(base | {"kind": "reward", "decision_id": "d0", "action": "i00", "reward_type": "click", "reward": 1.0})
    path = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def test_a_decision_log_export_is_evaluated_for_its_shadow_policy(tmp_path):
    (group,) = read_decision_log(_export(tmp_path), "click")
    assert group.label == "home: thompson → softmax" and group.weighting == "cascade"
    # One click at slot 1 of d0, weight 0.8 / 0.5, over two decisions.
    ips = ope.InverseProbabilityWeighting("cascade").estimate_policy_value(group.log)
    assert ips == pytest.approx(0.8 / 0.5 / 2)


def test_a_target_policy_cannot_be_applied_to_a_decision_log(tmp_path):
    with pytest.raises(ValueError, match="scores of the shown items"):
        run_ope_bench(Console(quiet=True), quick=True, out_dir=tmp_path, log=_export(tmp_path), targets=("greedy",))


def test_quick_synthetic_validation_writes_the_report_and_its_plot(tmp_path):
    path = run_ope_bench(Console(quiet=True), quick=True, out_dir=tmp_path, runs=3, targets=("greedy", "softmax:0.1"))
    assert path == tmp_path / "ope-quick.md"
    assert (tmp_path / "ope_errors.png").stat().st_size > 10_000
    table = json.loads((tmp_path / "ope-quick.json").read_text())["tables"][0]
    assert len(table["rows"]) == 2 * 10
    assert "coverage" in table["headers"]
