"""Storing a first call's email content and reserving its offers' caps in one script run (real Redis)."""

import asyncio
import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.email import ContentDecodeError, EmailContent, EmailSlot, with_offers
from feature_store.caps import Candidate, Cap, cap_usage, reservation_keys_args
from feature_store.email_store import EmailStore
from feature_store.keys import Keys
from feature_store.resp import LeanRedis

T0 = 1_800_000_000_000  # ms
DAY = 86_400
TTL = 30 * DAY
DEAL = Candidate("weekly_deal", (Cap("channel:email", 1, 7 * DAY),))
VIP = Candidate("vip", (Cap("offer:vip", 5, DAY),))


def _products(campaign: str = "wk1") -> EmailContent:
    slots = tuple(EmailSlot(k, "product", f"i{k}", ("als",), 0.5, 0.25 * k) for k in range(1, 5))
    return EmailContent(campaign, "D1", "email:weekly", slots, T0, "v1", None, 0, "O1")


def _pending(offers: list[tuple[str, str]]) -> bytes:
    return _products().with_pending_offers(offers)


async def _store(url: str, keys: Keys, items: list[Any], clients: int = 1) -> list[Any]:
    """Each item stored by its own call (concurrently, over `clients` connections)."""
    conns = [LeanRedis(url, 5.0) for _ in range(clients)]
    try:
        stores = [EmailStore(conns[k % clients], keys) for k in range(len(items))]
        calls = [store.store_first_reserving_many([item]) for store, item in zip(stores, items, strict=True)]
        return [reply for (reply,) in await asyncio.gather(*calls)]
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def _usage(url: str, keys: Keys, customer: str, scope: str) -> int:
    c = LeanRedis(url, 2.0)
    try:
        return await cap_usage(c, keys, customer, scope, 7 * DAY, T0 + 1)
    finally:
        await c.close()


def _item(keys: Keys, customer: str, campaign: str, candidates: list[Candidate], limit: int = 1) -> Any:
    call = reservation_keys_args(keys, customer, candidates, limit, T0)
    return (customer, campaign, _pending([(c.offer_id, "marketing") for c in candidates]), TTL, call)


def test_a_first_store_reserves_the_offer_and_the_stored_content_reads_back_with_it(redis_url, keys):
    ((other, reservation),) = asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk1", [DEAL])]))
    assert other is None and reservation is not None and reservation.granted == ("weekly_deal",)
    stored = asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk1", [DEAL])]))[0][0]
    content = EmailContent.from_bytes(stored)
    assert [s.item_id for s in content.products] == ["i1", "i2", "i3", "i4"]
    assert [(s.position, s.kind, s.item_id, s.reasons) for s in content.slots[4:]] == [
        (5, "offer", "weekly_deal", ("marketing",))
    ]
    assert content.offers_decision_id == "O1"
    assert asyncio.run(_usage(redis_url, keys, "c1", "channel:email")) == 1


def test_concurrent_first_calls_store_one_content_and_reserve_the_cap_once(redis_url, keys):
    """The lost races find the stored content and reserve nothing: a cap counts only what was sent."""
    generous = Candidate("weekly_deal", (Cap("channel:email", 100, 7 * DAY),))
    items = [_item(keys, "c1", "race", [generous]) for _ in range(50)]
    replies = asyncio.run(_store(redis_url, keys, items, clients=4))
    winners = [r for r in replies if r[0] is None]
    assert len(winners) == 1 and winners[0][1] is not None and winners[0][1].granted == ("weekly_deal",)
    assert len({r[0] for r in replies if r[0] is not None}) == 1  # every loser read the same content
    assert asyncio.run(_usage(redis_url, keys, "c1", "channel:email")) == 1


def test_a_capped_offer_is_left_out_of_the_stored_content(redis_url, keys):
    asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk1", [DEAL])]))
    ((other, reservation),) = asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk2", [DEAL])]))
    assert other is None and reservation is not None
    assert reservation.granted == () and reservation.refused == {"weekly_deal": "cap channel:email 1/604800s"}
    stored = asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk2", [DEAL])]))[0][0]
    content = EmailContent.from_bytes(stored)
    assert [s.kind for s in content.slots] == ["product"] * 4 and content.offers_decision_id is None


def test_the_walk_grants_the_next_offer_when_the_first_is_capped(redis_url, keys):
    asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk1", [DEAL])]))
    asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk2", [DEAL, VIP])]))
    content = EmailContent.from_bytes(asyncio.run(_store(redis_url, keys, [_item(keys, "c1", "wk2", [DEAL])]))[0][0])
    assert [s.item_id for s in content.slots if s.kind == "offer"] == ["vip"]


def test_content_without_offers_is_stored_as_it_is(redis_url, keys):
    plain = _products().to_bytes()
    ((other, reservation),) = asyncio.run(_store(redis_url, keys, [("c1", "wk1", plain, TTL, None)]))
    assert other is None and reservation is None
    assert asyncio.run(_store(redis_url, keys, [("c1", "wk1", b"other", TTL, None)]))[0][0] == plain


@given(
    st.lists(st.sampled_from(["weekly_deal", "vip", "free_shipping", "winback_15"]), unique=True, max_size=4),
    st.data(),
)
def test_pending_content_with_granted_offers_decodes_as_the_complete_content(offers, data):
    granted = data.draw(st.lists(st.sampled_from(offers), unique=True) if offers else st.just([]))
    granted.sort(key=offers.index)  # the script grants in candidate order
    classes = [(o, "service" if o == "vip" else "marketing") for o in offers]
    raw = _pending(classes) + b"\n".join(g.encode() for g in granted)
    content = EmailContent.from_bytes(raw)
    expected = [
        EmailSlot(5 + k, "offer", o, ("service" if o == "vip" else "marketing",)) for k, o in enumerate(granted)
    ]
    assert list(content.slots[4:]) == expected
    assert content.offers_decision_id == ("O1" if granted else None)
    assert EmailContent.from_bytes(content.to_bytes()) == content


@pytest.mark.parametrize(
    "raw",
    [_products().to_bytes() + b"\nweekly_deal", _pending([("vip", "service")]) + b"unknown", b"{}\n", b"\xff\n"],
)
def test_damaged_content_is_a_decode_error(raw):
    with pytest.raises(ContentDecodeError):
        EmailContent.from_bytes(raw)


def test_offer_slots_added_keep_every_other_field_of_the_content():
    # with_offers builds the content field by field: a field it forgot would be lost from every stored email.
    values = {f.name: getattr(_products(), f.name) for f in dataclasses.fields(EmailContent)}
    values |= {"model_version": "v7", "fallback_reason": "unknown_customer", "replaced": 2}
    content = EmailContent(**values)
    added = with_offers(content, [("vip", "service")], "O9")
    for f in dataclasses.fields(EmailContent):
        if f.name not in ("slots", "offers_decision_id"):
            assert getattr(added, f.name) == getattr(content, f.name), f.name
    assert added.slots == (*content.slots, EmailSlot(5, "offer", "vip", ("service",)))
    assert added.offers_decision_id == "O9"
    assert with_offers(content, [], "O9").offers_decision_id is None  # no offer slot, no offers' decision id
