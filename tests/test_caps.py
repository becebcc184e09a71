"""Frequency caps, suppression (real Redis, one Lua script per reservation) and persistent holdouts."""

import asyncio
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.holdout import bucket, in_holdout
from feature_store.caps import (
    SUPPRESSION_TTL_S,
    Candidate,
    Cap,
    cap_keys,
    cap_usage,
    record_positive_feedback,
    reserve,
)
from feature_store.resp import LeanRedis

T0 = 1_800_000_000_000  # ms
DAY = 86_400
HOUR = 3_600


def run(coro):
    return asyncio.run(coro)


async def _reserve(redis_url, keys, customer, candidates, limit, now_ms):
    c = LeanRedis(redis_url, 2.0)
    try:
        return await reserve(c, keys, customer, candidates, limit, now_ms)
    finally:
        await c.close()


async def _usage(redis_url, keys, customer, scope, window_s, now_ms):
    c = LeanRedis(redis_url, 2.0)
    try:
        return await cap_usage(c, keys, customer, scope, window_s, now_ms)
    finally:
        await c.close()


@pytest.fixture
def r(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _offer(offer_id, *caps, suppress_after=None):
    return Candidate(offer_id, tuple(caps), suppress_after)


# ---------------------------------------------------------------------------------------------- caps


def test_caps_hold_under_200_concurrent_requests(redis_url, keys):
    free_shipping = _offer("free_shipping", Cap("offer:free_shipping", 3, DAY))

    async def main():
        clients = [LeanRedis(redis_url, 5.0) for _ in range(4)]
        try:
            results = await asyncio.gather(
                *(reserve(clients[i % 4], keys, "c1", [free_shipping], 1, T0 + i) for i in range(200))
            )
            used = await cap_usage(clients[0], keys, "c1", "offer:free_shipping", DAY, T0 + 200)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return results, used

    results, used = run(main())
    assert sum(len(res.granted) for res in results) == 3
    assert used == 3
    refusals = [res.refused["free_shipping"] for res in results if not res.granted]
    assert refusals == ["cap offer:free_shipping 3/86400s"] * 197


def test_a_shared_class_cap_holds_under_200_concurrent_multi_offer_walks(redis_url, keys):
    marketing = Cap("class:marketing", 7, DAY)
    offers = [_offer("a", Cap("offer:a", 5, DAY), marketing), _offer("b", Cap("offer:b", 5, DAY), marketing)]

    async def main():
        clients = [LeanRedis(redis_url, 5.0) for _ in range(4)]
        try:
            results = await asyncio.gather(*(reserve(clients[i % 4], keys, "c1", offers, 2, T0) for i in range(200)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return results

    granted = [g for res in run(main()) for g in res.granted]
    assert len(granted) == 7  # the class cap binds first: (a, b) three times, then a alone
    assert granted.count("a") <= 5 and granted.count("b") <= 5


def test_impressions_older_than_the_window_stop_counting(redis_url, keys):
    offer = _offer("o", Cap("offer:o", 2, 60))
    assert run(_reserve(redis_url, keys, "c1", [offer], 1, T0)).granted == ("o",)
    assert run(_reserve(redis_url, keys, "c1", [offer], 1, T0 + 10_000)).granted == ("o",)
    late = run(_reserve(redis_url, keys, "c1", [offer], 1, T0 + 59_999))
    assert late.granted == () and late.refused == {"o": "cap offer:o 2/60s"}
    # The window is (now - 60 s, now]: at T0 + 60 s the first impression no longer counts.
    assert run(_usage(redis_url, keys, "c1", "offer:o", 60, T0 + 60_000)) == 1
    assert run(_reserve(redis_url, keys, "c1", [offer], 1, T0 + 60_000)).granted == ("o",)
    assert run(_usage(redis_url, keys, "c1", "offer:o", 60, T0 + 60_000)) == 2


def test_a_class_cap_binds_across_offers_within_one_walk(redis_url, keys):
    marketing = Cap("class:marketing", 2, DAY)
    offers = [_offer(o, Cap(f"offer:{o}", 5, DAY), marketing) for o in ("a", "b", "c")]
    res = run(_reserve(redis_url, keys, "c1", offers, 3, T0))
    assert res.granted == ("a", "b")
    assert res.refused == {"c": "cap class:marketing 2/86400s"}


def test_a_channel_cap_binds_across_offers_and_requests(redis_url, keys):
    email = Cap("channel:email", 1, DAY)
    first = run(_reserve(redis_url, keys, "c1", [_offer("a", email)], 1, T0))
    second = run(_reserve(redis_url, keys, "c1", [_offer("b", email)], 1, T0 + 1_000))
    assert first.granted == ("a",)
    assert second.granted == () and second.refused == {"b": "cap channel:email 1/86400s"}


def test_the_walk_skips_a_capped_offer_and_grants_the_next(redis_url, keys):
    a, b = _offer("a", Cap("offer:a", 1, DAY)), _offer("b", Cap("offer:b", 1, DAY))
    run(_reserve(redis_url, keys, "c1", [a], 1, T0))
    res = run(_reserve(redis_url, keys, "c1", [a, b], 1, T0 + 1))
    assert res.granted == ("b",)
    assert res.refused == {"a": "cap offer:a 1/86400s"}


def test_limit_stops_the_walk_and_records_nothing_beyond_it(redis_url, keys):
    offers = [_offer(o, Cap(f"offer:{o}", 1, DAY)) for o in ("a", "b", "c", "d")]
    res = run(_reserve(redis_url, keys, "c1", offers, 2, T0))
    assert res.granted == ("a", "b") and res.refused == {}
    usage = [run(_usage(redis_url, keys, "c1", f"offer:{o}", DAY, T0)) for o in ("a", "b", "c", "d")]
    assert usage == [1, 1, 0, 0]


def test_the_longest_known_window_of_a_scope_survives_a_call_that_knows_only_a_short_one(redis_url, keys):
    weekly = _offer("a", Cap("class:marketing", 10, 7 * DAY))
    hourly = _offer("b", Cap("class:marketing", 10, HOUR))
    run(_reserve(redis_url, keys, "c1", [weekly], 1, T0))
    run(_reserve(redis_url, keys, "c1", [hourly], 1, T0 + 2 * HOUR * 1000))  # must not trim T0's impression
    assert run(_usage(redis_url, keys, "c1", "class:marketing", 7 * DAY, T0 + 2 * HOUR * 1000)) == 2


def test_customers_do_not_share_caps(redis_url, keys):
    offer = _offer("a", Cap("offer:a", 1, DAY))
    assert run(_reserve(redis_url, keys, "c1", [offer], 1, T0)).granted == ("a",)
    assert run(_reserve(redis_url, keys, "c2", [offer], 1, T0)).granted == ("a",)


OFFERS = (
    _offer("a", Cap("offer:a", 2, 60), Cap("class:m", 3, 120)),
    _offer("b", Cap("offer:b", 1, 30), Cap("class:m", 3, 120), Cap("channel:email", 2, 90)),
    _offer("c", Cap("offer:c", 3, 60), Cap("channel:email", 2, 90)),
)


def _model_walk(history, candidates, limit, now_ms):
    """The specification, in plain Python: what a reservation grants given every earlier impression."""
    granted: list[str] = []
    for cand in candidates:
        if len(granted) == limit:
            break
        if all(sum(t > now_ms - cap.window_s * 1000 for t in history[cap.scope]) < cap.limit for cap in cand.caps):
            for scope in {cap.scope for cap in cand.caps}:
                history[scope].append(now_ms)
            granted.append(cand.offer_id)
    return tuple(granted)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 40_000), st.integers(1, 3), st.permutations(OFFERS)),
        min_size=1,
        max_size=15,
    )
)
def test_reservations_match_the_sliding_window_model(redis_url, keys, steps):
    customer = uuid.uuid4().hex

    async def main():
        c = LeanRedis(redis_url, 2.0)
        try:
            now, out = T0, []
            for gap, limit, order in steps:
                now += gap
                out.append((await reserve(c, keys, customer, order, limit, now)).granted)
            return out
        finally:
            await c.close()

    history: defaultdict[str, list[int]] = defaultdict(list)
    now, expected = T0, []
    for gap, limit, order in steps:
        now += gap
        expected.append(_model_walk(history, order, limit, now))
    assert run(main()) == expected


