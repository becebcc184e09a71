"""Email slots: stored once and read back, replacement at open, fallbacks, signed clicks, batch, offers."""

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
import redis
from babel.numbers import format_currency
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.email_render import _formatter, format_price
from api.settings import Settings
from api.signing import ClickSigner, ClickToken, InvalidTokenError
from engine.rules import DEFAULT_RULES_FILE, load_rules
from feature_store.keys import Keys
from feature_store.server import EmbeddedRedis
from tests.clear_text import in_clear
from tests.conftest import load_shop
from tests.test_serve import BALANCER, _serve, _stop

KEYS_SETTING = "k2:second-secret-0123456789,k1:first-secret-0123456789"
OFFER_RULES = """
placements:
  "email:weekly":
    default_limit: 4
    sources: {als: 1.0, bestsellers: 0.3}
    rerank: {max_per_category: 2}
    offer_slots: 1
offer_settings: {holdout_salt: test, holdout_share: 0.0}
offers:
  weekly_deal:
    title: 10 % off this week
    url: https://shop.example.com/deals
    channels: [email]
    value: {fixed: 5.0}
    caps: [{scope: channel, limit: 1, window: 7d}]
email:
  countries:
    DE: {locale: de_DE, currency: EUR}
    GB: {locale: en_GB, currency: GBP, rate: 0.86}
    default: {locale: en_IE, currency: EUR}
"""


def _settings(registry_root: Path, keys: Keys, **kw: Any) -> Settings:
    base: dict[str, Any] = {"refresh_interval_s": 0.1, "redis_timeout_ms": 2000, "email_signing_keys": KEYS_SETTING}
    return Settings(registry_dir=registry_root, key_prefix=keys.prefix, **{**base, **kw})


@pytest.fixture
def client(redis_url, keys, shop_dir, registry_root) -> Iterator[TestClient]:
    load_shop(redis_url, keys, shop_dir)
    with TestClient(create_app(_settings(registry_root, keys), redis_url=redis_url)) as c:
        yield c


