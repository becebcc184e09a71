"""The HTTP API against a real Redis and real trained models."""

import gc
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from engine.registry import Registry
from feature_store.keys import Keys
from feature_store.server import EmbeddedRedis
from feature_store.store import RedisStore
from tests.conftest import FAST, load_shop
from training.train import train


def _settings(registry: Path, keys: Keys, **kw) -> Settings:
    return Settings(registry_dir=registry, key_prefix=keys.prefix, **{"refresh_interval_s": 0.1, **kw})


@pytest.fixture
def registry_copy(trained, tmp_path) -> Registry:
    root = tmp_path / "registry"
    shutil.copytree(trained.registry.root, root)
    return Registry(root)


@pytest.fixture
def client(redis_url, keys, shop_dir, registry_copy) -> Iterator[TestClient]:
    load_shop(redis_url, keys, shop_dir)
    app = create_app(_settings(registry_copy.root, keys), redis_url=redis_url)
    with TestClient(app) as c:
        yield c


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _wait_until_personal(client: TestClient, body: dict[str, str]) -> None:
    """Personal answers resume by themselves once Redis is back (the circuit breaker closes)."""
    _wait_for(lambda: client.post("/v1/recommendations", json=body).json()["fallback"] is False)


def _buyer(shop) -> str:
    return str(shop.events[shop.events["type"] == "purchase"]["customer_id"].value_counts().index[0])


def test_known_customer_gets_personal_recommendations(client, shop):
    r = client.post("/v1/recommendations", json={"customer_id": _buyer(shop), "placement": "home", "limit": 10})
    assert r.status_code == 200
    body = r.json()
    assert body["fallback"] is False and body["fallback_reason"] is None
    assert len(body["items"]) == 10 and body["model_version"]
    assert all(item["reasons"] for item in body["items"])
    assert len(body["decision_id"]) == 26


def test_unknown_customer_gets_bestsellers_marked_fallback(client):
    r = client.post("/v1/recommendations", json={"customer_id": "never-seen", "placement": "home"})
    body = r.json()
    assert r.status_code == 200 and body["fallback"] is True and body["fallback_reason"] == "unknown_customer"
    assert len(body["items"]) == 10  # the placement's default limit


def test_served_items_are_in_stock_active_and_not_in_context(client, shop):
    catalog = shop.catalog.set_index("item_id")
    item = str(catalog.index[0])
    r = client.post(
        "/v1/recommendations",
        json={"customer_id": _buyer(shop), "placement": "pdp", "limit": 20, "context": {"item_id": item}},
    )
    ids = [i["item_id"] for i in r.json()["items"]]
    assert item not in ids and len(ids) == len(set(ids))
    assert (catalog.loc[ids, "stock"] > 0).all() and catalog.loc[ids, "active"].all()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"customer_id": "c1", "placement": "nowhere"}, ["body", "placement"]),
        ({"customer_id": "c1", "placement": "home", "limit": 0}, ["body", "limit"]),
        ({"customer_id": "c1", "placement": "home", "limit": 75}, ["body", "limit"]),
        ({"customer_id": "c1", "placement": "home", "limit": "ten"}, ["body", "limit"]),
        ({"placement": "home"}, ["body", "customer_id"]),
        ({"customer_id": "c{1}", "placement": "home"}, ["body", "customer_id"]),
        ({"customer_id": "c1", "placement": "home", "colour": "red"}, ["body", "colour"]),
        ({"customer_id": "c1", "placement": "home", "context": {"cart": "i1"}}, ["body", "context", "cart"]),
        ({"customer_id": "c1", "placement": "home", "context": {"cart": ["i 1"]}}, ["body", "context", "cart", 0]),
    ],
)
def test_bad_requests_get_422_naming_the_field(client, body, field):
    r = client.post("/v1/recommendations", json=body)
    assert r.status_code == 422
    assert any(d["loc"] == field for d in r.json()["detail"]), r.json()