# --------------------------------------------------------------------------------------- suppression


def test_an_offer_is_suppressed_after_n_ignored_impressions(redis_url, keys):
    offer = _offer("winback", Cap("class:marketing", 100, DAY), suppress_after=3)
    grants = [run(_reserve(redis_url, keys, "c1", [offer], 1, T0 + i)).granted for i in range(3)]
    assert grants == [("winback",)] * 3
    res = run(_reserve(redis_url, keys, "c1", [offer], 1, T0 + 3))
    assert res.granted == () and res.refused == {"winback": "suppressed after 3 ignored"}


def test_a_suppressed_offer_is_skipped_and_the_next_granted(redis_url, keys):
    a, b = _offer("a", suppress_after=1), _offer("b", suppress_after=1)
    run(_reserve(redis_url, keys, "c1", [a], 1, T0))
    res = run(_reserve(redis_url, keys, "c1", [a, b], 1, T0 + 1))
    assert res.granted == ("b",) and res.refused == {"a": "suppressed after 1 ignored"}


def test_positive_feedback_lifts_suppression(redis_url, keys):
    offer = _offer("winback", suppress_after=2)

    async def main():
        c = LeanRedis(redis_url, 2.0)
        try:
            shown = [(await reserve(c, keys, "c1", [offer], 1, T0 + i)).granted for i in range(3)]
            await record_positive_feedback(c, keys, "c1", "winback")
            shown += [(await reserve(c, keys, "c1", [offer], 1, T0 + 10 + i)).granted for i in range(3)]
            return shown
        finally:
            await c.close()

    assert run(main()) == [("winback",), ("winback",), (), ("winback",), ("winback",), ()]