def _slots(client: TestClient | httpx.Client, campaign: str, customer: str, **params: Any) -> dict[str, Any]:
    r = client.get(f"/v1/email/slots/{campaign}/{customer}", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _items(body: dict[str, Any]) -> list[str]:
    return [s["item_id"] for s in body["slots"] if s["type"] == "product"]


def _buyers(shop, n: int) -> list[str]:
    counts = shop.events[shop.events["type"] == "purchase"]["customer_id"].value_counts()
    return [str(c) for c in counts.index[:n]]


def test_first_call_decides_and_every_later_call_returns_the_same_content(client, shop):
    customer = _buyers(shop, 1)[0]
    first = _slots(client, "wk48", customer)
    assert first["source"] == "decided" and first["fallback"] is False and len(_items(first)) == 4
    for _ in range(3):
        again = _slots(client, "wk48", customer)
        assert again["source"] == "stored"
        assert again["decision_id"] == first["decision_id"] and again["slots"] == first["slots"]
    # Another campaign is decided on its own.
    assert _slots(client, "wk49", customer)["decision_id"] != first["decision_id"]


def test_slots_carry_title_formatted_price_image_and_signed_link(client, shop, redis_url, keys):
    customer = _buyers(shop, 1)[0]
    country = redis.Redis.from_url(redis_url).get(keys.profile(customer))
    body = _slots(client, "wk48", customer)
    catalog = shop.catalog.set_index("item_id")
    for s in [s for s in body["slots"] if s["type"] == "product"]:
        row = catalog.loc[s["item_id"]]
        assert s["title"] == row["title"] and s["image_url"] == row["image_url"]
        assert s["click_url"].startswith("http://127.0.0.1:8000/v1/email/click/")
        # The link does not carry the customer id, in clear or among the fields of its (readable) payload.
        token = client.app.state.runtime.email_signer.verify(s["click_url"].rsplit("/", 1)[1])
        assert not in_clear(customer, s["click_url"]) and customer not in map(str, dataclasses.astuple(token))
        assert s["price_formatted"]
    assert country is not None and body["currency"] in {"EUR", "GBP"}


def test_price_is_formatted_in_the_customers_locale_and_currency(client, shop, redis_url, keys):
    r = redis.Redis.from_url(redis_url)
    customers = shop.customers.set_index("customer_id")
    gb = next(c for c in _buyers(shop, 200) if customers.loc[c, "country"] == "GB")
    de = next(c for c in _buyers(shop, 200) if customers.loc[c, "country"] == "DE")
    assert r.get(keys.profile(gb)) is not None
    gb_body, de_body = _slots(client, "wk48", gb), _slots(client, "wk48", de)
    assert (gb_body["locale"], gb_body["currency"]) == ("en_GB", "GBP")
    assert (de_body["locale"], de_body["currency"]) == ("de_DE", "EUR")
    price = shop.catalog.set_index("item_id")["price"]
    s = gb_body["slots"][0]
    assert s["price"] == pytest.approx(round(price[s["item_id"]] * 0.86, 2))
    assert s["price_formatted"].startswith("£")
    assert de_body["slots"][0]["price_formatted"].endswith("€")  # '12,99 €'


def test_a_read_back_reads_only_the_country_of_the_profile(client, shop, redis_url, keys, caplog):
    """Stored content needs the profile's country alone (its prices' format): damage elsewhere in the profile
    leaves the read-back as it was, while a decision for the same customer refuses the profile. Damage to the
    country's own field is logged and the default format is used."""
    r = redis.Redis.from_url(redis_url)
    customers = shop.customers.set_index("customer_id")
    gb = next(c for c in _buyers(shop, 200) if customers.loc[c, "country"] == "GB")
    sent = _slots(client, "wk48", gb)
    profile = orjson.loads(r.get(keys.profile(gb)))  # type: ignore[arg-type]
    segment, country, affinities, _ = profile["x"].split(",")
    r.set(keys.profile(gb), orjson.dumps({**profile, "x": f"{segment},{country},{affinities},not base85!", "p": "x"}))
    opened = _slots(client, "wk48", gb)
    assert opened["source"] == "stored" and opened["slots"] == sent["slots"]
    assert (opened["locale"], opened["currency"]) == ("en_GB", "GBP")
    assert _slots(client, "wk49", gb)["fallback_reason"] == "profile_unreadable"
    r.set(keys.profile(gb), orjson.dumps({**profile, "x": f"{segment},{country}"}))
    with caplog.at_level("ERROR", logger="nextbest"):
        again = _slots(client, "wk48", gb)
    assert _items(again) == _items(sent) and (again["locale"], again["currency"]) == ("en_IE", "EUR")
    assert f"profile of {gb!r} is malformed: field 'x'" in caplog.text


def test_a_price_change_shows_in_the_next_rendering_of_stored_content(client, shop):
    """The renderer keeps item fields per catalog: a new catalog (a webhook's price) is rendered anew."""
    customer = _buyers(shop, 3)[2]
    first = _slots(client, "wk49", customer)
    slot = next(s for s in first["slots"] if s["type"] == "product")
    assert client.post("/v1/catalog/items", json={"item_id": slot["item_id"], "price": 1234.5}).status_code == 200
    again = _slots(client, "wk49", customer)
    assert _items(again) == _items(first)  # the stored content, read back
    now = next(s for s in again["slots"] if s["item_id"] == slot["item_id"])
    rate = 0.86 if again["currency"] == "GBP" else 1.0
    assert now["price"] == pytest.approx(round(1234.5 * rate, 2)) != slot["price"]
    assert now["title"] == slot["title"] and now["click_url"] == slot["click_url"]


def test_a_full_item_cache_starts_again_and_every_slot_keeps_its_own_fields(client, shop, monkeypatch):
    """The renderer holds at most MAX_CACHED_ITEMS item fields over every price format; one more starts
    the cache again, and each slot still shows its own item's title and price."""
    monkeypatch.setattr("api.email_render.MAX_CACHED_ITEMS", 3)
    catalog = shop.catalog.set_index("item_id")
    for customer in _buyers(shop, 6):
        body = _slots(client, "wk50", customer)
        rate = 0.86 if body["currency"] == "GBP" else 1.0
        for s in (s for s in body["slots"] if s["type"] == "product"):
            assert s["title"] == catalog.loc[s["item_id"], "title"]
            assert s["price"] == pytest.approx(round(float(catalog.loc[s["item_id"], "price"]) * rate, 2))
    renderer = client.app.state.runtime.email_renderer  # type: ignore[attr-defined]
    assert renderer._cached <= 3 + 4  # started again within the last email (4 product slots)


_BUNDLED_FORMATS = sorted({(f.currency, f.locale) for f in load_rules(DEFAULT_RULES_FILE).email.countries.values()})
# Formats the fast path must leave to babel (Indian grouping, Arabic marks and separators) or get right
# with other separators and decimals (Swiss apostrophe, no decimals, three decimals).
_OTHER_FORMATS = [("INR", "en_IN"), ("EGP", "ar_EG"), ("CHF", "de_CH"), ("JPY", "ja_JP"), ("KWD", "ar_KW")]


@settings(max_examples=400, deadline=None)
@given(
    cents=st.integers(0, 10**11),
    fmt=st.sampled_from(_BUNDLED_FORMATS + _OTHER_FORMATS),
)
def test_a_price_is_spelled_exactly_as_babel_spells_it(cents, fmt):
    currency, locale = fmt
    amount = cents / 100  # the renderer rounds converted prices to cents
    assert format_price.__wrapped__(amount, currency, locale) == format_currency(amount, currency, locale=locale)


def test_the_bundled_price_formats_take_the_fast_path_and_indian_grouping_takes_babel():
    assert all(_formatter(currency, locale) is not None for currency, locale in _BUNDLED_FORMATS)
    assert _formatter("INR", "en_IN") is None  # 12,34,567.89: groups of two after the first three
    assert format_price.__wrapped__(1_234_567.89, "INR", "en_IN") == "₹12,34,567.89"
    assert format_price.__wrapped__(1_234_567.89, "EUR", "fr_FR") == "1\u202f234\u202f567,89\xa0€"


def test_no_item_twice_across_slots_and_the_category_cap_holds(client, shop):
    category = shop.catalog.set_index("item_id")["category"]
    for customer in [*_buyers(shop, 15), "nobody-1"]:
        items = _items(_slots(client, "wk48", customer, slots=8))
        assert len(items) == len(set(items)) == 8
        assert max(Counter(category[i] for i in items).values()) <= 2  # email:weekly max_per_category


def test_an_item_sold_out_before_the_open_is_replaced_in_its_slot_and_the_rest_stays(client, shop):
    customer = _buyers(shop, 1)[0]
    sent = _slots(client, "wk48", customer)
    gone = sent["slots"][1]["item_id"]
    r = client.post("/v1/catalog/items", json={"item_id": gone, "stock": 0})
    assert r.status_code == 200, r.text
    opened = _slots(client, "wk48", customer)
    assert opened["decision_id"] == sent["decision_id"]
    assert opened["slots"][1]["item_id"] != gone
    assert "replaced_unavailable" in opened["slots"][1]["reasons"]
    for k in (0, 2, 3):
        assert opened["slots"][k] == sent["slots"][k]
    items = _items(opened)
    assert len(set(items)) == len(items)
    assert _slots(client, "wk48", customer)["slots"] == opened["slots"]  # the replacement is stored too


def test_unknown_recipient_gets_in_stock_bestsellers_with_fallback_and_the_same_on_retry(client, shop):
    body = _slots(client, "wk48", "never-seen-42")
    assert body["fallback"] is True and body["fallback_reason"] == "unknown_customer"
    assert len(_items(body)) == 4
    stock = shop.catalog.set_index("item_id")["stock"]
    assert all(stock[i] > 0 for i in _items(body))
    assert _slots(client, "wk48", "never-seen-42")["slots"] == body["slots"]


def test_customer_without_personalisation_consent_gets_bestsellers(client, shop):
    customer = _buyers(shop, 1)[0]
    change = {"channels": {"personalization": False}, "source": "preference_center"}
    r = client.put(f"/v1/customers/{customer}/consent", json=change)
    assert r.status_code == 200, r.text
    body = _slots(client, "wk50", customer)
    assert body["fallback"] is True and body["fallback_reason"] == "no_personalization_consent"
    assert len(_items(body)) == 4


def test_with_redis_stopped_email_slots_are_bestsellers_with_200(tmp_path, shop_dir, registry_root, shop):
    server = EmbeddedRedis(tmp_path / "own-redis").start()
    keys = Keys("nb")
    load_shop(server.url, keys, shop_dir)
    app = create_app(_settings(registry_root, keys, breaker_reset_s=0.2), redis_url=server.url)
    customer = _buyers(shop, 1)[0]
    try:
        with TestClient(app) as c:
            assert _slots(c, "wk48", customer)["fallback"] is False
            server.stop()
            for fmt in ("json", "html", "json"):
                r = c.get(f"/v1/email/slots/wk48/{customer}", params={"format": fmt})
                assert r.status_code == 200
                if fmt == "json":
                    body = r.json()
                    assert body["fallback"] is True and body["source"] == "fallback"
                    assert body["fallback_reason"] in {"redis_unavailable", "redis_circuit_open"}
                    assert len(_items(body)) == 4
                else:
                    assert r.text.count("<td") >= 4
    finally:
        server.stop()


def test_with_redis_stopped_a_batch_gives_each_recipient_bestsellers_in_its_line(
    tmp_path, shop_dir, registry_root, shop
):
    server = EmbeddedRedis(tmp_path / "own-redis").start()
    keys = Keys("nb")
    load_shop(server.url, keys, shop_dir)
    app = create_app(_settings(registry_root, keys, breaker_reset_s=0.2), redis_url=server.url)
    customers = _buyers(shop, 20)
    try:
        with TestClient(app) as c:
            assert _slots(c, "wk49", customers[0])["fallback"] is False
            server.stop()
            lines = _batch(c, "wk49", [*customers, "bad id", "new-1"])
    finally:
        server.stop()
    assert [line["index"] for line in lines] == list(range(len(customers) + 2))
    stock = shop.catalog.set_index("item_id")["stock"]
    assert lines[20]["error"].startswith("recipients[20]") and lines[20]["content"] is None
    for line in lines[:20] + lines[21:]:
        body = line["content"]
        assert line["error"] is None and body["fallback"] is True and body["source"] == "fallback"
        assert body["fallback_reason"] in {"redis_unavailable", "redis_circuit_open"}
        items = _items(body)
        assert len(items) == 4 == len(set(items)) and all(stock[i] > 0 for i in items)
        assert all(s["click_url"] and s["title"] and s["price_formatted"] for s in body["slots"])


def test_html_format_is_a_table_with_titles_prices_and_signed_links(client, shop):
    customer = _buyers(shop, 1)[0]
    body = _slots(client, "wk48", customer)
    r = client.get(f"/v1/email/slots/wk48/{customer}", params={"format": "html"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert html.startswith("<table") and html.count("<td") == len(body["slots"])
    for s in body["slots"]:
        assert s["click_url"] in html and s["price_formatted"] in html


def test_bad_requests_get_422_naming_the_field(client):
    assert client.get("/v1/email/slots/wk48/c1", params={"placement": "nope"}).json()["detail"][0]["loc"] == [
        "query",
        "placement",
    ]
    assert client.get("/v1/email/slots/wk48/c1", params={"slots": 0}).status_code == 422
    assert client.get("/v1/email/slots/wk48/c1", params={"slots": 99}).json()["detail"][0]["loc"][-1] == "slots"
    assert client.get("/v1/email/slots/bad campaign/c1").status_code == 422


def _token(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _stream_rewards(redis_url: str, keys: Keys) -> list[dict[str, Any]]:
    entries: Any = redis.Redis.from_url(redis_url).xrange(keys.log_stream)
    docs = [orjson.loads(fields[b"e"]) for _, fields in entries]
    return [d for d in docs if d.get("kind") == "reward"]


def test_a_signed_click_is_recorded_once_and_redirects_with_utm(client, shop, redis_url, keys):
    customer = _buyers(shop, 1)[0]
    body = _slots(client, "wk48", customer)
    slot = body["slots"][0]
    r = client.get(f"/v1/email/click/{_token(slot['click_url'])}", follow_redirects=False)
    assert r.status_code == 302
    target = urlsplit(r.headers["location"])
    query = parse_qs(target.query)
    assert query["utm_campaign"] == ["wk48"] and query["utm_content"] == ["slot1"]
    assert query["utm_medium"] == ["email"]
    item_url = shop.catalog.set_index("item_id").loc[slot["item_id"], "url"]
    assert r.headers["location"].startswith(item_url)
    rewards = [w for w in _stream_rewards(redis_url, keys) if w["decision_id"] == body["decision_id"]]
    assert [(w["action"], w["reward_type"]) for w in rewards] == [(slot["item_id"], "click")]
    client.get(f"/v1/email/click/{_token(slot['click_url'])}", follow_redirects=False)  # a second click
    assert len([w for w in _stream_rewards(redis_url, keys) if w["decision_id"] == body["decision_id"]]) == 1


def test_tampered_or_expired_links_get_403_and_record_nothing(client, shop, redis_url, keys):
    customer = _buyers(shop, 1)[0]
    body = _slots(client, "wk48", customer)
    token = _token(body["slots"][0]["click_url"])
    kid, payload, sig = token.split(".")
    signer = ClickSigner.from_setting(KEYS_SETTING)
    real = signer.verify(token)
    forged_payload = signer.sign(ClickToken(real.decision_id, "wk48", 2, "product", "other-item", real.expires_at))
    tampered = [
        f"{kid}.{forged_payload.split('.')[1]}.{sig}",  # another slot's payload under this signature
        f"{kid}.{payload}.{sig[:-2]}{'AB' if sig[-2:] != 'AB' else 'CD'}",  # always a different signature
        f"k9.{payload}.{sig}",
        "garbage",
    ]
    expired = signer.sign(ClickToken(real.decision_id, "wk48", 1, "product", real.target, int(time.time()) - 1))
    before = len(_stream_rewards(redis_url, keys))
    for bad in [*tampered, expired]:
        r = client.get(f"/v1/email/click/{bad}", follow_redirects=False)
        assert r.status_code == 403, bad
        assert "invalid link" in r.json()["detail"]
    assert len(_stream_rewards(redis_url, keys)) == before


def test_signing_keys_rotate_with_two_active_keys():
    old = ClickSigner.from_setting("k1:first-secret-0123456789")
    token = old.sign(ClickToken("01JDAB4ZK3W8T5N6QXR2C7M9EF", "wk48", 1, "product", "i1", int(time.time()) + 60))
    rotated = ClickSigner.from_setting("k2:second-secret-0123456789,k1:first-secret-0123456789")
    assert rotated.verify(token).target == "i1"  # old links keep working during the rotation
    assert rotated.sign(rotated.verify(token)).startswith("k2.")  # new links use the new key
    with pytest.raises(InvalidTokenError, match="not active"):
        ClickSigner.from_setting("k2:second-secret-0123456789").verify(token)


@pytest.mark.parametrize("secret", ["s" * 16, "k" * 64, "long-" * 40])  # shorter, equal, longer than a block
def test_a_link_signature_is_hmac_sha256_of_key_id_and_payload(secret):
    signer = ClickSigner.from_setting(f"k9:{secret}")
    token = signer.sign(ClickToken("01JDAB4ZK3W8T5N6QXR2C7M9EF", "wk48", 3, "offer", "deal", 1_900_000_000))
    kid, payload, signature = token.split(".")
    mac = hmac.new(secret.encode(), f"{kid}.{payload}".encode(), hashlib.sha256).digest()[:16]
    assert signature == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert signer.verify(token, now=1_800_000_000) == ClickToken(
        "01JDAB4ZK3W8T5N6QXR2C7M9EF", "wk48", 3, "offer", "deal", 1_900_000_000
    )


def test_signing_keys_setting_errors_name_the_entry():
    twice = "k1:aaaaaaaaaaaaaaaa,k1:bbbbbbbbbbbbbbbb"
    cases = [("nocolon", r"entry 1"), ("k1:short", r"entry 1 \(k1\)"), (twice, "twice")]
    for bad, words in cases:
        with pytest.raises(ValueError, match=words):
            ClickSigner.from_setting(bad)


def test_concurrent_first_calls_on_two_servers_store_one_content(
    redis_url, keys, shop_dir, trained, tmp_path, shop, monkeypatch
):
    monkeypatch.setenv("NEXTBEST_REDIS_TIMEOUT_MS", "2000")  # a slow CI machine must not turn this into fallbacks
    load_shop(redis_url, keys, shop_dir)
    # Replicas behind one balancer share its public address, so click links agree whichever answered.
    started = [
        _serve(redis_url, keys, trained.registry.root, tmp_path / f"var{n}", workers=1, public_url=BALANCER)
        for n in range(2)
    ]
    customers = _buyers(shop, 10)
    try:
        bases = [base for _, base in started]

        def call(job: tuple[str, str]) -> dict[str, Any]:
            base, customer = job
            with httpx.Client(base_url=base, timeout=10) as c:
                return _slots(c, "race", customer)

        jobs = [(bases[n % 2], c) for c in customers for n in range(8)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, jobs))
        by_customer: dict[str, set[str]] = {}
        for (_, customer), body in zip(jobs, answers, strict=True):
            by_customer.setdefault(customer, set()).add(orjson.dumps(body["slots"]).decode())
        assert all(len(v) == 1 for v in by_customer.values()), [v for v in by_customer.values() if len(v) > 1][:1]
        decided = Counter(body["source"] for body in answers)
        assert decided["decided"] >= len(customers)  # exactly one per customer logged its decision...
        entries: Any = redis.Redis.from_url(redis_url).xrange(keys.log_stream)
        logged = [orjson.loads(f[b"e"]) for _, f in entries]
        email_decisions = [d for d in logged if d.get("placement") == "email:weekly" and d.get("kind") == "decision"]
        ids = {body["decision_id"] for body in answers}
        assert len(ids) == len(customers)
        assert {d["decision_id"] for d in email_decisions} == ids  # ...and the losers logged nothing
    finally:
        for proc, _ in started:
            _stop(proc)


def _batch(client: TestClient, campaign: str, recipients: list[Any], **kw: Any) -> list[dict[str, Any]]:
    r = client.post("/v1/email/slots:batch", json={"campaign_id": campaign, "recipients": recipients, **kw})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [orjson.loads(line) for line in r.content.splitlines()]


def test_batch_lines_equal_the_single_calls_and_a_bad_entry_is_reported_in_its_line(client, shop):
    customers = _buyers(shop, 30)
    recipients: list[Any] = [*customers[:10], {"customer_id": customers[10]}, "bad id", 7, *customers[11:], "new-1"]
    lines = _batch(client, "pre", recipients)
    assert [line["index"] for line in lines] == list(range(len(recipients)))
    assert lines[11]["error"].startswith("recipients[11]") and lines[12]["error"].startswith("recipients[12]")
    assert lines[11]["content"] is None
    for line in lines:
        if line["error"] is None:
            single = _slots(client, "pre", line["customer_id"])
            assert single["source"] == "stored"
            assert single["decision_id"] == line["content"]["decision_id"]
            assert single["slots"] == line["content"]["slots"]
    # Calling the batch again reads back what it stored.
    again = _batch(client, "pre", customers[:5])
    assert all(line["content"]["source"] == "stored" for line in again)


def test_a_batch_of_several_chunks_keeps_recipient_order_and_stores_one_content_per_recipient(client, shop):
    """Chunks are decided while earlier ones wait on Redis: lines stay in order, and a recipient listed in
    two chunks in flight at once still gets one stored content (the same on both lines and on a later call)."""
    from api.email_batch import BATCH_CHUNK

    customers = _buyers(shop, 40)
    recipients = [customers[k % len(customers)] if k % 7 else f"new-{k}" for k in range(2 * BATCH_CHUNK + 50)]
    lines = _batch(client, "chunks", recipients)
    assert [line["index"] for line in lines] == list(range(len(recipients)))
    assert [line["customer_id"] for line in lines] == recipients
    by_customer: dict[str, set[bytes]] = {}
    for line in lines:
        assert line["error"] is None and line["content"]["slots"]
        by_customer.setdefault(line["customer_id"], set()).add(orjson.dumps(line["content"]["slots"]))
    assert all(len(v) == 1 for v in by_customer.values())
    for customer in customers[:5]:
        single = _slots(client, "chunks", customer)
        assert single["source"] == "stored" and {orjson.dumps(single["slots"])} == by_customer[customer]


def test_a_batch_decides_here_the_chunks_of_a_peer_that_is_gone_or_answers_garbage(
    redis_url, keys, shop_dir, registry_root, shop
):
    """A worker shares batch chunks with the sockets of its peers: a socket left by a dead worker refuses the
    connection, a broken one answers nonsense; either way their chunks are decided here, nothing is lost,
    and every line is what a single call reads back."""
    from api import metrics
    from api.email_batch import BATCH_CHUNK

    load_shop(redis_url, keys, shop_dir)
    peers = Path(tempfile.mkdtemp(prefix="nb-peers-"))  # short: a socket path has a ~100-byte limit
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(peers / "1.sock"))
    dead.close()  # the file stays, nobody listens: connection refused
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.bind(str(peers / "2.sock"))
    garbage.listen(8)

    def answer_nonsense() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = garbage.accept()
                conn.sendall(b"\x00\x00\x00\x03+no")  # a frame whose lines are not JSON lines of ours
                conn.close()

    threading.Thread(target=answer_nonsense, daemon=True).start()
    failed = metrics.EMAIL_BATCH_CHUNKS.labels("local_after_peer_failed")
    before = failed._value.get()
    customers = _buyers(shop, 30)
    recipients = [customers[k % len(customers)] for k in range(3 * BATCH_CHUNK)]
    try:
        settings = _settings(registry_root, keys, peers_dir=peers)
        with TestClient(create_app(settings, redis_url=redis_url)) as c:
            assert sorted(p.name for p in peers.iterdir()) == sorted(["1.sock", "2.sock", f"{os.getpid()}.sock"])
            assert c.get("/readyz").json()["batch_peers"] == 2
            lines = _batch(c, "peers-gone", recipients)
            # The dead worker's socket is removed (nobody listened on it); the broken one is only left out.
            assert sorted(p.name for p in peers.iterdir()) == sorted(["2.sock", f"{os.getpid()}.sock"])
            for line in lines[:: BATCH_CHUNK // 4]:
                single = _slots(c, "peers-gone", line["customer_id"])
                assert single["source"] == "stored" and single["slots"] == line["content"]["slots"]
        assert not (peers / f"{os.getpid()}.sock").exists()  # a worker removes its socket when it stops
    finally:
        garbage.close()
        shutil.rmtree(peers, ignore_errors=True)
    assert [line["index"] for line in lines] == list(range(len(recipients)))
    assert all(line["error"] is None and line["content"]["slots"] for line in lines)
    # Chunks 1 and 2 went to the two peers, which both failed; chunk 0 was decided here from the start.
    assert failed._value.get() - before == 2


def test_batch_chunks_go_to_whichever_worker_finishes_first_and_lines_stay_in_order(tmp_path, monkeypatch):
    """The scheduler alone (a chunk's work is a timed stand-in: what it checks is where chunks go and when):
    a worker that finishes sooner takes more chunks, no worker ever has more than its places, finished
    chunks wait for the ones before them only in memory (within the lookahead), and a peer that failed gets
    no further chunk of the batch."""
    import types

    import api.email_batch as eb
    from api.peers import ChunkJob, Peers

    for name in ("fast.sock", "slow.sock", "broken.sock"):
        (tmp_path / name).touch()  # others() lists the directory's sockets
    peers = Peers(tmp_path, handler=lambda job: asyncio.sleep(0, b""))
    runtime = types.SimpleNamespace(peers=peers)
    seconds = {None: 0.004, "fast.sock": 0.004, "slow.sock": 0.05, "broken.sock": 0.004}
    where_decided: dict[int, str] = {}
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    ahead = [0]
    sent = [0]

    async def work(where: str, job: ChunkJob) -> bytes:
        running[where] += 1
        most[where] = max(most[where], running[where])
        ahead[0] = max(ahead[0], job.start // eb.BATCH_CHUNK - sent[0])
        await asyncio.sleep(seconds[None if where == "here" else where])
        running[where] -= 1
        where_decided[job.start // eb.BATCH_CHUNK] = where
        return b"".join(b'{"index":%d}\n' % k for k in range(job.start, job.start + len(job.recipients)))

    given: Counter[str] = Counter()

    async def on_peer(rt: Any, peer: Path, job: ChunkJob) -> bytes:
        given[peer.name] += 1
        if peer.name == "broken.sock":
            peers.forget(peer)  # what a failed peer's chunk does, before it is decided here
            return await work("here", job)
        return await work(peer.name, job)

    async def local(rt: Any, job: ChunkJob) -> bytes:
        return await work("here", job)

    monkeypatch.setattr(eb, "_on_peer", on_peer)
    monkeypatch.setattr(eb, "_local", local)
    recipients = [f"c{k}" for k in range(60 * eb.BATCH_CHUNK)]

    async def main() -> list[int]:
        out = []
        async for lines in eb.batch_lines(runtime, "camp", "email:weekly", 4, recipients):  # type: ignore[arg-type]
            out += [orjson.loads(line)["index"] for line in lines.splitlines()]
            sent[0] += 1
        return out

    assert asyncio.run(main()) == list(range(len(recipients)))
    counts = Counter(where_decided.values())
    assert sum(counts.values()) == 60
    # The broken peer was given the chunks of its first places only (then decided here, as a failed peer's are).
    assert given["broken.sock"] == eb.CHUNKS_IN_FLIGHT
    assert counts["fast.sock"] > 3 * counts["slow.sock"]  # round-robin would give both the same share
    assert max(most.values()) <= 2 * eb.CHUNKS_IN_FLIGHT  # here: its own places and the broken peer's
    assert most["fast.sock"] <= eb.CHUNKS_IN_FLIGHT and most["slow.sock"] <= eb.CHUNKS_IN_FLIGHT
    assert ahead[0] < eb.LOOKAHEAD * 4


def test_a_batch_chunk_hands_the_event_loop_back_while_it_decides(client, shop, monkeypatch):
    """A chunk's decisions are CPU work: the worker's other requests, and the Redis replies of the chunk
    before, get the loop between groups of recipients decided together (a chunk holding it for its whole
    decision made those replies late enough to time out and turn recipients into fallbacks)."""
    from api.email import DECIDE_TOGETHER, SlotsRequest

    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    reqs = [SlotsRequest("yield", c, "email:weekly", 4) for c in _buyers(shop, 3 * DECIDE_TOGETHER + 5)]
    ticks = [0]
    seen: list[tuple[int, int]] = []  # (loop ticks so far, recipients in the group)
    decide = runtime.email._recommend

    def observed(state: Any, group: list[Any], reads: list[Any]) -> Any:
        seen.append((ticks[0], len(group)))
        return decide(state, group, reads)

    monkeypatch.setattr(runtime.email, "_recommend", observed)

    async def run() -> Any:
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            return await runtime.email.slots_many(reqs)
        finally:
            done.set()
            await task

    answers = client.portal.call(run)  # type: ignore[union-attr]
    assert [a.source for a in answers] == ["decided"] * len(reqs)
    assert [n for _, n in seen] == [DECIDE_TOGETHER] * 3 + [5]
    assert all(later > earlier for (earlier, _), (later, _) in itertools.pairwise(seen)), seen


def test_a_worker_busy_when_its_first_batch_arrives_still_stores_and_logs_every_decision(
    redis_url, keys, shop_dir, registry_root, shop
):
    """The production budget (20 ms a round trip) on a loop that is blocked longer than that as the first
    chunk goes out: connections are opened at start, so no connect races the busy loop (it lost, and the
    chunk's decisions went unlogged, when the log's connection was first opened by the batch)."""
    from api.email import SlotsRequest

    load_shop(redis_url, keys, shop_dir)
    settings = _settings(registry_root, keys, redis_timeout_ms=20.0)
    with TestClient(create_app(settings, redis_url=redis_url), backend_options={"use_uvloop": True}) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        reqs = [SlotsRequest("busy", c, "email:weekly", 4) for c in _buyers(shop, 40)]

        async def run() -> Any:
            done = asyncio.Event()

            async def other_chunk() -> None:  # CPU work holding the loop 30 ms at a time, as a chunk's groups do
                while not done.is_set():
                    time.sleep(0.03)
                    await asyncio.sleep(0)

            hog = asyncio.create_task(other_chunk())
            try:
                answers = await runtime.email.slots_many(reqs)
                await runtime.log_writes_checked()
            finally:
                done.set()
                await hog
            return answers

        answers = client.portal.call(run)  # type: ignore[union-attr]
    assert [a.source for a in answers] == ["decided"] * len(reqs)
    entries: Any = redis.Redis.from_url(redis_url).xrange(keys.log_stream)
    logged = {orjson.loads(f[b"e"]).get("decision_id") for _, f in entries}
    assert {a.content.decision_id for a in answers} <= logged


def test_a_bad_batch_body_is_422_and_stores_nothing(client, redis_url, keys):
    r = client.post("/v1/email/slots:batch", json={"campaign_id": "x y", "recipients": ["c1"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "campaign_id"]
    r = client.post("/v1/email/slots:batch", json={"campaign_id": "ok", "recipients": ["c1"], "placement": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "placement"]
    assert not redis.Redis.from_url(redis_url).keys(f"{keys.prefix}:*:email:*")


@pytest.fixture
def offer_client(redis_url, keys, shop_dir, registry_root, tmp_path) -> Iterator[TestClient]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(OFFER_RULES, encoding="utf-8")
    load_shop(redis_url, keys, shop_dir)
    with TestClient(create_app(_settings(registry_root, keys, rules_file=rules), redis_url=redis_url)) as c:
        yield c


def test_offer_slots_follow_the_email_channel_cap_and_consent(offer_client, shop, redis_url, keys):
    customers = shop.customers.set_index("customer_id")
    buyers = _buyers(shop, 100)
    consenting = next(c for c in buyers if bool(customers.loc[c, "consent_email"]))
    refusing = next(c for c in buyers if not bool(customers.loc[c, "consent_email"]))
    first = _slots(offer_client, "a", consenting)
    offers = [s for s in first["slots"] if s["type"] == "offer"]
    assert [o["offer_id"] for o in offers] == ["weekly_deal"] and offers[0]["title"] == "10 % off this week"
    # Channel cap 1 per 7 days on email: the next campaign has no offer slot; the first keeps its own.
    assert not [s for s in _slots(offer_client, "b", consenting)["slots"] if s["type"] == "offer"]
    assert _slots(offer_client, "a", consenting)["slots"] == first["slots"]
    assert not [s for s in _slots(offer_client, "a", refusing)["slots"] if s["type"] == "offer"]
    # A click on the offer slot lands on the offer's page and rewards the offers' decision.
    r = offer_client.get(f"/v1/email/click/{_token(offers[0]['click_url'])}", follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"].startswith("https://shop.example.com/deals?")
    rewards = _stream_rewards(redis_url, keys)
    assert any(w["action"] == "weekly_deal" for w in rewards)


def test_a_batch_names_each_offers_decision_and_marks_each_reservation_with_its_random_half(
    offer_client, shop, redis_url, keys
):
    customers = shop.customers.set_index("customer_id")
    consenting = [c for c in _buyers(shop, 200) if bool(customers.loc[c, "consent_email"])][:20]
    lines = _batch(offer_client, "n1", consenting)
    signer = ClickSigner.from_setting(KEYS_SETTING)
    offer_ids = {}
    for line in lines:
        (offer,) = [s for s in line["content"]["slots"] if s["type"] == "offer"]
        offer_ids[line["customer_id"]] = signer.verify(_token(offer["click_url"])).decision_id
    # One decision id per recipient's offers, not the products' one, and every one different.
    assert len(set(offer_ids.values())) == len(consenting)
    assert not set(offer_ids.values()) & {line["content"]["decision_id"] for line in lines}
    # Each impression the reservation recorded is '<ms>:<the decision id's random 80 bits>:<offer>'.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for customer, decision_id in offer_ids.items():
        (member,) = client.zrange(keys.caps(customer, "channel:email"), 0, -1)
        ms, nonce, offer = str(member).split(":")
        assert (nonce, offer) == (decision_id[-16:], "weekly_deal") and ms.isdigit()


def test_a_batch_reserves_with_the_caps_of_the_rules_in_force_after_an_edit(
    redis_url, keys, shop_dir, registry_root, shop, tmp_path
):
    """A batch spells a candidate list's cap arguments out once and keeps them; an edit of the rules (here the
    email channel cap from 1 to 2 a week) must reach the next batch without a restart."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(OFFER_RULES, encoding="utf-8")
    load_shop(redis_url, keys, shop_dir)
    customers = shop.customers.set_index("customer_id")
    consenting = [c for c in _buyers(shop, 200) if bool(customers.loc[c, "consent_email"])][:10]

    def offered(c: TestClient, campaign: str) -> int:
        lines = _batch(c, campaign, consenting)
        return sum(s["type"] == "offer" for line in lines for s in line["content"]["slots"])

    with TestClient(create_app(_settings(registry_root, keys, rules_file=rules), redis_url=redis_url)) as c:
        assert offered(c, "w1") == len(consenting)
        assert offered(c, "w2") == 0  # one email offer a week
        rules.write_text(OFFER_RULES.replace("limit: 1, window: 7d", "limit: 2, window: 7d"), encoding="utf-8")
        deadline = time.monotonic() + 5
        while c.app.state.runtime.rules.offers["weekly_deal"].caps[0].limit != 2:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the edited rules were not loaded"
            time.sleep(0.05)
        assert offered(c, "w3") == len(consenting)  # the second of the week
        assert offered(c, "w4") == 0


def test_erasure_deletes_stored_email_content(client, shop, redis_url, keys):
    customer = _buyers(shop, 1)[0]
    _slots(client, "wk48", customer)
    _slots(client, "wk49", customer)
    r = client.delete(f"/v1/customers/{customer}")
    assert r.status_code == 200 and "email_content" in r.json()["erased"]
    assert not redis.Redis.from_url(redis_url).keys(f"{keys.prefix}:{{c:{customer}}}:*")
