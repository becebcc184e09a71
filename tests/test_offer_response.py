"""Offer exposures with known true response probabilities, and the response models trained on them."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import training.generator as generator_module
from api.offers import offer_models
from engine.offers import Customer, arbitrate
from engine.rules import Rules
from engine.scoring import PropensityModels, load_propensity_models, load_scoring_model
from engine.types import SECONDS_PER_DAY, Context
from tests.conftest import SHOP_END
from training.datafiles import DataError, read_exposures, read_table
from training.features import FEATURE_COLUMNS, customer_features
from training.generator import ShopSpec, generate_shop
from training.generator_offers import OFFER_TYPES, OfferExposures
from training.generator_truth import load_truth
from training.offer_models import (
    RESPONSE_WINDOW_DAYS,
    response_as_of_dates,
    response_examples,
    train_propensity,
    train_response_models,
)
from training.propensity import DEFAULT_SPECS, LgbmParams, feature_matrix

DAY = SECONDS_PER_DAY
QUICK_LGBM = LgbmParams(num_threads=2, learning_rate=0.1, n_estimators=80, early_stopping_rounds=15)
SPEC = ShopSpec(customers=4000, items=200, days=150, seed=11, end=SHOP_END)


@dataclass(frozen=True)
class TrainedOffers:
    folder: Path
    metrics: dict[str, object]
    models: PropensityModels


@pytest.fixture(scope="session")
def offer_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offer_shop")
    generate_shop(SPEC, out)
    return out


@pytest.fixture(scope="session")
def exposures(offer_shop: Path) -> pd.DataFrame:
    return read_exposures(offer_shop / "offer_exposures.parquet")


def _span(shop: Path) -> tuple[int, int]:
    ts = read_table(shop / "events.parquet", "events")["timestamp"]
    return int(ts.min()), int(ts.max())


def _train(shop: Path, staging: Path) -> TrainedOffers:
    first, last = _span(shop)
    customers = read_table(shop / "customers.parquet", "customers")["customer_id"]
    metrics = train_propensity(shop, staging, first, last, QUICK_LGBM, customers=customers)
    models = load_propensity_models(staging / "propensity")
    assert models is not None
    return TrainedOffers(staging / "propensity", metrics, models)


@pytest.fixture(scope="session")
def trained_offers(offer_shop: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedOffers:
    return _train(offer_shop, tmp_path_factory.mktemp("offer_version"))


# ---------------------------------------------------------------- the generator's truth


def _documented_p(shop: Path, rows: pd.DataFrame) -> np.ndarray:  # type: ignore[type-arg]
    """true_p recomputed from truth.json's formula alone, row by row, from the events table and truth.npz."""
    truth = load_truth(shop)
    doc = truth.params["offers"]
    sim = truth.params["simulation_parameters"]
    tp = doc["term_parameters"]
    by_type = {t["offer_type"]: t for t in doc["types"]}
    events = read_table(shop / "events.parquet", "events")
    out = []
    for row in rows.itertuples():
        c, t = int(row.customer_id[1:]), int(row.timestamp)
        mine = events[(events["customer_id"] == row.customer_id) & (events["timestamp"] < t)]
        orders = mine[mine["type"] == "purchase"]["timestamp"].unique()
        carts = mine[mine["type"] == "add_to_cart"]["timestamp"]
        last_order = orders.max() if len(orders) else None
        last_cart = carts.max() if len(carts) else None
        last_event = mine["timestamp"].max() if len(mine) else None
        activity = (math.log(truth.activity_rate[c]) - math.log(sim["activity_median"])) / sim["activity_sigma"]
        since_order = (t - last_order) / DAY if last_order is not None else 0.0
        terms = {
            "price": math.log(truth.price_sensitivity[c]) / sim["price_sensitivity_sigma"],
            "activity": min(max(activity, -3.0), 3.0),
            "engagement": (truth.email_engagement[c] - tp["engagement_mean"]) / tp["engagement_sd"],
            "orders": math.log1p(len(orders)),
            "lapsed": 0.0
            if last_order is None
            else 1.0 / (1.0 + math.exp(-(since_order - tp["lapse_days"]) / tp["lapse_scale"])),
            "cart_open": float(
                last_cart is not None
                and (last_order is None or last_cart > last_order)
                and t - last_cart < tp["cart_open_days"] * DAY
            ),
            "fresh": 0.0 if last_event is None else math.exp(-(t - last_event) / DAY / tp["fresh_days"]),
            "churned": float(t >= truth.churn_at[c]),
        }
        kind = by_type[row.offer_type]
        logit = kind["bias"] + sum(w * terms[name] for name, w in kind["weights"].items())
        out.append(1.0 / (1.0 + math.exp(-logit)))
    return np.array(out)