# ------------------------------------------------------------------------------------- key hygiene


def _hash_tag(key: bytes) -> str:
    m = re.search(rb"\{([^}]*)\}", key)
    assert m and m.group(1), f"{key!r} has no hash tag"
    return m.group(1).decode()


def test_every_key_the_script_creates_has_a_ttl_under_the_customer_hash_tag(redis_url, keys, r):
    offers = [
        _offer("a", Cap("offer:a", 2, HOUR), Cap("class:marketing", 5, DAY), suppress_after=4),
        _offer("b", Cap("offer:b", 2, 2 * DAY), Cap("channel:email", 3, 7 * DAY)),
    ]
    run(_reserve(redis_url, keys, "c9", offers, 2, T0))
    created = set(r.scan_iter(match=f"{keys.prefix}:*", count=1000))
    assert created
    assert {_hash_tag(k) for k in created} == {"c:c9"}
    ttls = {k.decode(): r.ttl(k) for k in created}
    expected = {
        keys.caps("c9", "offer:a"): HOUR,
        keys.caps("c9", "class:marketing"): DAY,
        keys.caps("c9", "offer:b"): 2 * DAY,
        keys.caps("c9", "channel:email"): 7 * DAY,
        keys.cap_scopes("c9"): 7 * DAY,  # outlives every cap key it lists
        keys.offer_ignored("c9"): SUPPRESSION_TTL_S,
    }
    assert set(ttls) == set(expected)
    for key, ttl in ttls.items():
        assert expected[key] - 5 <= ttl <= expected[key], key


def test_the_index_outlives_its_cap_keys_and_a_scope_keeps_what_its_longest_window_counts(redis_url, keys, r):
    """Later calls that touch only short scopes, or know a scope only by a short cap, never let the index
    expire before a cap key it lists, nor drop an impression a longer cap of the same scope still counts."""
    monthly = _offer("m", Cap("offer:m", 5, 30 * DAY), Cap("class:marketing", 9, 7 * DAY))
    hourly = _offer("h", Cap("offer:h", 5, HOUR), Cap("class:marketing", 9, HOUR))
    assert run(_reserve(redis_url, keys, "c8", [monthly], 1, T0)).granted == ("m",)
    for k in range(1, 4):  # three days later, each day: only the hourly offer
        assert run(_reserve(redis_url, keys, "c8", [hourly], 1, T0 + k * DAY * 1000)).granted == ("h",)
    index = keys.cap_scopes("c8")
    assert {f.decode(): int(w) for f, w in r.hgetall(index).items()} == {
        "offer:m": 30 * DAY,
        "class:marketing": 7 * DAY,  # the hourly calls did not shorten it
        "offer:h": HOUR,
    }
    listed = [keys.caps("c8", s) for s in ("offer:m", "class:marketing", "offer:h")]
    assert all(0 < r.ttl(key) <= r.ttl(index) for key in listed)
    assert r.ttl(index) > 30 * DAY - 5
    # The monthly impression and the three hourly ones still count within the class's week.
    assert run(_usage(redis_url, keys, "c8", "class:marketing", 7 * DAY, T0 + 3 * DAY * 1000)) == 4
    # A week later the class drops what no cap of it counts any more when it next gains an impression.
    assert run(_reserve(redis_url, keys, "c8", [hourly], 1, T0 + 9 * DAY * 1000)).granted == ("h",)
    assert r.zcard(keys.caps("c8", "class:marketing")) == 2  # day 3's and day 9's


def test_erasure_finds_every_key_the_caps_create(redis_url, keys, r):
    offers = [_offer("a", Cap("offer:a", 2, HOUR), Cap("channel:sms", 1, DAY), suppress_after=2)]
    run(_reserve(redis_url, keys, "c9", offers, 1, T0))

    async def listed():
        c = LeanRedis(redis_url, 2.0)
        try:
            return await cap_keys(c, keys, "c9")
        finally:
            await c.close()

    erasable = set(keys.customer_keys("c9").values()) | set(run(listed()))
    created = {k.decode() for k in r.scan_iter(match=f"{keys.prefix}:*", count=1000)}
    assert created <= erasable


