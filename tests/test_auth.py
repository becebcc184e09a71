"""API keys with scopes: 401 without a valid key, 403 without the scope, open endpoints stay open."""

from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import ApiKeysError, hash_key, new_key, parse_keys, required_scope
from api.settings import Settings
from tests.conftest import load_shop
from tests.test_serve import _serve, _stop

KEYS = {scope: new_key() for scope in ("decide", "email", "ingest", "admin")}
ENTRIES = ",".join(f"{scope}-caller:{scope}:{hash_key(key)}" for scope, key in KEYS.items())

CALLS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("decide", "POST", "/v1/recommendations", {"customer_id": "c1", "placement": "home"}),
    ("decide", "POST", "/v1/offers/next-best", {"customer_id": "c1", "channel": "web"}),
    ("email", "GET", "/v1/email/slots/wk1/c1", None),
    ("email", "POST", "/v1/email/slots:batch", {"campaign_id": "wk1", "recipients": ["c1"]}),
    ("ingest", "POST", "/v1/catalog/items", {"item_id": "i1", "stock": 3}),
    (
        "ingest",
        "POST",
        "/v1/events",
        {
            "event_id": "e-auth-1",
            "customer_id": "c1",
            "type": "view_item",
            "item_id": "i1",
            "timestamp": "2026-11-23T10:00:00Z",
        },
    ),
    ("admin", "PUT", "/v1/customers/c9/consent", {"channels": {"email": True}, "source": "test"}),
    ("admin", "DELETE", "/v1/customers/c9", None),
    ("admin", "GET", "/metrics", None),
    ("admin", "POST", "/v1/admin/reload", None),
]


@pytest.fixture
def client(redis_url, keys, shop_dir, registry_root) -> Iterator[TestClient]:
    load_shop(redis_url, keys, shop_dir)
    settings = Settings(registry_dir=registry_root, key_prefix=keys.prefix, redis_timeout_ms=2000, api_keys=ENTRIES)
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        yield c


def _call(client: TestClient, method: str, path: str, body: dict[str, Any] | None, key: str | None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response: httpx2.Response = client.request(method, path, json=body, headers=headers)
    return response


@pytest.mark.parametrize(("scope", "method", "path", "body"), CALLS)
def test_each_endpoint_needs_a_key_with_its_scope(client, scope, method, path, body):
    missing = _call(client, method, path, body, None)
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert _call(client, method, path, body, "nbk_not-a-key").status_code == 401
    other = next(s for s in KEYS if s != scope)
    wrong = _call(client, method, path, body, KEYS[other])
    assert wrong.status_code == 403
    assert f"lacks scope '{scope}'" in wrong.json()["detail"] and f"{other}-caller" in wrong.json()["detail"]
    right = _call(client, method, path, body, KEYS[scope])
    assert right.status_code < 400, right.text


def test_a_refused_request_changes_nothing(client, redis_url, keys):
    import redis

    r = redis.Redis.from_url(redis_url)
    before = r.get(keys.catalog_version)
    refused = _call(client, "POST", "/v1/catalog/items", {"item_id": "i1", "stock": 0}, KEYS["decide"])
    assert refused.status_code == 403 and r.get(keys.catalog_version) == before


def test_health_readiness_docs_and_signed_email_links_stay_open(client):
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    slots = client.get("/v1/email/slots/wk2/c1", headers={"Authorization": f"Bearer {KEYS['email']}"}).json()
    link = slots["slots"][0]["click_url"]
    click = client.get(link[link.index("/v1/") :], follow_redirects=False)
    assert click.status_code == 302


def test_without_keys_the_api_is_open(redis_url, keys, shop_dir, registry_root):
    load_shop(redis_url, keys, shop_dir)
    settings = Settings(registry_dir=registry_root, key_prefix=keys.prefix, redis_timeout_ms=2000)
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        assert c.post("/v1/recommendations", json={"customer_id": "c1", "placement": "home"}).status_code == 200


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("web:decide", "expected 'name:scope+scope:sha256hex'"),
        (f"web:decide+root:{hash_key('x')}", "unknown scope(s) ['root']"),
        ("web:decide:nbk_plain-key-instead-of-its-hash", "never the key itself"),
        (f"a:decide:{hash_key('x')},a:email:{hash_key('y')}", "used twice"),
    ],
)
def test_bad_key_settings_are_refused_naming_the_entry(setting, words):
    with pytest.raises(ApiKeysError) as err:
        parse_keys(setting)
    assert words in str(err.value)


def test_scopes_of_paths():
    assert required_scope("GET", "/v1/email/click/k1.abc.def") is None
    assert required_scope("POST", "/v1/feedback") == "ingest"
    assert required_scope("POST", "/v1/something-new") == "admin"  # unknown paths get the narrowest audience


def test_metrics_can_be_served_on_their_own_port_without_a_key(
    redis_url, keys, shop_dir, trained, tmp_path, monkeypatch
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    monkeypatch.setenv("NEXTBEST_API_KEYS", ENTRIES)
    monkeypatch.setenv("NEXTBEST_METRICS_PORT", str(metrics_port))
    load_shop(redis_url, keys, shop_dir)
    proc, base = _serve(redis_url, keys, trained.registry.root, tmp_path / "var", workers=2)
    try:
        assert httpx.get(f"{base}/metrics").status_code == 401
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200 and "nextbest_model_info{" in scraped.text
    finally:
        _stop(proc)


def test_the_openapi_document_says_which_key_each_operation_needs(client):
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    recs = doc["paths"]["/v1/recommendations"]["post"]
    assert recs["security"] == [{"apiKey": []}] and {"401", "403"} <= set(recs["responses"])
    assert "scope `decide`" in recs["description"]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert client.get("/openapi.json").json() == doc  # documenting twice changes nothing
