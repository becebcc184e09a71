"""POST /v1/events: idempotent ingest that the very next decision sees."""

import shutil
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from engine.types import Profile
from feature_store.store import RedisStore
from tests.conftest import load_shop

T = "2026-11-01T12:00:00Z"


@pytest.fixture
def client(redis_url, keys, shop_dir, trained, tmp_path) -> Iterator[TestClient]:
    load_shop(redis_url, keys, shop_dir)
    root = tmp_path / "registry"
    shutil.copytree(trained.registry.root, root)
    settings = Settings(registry_dir=root, key_prefix=keys.prefix, refresh_interval_s=0.1)
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        yield c


def _profile(redis_url: str, keys, customer_id: str) -> Profile:
    profile = RedisStore(redis_url, keys).read_profile(customer_id)
    assert profile is not None, f"no profile for {customer_id}"
    return profile


def _event(event_id: str, customer: str, type_: str, item: str | None, **kw):
    return {"event_id": event_id, "customer_id": customer, "type": type_, "item_id": item, "timestamp": T, **kw}


def test_a_single_event_is_accepted_and_lands_in_the_profile(client, redis_url, keys):
    r = client.post("/v1/events", json=_event("e1", "c5", "view_item", "i9"))
    assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    assert _profile(redis_url, keys, "c5").recent_views[0] == "i9"


def test_duplicate_events_are_counted_once(client, redis_url, keys):
    purchase = _event("d1", "new-6", "purchase", "i3", price=2.5, quantity=2)
    first = client.post("/v1/events", json={"events": [purchase, purchase]}).json()
    again = client.post("/v1/events", json={"events": [purchase]}).json()  # a retried webhook
    assert (first["accepted"], first["duplicates"]) == (1, 1)
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    profile = _profile(redis_url, keys, "new-6")
    assert [(p.item_id, p.count) for p in profile.purchases] == [("i3", 1)]
    assert profile.orders == 1 and profile.spend == pytest.approx(5.0)


def test_a_bad_event_is_named_and_does_not_block_the_good_ones(client, redis_url, keys):
    batch = {
        "events": [
            _event("g1", "c7", "view_item", "i11"),
            _event("b1", "c7", "teleport", "i11"),
            _event("b2", "c7", "add_to_cart", None),
            _event("g2", "c7", "add_to_cart", "i12"),
        ]
    }
    body = client.post("/v1/events", json=batch).json()
    assert body["accepted"] == 2
    assert [(r["index"], r["event_id"]) for r in body["rejected"]] == [(1, "b1"), (2, "b2")]
    assert body["rejected"][0]["errors"][0]["loc"] == ["body", "events", 1, "type"]
    profile = _profile(redis_url, keys, "c7")
    assert profile.recent_views[0] == "i11" and profile.cart[0] == "i12"


BAD_SINGLE = [
    ({"event_id": "x", "customer_id": "new-1", "type": "view_item", "timestamp": T}, ["body"]),
    ({"events": []}, ["body", "events"]),
    (_event("x", "new-1", "view_item", "i1", timestamp="soon"), ["body", "timestamp"]),
    (_event("x", "new-1", "view_item", "i1", colour="red"), ["body", "colour"]),
]


@pytest.mark.parametrize(("body", "loc"), BAD_SINGLE)
def test_a_bad_single_event_is_422_and_writes_nothing(client, redis_url, keys, body, loc):
    r = client.post("/v1/events", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc
    assert RedisStore(redis_url, keys).read_profile("new-1") is None


def test_a_purchase_is_visible_to_the_very_next_decision(client, shop, rules):
    consenting = shop.customers[shop.customers["consent_personalization"]]["customer_id"]
    customer = str(consenting.iloc[0])
    request = {"customer_id": customer, "placement": "home", "limit": 20}
    durable = set(shop.catalog[~shop.catalog["category"].isin(rules.categories.repurchase)]["item_id"])
    before = [i["item_id"] for i in client.post("/v1/recommendations", json=request).json()["items"]]
    item = next(i for i in before if i in durable)
    r = client.post("/v1/events", json=_event("p8", customer, "purchase", item, price=10.0))
    assert r.status_code == 202 and r.json()["accepted"] == 1
    after = [i["item_id"] for i in client.post("/v1/recommendations", json=request).json()["items"]]
    assert item not in after  # bought and durable: gone from the very next decision


def test_the_first_event_of_a_new_visitor_creates_its_profile_at_once(client, shop):
    item = str(shop.catalog["item_id"].iloc[3])
    home = {"customer_id": "visitor-1", "placement": "home"}
    assert client.post("/v1/recommendations", json=home).json()["fallback_reason"] == "unknown_customer"
    client.post("/v1/events", json=_event("nv1", "visitor-1", "view_item", item))
    # Known from now on; personal content waits for a personalisation consent (none recorded yet).
    assert client.post("/v1/recommendations", json=home).json()["fallback_reason"] == "no_personalization_consent"


def test_profile_lists_stay_capped(client, redis_url, keys):
    from feature_store.profiles import MAX_VIEWS

    batch = {"events": [_event(f"cap{n}", "c9", "view_item", f"i{n}", timestamp=1_790_000_000 + n) for n in range(60)]}
    assert client.post("/v1/events", json=batch).json()["accepted"] == 60
    views = _profile(redis_url, keys, "c9").recent_views
    assert len(views) == MAX_VIEWS and views[0] == "i59"


def test_consent_given_and_withdrawn_applies_to_the_very_next_decision(client, redis_url, keys, shop):
    item = str(shop.catalog["item_id"].iloc[3])
    home = {"customer_id": "visitor-2", "placement": "home"}
    client.post("/v1/events", json=_event("nv2", "visitor-2", "view_item", item))
    assert client.post("/v1/recommendations", json=home).json()["fallback_reason"] == "no_personalization_consent"
    given = {"channels": {"personalization": True}, "source": "cookie-banner"}
    r = client.put("/v1/customers/visitor-2/consent", json=given)
    assert r.status_code == 200 and r.json()["consents"]["personalization"] is True
    assert r.json()["consents"]["email"] is False  # channels not named keep their value
    assert client.post("/v1/recommendations", json=home).json()["fallback"] is False
    withdrawn = {"channels": {"personalization": False}, "source": "account-settings"}
    assert client.put("/v1/customers/visitor-2/consent", json=withdrawn).status_code == 200
    assert client.post("/v1/recommendations", json=home).json()["fallback_reason"] == "no_personalization_consent"
    import redis

    evidence = redis.Redis.from_url(redis_url).lrange(keys.consent_evidence("visitor-2"), 0, -1)
    assert [b"account-settings" in e for e in evidence] == [True, False]  # newest first, both kept
    assert _profile(redis_url, keys, "visitor-2").recent_views == (item,)  # the rest of the profile untouched


@pytest.mark.parametrize(
    "body",
    [{"channels": {}, "source": "x"}, {"channels": {"telepathy": True}, "source": "x"}, {"channels": {"sms": True}}],
)
def test_a_bad_consent_change_is_422_and_changes_nothing(client, redis_url, keys, body):
    assert client.put("/v1/customers/new-9/consent", json=body).status_code == 422
    assert RedisStore(redis_url, keys).read_profile("new-9") is None
