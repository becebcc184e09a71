"""POST /v1/catalog/items: webhook changes reach every worker's next decision."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from tests.conftest import load_shop


def _app(redis_url, keys, root):
    # A refresh interval of an hour: only the request path can bring the change in. Greedy, so both
    # workers show the same list and a change is the catalog's doing, not exploration's.
    settings = Settings(registry_dir=root, key_prefix=keys.prefix, refresh_interval_s=3600, exploration=False)
    return create_app(settings, redis_url=redis_url)


@pytest.fixture
def clients(redis_url, keys, shop_dir, registry_root) -> Iterator[tuple[TestClient, TestClient]]:
    load_shop(redis_url, keys, shop_dir)
    with TestClient(_app(redis_url, keys, registry_root)) as a, TestClient(_app(redis_url, keys, registry_root)) as b:
        yield a, b


def _shown(client: TestClient, body: dict[str, object]) -> list[str]:
    return [i["item_id"] for i in client.post("/v1/recommendations", json=body).json()["items"]]


def test_stock_to_zero_removes_the_item_from_the_next_request_of_every_worker(clients):
    a, b = clients
    home = {"customer_id": "nobody", "placement": "home", "limit": 10}
    shown_a, shown_b = _shown(a, home), _shown(b, home)
    assert shown_a == shown_b
    gone = shown_a[:3]
    r = a.post("/v1/catalog/items", json={"items": [{"item_id": i, "stock": 0} for i in gone]})
    assert r.status_code == 200 and sorted(r.json()["updated"]) == sorted(gone)
    assert not set(gone) & set(_shown(a, home))
    assert not set(gone) & set(_shown(b, home))


def test_a_price_change_keeps_the_other_fields(clients, redis_url, keys, shop):
    from feature_store.store import RedisStore

    a, _ = clients
    item = str(shop.catalog["item_id"].iloc[0])
    before = {it.item_id: it for it in RedisStore(redis_url, keys).read_catalog()[1]}[item]
    assert a.post("/v1/catalog/items", json={"item_id": item, "price": 1.23}).status_code == 200
    after = {it.item_id: it for it in RedisStore(redis_url, keys).read_catalog()[1]}[item]
    assert after.price == 1.23 and (after.title, after.stock, after.category) == (
        before.title,
        before.stock,
        before.category,
    )


def test_a_new_item_needs_its_required_fields_and_then_serves(clients):
    a, b = clients
    partial = a.post("/v1/catalog/items", json={"item_id": "brand-new", "stock": 5})
    assert partial.status_code == 422 and "required" in partial.json()["detail"][0]["msg"]
    full = {"item_id": "brand-new", "title": "New thing", "category": "gadgets", "price": 9.5, "cost": 4.0, "stock": 5}
    r = a.post("/v1/catalog/items", json=full)
    assert r.status_code == 200 and r.json()["created"] == ["brand-new"]
    ready = b.get("/readyz")  # b learns about the new version through its next request
    b.post("/v1/recommendations", json={"customer_id": "nobody", "placement": "home"})
    assert (
        int(b.get("/readyz").json()["catalog_version"])
        == r.json()["catalog_version"]
        > int(ready.json()["catalog_version"])
    )


def test_bad_items_in_a_batch_are_named_and_the_good_ones_applied(clients, shop):
    a, _ = clients
    item = str(shop.catalog["item_id"].iloc[1])
    batch = {"items": [{"item_id": item, "stock": 7}, {"item_id": item, "stock": -1}, {"item_id": "x"}]}
    body = a.post("/v1/catalog/items", json=batch).json()
    assert body["updated"] == [item]
    assert [(r["index"], r["errors"][0]["loc"]) for r in body["rejected"]] == [
        (1, ["body", "items", 1, "stock"]),
        (2, ["body", "items", 2]),
    ]