# -------------------------------------------------------------------------------------- bad input

GOOD = _offer("good", Cap("offer:good", 1, DAY))


@pytest.mark.parametrize(
    ("candidates", "limit", "message"),
    [
        ([GOOD], 0, r"limit must be an integer >= 1, got 0"),
        ([GOOD, _offer("x", Cap("offer:x", 0, DAY))], 1, r"offer 'x': caps\[0\]\.limit must be an integer >= 1"),
        ([GOOD, _offer("x", Cap("offer:x", 1, 0))], 1, r"offer 'x': caps\[0\]\.window_s must be an integer >= 1"),
        ([GOOD, _offer("x", Cap("", 1, DAY))], 1, r"offer 'x': caps\[0\]\.scope must be non-empty"),
        ([GOOD, _offer("", Cap("offer:x", 1, DAY))], 1, r"candidates\[1\]\.offer_id must be non-empty"),
        ([GOOD, _offer("free shipping")], 1, r"candidates\[1\]\.offer_id must be .*without whitespace"),
        ([GOOD, _offer("x", suppress_after=0)], 1, r"offer 'x': suppress_after must be an integer >= 1"),
        ([GOOD, GOOD], 1, r"offer 'good': offer_id appears more than once"),
    ],
)
def test_bad_input_is_a_value_error_and_touches_nothing(redis_url, keys, r, candidates, limit, message):
    with pytest.raises(ValueError, match=message):
        run(_reserve(redis_url, keys, "c1", candidates, limit, T0))
    assert list(r.scan_iter(match=f"{keys.prefix}:*", count=1000)) == []


# ------------------------------------------------------------------------------------------ holdout

IDS = [f"c{i}" for i in range(20_000)]
customer_ids = st.text(min_size=1, max_size=30)
shares = st.floats(0.0, 1.0)


def test_the_holdout_bucket_is_the_documented_hash_in_every_process():
    assert bucket("c42", "spring-2026") == 0.276251843804732  # sha256("spring-2026:c42")[:8] / 2**64


@given(customer_ids, st.text(max_size=20), shares)
def test_holdout_assignment_is_stable_across_calls(customer_id, salt, share):
    first = in_holdout(customer_id, salt, share)
    assert all(in_holdout(customer_id, salt, share) == first for _ in range(3))
    assert first == (share == 1.0 or bucket(customer_id, salt) < share)


@given(customer_ids, st.text(max_size=20), shares, shares)
def test_a_larger_share_only_adds_customers_to_the_holdout(customer_id, salt, s1, s2):
    low, high = sorted((s1, s2))
    assert not in_holdout(customer_id, salt, low) or in_holdout(customer_id, salt, high)


@given(customer_ids, st.text(max_size=20))
def test_share_zero_holds_out_nobody_and_share_one_everybody(customer_id, salt):
    assert not in_holdout(customer_id, salt, 0.0)
    assert in_holdout(customer_id, salt, 1.0)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.floats(0.0, 1.0), st.text(max_size=20))
def test_the_held_out_fraction_matches_the_share(share, salt):
    fraction = sum(in_holdout(c, salt, share) for c in IDS) / len(IDS)
    assert abs(fraction - share) <= 0.015


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.text(max_size=20), st.text(max_size=20))
def test_different_salts_assign_independently(salt_a, salt_b):
    assume(salt_a != salt_b)
    both = sum(in_holdout(c, salt_a, 0.5) and in_holdout(c, salt_b, 0.5) for c in IDS) / len(IDS)
    assert abs(both - 0.25) <= 0.015


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_zero_to_one_is_a_value_error(share):
    with pytest.raises(ValueError, match="holdout share"):
        in_holdout("c1", "s", share)


def test_erasure_deletes_the_cap_keys_too(redis_url, keys):
    run(_erase_after_a_reservation(redis_url, keys))


async def _erase_after_a_reservation(redis_url, keys):  # type: ignore[no-untyped-def]
    from feature_store.erasure import erase_customer

    client = LeanRedis(redis_url, timeout_s=2.0)
    try:
        offer = Candidate("o1", (Cap("offer:o1", 3, 3600), Cap("channel:web", 5, 86400)), suppress_after=4)
        granted = await reserve(client, keys, "c-erase", [offer], 1, 1_000_000)
        assert granted.granted == ("o1",)
        erased = await erase_customer(client, keys, "c-erase")
        assert set(erased) == {"cap_scopes", "offer_ignored", "caps"}
        raw = redis.Redis.from_url(redis_url)
        assert [k for k in raw.scan_iter(match=f"{keys.prefix}:*", count=1000) if b"{c:c-erase}" in k] == []
    finally:
        await client.close()
