"""Propensity and value models: training on a known data-generating process, ONNX parity, model file checks,
and the metric helpers on cases small enough to compute by hand."""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from engine.scoring import ModelFileError, load_scoring_model
from training import propensity
from training.propensity import (
    LgbmParams,
    ModelSpec,
    ParityError,
    auc,
    brier,
    expected_calibration_error,
    export_onnx,
    fit_booster,
    inference_speed,
    log_loss,
    rate_table_baseline,
    reliability_table,
    spearman,
    split_examples,
    top_decile_lift,
    train_models,
)

FEATURES = (
    "recency_days",
    "frequency_90d",
    "spend_90d",
    "tenure_days",
    "sessions_30d",
    "email_opens_30d",
    "cart_adds_30d",
    "discount_share",
)
DAY = 86_400
AS_OFS = (1_780_000_000, 1_780_000_000 + 30 * DAY, 1_780_000_000 + 60 * DAY)
PARAMS = LgbmParams(num_threads=1, learning_rate=0.1, n_estimators=200, early_stopping_rounds=20)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def make_examples(customers: int = 3000, as_ofs: tuple[int, ...] = AS_OFS, seed: int = 0) -> pd.DataFrame:
    """Examples whose labels are drawn from known logistic probabilities of the features (kept in `true_*`).

    Some features are then blanked (NaN), as a feature store leaves them for customers without history; the
    true probabilities still use the full values, so no model can reach the true AUC exactly.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for as_of in as_ofs:
        n = customers
        f = {
            "recency_days": rng.exponential(40, n),
            "frequency_90d": rng.poisson(2, n).astype(float),
            "tenure_days": rng.uniform(30, 900, n),
            "sessions_30d": rng.poisson(3, n).astype(float),
            "email_opens_30d": rng.poisson(1.5, n).astype(float),
            "cart_adds_30d": rng.poisson(0.7, n).astype(float),
            "discount_share": rng.beta(2, 5, n),
        }
        f["spend_90d"] = f["frequency_90d"] * rng.gamma(2, 25, n)
        p_buy = _sigmoid(
            -1.6
            - 0.025 * f["recency_days"]
            + 0.3 * f["frequency_90d"]
            + 0.15 * f["sessions_30d"]
            + 0.6 * f["cart_adds_30d"]
            + 1.5 * (f["discount_share"] > 0.4)
        )
        p_churn = _sigmoid(-1.5 + 0.03 * f["recency_days"] - 0.4 * f["frequency_90d"] - 0.0015 * f["tenure_days"])
        p_click = _sigmoid(-2.8 + 0.7 * f["email_opens_30d"] + 1.0 * f["discount_share"])
        p_buy_90d = _sigmoid(np.log(p_buy / (1 - p_buy)) + 1.0)
        mean_amount = 30 * np.exp(0.8 * f["discount_share"] + 0.1 * f["frequency_90d"])
        bought_90d = rng.random(n) < p_buy_90d
        frame = pd.DataFrame(
            {
                "customer_id": [f"c{i:05d}" for i in range(n)],
                "as_of": as_of,
                **{name: f[name].astype(np.float64) for name in FEATURES},
                "purchased_next_30d": (rng.random(n) < p_buy).astype(int),
                "churned_next_90d": (rng.random(n) < p_churn).astype(int),
                "email_click_next_30d": (rng.random(n) < p_click).astype(int),
                "value_next_90d": np.where(bought_90d, rng.gamma(2.0, mean_amount / 2.0), 0.0),
                "true_p_purchase": p_buy,
                "true_value": p_buy_90d * mean_amount,
            }
        )
        for name, share in (("recency_days", 0.05), ("sessions_30d", 0.05), ("discount_share", 0.1)):
            frame.loc[rng.random(n) < share, name] = np.nan
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def examples() -> pd.DataFrame:
    return make_examples()


@pytest.fixture(scope="module")
def trained(examples: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("propensity")
    return out, train_models(examples, FEATURES, out, params=PARAMS)


def _latest(examples: pd.DataFrame) -> pd.DataFrame:
    return examples[examples["as_of"] == examples["as_of"].max()]


# ---------------------------------------------------------------- training on the known process


def test_every_model_is_written_and_scores_in_onnx_runtime(trained, examples):
    out, metrics = trained
    x = _latest(examples).loc[:, list(FEATURES)].to_numpy(np.float32)[:7]
    for spec in propensity.DEFAULT_SPECS:
        model = load_scoring_model(out / f"{spec.name}.onnx", spec.name, spec.kind, FEATURES)
        pred = model.predict(x)
        assert pred.shape == (7,) and pred.dtype == np.float64
        assert metrics[spec.name]["path"] == str(out / f"{spec.name}.onnx")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_onnx_runtime_matches_lightgbm_within_1e5_on_all_models(trained, examples):
    _, metrics = trained
    n_valid = len(_latest(examples))
    assert _latest(examples)[list(FEATURES)].isna().any().any()  # the validation rows do have missing values
    for name, m in metrics.items():
        assert m["parity_rows"] > n_valid  # validation rows plus the blanked copy
        if m["kind"] == "binary":
            assert m["parity_max_abs_diff"] <= 1e-5, name
        else:
            assert m["parity_max_rel_diff"] <= 1e-5, name


def test_purchase_model_beats_baselines_and_approaches_the_true_auc(trained, examples):
    _, metrics = trained
    m = metrics["purchase_30d"]
    latest = _latest(examples)
    true_auc = auc(latest["purchased_next_30d"], latest["true_p_purchase"])
    model_auc = m["model"]["auc"]
    assert m["baselines"]["base_rate"]["auc"] == pytest.approx(0.5)
    assert model_auc > m["baselines"]["recency_rate_table"]["auc"] + 0.05
    assert model_auc > true_auc - 0.03
    assert m["model"]["log_loss"] < m["baselines"]["base_rate"]["log_loss"]
    assert m["model"]["brier"] < m["baselines"]["base_rate"]["brier"]


def test_binary_models_are_calibrated(trained):
    _, metrics = trained
    for name in ("purchase_30d", "churn_90d", "email_click_30d"):
        m = metrics[name]
        assert m["model"]["ece"] < 0.04, name
        table = m["model"]["reliability"]
        assert sum(row["count"] for row in table) == m["n_valid"]
        busy = [row for row in table if row["count"] >= 200]
        assert all(abs(row["mean_predicted"] - row["observed_rate"]) < 0.08 for row in busy), name


def test_value_model_ranks_future_value_better_than_past_spend(trained, examples):
    _, metrics = trained
    m = metrics["value_90d"]
    latest = _latest(examples)
    assert m["objective"] == "tweedie"
    assert m["baselines"]["train_mean"]["spearman"] is None  # a constant has no ranking
    assert m["baselines"]["train_mean"]["top_decile_lift"] == pytest.approx(1.0)
    assert m["baselines"]["past_spend"]["feature"] == "spend_90d"
    assert m["model"]["spearman"] > m["baselines"]["past_spend"]["spearman"]
    assert m["model"]["top_decile_lift"] > 1.5
    assert m["model"]["mae"] < m["baselines"]["train_mean"]["mae"]
    # Learned values track the true expected values on the validation rows.
    model = load_scoring_model(Path(m["path"]), "value_90d", "regression", FEATURES)
    pred = model.predict(latest.loc[:, list(FEATURES)].to_numpy(np.float32))
    assert spearman(latest["true_value"], pred) > 0.8


def test_metrics_report_split_sizes_trees_and_top_features(trained, examples):
    _, metrics = trained
    m = metrics["email_click_30d"]
    assert m["split"] == "time" and m["valid_as_of"] == str(max(AS_OFS))
    assert (m["n_train"], m["n_valid"]) == (len(examples) - len(_latest(examples)), len(_latest(examples)))
    assert m["n_trees"] == m["best_iteration"] >= 1
    gains = m["feature_importance_gain"]
    assert 1 <= len(gains) <= 10 and next(iter(gains)) == "email_opens_30d"
    assert list(gains.values()) == sorted(gains.values(), reverse=True)


def test_single_as_of_splits_customers_by_hash(examples):
    one_date = examples[examples["as_of"] == AS_OFS[0]]
    valid, method = split_examples(one_date)
    assert method == "customer_hash"
    assert 0.15 < valid.mean() < 0.25
    assert not set(one_date["customer_id"][valid]) & set(one_date["customer_id"][~valid])
    again, _ = split_examples(one_date.iloc[::-1])
    assert set(one_date.iloc[::-1]["customer_id"][again]) == set(one_date["customer_id"][valid])


def test_failed_parity_raises_and_leaves_no_model_file(examples, tmp_path, monkeypatch):
    monkeypatch.setattr(propensity, "PARITY_TOLERANCE", -1.0)  # no difference is small enough
    spec = ModelSpec("purchase_30d", "purchased_next_30d", "binary")
    small = LgbmParams(num_threads=1, n_estimators=5)
    with pytest.raises(ParityError, match="purchase_30d") as err:
        train_models(examples, FEATURES, tmp_path, specs=(spec,), params=small)
    measured = err.value.metrics["parity_max_abs_diff"]
    assert isinstance(measured, float) and measured >= 0.0
    assert list(tmp_path.iterdir()) == []


def test_bad_examples_are_refused_with_the_column_named(examples, tmp_path):
    with pytest.raises(ValueError, match="no_such_feature"):
        train_models(examples, (*FEATURES, "no_such_feature"), tmp_path, params=PARAMS)
    broken = examples.assign(churned_next_90d=2)
    with pytest.raises(ValueError, match="churned_next_90d"):
        train_models(broken, FEATURES, tmp_path, params=PARAMS)


def test_threshold_between_adjacent_float32_values_branches_alike_in_onnx(tmp_path):
    # Two adjacent float32 values: LightGBM splits halfway between them, in double; rounded to the nearest
    # float32 that threshold can land on the upper value and send it the other way in ONNX.
    a = np.float32(4.5671987)
    b = np.nextafter(a, np.float32(np.inf))
    rng = np.random.default_rng(0)
    x = np.column_stack([np.where(rng.random(2000) < 0.5, a, b), rng.standard_normal(2000)]).astype(np.float32)
    y = (x[:, 0] == b).astype(np.float64)
    booster, _ = fit_booster(x[:1500], y[:1500], x[1500:], y[1500:], "binary", ("f0", "f1"), PARAMS)
    np.testing.assert_array_equal(propensity.float32_thresholds(booster).predict(x), booster.predict(x))
    path = tmp_path / "adjacent.onnx"
    export_onnx(booster, path, ModelSpec("adjacent", "y", "binary"), ("f0", "f1"))
    served = load_scoring_model(path, "adjacent", "binary", ("f0", "f1"))
    assert np.abs(served.predict(x) - booster.predict(x)).max() <= 1e-6


def test_floor_to_float32_keeps_every_float32_comparison():
    a = np.float32(4.5671987)
    b = np.nextafter(a, np.float32(np.inf))
    mid = (float(a) + float(b)) / 2
    thresholds = np.array([mid, float(a), -mid, 1e39, 1e-35])
    floored = propensity.floor_to_float32(thresholds)
    assert floored[0] == float(a) and floored[1] == float(a)
    assert floored[2] == float(-b)
    assert floored[3] == float(np.finfo(np.float32).max)
    for x in (a, b, -a, -b, np.float32(0.0)):
        assert ((float(x) <= thresholds) == (float(x) <= floored)).all()


# ---------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A quick binary model over the first three features."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 3)).astype(np.float32)
    y = (rng.random(600) < _sigmoid(x[:, 0] - x[:, 1])).astype(np.float64)
    booster, _ = fit_booster(x[:400], y[:400], x[400:], y[400:], "binary", FEATURES[:3], LgbmParams(num_threads=1))
    path = tmp_path_factory.mktemp("small") / "purchase_30d.onnx"
    export_onnx(booster, path, ModelSpec("purchase_30d", "purchased_next_30d", "binary"), FEATURES[:3])
    return path, booster


def _load(path: Path, kind: str = "binary", names: tuple[str, ...] = FEATURES[:3], name: str = "purchase_30d"):
    return load_scoring_model(path, name, kind, names)


def test_truncated_model_file_is_refused_naming_the_file(small_model, tmp_path):
    path = tmp_path / "truncated.onnx"
    data = small_model[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"truncated\.onnx"):
        _load(path)


def test_random_bytes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError, match=r"noise\.onnx"):
        _load(path)


def test_wrong_feature_count_is_refused(small_model):
    with pytest.raises(ModelFileError, match=r"purchase_30d\.onnx.*expected \[n, 4\]"):
        _load(small_model[0], names=FEATURES[:4])


def test_features_in_another_order_are_refused(small_model):
    swapped = (FEATURES[1], FEATURES[0], FEATURES[2])
    with pytest.raises(ModelFileError, match="other features"):
        _load(small_model[0], names=swapped)


def test_binary_model_loaded_as_regression_is_refused(small_model):
    with pytest.raises(ModelFileError, match="value"):
        _load(small_model[0], kind="regression")


def test_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match=r"absent\.onnx"):
        _load(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        _load(tmp_path / "empty.onnx")


def test_predict_takes_float32_rows_and_refuses_the_wrong_width(small_model):
    path, booster = small_model
    model = _load(path)
    x = np.array([[0.1, -0.2, np.nan], [2.0, 1.0, 0.0]], dtype=np.float64)
    np.testing.assert_allclose(model.predict(x), booster.predict(x.astype(np.float32)), atol=1e-6)
    assert model.predict(np.empty((0, 3), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        model.predict(np.zeros((2, 4), np.float32))


def test_inference_speed_reports_each_batch_size(small_model):
    path, booster = small_model
    table = inference_speed(path, booster, rows=(1, 20), repeats=5, feature_names=FEATURES[:3])
    assert [row["rows"] for row in table] == [1, 20]
    for row in table:
        assert row["onnx_us_per_call"] > 0 and row["lightgbm_us_per_call"] > 0
        assert row["onnx_rows_per_s"] == pytest.approx(row["rows"] / row["onnx_us_per_call"] * 1e6)


# ---------------------------------------------------------------- metric helpers by hand


def test_auc_counts_correctly_ordered_pairs_and_half_ties():
    # Pairs (pos, neg): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes -> 3/4.
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_log_loss_and_brier_by_hand():
    assert log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert brier([1, 0], [0.8, 0.3]) == pytest.approx((0.2**2 + 0.3**2) / 2)
    assert math.isfinite(log_loss([1], [0.0]))  # clipped, not infinite


def test_expected_calibration_error_weights_bins_by_rows():
    y = [0, 1, 1, 0]
    p = [0.1, 0.15, 0.85, 0.9]
    # bin [0.1, 0.2): mean p 0.125, rate 0.5; bin [0.8, 0.9): 0.85 vs 1; bin [0.9, 1]: 0.9 vs 0.
    expected = 0.5 * 0.375 + 0.25 * 0.15 + 0.25 * 0.9
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    table = reliability_table(y, p)
    assert [(r["lower"], r["count"]) for r in table] == [(0.1, 2.0), (0.8, 1.0), (0.9, 1.0)]
    assert reliability_table([1], [1.0])[0]["lower"] == 0.9  # p = 1 falls in the last bin


def test_spearman_by_hand():
    # ranks (1, 2, 4, 3): 1 - 6 * (0 + 0 + 1 + 1) / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


def test_top_decile_lift_by_hand():
    y = [0.0] * 18 + [5.0, 15.0]
    score = list(range(20))  # the two spenders score highest
    assert top_decile_lift(y, score) == pytest.approx(10.0)  # top 2 average 10, everyone averages 1
    assert top_decile_lift(y, [1.0] * 20) == pytest.approx(1.0)  # ties share the top places
    # k = 1 of 10; two rows tie at the cut with outcomes 2 and 0 -> top mean 1, overall mean 0.2.
    assert top_decile_lift([2.0] + [0.0] * 9, [1.0, 1.0] + [0.0] * 8) == pytest.approx(5.0)


def test_rate_table_baseline_predicts_the_rate_of_each_bin():
    x_train = np.array([1, 1, 1, 1, 9, 9, 9, 9, np.nan, np.nan], dtype=np.float32)
    y_train = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=np.float64)
    pred = rate_table_baseline(x_train, y_train, np.array([1, 9, np.nan, 5], dtype=np.float32), bins=2)
    # bins with one pseudo-row at the base rate: (3 + .5) / 5, (0 + .5) / 5, (2 + .5) / 3
    assert pred[:3] == pytest.approx([3.5 / 5, 0.5 / 5, 2.5 / 3])
    assert pred[3] == pytest.approx(0.5 / 5)  # 5 is the edge: it falls in the upper bin


# ---------------------------------------------------------------- end to end on a generated shop


@pytest.mark.slow
def test_generated_shop_trains_all_models_with_onnx_parity(tmp_path):
    from training.features import FEATURE_COLUMNS, training_examples
    from training.generator import ShopSpec, generate_shop

    spec = ShopSpec(customers=1500, items=150, days=150, seed=3)
    generate_shop(spec, tmp_path / "shop")
    end = int(dt.datetime.combine(spec.end, dt.time(), tzinfo=dt.UTC).timestamp())
    dates = [end - days * DAY for days in (119, 105, 91)]  # each needs 90 days of labels after it
    examples = training_examples(tmp_path / "shop", dates, memory_limit="500MB")
    assert sorted(set(examples["as_of"])) == dates

    metrics: dict[str, dict[str, Any]] = train_models(examples, FEATURE_COLUMNS, tmp_path / "models", params=PARAMS)

    assert set(metrics) == {s.name for s in propensity.DEFAULT_SPECS}
    for name, m in metrics.items():
        assert m["split"] == "time" and m["n_valid"] == (examples["as_of"] == dates[-1]).sum()
        gate = m["parity_max_abs_diff"] if m["kind"] == "binary" else m["parity_max_rel_diff"]
        assert gate <= 1e-5, name
        assert Path(m["path"]).is_file()
    assert metrics["purchase_30d"]["model"]["auc"] > 0.6
    assert metrics["purchase_30d"]["baselines"]["recency_rate_table"]["feature"] == "recency_days"
    assert metrics["value_90d"]["baselines"]["past_spend"]["feature"] == "spend_90d"
