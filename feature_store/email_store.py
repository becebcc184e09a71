"""Stored email content per (campaign, customer): first writer wins, read-backs are one round trip.

The content key and the customer's campaign index share the customer's hash tag (one Cluster slot),
so each script below touches one slot. `STORE_FIRST` is the atomic "decide once": of two concurrent
first calls the one that arrives second gets the first one's content back and stores nothing.
`REPLACE_IF_SAME` swaps in a refreshed content (an item replaced at open time) only if the stored one
is still what the caller read, keeping the TTL, so two concurrent opens cannot disagree either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.fastinit import fast_init
from engine.types import Profile
from feature_store.caps import RESERVE_FUNCTION, Reservation, reservation_of
from feature_store.keys import Keys
from feature_store.resp import Arg, RedisClient, RespConnectionError, RespError, Script
from feature_store.store import StoreUnavailableError, country_from_json, profile_from_json

# KEYS: content, campaign index. ARGV: content, ttl_s, campaign id.
# Returns the stored content if there was one (and stores nothing), else nil after storing ARGV[1].
STORE_FIRST = Script(r"""
local current = redis.call('GET', KEYS[1])
if current then return current end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return false
""")

# The same with the offers' caps reserved in the same run (one round trip for a first call with offers).
# KEYS: content, campaign index, then the reservation's keys. ARGV: content, ttl_s, campaign id, then the
# reservation's arguments (feature_store.caps.RESERVE_FUNCTION). With reservation keys, ARGV[1] is a
# content awaiting its offers (engine.email.EmailContent.with_pending_offers): the granted offer ids are
# appended, one per line. Returns {stored content} if there was one (nothing reserved, nothing stored),
# else {false, granted, refused} after storing.
STORE_FIRST_RESERVING = Script(
    RESERVE_FUNCTION
    + r"""
local current = redis.call('GET', KEYS[1])
if current then return {current} end
local ttl = tonumber(ARGV[2])
local content, granted, refused = ARGV[1], {}, {}
if #KEYS > 2 then
  local r = reserve({unpack(KEYS, 3)}, {unpack(ARGV, 4)})
  granted, refused = r[1], r[2]
  content = content .. table.concat(granted, '\n')
end
redis.call('SET', KEYS[1], content, 'EX', ttl)
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return {false, granted, refused}
"""
)

# KEYS: content. ARGV: expected current content, new content.
# Returns the content now stored: the new one if the expected one was still there, else the current.
REPLACE_IF_SAME = Script(r"""
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return ARGV[2]
""")


@fast_init
@dataclass(frozen=True, slots=True)
class EmailRead:
    """What one round trip brings for an email call."""

    profile_raw: bytes | None
    catalog_version: int | None
    stored: bytes | None


def _store_call(keys: Keys, customer_id: str, campaign_id: str, content: bytes, ttl_s: int) -> tuple[Arg, ...]:
    return (
        2,
        keys.email_content(customer_id, campaign_id),
        keys.email_campaigns(customer_id),
        content,
        ttl_s,
        campaign_id,
    )


class EmailStore:
    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def read_many(self, customer_ids: Sequence[str], campaign_id: str) -> list[EmailRead]:
        """Profile, catalog version and stored content of each recipient, in one round trip: one MGET per
        recipient (profile and content share the customer's hash tag, so one Cluster slot)."""
        k = self.keys
        commands: list[tuple[Arg, ...]] = [("GET", k.catalog_version)]
        commands += [("MGET", k.profile(cid), k.email_content(cid, campaign_id)) for cid in customer_ids]
        replies = await self._pipeline("email batch read", commands)
        version = int(replies[0]) if replies[0] is not None else None
        return [EmailRead(profile, version, stored) for profile, stored in replies[1:]]

    async def store_first_many(self, items: Sequence[tuple[str, str, bytes, int]]) -> list[bytes | None]:
        """Store each (customer, campaign, content, ttl) unless content is there, in one round trip; per item
        the content already stored (which wins), else None."""
        if not items:
            return []
        calls = [_store_call(self.keys, cid, campaign, content, ttl) for cid, campaign, content, ttl in items]
        replies = await self._scripts("email batch store", STORE_FIRST, calls)
        return [r if isinstance(r, bytes) else None for r in replies]

    async def store_first_reserving_many(
        self, items: Sequence[tuple[str, str, bytes, int, tuple[list[Arg], list[Arg]] | None]]
    ) -> list[tuple[bytes | None, Reservation | None]]:
        """Per (customer, campaign, content, ttl, reservation keys and args or None), in one round trip: the
        content already stored (which wins: nothing reserved), else (None, the reservation made while storing;
        None without one). A content with a reservation is one of `EmailContent.with_pending_offers`."""
        if not items:
            return []
        calls = []
        for cid, campaign, content, ttl, reservation in items:
            rkeys, rargs = reservation if reservation is not None else ([], [])
            keys = [self.keys.email_content(cid, campaign), self.keys.email_campaigns(cid), *rkeys]
            calls.append((len(keys), *keys, content, ttl, campaign, *rargs))
        replies = await self._scripts("email store", STORE_FIRST_RESERVING, calls)
        out: list[tuple[bytes | None, Reservation | None]] = []
        for reply, item in zip(replies, items, strict=True):
            if reply[0] is not None:
                out.append((bytes(reply[0]), None))
            else:
                out.append((None, reservation_of(reply[1:]) if item[4] is not None else None))
        return out

    async def replace_if_same(self, customer_id: str, campaign_id: str, expected: bytes, new: bytes) -> bytes | None:
        (reply,) = await self._scripts(
            "email replace", REPLACE_IF_SAME, [(1, self.keys.email_content(customer_id, campaign_id), expected, new)]
        )
        return reply if isinstance(reply, bytes) else None

    async def _pipeline(self, what: str, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        try:
            return await self.client.pipeline(commands)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def _scripts(self, what: str, script: Script, calls: Sequence[Sequence[Arg]]) -> list[Any]:
        try:
            return await self.client.run_script(script, calls)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def profile_of(customer_id: str, raw: bytes | None) -> Profile | None:
    """The profile from a raw read (ProfileDecodeError if it is damaged)."""
    return profile_from_json(customer_id, raw)


def country_of(customer_id: str, raw: bytes | None) -> str | None:
    """The profile's country from a raw read, without decoding the rest (ProfileDecodeError if it is damaged)."""
    return country_from_json(customer_id, raw)
