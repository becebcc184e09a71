"""Profiles and catalog in a real Redis."""

from dataclasses import replace

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.catalog import CatalogItem
from engine.types import CONSENT_CHANNELS, Profile, PurchaseSummary
from feature_store.keys import Keys
from feature_store.profiles import decode_profile, encode_profile
from feature_store.store import RedisStore

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_:", min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(
    views=st.lists(ids, max_size=20, unique=True),
    purchases=st.lists(
        st.tuples(ids, st.integers(1, 50), st.integers(19000, 21000), st.integers(0, 300)),
        max_size=30,
        unique_by=lambda t: t[0],
    ),
    consents=st.frozensets(st.sampled_from(CONSENT_CHANNELS)),
    spend=st.floats(0, 1e6, allow_nan=False),
)
def test_profile_encoding_round_trips(views, purchases, consents, spend):
    p = Profile(
        "c1",
        recent_views=tuple(views),
        purchases=tuple(PurchaseSummary(i, c, f, f + d) for i, c, f, d in purchases),
        consents=consents,
        spend=round(spend, 2),
        orders=len(purchases),
    )
    assert decode_profile("c1", encode_profile(p)) == p


def test_a_customers_keys_share_one_hash_tag():
    k = Keys("nb")
    assert k.profile("c42") == "nb:{c:c42}:profile"
    assert "{catalog}" in k.catalog_items and "{catalog}" in k.catalog_version


def test_profiles_and_catalog_round_trip_through_redis(redis_url, keys):
    store = RedisStore(redis_url, keys)
    p = Profile(
        "c9", recent_views=("i1", "i2"), purchases=(PurchaseSummary("i3", 2, 20000, 20010),), orders=2, spend=10.5
    )
    assert store.write_profiles([p]) == 1
    back = store.read_profile("c9")
    assert back is not None and back.pseudonym is not None and len(back.pseudonym) == 16
    assert replace(back, pseudonym=None) == p
    assert store.read_profile("unknown") is None
    # A reload replaces the profile but keeps the pseudonym the decision log knows the customer by.
    store.write_profiles([replace(p, orders=3)])
    again = store.read_profile("c9")
    assert again is not None and again.orders == 3 and again.pseudonym == back.pseudonym
    items = [CatalogItem("i1", "A", "x", 1.0, 0.5, 3), CatalogItem("i2", "B", "y", 2.0, 1.0, 0, active=False)]
    v1 = store.write_catalog(items)
    v2 = store.write_catalog(items[:1])
    assert v2 == v1 + 1
    version, stored = store.read_catalog()
    assert version == str(v2) and stored == items[:1]


def test_a_profile_is_a_few_hundred_bytes(redis_url, keys):
    store = RedisStore(redis_url, keys)
    p = Profile(
        "c123456",
        recent_views=tuple(f"i{n}" for n in range(1000, 1020)),
        purchases=tuple(PurchaseSummary(f"i{n}", 2, 20300, 20350) for n in range(2000, 2010)),
        category_affinity=(("groceries", 0.5), ("beauty", 0.3), ("toys", 0.2)),
        orders=12,
        spend=456.78,
    )
    store.write_profiles([p])
    used = redis.Redis.from_url(redis_url).memory_usage(keys.profile("c123456"))
    assert used is not None and used < 600