def test_malformed_json_is_422(client):
    r = client.post("/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_what_a_refresh_froze_is_collectable_again_once_the_app_stops(redis_url, keys, shop_dir, registry_copy):
    """Loaded model and catalog go to the permanent generation while serving (full collections skip them);
    after shutdown they must not stay there, or they are never freed (and DuckDB reports leaks at exit)."""
    load_shop(redis_url, keys, shop_dir)
    gc.unfreeze()
    with TestClient(create_app(_settings(registry_copy.root, keys), redis_url=redis_url)) as c:
        assert c.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_the_app_collects_young_objects_at_its_own_threshold_and_gives_the_old_one_back(
    redis_url, keys, shop_dir, registry_copy
):
    """A batch keeps hundreds of recipients' objects alive for a few milliseconds: at CPython's default young
    threshold (700) each is scanned and promoted several times before it dies; the runtime raises it while it
    runs (NEXTBEST_GC_YOUNG_OBJECTS) and restores the process's own on stop."""
    load_shop(redis_url, keys, shop_dir)
    before = gc.get_threshold()
    settings = _settings(registry_copy.root, keys, gc_young_objects=12_345)
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        assert c.get("/readyz").status_code == 200
        assert gc.get_threshold() == (12_345, *before[1:])
    assert gc.get_threshold() == before


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] is True and ready.json()["catalog_source"] == "redis"
    client.post("/v1/recommendations", json={"customer_id": "nobody", "placement": "cart"})
    text = client.get("/metrics").text
    assert 'nextbest_decision_seconds_bucket{le="0.01",placement="cart"}' in text
    assert 'nextbest_fallbacks_total{placement="cart",reason="unknown_customer"}' in text
    assert "nextbest_model_info{version=" in text


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/recommendations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[-1]
    assert set(spec["components"]["schemas"][name]["properties"]) == {"customer_id", "placement", "limit", "context"}
    assert {"RecommendationContext", "RecommendationResponse", "RecommendedItem", "ValidationErrorBody"} <= set(
        spec["components"]["schemas"]
    )
    responses = spec["paths"]["/v1/recommendations"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/RecommendationResponse")


def test_a_new_registry_version_is_picked_up_without_restart(client, registry_copy, shop_dir, rules):
    old = client.get("/readyz").json()["model_version"]
    artifact, _ = train(shop_dir, registry_copy, rules, FAST.__class__(als=FAST.als, evaluate=False))
    assert artifact.version != old
    _wait_for(lambda: client.get("/readyz").json()["model_version"] == artifact.version)
    r = client.post("/v1/recommendations", json={"customer_id": "c1", "placement": "home"})
    assert r.json()["model_version"] == artifact.version


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(client, registry_copy, shop_dir, rules):
    old = client.get("/readyz").json()["model_version"]
    artifact, _ = train(shop_dir, registry_copy, rules, FAST.__class__(als=FAST.als, evaluate=False), activate=False)
    factors = artifact.path / "item_factors.npy"
    factors.write_bytes(factors.read_bytes()[:-64])  # a half-written file
    (registry_copy.root / "LIVE").write_text(artifact.version)  # someone forces it live by hand
    _wait_for(lambda: client.get("/readyz").json()["model_error"] is not None)
    ready = client.get("/readyz").json()
    assert ready["model_version"] == old and "checksum mismatch" in ready["model_error"]
    r = client.post("/v1/recommendations", json={"customer_id": "c1", "placement": "home"})
    assert r.status_code == 200 and r.json()["model_version"] == old
    assert 'nextbest_model_loads_total{result="refused"}' in client.get("/metrics").text
    (registry_copy.root / "LIVE").write_text(old)  # the operator rolls LIVE back
    _wait_for(lambda: client.get("/readyz").json()["model_error"] is None)


def test_a_catalog_change_in_redis_reaches_the_next_decisions(client, redis_url, keys, shop):
    r = client.post("/v1/recommendations", json={"customer_id": "nobody", "placement": "home", "limit": 10})
    shown = {i["item_id"] for i in r.json()["items"]}
    store = RedisStore(redis_url, keys)
    _, items = store.read_catalog()
    store.write_catalog([it if it.item_id not in shown else replace(it, stock=0) for it in items])

    def gone() -> bool:
        again = client.post("/v1/recommendations", json={"customer_id": "nobody", "placement": "home", "limit": 10})
        return not shown & {i["item_id"] for i in again.json()["items"]}

    _wait_for(gone)


def test_with_redis_stopped_answers_stay_valid_and_recover_when_it_returns(tmp_path, shop_dir, registry_copy, shop):
    server = EmbeddedRedis(tmp_path / "own-redis", appendonly=True).start()
    keys = Keys("nb")
    load_shop(server.url, keys, shop_dir)
    app = create_app(_settings(registry_copy.root, keys, breaker_reset_s=0.2), redis_url=server.url)
    buyer = _buyer(shop)
    try:
        with TestClient(app) as c:
            assert (
                c.post("/v1/recommendations", json={"customer_id": buyer, "placement": "home"}).json()["fallback"]
                is False
            )
            server.stop()  # really stop the server
            for _ in range(10):
                r = c.post("/v1/recommendations", json={"customer_id": buyer, "placement": "home"})
                body = r.json()
                assert r.status_code == 200 and body["fallback"] is True
                assert body["fallback_reason"] in {"redis_unavailable", "redis_circuit_open"}
                assert len(body["items"]) == 10
            assert c.get("/readyz").status_code == 503
            server.start()  # append-only file brings the profiles back
            _wait_until_personal(c, {"customer_id": buyer, "placement": "home"})
    finally:
        server.stop()


def _commands_served(client) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


@pytest.mark.parametrize("logged", [True, False])
def test_a_decision_costs_one_read_round_trip_whatever_the_candidates(
    redis_url, keys, shop_dir, registry_copy, shop, logged
):
    load_shop(redis_url, keys, shop_dir)
    settings = _settings(registry_copy.root, keys, refresh_interval_s=3600, decision_log=logged)
    app = create_app(settings, redis_url=redis_url)
    with TestClient(app) as c:
        body = {"customer_id": _buyer(shop), "placement": "cart", "limit": 40, "context": {"cart": ["i1", "i2", "i3"]}}
        c.post("/v1/recommendations", json=body)  # warm up the connection
        counter = redis.Redis.from_url(redis_url)
        _commands_served(counter)
        before = _commands_served(counter)
        r = c.post("/v1/recommendations", json=body)
        after = _commands_served(counter)
    assert r.status_code == 200 and r.json()["fallback"] is False
    # The profile (with the log pseudonym) and the catalog version, written together as one pipeline
    # (see test_resp): one round trip. Logging is a second one: the entry and the record feedback joins on.
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    log_writes = {"cmdstat_xadd": 1, "cmdstat_set": 1} if logged else {}
    assert delta == {"cmdstat_get": 2} | log_writes


def test_a_paused_redis_gives_fallback_content_instead_of_a_hang(tmp_path, shop_dir, registry_copy, shop):
    server = EmbeddedRedis(tmp_path / "paused-redis", appendonly=False).start()
    keys = Keys("nb")
    load_shop(server.url, keys, shop_dir)
    app = create_app(_settings(registry_copy.root, keys, breaker_reset_s=0.2), redis_url=server.url)
    try:
        with TestClient(app) as c:
            buyer = _buyer(shop)
            home = {"customer_id": buyer, "placement": "home"}
            assert c.post("/v1/recommendations", json=home).json()["fallback"] is False
            redis.Redis.from_url(server.url).execute_command("CLIENT", "PAUSE", 1500, "ALL")
            reasons = set()
            for _ in range(5):
                body = c.post("/v1/recommendations", json=home).json()
                assert body["fallback"] is True and len(body["items"]) == 10
                reasons.add(body["fallback_reason"])
            assert "redis_unavailable" in reasons  # the per-call timeout fired
            assert "redis_circuit_open" in reasons  # then the breaker stopped calling
            _wait_until_personal(c, {"customer_id": buyer, "placement": "home"})
    finally:
        server.stop()
