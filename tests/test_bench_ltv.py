"""`nextbest bench ltv`: metrics on hand-computed cases, BG/NBD and Gamma-Gamma recovering simulated parameters,
a calibration/holdout split that leaks nothing, transactions files rejected with file, line and column, and
quick end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from benchmarks.ltv import metrics, predict_holdout, run_ltv_bench, write_shop
from benchmarks.ltv_baselines import BgNbd, GammaGamma
from benchmarks.ltv_data import read_transactions_csv, summarise, windows_for
from benchmarks.public_data import CDNOW
from tests.conftest import public_dataset
from training.datafiles import DataError
from training.features import training_examples

DAY = 86_400
WEEK = 7 * DAY
START = 1_704_067_200  # 2024-01-01T00:00Z, a Monday


def _simulate_bgnbd(
    rng: np.random.Generator, n: int, r: float, alpha: float, a: float, b: float, horizon: np.ndarray
) -> list[np.ndarray]:
    """Repeat purchase times (weeks after the first purchase) of n BG/NBD customers, each observed to its horizon."""
    rate = rng.gamma(r, 1.0 / alpha, n)
    drop = rng.beta(a, b, n)
    times: list[list[float]] = [[] for _ in range(n)]
    now = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        now[idx] += rng.exponential(1.0 / np.maximum(rate[idx], 1e-12))
        inside = now[idx] <= horizon[idx]
        for i in idx[inside]:
            times[i].append(float(now[i]))
        alive[idx[~inside]] = False
        alive[idx[inside][rng.random(int(inside.sum())) < drop[idx[inside]]]] = False
    return [np.asarray(t) for t in times]


def _transactions(n: int, weeks: int, seed: int) -> pd.DataFrame:
    """A small shop's transactions: BG/NBD buyers acquired over the first 4 weeks, gamma-distributed spend."""
    rng = np.random.default_rng(seed)
    first = START + rng.integers(0, 28, n) * DAY
    horizon = (START + weeks * WEEK - 1 - first) / WEEK
    repeats = _simulate_bgnbd(rng, n, 0.9, 3.0, 0.8, 4.0, horizon)
    rows = []
    for c in range(n):
        for t in (0.0, *repeats[c]):
            rows.append((f"c{c}", int(first[c] + t * WEEK), round(float(rng.gamma(4.0, 8.0)), 2)))
    frame = pd.DataFrame(rows, columns=["customer_id", "ts", "amount"])
    return frame.assign(quantity=1, item_id="item").sort_values("ts", ignore_index=True)


# ---------------------------------------------------------------- metrics


def test_top_decile_lift_is_the_top_tenths_share_of_value_over_a_tenth() -> None:
    actual = np.array([30.0, 0, 10, 0, 20, 0, 5, 0, 15, 0, 0, 0, 10, 0, 0, 0, 5, 0, 5, 0])  # total 100
    predicted = -np.arange(20.0)  # customers 0 and 1 are the top 10 %: 30 of 100 → share 0.3, lift 3
    assert metrics(actual, predicted)["top_decile_lift"] == pytest.approx(3.0)
    assert metrics(actual, np.ones(20))["top_decile_lift"] == pytest.approx(1.0)  # no ranking, no lift


def test_mae_and_rmse_match_a_hand_computed_case() -> None:
    got = metrics(np.array([0.0, 10.0, 20.0]), np.array([5.0, 10.0, 14.0]))  # errors 5, 0, −6
    assert got["mae"] == pytest.approx(11 / 3)
    assert got["rmse"] == pytest.approx(math.sqrt(61 / 3))
    assert got["spearman"] == pytest.approx(1.0)


# ---------------------------------------------------------------- BG/NBD and Gamma-Gamma


def test_bgnbd_recovers_the_parameters_of_a_simulated_population() -> None:
    rng = np.random.default_rng(3)
    n = 8000
    horizon = rng.uniform(26.0, 39.0, n)
    repeats = _simulate_bgnbd(rng, n, r=0.5, alpha=4.0, a=0.8, b=2.5, horizon=horizon)
    x = np.array([len(t) for t in repeats], dtype=float)
    t_x = np.array([t[-1] if len(t) else 0.0 for t in repeats])
    fit = BgNbd.fit(x, t_x, horizon)
    assert fit.r == pytest.approx(0.5, rel=0.15)
    assert fit.alpha == pytest.approx(4.0, rel=0.2)
    assert fit.a == pytest.approx(0.8, rel=0.3)
    assert fit.b == pytest.approx(2.5, rel=0.3)


