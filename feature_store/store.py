"""The Redis online store: bulk writes for `nextbest load`, single-round-trip reads for the API.

One narrow interface per direction: `RedisStore` (sync, batch materialisation and admin reads) and
`AsyncRedisStore` (the request path). The key layout lives in feature_store.keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import orjson

from engine.catalog import CatalogItem
from engine.types import Profile
from feature_store.cluster import connect, sync_client
from feature_store.keys import Keys
from feature_store.profiles import ProfileDecodeError, decode_country, decode_profile, encode_profile, new_pseudonym
from feature_store.resp import RespConnectionError, RespError

BATCH = 2_000

# Replace a profile but keep its pseudonym (or give it the new one): the new JSON object, written by
# Python without "ps", gets the field appended before its closing brace. The object is "{}" for a customer
# whose every field is a default (feature_store.profiles leaves those out).
KEEP_PSEUDONYM = r"""
local old = redis.call('GET', KEYS[1])
local ps = (old and string.match(old, '"ps":"(%x+)"')) or ARGV[2]
local sep = (ARGV[1] == '{}') and '' or ','
local doc = string.sub(ARGV[1], 1, -2) .. sep .. '"ps":"' .. ps .. '"}'
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], doc, 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], doc)
end
"""


class StoreUnavailableError(RuntimeError):
    """The store could not answer in time (down, slow, or the circuit breaker is open)."""


def _item_json(item: CatalogItem) -> bytes:
    d = asdict(item)
    d.pop("item_id")
    return orjson.dumps(d)


def _text(v: bytes | str | None) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else v


def profile_from_json(customer_id: str, raw: bytes | str | None) -> Profile | None:
    return None if raw is None else decode_profile(customer_id, _fields(customer_id, raw))


def country_from_json(customer_id: str, raw: bytes | str | None) -> str | None:
    """`profile_from_json(...).country` without decoding the rest of the profile (see `decode_country`)."""
    return None if raw is None else decode_country(customer_id, _fields(customer_id, raw))


def _fields(customer_id: str, raw: bytes | str) -> dict[str, Any]:
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProfileDecodeError(f"profile of {customer_id!r} is not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise ProfileDecodeError(f"profile of {customer_id!r} is not a JSON object")
    return fields


def _decode_items(raw: dict[bytes, bytes]) -> list[CatalogItem]:
    return [CatalogItem(item_id=k.decode(), **orjson.loads(v)) for k, v in raw.items()]


class RedisStore:
    """Synchronous access for batch jobs and tools."""

    def __init__(self, url: str, keys: Keys | None = None, timeout_s: float = 10.0) -> None:
        self.client = sync_client(url, timeout_s)  # redis.Redis, or RedisCluster for a redis+cluster:// URL
        self.keys = keys or Keys()

    def ping(self) -> bool:
        return bool(self.client.ping())

    def write_profiles(
        self,
        profiles: Iterable[Profile],
        ttl_s: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Replace each customer's profile; pipelined in batches (no transaction: each key stands alone)."""
        n = 0
        self._keep_pseudonym = str(self.client.script_load(KEEP_PSEUDONYM))
        pipe = self.client.pipeline(transaction=False)
        for p in profiles:
            key = self.keys.profile(p.customer_id)
            fields = encode_profile(p)
            fields.pop("ps", None)
            # A reload keeps a customer's pseudonym, so decision logs stay linkable across loads.
            # execute_command: redis-py's cluster pipeline refuses .evalsha(), yet routes EVALSHA by its key.
            pipe.execute_command(
                "EVALSHA", self._keep_pseudonym, 1, key, orjson.dumps(fields), new_pseudonym(), ttl_s or 0
            )
            n += 1
            if n % BATCH == 0:
                pipe.execute()
                if progress:
                    progress(BATCH)
        pipe.execute()
        if progress:
            progress(n % BATCH)
        return n

    def read_profile(self, customer_id: str) -> Profile | None:
        return profile_from_json(customer_id, self.client.get(self.keys.profile(customer_id)))

    def write_catalog(self, items: Iterable[CatalogItem], replace: bool = True) -> int:
        """Write the catalog and bump its version so every API worker reloads it."""
        mapping = {it.item_id: _item_json(it) for it in items}
        pipe = self.client.pipeline(transaction=True)
        if replace:
            pipe.delete(self.keys.catalog_items)
        for start in range(0, len(mapping), BATCH):
            chunk = dict(list(mapping.items())[start : start + BATCH])
            pipe.hset(self.keys.catalog_items, mapping=chunk)  # type: ignore[arg-type]
        pipe.incr(self.keys.catalog_version)
        results = pipe.execute()
        version = int(results[-1])
        # A bulk load is not in the change log: workers below this version reload the whole catalog.
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.catalog_changes)
        pipe.set(self.keys.catalog_base, version)
        pipe.execute()
        return version

    def catalog_version(self) -> str | None:
        return _text(self.client.get(self.keys.catalog_version))

    def read_catalog(self) -> tuple[str | None, list[CatalogItem]]:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.catalog_version)
        pipe.hgetall(self.keys.catalog_items)
        version, raw = pipe.execute()
        return _text(version), _decode_items(raw)

    def record_load(self, **meta: str) -> None:
        self.client.hset(self.keys.load_meta, mapping={"at": str(int(time.time())), **meta})  # type: ignore[dict-item]

    def close(self) -> None:
        self.client.close()


class AsyncRedisStore:
    """The request path: every read is one round trip, bounded by a timeout (see feature_store.resp)."""

    def __init__(self, url: str, keys: Keys | None = None, timeout_s: float = 0.02) -> None:
        self.client = connect(url, timeout_s)
        self.keys = keys or Keys()

    async def _run(self, what: str, *commands: tuple[str, ...]) -> list[Any]:
        try:
            return await self.client.pipeline(commands)
        except (RespError, RespConnectionError, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def read_profile(self, customer_id: str) -> Profile | None:
        (raw,) = await self._run("profile read", ("GET", self.keys.profile(customer_id)))
        return profile_from_json(customer_id, raw)

    async def read_profile_and_catalog_version(self, customer_id: str) -> tuple[Profile | None, int | None]:
        """The request's single round trip: the profile, and the catalog version to check freshness."""
        raw, version = await self._run(
            "profile read", ("GET", self.keys.profile(customer_id)), ("GET", self.keys.catalog_version)
        )
        return profile_from_json(customer_id, raw), (int(version) if version is not None else None)

    async def catalog_version(self) -> str | None:
        (v,) = await self._run("catalog version read", ("GET", self.keys.catalog_version))
        return _text(v)

    async def read_catalog(self) -> tuple[str | None, list[CatalogItem]]:
        k = self.keys
        replies = await self._run(
            "catalog read", ("MULTI",), ("GET", k.catalog_version), ("HGETALL", k.catalog_items), ("EXEC",)
        )
        version, flat = replies[-1]
        return _text(version), _decode_items(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def ping(self) -> bool:
        try:
            await self._run("ping", ("PING",))
        except StoreUnavailableError:
            return False
        return True

    async def close(self) -> None:
        await self.client.close()
