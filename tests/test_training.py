"""Model quality on the synthetic shops, measured on a time split (figures stored in the manifest)."""

from typing import Any

import numpy as np
import pytest

from engine.recmodel import load_rec_model
from engine.registry import Registry
from tests.conftest import FAST, SHOP_END
from training.als import interaction_matrix, item_neighbours
from training.generator import ShopSpec, generate_shop
from training.train import train


def test_als_beats_popularity_on_recall_at_10(trained):
    discovery = trained.metrics["discovery"]
    assert discovery["users"] >= 100
    assert discovery["als"]["recall@10"] > 1.3 * discovery["popularity"]["recall@10"]


def test_metrics_and_checksums_are_in_the_manifest(trained):
    manifest = trained.artifact.manifest
    assert manifest["metrics"]["discovery"]["als"]["recall@10"] == trained.metrics["discovery"]["als"]["recall@10"]
    assert manifest["data"]["events"] > 0 and manifest["data"]["from"] < manifest["data"]["to"]
    assert all(len(h) == 64 for h in manifest["files"].values())


@pytest.mark.slow
def test_on_a_repeat_purchase_shop_the_served_list_beats_own_most_frequent_items(tmp_path, rules):
    out = tmp_path / "grocery"
    generate_shop(ShopSpec(customers=3000, items=400, days=120, seed=11, kind="grocery", end=SHOP_END), out)
    _, metrics = train(out, Registry(tmp_path / "reg"), rules, FAST)
    basket: Any = metrics["next_basket"]
    assert basket["users"] >= 200
    assert basket["served_home"]["recall@10"] > basket["own_most_frequent"]["recall@10"]
    assert basket["served_home"]["ndcg@10"] > basket["own_most_frequent"]["ndcg@10"]


def test_neighbours_exclude_the_item_itself_and_are_sorted():
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(50, 8)).astype(np.float32)
    idx, sim = item_neighbours(factors, 5, block=16)
    assert not (idx == np.arange(50)[:, None]).any()
    assert (np.diff(sim, axis=1) <= 1e-6).all()


def test_recent_events_weigh_more_than_old_ones():
    import pandas as pd

    ev = pd.DataFrame(
        {
            "customer_id": ["c1", "c1"],
            "type": ["view_item", "view_item"],
            "item_id": ["a", "b"],
            "timestamp": [0, 90 * 86400],
        }
    )
    _, m = interaction_matrix(ev, np.array(["a", "b"]), now=90 * 86400, half_life_days=45)
    assert m[0, 1] == pytest.approx(1.0) and m[0, 0] == pytest.approx(0.25)


def test_the_served_version_has_factors_for_every_item_and_active_customer(trained, shop_dir):
    from training.datafiles import read_shop

    model = load_rec_model(trained.registry.verify(trained.artifact.version))
    events = read_shop(shop_dir).events
    active = set(events[events["item_id"] != ""]["customer_id"])
    assert model.item_factors.shape == (len(model.item_ids), FAST.als.factors)
    assert active <= set(model.user_ids.tolist())
    assert all(model.user_vector(c) is not None for c in list(active)[:50])


def test_interaction_matrix_matches_a_naive_sum():
    import pandas as pd

    from training.als import EVENT_WEIGHT

    rng = np.random.default_rng(5)
    n = 400
    types = rng.choice(["view_item", "add_to_cart", "purchase", "email_open", "email_click"], n)
    items = np.array([f"i{k}" for k in rng.integers(0, 12, n)], dtype=object)
    items[types == "email_open"] = ""
    ev = pd.DataFrame(
        {
            "customer_id": [f"c{k}" for k in rng.integers(0, 30, n)],
            "type": types,
            "item_id": items,
            "timestamp": rng.integers(0, 60 * 86400, n),
        }
    )
    item_ids = np.array(sorted({f"i{k}" for k in range(12)}))
    now = 60 * 86400
    users, m = interaction_matrix(ev, item_ids, now, 30.0)
    assert list(users) == sorted(users)
    expected: dict[tuple[str, str], float] = {}
    for row in ev.itertuples():
        w = EVENT_WEIGHT[row.type] * 0.5 ** ((now - row.timestamp) / 86400 / 30.0)
        if w > 0 and row.item_id:
            expected[(row.customer_id, row.item_id)] = expected.get((row.customer_id, row.item_id), 0.0) + w
    got = {(users[u], item_ids[i]): m[u, i] for u, i in zip(*m.nonzero(), strict=True)}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(expected[k], rel=1e-5) for k in got)