def test_true_p_of_each_exposure_is_the_documented_function_of_traits_and_state(offer_shop, exposures):
    sample = exposures.sample(400, random_state=1)
    # Include rows where the rarer terms are on: winback after a lapse and free shipping after a cart.
    expected = _documented_p(offer_shop, sample)
    np.testing.assert_allclose(sample["true_p"].to_numpy(), expected, atol=2e-6)


def test_response_rate_per_true_p_decile_matches_the_truth(exposures):
    p = exposures["true_p"].to_numpy()
    y = exposures["responded"].to_numpy(dtype=float)
    edges = np.quantile(p, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for b in range(10):
        sel = bins == b
        mean_p, rate = p[sel].mean(), y[sel].mean()
        se = math.sqrt(mean_p * (1 - mean_p) / sel.sum())
        assert abs(rate - mean_p) < 4 * se + 1e-3, (b, rate, mean_p)


def test_offer_types_are_uniform_and_depend_on_different_traits(offer_shop, exposures):
    shares = exposures["offer_type"].value_counts(normalize=True)
    assert set(shares.index) == set(OFFER_TYPES)
    assert (shares - 1 / len(OFFER_TYPES)).abs().max() < 0.02
    doc = json.loads((offer_shop / "truth.json").read_text())["offers"]
    # churned is shared (it damps every type); otherwise each type's leading term differs.
    leading = {
        t["offer_type"]: max((k for k in t["weights"] if k != "churned"), key=lambda k: abs(t["weights"][k]))
        for t in doc["types"]
    }
    assert len(set(leading.values())) == len(leading) == len(OFFER_TYPES)


def test_the_offers_stream_leaves_catalog_customers_events_and_truth_arrays_unchanged(tmp_path, monkeypatch):
    spec = ShopSpec(customers=600, items=60, days=30, seed=3, end=SHOP_END)
    generate_shop(spec, tmp_path / "with")
    real = generator_module.simulate_offers  # type: ignore[attr-defined]

    def other_offers(rng, *args):  # type: ignore[no-untyped-def]
        # Ten times the draws from the offers stream: nothing else may move.
        rng.random(10 * len(args[0].created_at))
        return real(rng, *args)

    monkeypatch.setattr(generator_module, "simulate_offers", other_offers)
    generate_shop(spec, tmp_path / "other")

    def nothing(rng, cu, *args):  # type: ignore[no-untyped-def]
        empty = np.empty(0, np.int64)
        return OfferExposures(empty, empty, empty, empty, np.empty(0), np.empty(0, bool))

    monkeypatch.setattr(generator_module, "simulate_offers", nothing)
    generate_shop(spec, tmp_path / "without")
    for name in ("catalog.parquet", "customers.parquet", "events.parquet", "truth.npz"):
        data = (tmp_path / "with" / name).read_bytes()
        assert data == (tmp_path / "other" / name).read_bytes() == (tmp_path / "without" / name).read_bytes(), name
    assert (tmp_path / "with" / "offer_exposures.parquet").read_bytes() != (
        tmp_path / "other" / "offer_exposures.parquet"
    ).read_bytes()


# ---------------------------------------------------------------- reading the exposures


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("responded", "maybe", "not a boolean"),
        ("responded", "", "empty value"),
        ("true_p", "1.5", "must be <= 1"),
        ("offer_type", "Free-Shipping", "lower-case letters"),
        ("timestamp", "yesterday", "not an ISO-8601 timestamp"),
    ],
)
def test_a_bad_exposures_row_is_rejected_with_file_line_and_column(tmp_path, field, value, reason):
    header = ["exposure_id", "customer_id", "offer_type", "channel", "responded", "true_p", "timestamp"]
    good = ["x1", "c1", "discount", "email", "true", "0.1", "2026-10-01T10:00:00Z"]
    bad = dict(zip(header, ["x2", "c2", "winback", "web", "false", "0.2", "2026-10-02T10:00:00Z"], strict=True))
    bad[field] = value
    path = tmp_path / "offer_exposures.csv"
    path.write_text("\n".join([",".join(header), ",".join(good), ",".join(bad.values())]) + "\n")
    with pytest.raises(DataError, match=reason) as err:
        read_exposures(path)
    assert (err.value.file, err.value.line, err.value.column) == (path, 3, field)


