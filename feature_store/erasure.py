"""Erasure of one customer (right to be forgotten): every key under the customer's hash tag, at once.

The decision log never holds the customer id, only a random pseudonym whose one link to the customer
is a field of the profile deleted here; after erasure the log's entries (in Redis and in exported files) can no
longer be tied to the person, i.e. they are irreversibly pseudonymised.
"""

from __future__ import annotations

from feature_store.keys import Keys
from feature_store.resp import Arg, LeanRedis


async def erase_customer(client: LeanRedis, keys: Keys, customer_id: str) -> list[str]:
    """Delete the customer's keys in one transaction; returns what existed (e.g. ["profile", "event_dedupe"])."""
    named = keys.customer_keys(customer_id)
    commands: list[tuple[Arg, ...]] = [("MULTI",)]
    commands += [("EXISTS", key) for key in named.values()]
    commands += [("DEL", *named.values()), ("EXEC",)]
    replies = await client.pipeline(commands)
    existed = replies[-1][: len(named)]
    return [name for name, flag in zip(named, existed, strict=True) if int(flag)]
