"""Frequency caps and suppression for one customer, checked and reserved in one atomic Lua script.

A cap is "at most `limit` impressions within `window_s` seconds" in a scope (``offer:<id>``,
``class:<priority class>``, ``channel:<channel>``, or any other name); a scope's impressions are a
sorted set scored by milliseconds. Suppression stops an offer once it was shown `suppress_after` times
without positive feedback. `reserve` walks the candidates, checks and records in one script run, so
concurrent requests for one customer are serialised by Redis and can never overshoot a cap.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.fastinit import fast_init
from engine.types import SECONDS_PER_DAY
from feature_store.keys import Keys
from feature_store.resp import Arg, RedisClient, Script

SUPPRESSION_TTL_S = 30 * SECONDS_PER_DAY  # ignored counts lapse after this long without an impression


@dataclass(frozen=True, slots=True)
class Cap:
    scope: str  # e.g. "offer:free_shipping", "class:marketing", "channel:email" (free-form, used in the key)
    limit: int  # at most this many impressions ...
    window_s: int  # ... within this many seconds


@dataclass(frozen=True, slots=True)
class Candidate:
    offer_id: str
    caps: tuple[Cap, ...]
    suppress_after: int | None = None  # None: never suppressed


@fast_init
@dataclass(frozen=True, slots=True)
class Reservation:
    granted: tuple[str, ...]  # offer ids reserved, in candidate order
    refused: dict[str, str]  # offer_id -> reason; candidates after the limit was reached are in neither


# The reservation as a Lua function of its own keys and arguments, so a script that stores something else
# in the customer's slot can reserve in the same run (feature_store.email_store.STORE_FIRST_RESERVING).
# K: scope index hash, ignored hash, then one cap key per scope (in A's scope order).
# A: now_ms, limit, nonce, ignored TTL, scope count, per scope (name, longest window of this call),
# then per candidate (offer, suppress_after or 0, cap count, per cap (scope number, limit, window_s)).
# Returns {granted offers, refused as offer, reason, offer, reason, ...}.
RESERVE_FUNCTION = r"""
local function reserve(K, A)
  local index_key, ignored_key = K[1], K[2]
  local now, limit, nonce, ignored_ttl = tonumber(A[1]), tonumber(A[2]), A[3], tonumber(A[4])
  local function since(window_s) return string.format('%d', now - window_s * 1000) end

  -- Each scope's longest window: the longest any call has declared for it (one HMGET of the index), so
  -- that a call knowing only a short cap never throws away what a longer cap of the same scope still
  -- has to count.
  local n_scopes, names, longest, grown = tonumber(A[5]), {}, {}, {}
  for s = 1, n_scopes do names[s] = A[4 + 2 * s] end
  local known = n_scopes > 0 and redis.call('HMGET', index_key, unpack(names)) or {}
  for s = 1, n_scopes do
    local window, stored = tonumber(A[5 + 2 * s]), tonumber(known[s] or '0')
    longest[s], grown[s] = math.max(window, stored), window > stored
  end
  local a = 6 + 2 * n_scopes

  local granted, refused, touched, is_touched = {}, {}, {}, {}
  while a <= #A and #granted < limit do
    local offer, suppress_after, first_cap = A[a], tonumber(A[a + 1]), a + 3
    a = first_cap + 3 * tonumber(A[a + 2])
    local reason = nil
    if suppress_after > 0 then
      local ignored = tonumber(redis.call('HGET', ignored_key, offer) or '0')
      if ignored >= suppress_after then reason = 'suppressed after ' .. ignored .. ' ignored' end
    end
    for c = first_cap, a - 1, 3 do
      if reason then break end
      local s = tonumber(A[c])
      if redis.call('ZCOUNT', K[2 + s], '(' .. since(tonumber(A[c + 2])), '+inf') >= tonumber(A[c + 1]) then
        reason = 'cap ' .. names[s] .. ' ' .. A[c + 1] .. '/' .. A[c + 2] .. 's'
      end
    end
    if reason then
      refused[#refused + 1] = offer
      refused[#refused + 1] = reason
    else
      local member, here = A[1] .. ':' .. nonce .. ':' .. offer, {}
      for c = first_cap, a - 1, 3 do
        local s = tonumber(A[c])
        if not here[s] then
          here[s] = true
          redis.call('ZADD', K[2 + s], A[1], member)
          if not is_touched[s] then is_touched[s] = true; touched[#touched + 1] = s end
        end
      end
      redis.call('HINCRBY', ignored_key, offer, 1)
      granted[#granted + 1] = offer
    end
  end

  if #granted > 0 then
    -- A scope that gained an impression drops what its longest window no longer counts (counting looks
    -- only inside each cap's window, so a scope nothing was added to can wait: its key expires with its
    -- longest window after its last impression) and lives that long; the index learns longer windows.
    local grew, top = {}, 0
    for _, s in ipairs(touched) do
      redis.call('ZREMRANGEBYSCORE', K[2 + s], '-inf', since(longest[s]))
      redis.call('EXPIRE', K[2 + s], longest[s])
      if grown[s] then grew[#grew + 1] = names[s]; grew[#grew + 1] = longest[s] end
      if longest[s] > top then top = longest[s] end
    end
    if #grew > 0 then redis.call('HSET', index_key, unpack(grew)) end
    -- The index outlives every cap key it lists, so erasure can always find them: it already outlives the
    -- keys not touched here, and now lives at least as long as the longest one touched.
    if redis.call('TTL', index_key) < top then redis.call('EXPIRE', index_key, top) end
    redis.call('EXPIRE', ignored_key, ignored_ttl)
  end
  return {granted, refused}
end
"""
RESERVE = Script(RESERVE_FUNCTION + "return reserve(KEYS, ARGV)\n")


_WHITESPACE = re.compile(r"\s")  # the characters str.isspace() accepts, searched in C


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or _WHITESPACE.search(value):
        raise ValueError(f"{what} must be non-empty without whitespace, got {value!r}")


def _check_positive(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


def _check_call(customer_id: str, now_ms: int) -> None:
    _check_name(customer_id, "customer_id")
    if isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms < 0:
        raise ValueError(f"now_ms must be an integer >= 0, got {now_ms!r}")


def _check_candidates(candidates: Sequence[Candidate], limit: int) -> None:
    _check_positive(limit, "limit")
    seen: set[str] = set()
    for i, cand in enumerate(candidates):
        _check_name(cand.offer_id, f"candidates[{i}].offer_id")
        where = f"offer {cand.offer_id!r}"
        if cand.offer_id in seen:
            raise ValueError(f"{where}: offer_id appears more than once among the candidates")
        seen.add(cand.offer_id)
        if cand.suppress_after is not None:
            _check_positive(cand.suppress_after, f"{where}: suppress_after")
        for j, cap in enumerate(cand.caps):
            _check_name(cap.scope, f"{where}: caps[{j}].scope")
            _check_positive(cap.limit, f"{where}: caps[{j}].limit")
            _check_positive(cap.window_s, f"{where}: caps[{j}].window_s")


@dataclass(frozen=True, slots=True)
class ReservationTemplate:
    """What a reservation's keys and arguments owe to its candidates and limit alone, checked and spelled out
    once (`reservation_template`): a pre-send batch reserves the same few candidate lists for thousands of
    customers, and only the customer's keys, the time and the nonce differ."""

    scopes: tuple[str, ...]  # the cap scopes in the script's numbering (one cap key each)
    limit: str
    tail: tuple[str, ...]  # A[5:] of `RESERVE_FUNCTION`: scope count, per scope ..., per candidate ...


def reservation_template(candidates: Sequence[Candidate], limit: int) -> ReservationTemplate:
    """The candidates' and limit's part of a reservation; ValueError naming what is wrong with them."""
    _check_candidates(candidates, limit)
    scope_no: dict[str, int] = {}  # scope -> its 1-based number in the script
    longest: dict[str, int] = {}
    for cand in candidates:
        for cap in cand.caps:
            scope_no.setdefault(cap.scope, len(scope_no) + 1)
            longest[cap.scope] = max(longest.get(cap.scope, 0), cap.window_s)
    tail: list[object] = [len(scope_no)]
    for scope in scope_no:
        tail += [scope, longest[scope]]
    for cand in candidates:
        tail += [cand.offer_id, cand.suppress_after or 0, len(cand.caps)]
        for cap in cand.caps:
            tail += [scope_no[cap.scope], cap.limit, cap.window_s]
    return ReservationTemplate(tuple(scope_no), str(limit), tuple(str(x) for x in tail))


def template_keys_args(
    template: ReservationTemplate, keys: Keys, customer_id: str, now_ms: int, nonce: str | None = None
) -> tuple[list[Arg], list[Arg]]:
    """The reservation's keys and arguments (K and A of `RESERVE_FUNCTION`) for one customer at `now_ms`.

    `nonce` makes this reservation's impressions distinct from any other's in the same millisecond: random
    by default; a caller holding random bits unique to this reservation (its decision's) can pass them and
    save a system call per reservation."""
    _check_call(customer_id, now_ms)
    return _keys_args(template, keys, customer_id, now_ms, nonce)


def _keys_args(
    template: ReservationTemplate, keys: Keys, customer_id: str, now_ms: int, nonce: str | None
) -> tuple[list[Arg], list[Arg]]:
    named: list[Arg] = [keys.cap_scopes(customer_id), keys.offer_ignored(customer_id)]
    named += [keys.caps(customer_id, scope) for scope in template.scopes]
    args: list[Arg] = [now_ms, template.limit, nonce or secrets.token_hex(8), SUPPRESSION_TTL_S, *template.tail]
    return named, args


def reservation_keys_args(
    keys: Keys, customer_id: str, candidates: Sequence[Candidate], limit: int, now_ms: int, nonce: str | None = None
) -> tuple[list[Arg], list[Arg]]:
    """`template_keys_args` of these candidates and limit (ValueError if any input is malformed, the customer
    and the time checked first)."""
    _check_call(customer_id, now_ms)
    return _keys_args(reservation_template(candidates, limit), keys, customer_id, now_ms, nonce)


def reservation_of(reply: Sequence[Any]) -> Reservation:
    """A `reserve` reply ({granted, refused pairs}) as a Reservation."""
    granted, refused = reply
    flat = [x.decode() for x in refused]
    return Reservation(
        granted=tuple(x.decode() for x in granted), refused=dict(zip(flat[::2], flat[1::2], strict=True))
    )


def _reserve_call(
    keys: Keys, customer_id: str, candidates: Sequence[Candidate], limit: int, now_ms: int
) -> tuple[Arg, ...]:
    named, args = reservation_keys_args(keys, customer_id, candidates, limit, now_ms)
    return (len(named), *named, *args)


async def reserve(
    client: RedisClient, keys: Keys, customer_id: str, candidates: Sequence[Candidate], limit: int, now_ms: int
) -> Reservation:
    """Walk the candidates in order and reserve up to `limit` of them that pass every cap and suppression.

    One script run (one round trip, one Cluster slot): a granted offer's impression is recorded in each
    of its cap scopes and its ignored count goes up, before the next candidate is checked.
    """
    call = _reserve_call(keys, customer_id, candidates, limit, now_ms)  # checks every input (ValueError)
    if not candidates:
        return Reservation(granted=(), refused={})
    (reply,) = await client.run_script(RESERVE, [call])
    return reservation_of(reply)


async def reserve_many(
    client: RedisClient, keys: Keys, requests: Sequence[tuple[str, Sequence[Candidate], int]], now_ms: int
) -> list[Reservation]:
    """`reserve` for many customers (customer, candidates, limit) in one round trip, one script run each."""
    # Every request's call is built (and so checked) before anything is sent: a bad one changes nothing.
    built = [_reserve_call(keys, cid, cands, limit, now_ms) for cid, cands, limit in requests]
    calls = [call for call, (_, cands, _) in zip(built, requests, strict=True) if cands]
    replies = iter(await client.run_script(RESERVE, calls) if calls else [])
    out = []
    for _, candidates, _ in requests:
        if not candidates:
            out.append(Reservation(granted=(), refused={}))
            continue
        out.append(reservation_of(next(replies)))
    return out


async def record_positive_feedback(client: RedisClient, keys: Keys, customer_id: str, offer_id: str) -> None:
    """The customer responded to the offer: its ignored count starts again from zero (lifts suppression)."""
    _check_name(customer_id, "customer_id")
    _check_name(offer_id, "offer_id")
    await client.execute("HDEL", keys.offer_ignored(customer_id), offer_id)


async def cap_usage(client: RedisClient, keys: Keys, customer_id: str, scope: str, window_s: int, now_ms: int) -> int:
    """Impressions recorded in the scope within the last `window_s` seconds before `now_ms`."""
    _check_name(customer_id, "customer_id")
    _check_name(scope, "scope")
    _check_positive(window_s, "window_s")
    return int(await client.execute("ZCOUNT", keys.caps(customer_id, scope), f"({now_ms - window_s * 1000}", "+inf"))


async def cap_keys(client: RedisClient, keys: Keys, customer_id: str) -> list[str]:
    """The customer's cap keys, for erasure (which deletes them along with `Keys.customer_keys`)."""
    scopes = await client.execute("HKEYS", keys.cap_scopes(customer_id))
    return [keys.caps(customer_id, scope.decode()) for scope in scopes]
