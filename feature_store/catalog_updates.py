"""Catalog webhooks: partial item upserts with a change log, so every worker catches up on its next request.

An upsert merges the given fields into each item's JSON, bumps the catalog version once, and records
item → version in a capped change log. A worker that sees a newer version on a request reads just the
changed items (one more round trip, once per change) instead of the whole catalog.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine.catalog import CatalogItem
from feature_store.keys import Keys
from feature_store.resp import RedisClient, Script

MAX_CHANGES = 100_000
REQUIRED_FOR_NEW = ("title", "category", "price", "cost", "stock")

UPSERT_ITEMS = Script(r"""
local items_key, version_key, changes_key, base_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cap = tonumber(ARGV[1])
local required = cjson.decode(ARGV[2])
local status = {}
local updates = {}
for i = 3, #ARGV, 2 do
  local id, patch = ARGV[i], cjson.decode(ARGV[i + 1])
  local raw = redis.call('HGET', items_key, id)
  local item = {}
  local ok = true
  if raw then
    item = cjson.decode(raw)
  else
    for _, f in ipairs(required) do if patch[f] == nil then ok = false end end
  end
  if ok then
    for k, v in pairs(patch) do item[k] = v end
    updates[#updates + 1] = {id, cjson.encode(item)}
    status[#status + 1] = raw and 1 or 2
  else
    status[#status + 1] = 0
  end
end
local version = tonumber(redis.call('GET', version_key) or '0')
if #updates > 0 then
  version = redis.call('INCR', version_key)
  for _, u in ipairs(updates) do
    redis.call('HSET', items_key, u[1], u[2])
    redis.call('ZADD', changes_key, version, u[1])
  end
  local size = redis.call('ZCARD', changes_key)
  if size > cap then
    local dropped = redis.call('ZRANGE', changes_key, 0, size - cap - 1, 'WITHSCORES')
    local newest_dropped = tonumber(dropped[#dropped])
    if newest_dropped > tonumber(redis.call('GET', base_key) or '0') then
      redis.call('SET', base_key, newest_dropped)
    end
    redis.call('ZREMRANGEBYRANK', changes_key, 0, size - cap - 1)
  end
end
table.insert(status, 1, version)
return status
""")


@dataclass(frozen=True)
class UpsertResult:
    version: int
    created: list[str]
    updated: list[str]
    unknown: list[str]  # new items that lacked a required field: nothing was written for them


@dataclass(frozen=True)
class CatalogDelta:
    version: int
    full_reload: bool  # the change log no longer reaches back to the worker's version
    items: list[CatalogItem]


class CatalogWriter:
    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self.client, self.keys = client, keys

    async def upsert(self, patches: Sequence[tuple[str, Mapping[str, Any]]]) -> UpsertResult:
        k = self.keys
        args: list[Any] = [MAX_CHANGES, orjson.dumps(REQUIRED_FOR_NEW)]
        for item_id, patch in patches:
            args += [item_id, orjson.dumps(dict(patch))]
        keys = (k.catalog_items, k.catalog_version, k.catalog_changes, k.catalog_base)
        (reply,) = await self.client.run_script(UPSERT_ITEMS, [(4, *keys, *args)])
        version, statuses = int(reply[0]), reply[1:]
        ids = [i for i, _ in patches]
        return UpsertResult(
            version=version,
            created=[i for i, s in zip(ids, statuses, strict=True) if s == 2],
            updated=[i for i, s in zip(ids, statuses, strict=True) if s == 1],
            unknown=[i for i, s in zip(ids, statuses, strict=True) if s == 0],
        )


async def read_delta(client: RedisClient, keys: Keys, since: int) -> CatalogDelta:
    """What changed after version `since`: one round trip for the log, one for the changed items."""
    replies = await client.pipeline(
        [
            ("MULTI",),
            ("GET", keys.catalog_base),
            ("GET", keys.catalog_version),
            ("ZRANGEBYSCORE", keys.catalog_changes, f"({since}", "+inf"),
            ("EXEC",),
        ]
    )
    base, version, changed = replies[-1]
    current = int(version or 0)
    if int(base or 0) > since:
        return CatalogDelta(current, True, [])
    if not changed:
        return CatalogDelta(current, False, [])
    raw = await client.execute("HMGET", keys.catalog_items, *changed)
    items = [
        CatalogItem(item_id=i.decode(), **orjson.loads(r)) for i, r in zip(changed, raw, strict=True) if r is not None
    ]
    return CatalogDelta(current, False, items)
