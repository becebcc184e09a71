"""Tests of the synthetic shop generator: files, determinism, and that the hidden structure shows in the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.generator import (
    CONSUMABLE_CATEGORIES,
    GeneratedShop,
    ShopSpec,
    generate_shop,
    load_truth,
    true_funnel_probabilities,
    true_purchase_probability,
)

SMALL = ShopSpec(customers=500, items=200, days=60, seed=7)
# Big enough for statistics on purchases, still well under a second to generate.
STATS = ShopSpec(customers=4_000, items=400, days=180, seed=11)

CATALOG_COLUMNS = ["item_id", "title", "category", "price", "cost", "stock", "url", "image_url", "active"]
CUSTOMER_COLUMNS = [
    "customer_id",
    "created_at",
    "country",
    "consent_email",
    "consent_sms",
    "consent_push",
    "consent_personalization",
]
EVENT_COLUMNS = ["event_id", "customer_id", "type", "item_id", "quantity", "price", "timestamp"]
ISO = "%Y-%m-%dT%H:%M:%SZ"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _read(shop: GeneratedShop, name: str) -> pd.DataFrame:
    path: Path = getattr(shop, name)
    if path.suffix == ".csv":
        df = pd.read_csv(path)
        for col in ("created_at", "timestamp"):
            if col in df:
                df[col] = pd.to_datetime(df[col], format=ISO, utc=True)
        return df
    return pd.read_parquet(path)


def _indexed(events: pd.DataFrame) -> pd.DataFrame:
    ev = events.copy()
    ev["c"] = ev["customer_id"].str[1:].astype(np.int64)
    ev["i"] = ev["item_id"].str[1:].astype("float64").fillna(-1).astype(np.int64)
    return ev


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> GeneratedShop:
    return generate_shop(SMALL, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def stats_general(tmp_path_factory: pytest.TempPathFactory) -> GeneratedShop:
    return generate_shop(STATS, tmp_path_factory.mktemp("general"))


@pytest.fixture(scope="module")
def stats_grocery(tmp_path_factory: pytest.TempPathFactory) -> GeneratedShop:
    spec = ShopSpec(customers=STATS.customers, items=STATS.items, days=STATS.days, seed=STATS.seed, kind="grocery")
    return generate_shop(spec, tmp_path_factory.mktemp("grocery"))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    for fmt in ("parquet", "csv"):
        spec = ShopSpec(customers=500, items=200, days=60, seed=3, fmt=fmt)
        a = generate_shop(spec, tmp_path / f"a_{fmt}")
        b = generate_shop(spec, tmp_path / f"b_{fmt}")
        assert _digests(a.out) == _digests(b.out)
        assert len(_digests(a.out)) == 6  # catalog, customers, events, offer_exposures, truth.json, truth.npz
    other = generate_shop(ShopSpec(customers=500, items=200, days=60, seed=4), tmp_path / "other")
    first = _digests(tmp_path / "a_parquet")
    second = _digests(other.out)
    for name in ("catalog.parquet", "customers.parquet", "events.parquet", "truth.npz"):
        assert first[name] != second[name], name


def test_files_columns_and_referential_integrity(small: GeneratedShop) -> None:
    catalog, customers, events = _read(small, "catalog"), _read(small, "customers"), _read(small, "events")
    assert list(catalog.columns) == CATALOG_COLUMNS
    assert list(customers.columns) == CUSTOMER_COLUMNS
    assert list(events.columns) == EVENT_COLUMNS
    assert (len(catalog), len(customers), len(events)) == (small.n_items, small.n_customers, small.n_events)
    assert events["type"].value_counts().to_dict() == {k: v for k, v in small.event_counts.items() if v}

    assert catalog["item_id"].tolist() == [f"i{i}" for i in range(len(catalog))]
    assert (catalog["url"] == "https://shop.example/p/" + catalog["item_id"]).all()
    assert (catalog["image_url"] == "https://cdn.shop.example/img/" + catalog["item_id"] + ".jpg").all()
    assert (catalog["price"] > 0).all() and (catalog["cost"] > 0).all() and (catalog["cost"] < catalog["price"]).all()
    assert np.allclose(catalog["price"], catalog["price"].round(2)) and (catalog["stock"] >= 0).any()
    assert (catalog["stock"] >= 0).all() and (catalog["stock"] == 0).any()
    assert catalog["active"].dtype == bool and catalog["title"].str.len().min() > 5
    assert set(customers["country"]) <= {"DE", "FR", "GB", "NL", "ES", "IT", "AT", "BE"}
    assert 0.7 < customers["consent_email"].mean() < 0.9

    assert events["event_id"].is_unique and events["timestamp"].is_monotonic_increasing
    assert events["customer_id"].isin(customers["customer_id"]).all()
    has_item = events["item_id"].notna()
    assert events.loc[has_item, "item_id"].isin(catalog["item_id"]).all()
    assert set(events.loc[~has_item, "type"]) == {"email_open"}
    assert has_item[events["type"] != "email_open"].all()
    assert (events["quantity"] >= 1).all()
    assert (events.loc[events["type"] == "email_open", "price"] == 0.0).all()
    assert (events.loc[has_item, "price"] > 0).all()

    created = events["customer_id"].map(customers.set_index("customer_id")["created_at"])
    assert (events["timestamp"] >= created).all()
    end = pd.Timestamp(SMALL.end, tz="UTC")
    assert events["timestamp"].max() < end
    assert events["timestamp"].min() >= end - pd.Timedelta(days=SMALL.days)
    # Email opens only go to customers who consented to email.
    consent = customers.set_index("customer_id")["consent_email"]
    assert consent[events.loc[events["type"] == "email_open", "customer_id"]].all()


def test_funnel_order_inside_sessions(stats_general: GeneratedShop) -> None:
    ev = _read(stats_general, "events")
    keys = ["customer_id", "item_id"]

    def preceded_by(later: str, earlier: str, within: str) -> pd.Series:
        left = ev[ev["type"] == later][[*keys, "timestamp"]].sort_values("timestamp")
        right = ev[ev["type"] == earlier][[*keys, "timestamp"]].rename(columns={"timestamp": "t_before"})
        right = right.sort_values("t_before")
        m = pd.merge_asof(
            left,
            right,
            left_on="timestamp",
            right_on="t_before",
            by=keys,
            direction="backward",
            allow_exact_matches=False,
            tolerance=pd.Timedelta(within),
        )
        return m["t_before"].notna()

    assert (ev["type"] == "purchase").sum() > 500
    assert preceded_by("purchase", "add_to_cart", "1h").all()
    assert preceded_by("add_to_cart", "view_item", "5min").all()
    # An email click lands on the product page a few seconds later.
    clicks = ev[ev["type"] == "email_click"][[*keys, "timestamp"]].sort_values("timestamp")
    views = ev[ev["type"] == "view_item"][[*keys, "timestamp"]].rename(columns={"timestamp": "t_view"})
    m = pd.merge_asof(
        clicks,
        views.sort_values("t_view"),
        left_on="timestamp",
        right_on="t_view",
        by=keys,
        direction="forward",
        allow_exact_matches=False,
        tolerance=pd.Timedelta("30s"),
    )
    assert len(clicks) > 20 and m["t_view"].notna().all()


def test_consumables_are_rebought_at_their_interval(stats_grocery: GeneratedShop) -> None:
    truth = load_truth(stats_grocery.out)
    ev = _indexed(_read(stats_grocery, "events"))
    buys = ev[ev["type"] == "purchase"].sort_values(["c", "i", "timestamp"])
    gap_days = buys.groupby(["c", "i"])["timestamp"].diff().dt.total_seconds() / 86_400
    pairs = buys.assign(gap=gap_days).dropna(subset=["gap"])
    cat = truth.item_category[pairs["i"].to_numpy()]
    consumable = truth.category_is_consumable[cat]
    pairs, cat = pairs[consumable], cat[consumable]
    expected = truth.category_repurchase_days[cat] * truth.repurchase_multiplier[pairs["c"].to_numpy()]
    ratio = pairs["gap"].to_numpy() / expected
    assert len(ratio) > 500
    # Gamma(4) has its median at 0.92 of the mean; the window end cuts off some long gaps.
    assert 0.7 < float(np.median(ratio)) < 1.1
    # Per category the observed median gap follows the configured mean interval.
    per_cat = pd.DataFrame({"cat": cat, "gap": pairs["gap"].to_numpy()}).groupby("cat")["gap"].median()
    true_days = truth.category_repurchase_days[per_cat.index.to_numpy()]
    assert np.corrcoef(np.log(per_cat.to_numpy()), np.log(true_days))[0, 1] > 0.8


def test_purchases_concentrate_in_top_taste_categories(stats_general: GeneratedShop) -> None:
    truth = load_truth(stats_general.out)
    ev = _indexed(_read(stats_general, "events"))
    top3 = np.argsort(-truth.taste, axis=1)[:, :3]
    chance = 3 / truth.n_categories

    def top3_share(kind: str) -> float:
        rows = ev[ev["type"] == kind]
        cat = truth.item_category[rows["i"].to_numpy()]
        return float((top3[rows["c"].to_numpy()] == cat[:, None]).any(axis=1).mean())

    assert top3_share("view_item") > 0.6 and top3_share("view_item") > 4 * chance
    assert top3_share("purchase") > 0.7 and top3_share("purchase") > 4 * chance


def test_click_model_drives_the_funnel(stats_general: GeneratedShop) -> None:
    """Views whose true P(cart | view) is high are carted far more often than those where it is low."""
    truth = load_truth(stats_general.out)
    ev = _indexed(_read(stats_general, "events"))
    views = ev[ev["type"] == "view_item"][["c", "i", "timestamp", "price"]]
    carts = ev[ev["type"] == "add_to_cart"][["c", "i", "timestamp"]].rename(columns={"timestamp": "t_cart"})
    m = pd.merge_asof(
        views.sort_values("timestamp"),
        carts.sort_values("t_cart"),
        left_on="timestamp",
        right_on="t_cart",
        by=["c", "i"],
        direction="forward",
        tolerance=pd.Timedelta("2min"),
    )
    _, p_cart, _ = true_funnel_probabilities(truth, m["c"].to_numpy(), m["i"].to_numpy(), m["price"].to_numpy())
    carted = m["t_cart"].notna().to_numpy()
    low, high = p_cart < np.quantile(p_cart, 0.25), p_cart > np.quantile(p_cart, 0.75)
    assert carted[high].mean() > 3 * carted[low].mean()


def test_csv_and_parquet_hold_the_same_rows(tmp_path: Path) -> None:
    pq_shop = generate_shop(SMALL, tmp_path / "pq")
    csv_shop = generate_shop(ShopSpec(**{**SMALL.__dict__, "fmt": "csv"}), tmp_path / "csv")
    header = csv_shop.events.read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(EVENT_COLUMNS)
    assert "true" in csv_shop.catalog.read_text(encoding="utf-8")
    assert pd.read_parquet(pq_shop.customers)["created_at"].dtype == "datetime64[us, UTC]"
    for name in ("catalog", "customers", "events"):
        a, b = _read(pq_shop, name), _read(csv_shop, name)
        for col in ("created_at", "timestamp"):
            if col in a:
                a[col] = a[col].dt.strftime(ISO)
                b[col] = b[col].dt.strftime(ISO)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert np.load(pq_shop.truth_npz)["taste"].tobytes() == np.load(csv_shop.truth_npz)["taste"].tobytes()


def test_grocery_shop_repeats_purchases_far_more(stats_general: GeneratedShop, stats_grocery: GeneratedShop) -> None:
    def repeat_share(shop: GeneratedShop) -> float:
        buys = _read(shop, "events").query("type == 'purchase'")
        return float(buys.duplicated(["customer_id", "item_id"]).mean())

    general, grocery = repeat_share(stats_general), repeat_share(stats_grocery)
    assert grocery > 0.5 and grocery > 1.8 * general


def test_truth_files_and_true_probabilities(stats_general: GeneratedShop) -> None:
    truth = load_truth(stats_general.out)
    doc = json.loads(stats_general.truth_json.read_text(encoding="utf-8"))
    n_c, n_i = stats_general.n_customers, stats_general.n_items
    assert truth.taste.shape == (n_c, truth.n_categories) and np.allclose(truth.taste.sum(axis=1), 1, atol=1e-4)
    assert truth.item_factors.shape == (n_i, truth.style.shape[1])
    assert len(truth.item_price) == n_i and "formulas" in doc["click_model"]
    for c in doc["categories"]:
        assert c["is_consumable"] == (c["name"] in CONSUMABLE_CATEGORIES)
        assert (c["mean_repurchase_days"] is not None) == c["is_consumable"]
    catalog = _read(stats_general, "catalog")
    assert np.array_equal(truth.item_price, catalog["price"].to_numpy())
    names = np.array(truth.categories)[truth.item_category]
    assert (names == catalog["category"].to_numpy()).all()

    rng = np.random.default_rng(0)
    cust = rng.integers(0, n_c, 5_000)
    item = rng.integers(0, n_i, 5_000)
    p = true_purchase_probability(truth, cust, item)
    assert p.shape == (5_000,) and ((p > 0) & (p < 1)).all()
    # The same customers buy more from their favourite category than from a random one.
    fav = truth.taste.argmax(axis=1)[cust]
    fav_item = np.array([rng.choice(np.flatnonzero(truth.item_category == k)) for k in fav[:500]])
    assert true_purchase_probability(truth, cust[:500], fav_item).mean() > 3 * p[:500].mean()
    # A discount raises the probability (price sensitivity is positive).
    cheaper = true_purchase_probability(truth, cust, item, price=truth.item_price[item] * 0.7)
    assert (cheaper > p).all()


def test_consumable_categories_cover_both_kinds() -> None:
    assert {"groceries", "household", "beauty", "pet_supplies", "baby_care", "dairy"} <= CONSUMABLE_CATEGORIES
    assert not {"electronics", "fashion", "kitchen", "home_decor"} & CONSUMABLE_CATEGORIES


def test_progress_is_reported_up_to_done(tmp_path: Path) -> None:
    calls: list[tuple[str, float]] = []
    generate_shop(SMALL, tmp_path, lambda step, frac: calls.append((step, frac)))
    fractions = [f for _, f in calls]
    assert len(calls) > 5 and fractions == sorted(fractions) and calls[-1] == ("done", 1.0)


def test_invalid_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="items"):
        generate_shop(ShopSpec(customers=10, items=3), tmp_path)
    with pytest.raises(ValueError, match="days"):
        generate_shop(ShopSpec(customers=10, items=100, days=2), tmp_path)
