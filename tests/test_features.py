"""Point-in-time customer features, RFM segments and labels (training/features.py)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.datafiles import DataError, read_shop
from training.features import (
    FEATURE_COLUMNS,
    NEVER_DAYS,
    SEGMENT_RULES,
    SEGMENTS,
    customer_features,
    segment_of,
    training_examples,
)
from training.generator import EVENT_TYPES, ShopSpec, generate_shop

DAY = 86_400
SPEC = ShopSpec(customers=800, items=150, days=120, seed=11, end=dt.date(2026, 11, 1))
SHOP_START = dt.datetime(2026, 7, 4, tzinfo=dt.UTC)  # SPEC.end − 120 days
AS_OF = SHOP_START + dt.timedelta(days=75)


@pytest.fixture(scope="session")
def parquet_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features-parquet")
    generate_shop(SPEC, out)
    return out


@pytest.fixture(scope="session")
def csv_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features-csv")
    generate_shop(ShopSpec(**{**SPEC.__dict__, "fmt": "csv"}), out)
    return out


@pytest.fixture(scope="session")
def features(parquet_shop: Path) -> pd.DataFrame:
    return customer_features(parquet_shop, AS_OF)


# --- a hand-built shop --------------------------------------------------------------------------------------

A = "2026-06-01T00:00:00Z"  # the as-of date of the hand-built shop
A_TS = int(dt.datetime(2026, 6, 1, tzinfo=dt.UTC).timestamp())


def _at(seconds_from_a: int) -> str:
    return dt.datetime.fromtimestamp(A_TS + seconds_from_a, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


HAND_CATALOG = ["i1,Runner,shoes", "i2,Boot,shoes", "i3,Novel,books", "i4,Kite,toys"]
HAND_CUSTOMERS = [
    "a,2026-01-01T00:00:00Z",
    "b,2026-05-02T00:00:00Z",
    "c,2026-05-31T12:00:00Z",
    f"d,{A}",  # created exactly at as_of: not a customer yet
]
HAND_EVENTS = [
    # customer a: two orders before as_of, one of two lines
    ("a", "purchase", "i1", "2", "10", "2026-03-01T00:00:00Z"),
    ("a", "purchase", "i3", "1", "5", "2026-03-01T00:00:00Z"),
    ("a", "purchase", "i3", "1", "7.5", _at(-30 * DAY)),  # on the 30-day boundary: inside
    ("a", "view_item", "i3", "1", "7.5", _at(-30 * DAY)),
    ("a", "view_item", "i1", "1", "10", _at(-30 * DAY - 1)),  # just outside 30 days, inside 90
    ("a", "view_item", "i2", "1", "20", _at(-90 * DAY)),  # on the 90-day boundary: inside
    ("a", "view_item", "i4", "1", "3", _at(-90 * DAY - 1)),  # just outside 90 days
    ("a", "add_to_cart", "i1", "1", "10", "2026-05-20T08:00:00Z"),
    ("a", "email_click", "i1", "1", "10", "2026-04-01T00:00:00Z"),
    ("a", "email_open", "", "", "", _at(-1)),
    ("a", "view_item", "i1", "1", "10", A),  # exactly at as_of: the future
    ("a", "purchase", "i4", "1", "100", A),  # the future: a label, not a feature
    # customer b: one order
    ("b", "view_item", "i2", "1", "40", "2026-05-30T12:00:00Z"),
    ("b", "purchase", "i2", "1", "40", "2026-05-31T00:00:00Z"),
    ("z", "purchase", "i1", "1", "999", "2026-05-01T00:00:00Z"),  # not in the customers file
    # after as_of: labels
    ("a", "email_click", "i2", "1", "20", _at(29 * DAY)),
    ("a", "purchase", "i2", "2", "5", _at(60 * DAY)),
    ("b", "purchase", "i2", "1", "20", _at(30 * DAY)),  # the 30-day label window is open on the right
    ("b", "purchase", "i2", "1", "1000", _at(90 * DAY)),  # so is the 90-day one
    ("c", "email_click", "i1", "1", "10", _at(30 * DAY)),
    ("c", "view_item", "i3", "1", "5", _at(100 * DAY)),  # the last event: data runs to as_of + 100 days
]


def _write_hand_shop(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    catalog = [f"{row},9.99,5.00,10,,,true" for row in HAND_CATALOG]
    (folder / "catalog.csv").write_text(
        "\n".join(["item_id,title,category,price,cost,stock,url,image_url,active", *catalog]) + "\n"
    )
    (folder / "customers.csv").write_text("\n".join(["customer_id,created_at", *HAND_CUSTOMERS]) + "\n")
    events = [f"e{n},{','.join(row)}" for n, row in enumerate(HAND_EVENTS)]
    (folder / "events.csv").write_text(
        "\n".join(["event_id,customer_id,type,item_id,quantity,price,timestamp", *events]) + "\n"
    )
    return folder


@pytest.fixture
def hand_shop(tmp_path: Path) -> Path:
    return _write_hand_shop(tmp_path / "hand")


def test_hand_built_shop_features_match_hand_computation(hand_shop):
    f = customer_features(hand_shop, A_TS).set_index("customer_id")
    assert list(f.index) == ["a", "b", "c"]
    a, b, c = f.loc["a"], f.loc["b"], f.loc["c"]
    expected_a = {
        "recency_days": 30.0,
        "frequency": 2.0,
        "monetary": 32.5,
        "avg_order_value": 16.25,
        "tenure_days": 151.0,
        "days_since_last_visit": 1 / DAY,
        "views_30d": 1.0,
        "views_90d": 3.0,
        "carts_30d": 1.0,
        "purchases_30d": 1.0,
        "purchases_90d": 1.0,
        "spend_90d": 7.5,
        "email_opens_30d": 1.0,
        "email_opens_90d": 1.0,
        "email_clicks_30d": 0.0,
        "email_clicks_90d": 1.0,
        "distinct_items_bought": 2.0,
        "distinct_categories_bought": 2.0,
        "top_category_share": 0.5,  # shoes: two views; books: a view and a purchase
        "category_entropy": 1.0,
        "categories_90d": 2.0,
    }
    assert a[list(FEATURE_COLUMNS)].to_dict() == pytest.approx(expected_a)
    assert a["top_category"] == "books"  # a tie goes to the alphabetically first category
    assert (b["recency_days"], b["frequency"], b["monetary"], b["avg_order_value"]) == (1.0, 1.0, 40.0, 40.0)
    assert (b["tenure_days"], b["days_since_last_visit"], b["views_30d"]) == (30.0, 1.0, 1.0)
    assert (b["top_category_share"], b["category_entropy"], b["top_category"]) == (1.0, 0.0, "shoes")
    assert (c["recency_days"], c["days_since_last_visit"], c["tenure_days"]) == (NEVER_DAYS, NEVER_DAYS, 0.5)
    assert c[[col for col in FEATURE_COLUMNS if "days" not in col]].eq(0).all()
    assert c["top_category"] is None and c["segment"] == "prospects"


def test_hand_built_shop_rfm_scores_and_segments(hand_shop):
    f = customer_features(hand_shop, dt.datetime(2026, 6, 1)).set_index("customer_id")  # naive = UTC
    scores = f[["r_score", "f_score", "m_score", "segment"]].to_dict("index")
    # two buyers: a is older (R 1), has more orders (F 3) and spent less (M 1) than b
    assert scores["a"] == {"r_score": 1, "f_score": 3, "m_score": 1, "segment": "at_risk"}
    assert scores["b"] == {"r_score": 3, "f_score": 1, "m_score": 3, "segment": "about_to_sleep"}
    assert scores["c"] == {"r_score": 0, "f_score": 0, "m_score": 0, "segment": "prospects"}


def test_hand_built_shop_labels_match_hand_computation(hand_shop):
    ex = training_examples(hand_shop, [A_TS]).set_index("customer_id")
    labels = ex[["purchased_next_30d", "churned_next_90d", "value_next_90d", "email_click_next_30d"]]
    assert labels.to_dict("index") == {
        "a": {"purchased_next_30d": 1, "churned_next_90d": 0, "value_next_90d": 110.0, "email_click_next_30d": 1},
        "b": {"purchased_next_30d": 0, "churned_next_90d": 0, "value_next_90d": 20.0, "email_click_next_30d": 0},
        "c": {"purchased_next_30d": 0, "churned_next_90d": 1, "value_next_90d": 0.0, "email_click_next_30d": 0},
    }
    assert ex.loc["a", "monetary"] == 32.5  # the purchase at as_of is a label, not a feature


def test_an_as_of_date_whose_label_window_runs_past_the_data_is_refused(hand_shop):
    training_examples(hand_shop, [A_TS + 10 * DAY])  # the window ends on the last event: allowed
    with pytest.raises(ValueError, match="2026-06-11T00:00:01Z"):
        training_examples(hand_shop, [A_TS, A_TS + 10 * DAY + 1])


def test_a_missing_required_column_names_the_file_and_column(hand_shop):
    (hand_shop / "catalog.csv").write_text("item_id,title\ni1,Runner\n")
    with pytest.raises(DataError, match=r"catalog\.csv.*'category'"):
        customer_features(hand_shop, A_TS)


def test_an_unreadable_timestamp_is_a_data_error(hand_shop):
    events = hand_shop / "events.csv"
    events.write_text(events.read_text() + "e999,a,view_item,i1,1,10,yesterday\n")
    with pytest.raises(DataError, match="yesterday"):
        customer_features(hand_shop, A_TS)


def test_a_bad_memory_limit_is_refused(hand_shop):
    with pytest.raises(ValueError, match="memory_limit 'lots'"):
        customer_features(hand_shop, A_TS, memory_limit="lots")


# --- the generated shop ---------------------------------------------------------------------------------------


def _future_events(shop: Path, as_of: int, schema: pa.Schema) -> pa.Table:
    """Events of every type at and after as_of, for every 5th customer, including a never-active one."""
    customers = pq.read_table(shop / "customers.parquet")["customer_id"].to_pylist()[::5]
    rows: dict[str, list[object]] = {name: [] for name in schema.names}
    for n, (cust, kind, offset) in enumerate(
        (c, k, o) for c in customers for k in EVENT_TYPES for o in (0, 1, 3 * DAY, 40 * DAY)
    ):
        rows["event_id"].append(f"future{n}")
        rows["customer_id"].append(cust)
        rows["type"].append(kind)
        rows["item_id"].append(None if kind == "email_open" else f"i{n % 150}")
        rows["quantity"].append(3)
        rows["price"].append(77.7)
        rows["timestamp"].append(dt.datetime.fromtimestamp(as_of + offset, dt.UTC))
    return pa.table(rows, schema=schema)


def test_events_after_as_of_change_no_feature(parquet_shop, features, tmp_path):
    as_of = int(AS_OF.timestamp())
    grown = tmp_path / "grown"
    shutil.copytree(parquet_shop, grown)
    events = pq.read_table(parquet_shop / "events.parquet")
    pq.write_table(
        pa.concat_tables([events, _future_events(parquet_shop, as_of, events.schema)]), grown / "events.parquet"
    )
    pd.testing.assert_frame_equal(customer_features(grown, as_of), features)


def test_columns_are_the_documented_ones_and_features_are_floats(features):
    import training.features

    scores = ["r_score", "f_score", "m_score"]
    assert list(features.columns) == ["customer_id", "as_of", *FEATURE_COLUMNS, *scores, "segment", "top_category"]
    assert (features[list(FEATURE_COLUMNS)].dtypes == "float64").all()
    assert (features[scores].dtypes == "int64").all()
    documented = training.features.__doc__ or ""
    assert all(f" {col}" in documented for col in FEATURE_COLUMNS)


def test_scores_are_quintiles_for_buyers_and_zero_for_others(features):
    buyers = features["frequency"] > 0
    assert buyers.sum() > 50 and (~buyers).sum() > 50
    for col in ("r_score", "f_score", "m_score"):
        assert features.loc[buyers, col].between(1, 5).all()
        assert (features.loc[~buyers, col] == 0).all()
    # more recent never scores lower; equal behaviour scores the same
    by_recency = features[buyers].sort_values("recency_days")
    assert by_recency["r_score"].is_monotonic_decreasing
    assert (features[buyers].groupby("frequency")["f_score"].nunique() == 1).all()
    assert (features[buyers].groupby("monetary")["m_score"].nunique() == 1).all()


def test_segments_follow_the_rule_table_and_runs_are_deterministic(parquet_shop, features):
    assert set(features["segment"]) <= set(SEGMENTS)
    expected = [segment_of(*t) for t in features[["r_score", "f_score", "m_score"]].itertuples(index=False)]
    assert features["segment"].tolist() == expected
    pd.testing.assert_frame_equal(customer_features(parquet_shop, AS_OF), features)


@pytest.mark.parametrize(
    ("scores", "segment"),
    [
        ((0, 0, 0), "prospects"),
        ((5, 5, 5), "champions"),
        ((4, 4, 1), "champions"),
        ((3, 5, 2), "loyal"),
        ((5, 2, 3), "potential_loyalists"),
        ((5, 1, 1), "new"),
        ((4, 1, 4), "promising"),
        ((3, 3, 3), "need_attention"),
        ((3, 1, 5), "about_to_sleep"),
        ((1, 5, 4), "cant_lose"),
        ((1, 5, 3), "at_risk"),
        ((2, 3, 5), "at_risk"),
        ((2, 2, 5), "hibernating"),
        ((1, 1, 1), "hibernating"),
    ],
)
def test_segment_mapping_on_hand_built_scores(scores, segment):
    assert segment_of(*scores) == segment


def test_every_score_combination_has_a_segment_and_every_segment_is_reachable():
    grid = [(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)]
    reached = {segment_of(*s) for s in grid} | {segment_of(0, 0, 0)}
    assert reached == set(SEGMENTS) == {rule.segment for rule in SEGMENT_RULES}


def test_csv_and_parquet_inputs_give_the_same_features(csv_shop, features):
    pd.testing.assert_frame_equal(customer_features(csv_shop, AS_OF), features)


def test_features_match_a_pandas_computation_over_read_shop(parquet_shop, features):
    shop = read_shop(parquet_shop)
    as_of = int(AS_OF.timestamp())
    ev = shop.events[shop.events["timestamp"] < as_of]
    buys = ev[ev["type"] == "purchase"]
    f = features.set_index("customer_id")
    frequency = buys.groupby("customer_id")["timestamp"].nunique()
    spend = (buys["quantity"] * buys["price"]).groupby(buys["customer_id"]).sum()
    views = ev[(ev["type"] == "view_item") & (ev["timestamp"] >= as_of - 30 * DAY)].groupby("customer_id").size()
    np.testing.assert_array_equal(f["frequency"], frequency.reindex(f.index, fill_value=0))
    np.testing.assert_allclose(f["monetary"], spend.reindex(f.index, fill_value=0.0), rtol=1e-12)
    np.testing.assert_array_equal(f["views_30d"], views.reindex(f.index, fill_value=0))
    created = shop.customers.set_index("customer_id")["created_at"]
    assert set(f.index) == set(created[created < as_of].index)


def test_asking_for_some_customers_returns_their_rows_unchanged(parquet_shop, features):
    wanted = [*features["customer_id"].iloc[::7], "nobody"]
    some = customer_features(parquet_shop, AS_OF, customers=wanted)
    expected = features[features["customer_id"].isin(wanted)].reset_index(drop=True)
    pd.testing.assert_frame_equal(some, expected)


def test_training_examples_carry_the_features_of_each_date(parquet_shop):
    dates = [SHOP_START + dt.timedelta(days=14), SHOP_START + dt.timedelta(days=28)]  # labels need 90 days
    ex = training_examples(parquet_shop, dates, memory_limit="500MB")
    assert sorted(set(ex["as_of"])) == [int(d.timestamp()) for d in dates]
    features = customer_features(parquet_shop, dates[1])
    at_date = ex[ex["as_of"] == int(dates[1].timestamp())].reset_index(drop=True)
    pd.testing.assert_frame_equal(at_date[features.columns], features)
    assert set(ex["purchased_next_30d"]) == {0, 1} and set(ex["churned_next_90d"]) == {0, 1}
    assert ((ex["value_next_90d"] > 0) == (ex["churned_next_90d"] == 0)).all()