def test_bgnbd_conditional_expectation_matches_the_published_cdnow_example() -> None:
    # Fader, Hardie & Lee (2005): with r=0.243, α=4.414, a=0.793, b=2.426, a customer with x=2, t_x=30.43,
    # T=38.86 is expected to make 1.226 purchases in the next 39 weeks.
    model = BgNbd(0.243, 4.414, 0.793, 2.426)
    got = model.expected_purchases(39.0, np.array([2.0]), np.array([30.43]), np.array([38.86]))
    assert got[0] == pytest.approx(1.226, abs=0.002)


def test_gamma_gamma_recovers_the_parameters_of_a_simulated_population() -> None:
    rng = np.random.default_rng(5)
    n = 4000
    nu = rng.gamma(4.0, 1.0 / 20.0, n)  # ν ~ Gamma(q=4, rate γ=20)
    x = rng.integers(1, 8, n).astype(float)
    zbar = np.array([rng.gamma(6.0, 1.0 / nu[i], int(x[i])).mean() for i in range(n)])  # z ~ Gamma(p=6, rate ν)
    fit = GammaGamma.fit(x, zbar)
    assert fit.p == pytest.approx(6.0, rel=0.15)
    assert fit.q == pytest.approx(4.0, rel=0.2)
    assert fit.gamma == pytest.approx(20.0, rel=0.25)


# ---------------------------------------------------------------- the split


def test_the_calibration_summary_counts_repeat_days_only_before_the_calibration_end() -> None:
    tx = pd.DataFrame(
        {
            "customer_id": ["a", "a", "a", "a", "b"],
            "ts": [START, START + 3600, START + 2 * WEEK, START + 10 * WEEK, START + WEEK],
            "amount": [10.0, 5.0, 20.0, 99.0, 7.0],
        }
    )
    s = summarise(tx, START + 4 * WEEK)
    assert s.customer_id.tolist() == ["a", "b"]
    assert s.x.tolist() == [1.0, 0.0]  # two lines on the first day are one purchase day; week 10 is the holdout
    assert s.t_x.tolist() == [2.0, 0.0]
    assert s.T.tolist() == pytest.approx([(4 * 7 - 1) / 7, (3 * 7 - 1) / 7])
    assert s.zbar.tolist() == [20.0, 0.0]
    assert s.spend.tolist() == [35.0, 7.0]


def test_holdout_transactions_change_no_prediction() -> None:
    data = _transactions(400, 30, seed=11)
    w = windows_for(data, calibration_weeks=16, holdout_weeks=14)
    holdout = data["ts"] >= w.calibration_end
    assert holdout.any()
    changed = data.copy()
    changed.loc[holdout, "amount"] *= 7.0  # the holdout spend changes...
    extra = changed[holdout].assign(ts=lambda f: f["ts"] + 3 * DAY, customer_id=lambda f: f["customer_id"] + "x")
    changed = pd.concat([changed, extra], ignore_index=True)  # ...and customers first buying there appear
    quiet = Console(quiet=True)
    before = predict_holdout(data, w, label_weeks=6, seed=0, console=quiet)
    after = predict_holdout(changed, w, label_weeks=6, seed=0, console=quiet)
    assert after.summary.customer_id.tolist() == before.summary.customer_id.tolist()
    assert not np.array_equal(after.actual, before.actual)
    for name, pred in before.by_model.items():
        np.testing.assert_array_equal(after.by_model[name], pred, err_msg=name)