def test_an_exposure_of_an_unknown_customer_is_rejected(tmp_path):
    path = tmp_path / "offer_exposures.csv"
    path.write_text("exposure_id,customer_id,offer_type,responded,timestamp\nx1,c9,loyalty,0,2026-10-01\n")
    with pytest.raises(DataError, match="unknown customer 'c9'") as err:
        read_exposures(path, pd.Series(["c1", "c2"]))
    assert (err.value.line, err.value.column) == (2, "customer_id")


# ---------------------------------------------------------------- point-in-time examples


def test_response_examples_see_nothing_after_the_as_of_date_and_label_only_the_window(offer_shop, exposures):
    first, _ = _span(offer_shop)
    d = response_as_of_dates(first, int(exposures["timestamp"].max()))[-2]
    end = d + RESPONSE_WINDOW_DAYS * DAY
    base = response_examples(offer_shop, exposures, [d])
    assert ((base["exposed_at"] >= d) & (base["exposed_at"] < end)).all()
    assert not base.duplicated(["customer_id", "offer_type"]).any()

    ts = exposures["timestamp"]
    outside = exposures.copy()
    outside.loc[(ts < d) | (ts >= end), "responded"] ^= True
    assert base.equals(response_examples(offer_shop, outside, [d]))
    # Extra exposures (all responded) just before as_of and right after the window change nothing either.
    extra = exposures[(ts >= d) & (ts < end)].assign(responded=True)
    before = extra.assign(
        timestamp=extra["timestamp"] - RESPONSE_WINDOW_DAYS * DAY, exposure_id="b" + extra["exposure_id"]
    )
    after = extra.assign(
        timestamp=extra["timestamp"] + RESPONSE_WINDOW_DAYS * DAY, exposure_id="a" + extra["exposure_id"]
    )
    assert base.equals(response_examples(offer_shop, pd.concat([exposures, before, after], ignore_index=True), [d]))

    inside = exposures.copy()
    inside.loc[(ts >= d) & (ts < end), "responded"] ^= True
    flipped = response_examples(offer_shop, inside, [d])
    assert flipped[list(FEATURE_COLUMNS)].equals(base[list(FEATURE_COLUMNS)])
    assert (flipped["responded"] == 1 - base["responded"]).all()

    features = customer_features(offer_shop, d).set_index("customer_id")
    raw = features.loc[base["customer_id"], "frequency"].to_numpy()
    np.testing.assert_allclose(base["frequency"].to_numpy(), raw, rtol=1e-3)  # quantised to float16


# ---------------------------------------------------------------- training and serving


def test_each_offer_type_gets_a_response_model_that_passes_onnx_parity(trained_offers):
    response = trained_offers.metrics["offer_response"]
    models = response["models"]  # type: ignore[index]
    assert set(models) == {f"response_{t}" for t in OFFER_TYPES}
    doc = json.loads((trained_offers.folder / "models.json").read_text())
    assert set(doc["models"]) == {s.name for s in DEFAULT_SPECS} | set(models)
    for name, m in models.items():
        assert m["parity_max_abs_diff"] <= 1e-5 and m["path"] == f"propensity/{name}.onnx"
        assert m["split"] == "time" and m["label"] == "responded"
        assert m["truth"]["auc"] > m["model"]["auc"] - 0.05  # the oracle is the ceiling, up to noise


def test_the_served_response_model_scores_as_the_trained_one(trained_offers, offer_shop, exposures):
    first, _ = _span(offer_shop)
    d = response_as_of_dates(first, int(exposures["timestamp"].max()))[-1]
    rows = response_examples(offer_shop, exposures, [d])
    rows = rows[rows["offer_type"] == "loyalty"]
    x = feature_matrix(rows, FEATURE_COLUMNS)
    served = load_scoring_model(
        trained_offers.folder / "response_loyalty.onnx", "response_loyalty", "binary", FEATURE_COLUMNS
    )
    p = served.predict(x)
    via_version = np.array([trained_offers.models.predict(r, {"response_loyalty"})["response_loyalty"] for r in x])
    np.testing.assert_allclose(p, via_version, atol=1e-6)
    assert ((p > 0) & (p < 1)).all() and p.std() > 0


