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

from engine.types import Profile
from feature_store.keys import Keys
from feature_store.resp import Arg, RedisClient, RespConnectionError, RespError, Script
from feature_store.store import StoreUnavailableError, profile_from_json

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

# KEYS: content. ARGV: expected current content, new content.
# Returns the content now stored: the new one if the expected one was still there, else the current.
REPLACE_IF_SAME = Script(r"""
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return ARGV[2]
""")


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
        """Profile, catalog version and stored content of each recipient, in one round trip."""
        k = self.keys
        commands: list[tuple[Arg, ...]] = [("GET", k.catalog_version)]
        for cid in customer_ids:
            commands += [("GET", k.profile(cid)), ("GET", k.email_content(cid, campaign_id))]
        replies = await self._pipeline("email batch read", commands)
        version = int(replies[0]) if replies[0] is not None else None
        return [EmailRead(replies[1 + 2 * j], version, replies[2 + 2 * j]) for j in range(len(customer_ids))]

    async def store_first_many(self, items: Sequence[tuple[str, str, bytes, int]]) -> list[bytes | None]:
        """Store each (customer, campaign, content, ttl) unless content is there, in one round trip; per item
        the content already stored (which wins), else None."""
        if not items:
            return []
        calls = [_store_call(self.keys, cid, campaign, content, ttl) for cid, campaign, content, ttl in items]
        replies = await self._scripts("email batch store", STORE_FIRST, calls)
        return [r if isinstance(r, bytes) else None for r in replies]

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