def test_the_value_label_window_follows_label_window_days(tmp_path: Path) -> None:
    tx = pd.DataFrame(
        {
            "customer_id": ["a", "a", "b", "b"],
            "ts": [START, START + 70 * DAY, START, START + 120 * DAY],
            "amount": [10.0, 20.0, 5.0, 5.0],
        }
    ).assign(quantity=1, item_id="item")
    write_shop(tx, tmp_path)
    as_of = START + 30 * DAY  # a's second purchase lies 40 days later

    def value_of_a(days: int) -> float:
        ex = training_examples(tmp_path, [as_of], label_window_days=days)
        return float(ex.loc[ex["customer_id"] == "a", "value_next_90d"].iloc[0])

    assert value_of_a(35) == 0.0
    assert value_of_a(45) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="label window"):
        training_examples(tmp_path, [as_of], label_window_days=91)  # would run past the last event
    with pytest.raises(ValueError, match=">= 30"):
        training_examples(tmp_path, [as_of], label_window_days=20)


def test_a_holdout_past_the_end_of_the_data_is_refused() -> None:
    data = _transactions(50, 20, seed=2)
    with pytest.raises(ValueError, match="the holdout runs to"):
        windows_for(data, calibration_weeks=16, holdout_weeks=14)


# ---------------------------------------------------------------- transactions files


@pytest.mark.parametrize(
    ("bad_row", "column", "reason"),
    [
        ("c2,2024-01-03T10:00:00Z,abc", "amount", "not a number"),
        ("c2,2024-01-03T10:00:00Z,-5", "amount", "must be >= 0"),
        ("c2,yesterday,12.5", "timestamp", "ISO-8601"),
        ("c 2,2024-01-03T10:00:00Z,12.5", "customer_id", "whitespace"),
    ],
)
def test_a_bad_transactions_row_is_rejected_with_file_line_and_column(
    tmp_path: Path, bad_row: str, column: str, reason: str
) -> None:
    path = tmp_path / "tx.csv"
    good = "c1,2024-01-02T09:00:00Z,10.00"
    path.write_text(f"customer_id,timestamp,amount\n{good}\n{good}\n{bad_row}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_transactions_csv(path)
    assert (err.value.file, err.value.line, err.value.column) == (path, 4, column)
    assert reason in err.value.reason


def test_a_transactions_file_without_an_amount_column_is_rejected_at_the_header(tmp_path: Path) -> None:
    path = tmp_path / "tx.csv"
    path.write_text("customer_id,timestamp\nc1,2024-01-02T09:00:00Z\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_transactions_csv(path)
    assert (err.value.line, err.value.column) == (1, "amount")


# ---------------------------------------------------------------- end to end


def test_quick_run_on_a_transactions_csv_writes_the_report_and_decile_plot(tmp_path: Path) -> None:
    data = _transactions(600, 30, seed=7)
    csv_path = tmp_path / "tx.csv"
    iso = pd.to_datetime(data["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    data.assign(timestamp=iso)[["customer_id", "timestamp", "amount"]].to_csv(csv_path, index=False)
    out = tmp_path / "reports"
    path = run_ltv_bench(
        Console(quiet=True), quick=True, out_dir=out, transactions=csv_path, calibration_weeks=16, holdout_weeks=14
    )
    assert path == out / "ltv-quick.md"
    assert (out / "ltv-quick_deciles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "ltv-quick.json").read_text(encoding="utf-8"))
    (results,) = [t for t in report["tables"] if t["title"].startswith("Holdout spend")]
    assert [row[0] for row in results["rows"]] == ["LightGBM value model", "BG/NBD + Gamma-Gamma", "past average"]
    assert report["datasets"][0]["name"] == "transactions"
    assert report["params"]["customers"] == 600


def test_quick_run_on_cdnow_reproduces_the_published_bgnbd_parameters(tmp_path: Path) -> None:
    public_dataset(CDNOW, "CDNOW_master.txt")
    path = run_ltv_bench(Console(quiet=True), quick=True, out_dir=tmp_path)
    report = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    (check,) = [t for t in report["tables"] if t["title"].startswith("BG/NBD and Gamma-Gamma fitted here")]
    for model, name, fitted, published in check["rows"]:
        tolerance = 0.1 if name == "log_likelihood" else 0.01
        assert float(fitted) == pytest.approx(float(published), abs=tolerance), f"{model} {name}"
    assert (tmp_path / "ltv-quick_deciles.png").exists()
    assert report["params"]["customers"] == 2500