def test_a_learned_response_model_beats_the_base_rate_on_a_small_shop(trained_offers):
    models = trained_offers.metrics["offer_response"]["models"]  # type: ignore[index]
    for name in ("response_loyalty", "response_winback"):
        m = models[name]
        assert m["model"]["auc"] > 0.6, name
        assert m["model"]["log_loss"] < m["baselines"]["base_rate"]["log_loss"], name


def test_a_request_runs_only_the_models_its_offers_reference(trained_offers, rules: Rules):
    wanted = offer_models(SimpleNamespace(rules=rules))  # type: ignore[arg-type]
    assert {"response_free_shipping", "response_winback", "response_loyalty", "response_early_access"} <= wanted
    assert wanted <= set(trained_offers.models.models)  # every bundled offer is scored by a model
    row = np.zeros(len(FEATURE_COLUMNS))
    assert set(trained_offers.models.predict(row, wanted)) == wanted
    assert "response_discount" not in trained_offers.models.predict(row, wanted)
    batch = trained_offers.models.predict_rows([row, row], wanted)
    assert [set(b) for b in batch] == [wanted, wanted]


def test_a_batch_scores_each_customer_with_its_own_models_as_one_request_would(trained_offers):
    models = trained_offers.models
    names = sorted(models.models)
    rng = np.random.default_rng(3)
    rows = [rng.gamma(2.0, 5.0, len(FEATURE_COLUMNS)).tolist() for _ in range(6)]
    rows[2][0] = float("nan")  # missing
    wanted = [
        frozenset(names[:1]),
        frozenset(names),
        frozenset(),
        frozenset(names[1:3]),
        frozenset(names[:1]),
        {"nope"},
    ]
    batch = models.predict_each(rows, wanted)
    assert [set(b) for b in batch] == [set(w) & set(names) for w in wanted]
    assert batch == [models.predict(r, w) for r, w in zip(rows, wanted, strict=True)]
    assert models.predict_each([], []) == []
    with pytest.raises(ValueError, match="one set of wanted models per row: 2 rows, 1 sets"):
        models.predict_each(rows[:2], wanted[:1])
    with pytest.raises(ValueError, match=f"rows of {len(FEATURE_COLUMNS)} features"):
        models.predict_each([[1.0, 2.0]], [frozenset(names)])


def test_without_exposures_no_response_models_are_trained_and_offers_use_the_default_propensity(
    offer_shop, trained_offers, tmp_path, rules: Rules
):
    shop = tmp_path / "shop"
    shutil.copytree(offer_shop, shop, ignore=shutil.ignore_patterns("offer_exposures.*"))
    specs, metrics = train_response_models(shop, tmp_path / "models", _span(shop)[0], QUICK_LGBM)
    assert specs == [] and "no offer_exposures" in str(metrics["skipped"])
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())

    # What such a version serves: the default models only.
    served = trained_offers.models
    defaults = PropensityModels(served.feature_names, {s.name: served.models[s.name] for s in DEFAULT_SPECS})
    scores = defaults.predict(np.zeros(len(FEATURE_COLUMNS)), offer_models(SimpleNamespace(rules=rules)))  # type: ignore[arg-type]
    customer = Customer("c1", "champions", "DE", frozenset({"email", "personalization"}), scores)
    ranked, _ = arbitrate(rules.offers, rules.offer_settings, customer, "web", Context(), now=_now())
    by_id = {r.offer_id: r for r in ranked}
    assert by_id["free_shipping"].propensity_source == "default"
    assert by_id["free_shipping"].propensity == rules.offer_settings.default_propensity
    assert by_id["loyalty_points"].propensity_source == "default"
    with_models = Customer(
        "c1", "champions", "DE", frozenset({"email", "personalization"}), served.predict(np.zeros(len(FEATURE_COLUMNS)))
    )
    ranked, _ = arbitrate(rules.offers, rules.offer_settings, with_models, "web", Context(), now=_now())
    assert {r.offer_id: r for r in ranked}["free_shipping"].propensity_source == "response_free_shipping"


def _now():  # type: ignore[no-untyped-def]
    import datetime as dt

    return dt.datetime(2026, 11, 15, tzinfo=dt.UTC)
