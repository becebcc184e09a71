"""Live events into profiles: one atomic Lua script per customer, all customers of a batch in one round trip.

The script deduplicates by event id (a capped, expiring sorted set per customer, under the customer's
hash tag so it lives beside the profile on Redis Cluster) and applies accepted events to the profile
JSON: recent views, cart, purchases, orders, spend, last seen. A customer seen for the first time also
gets a random pseudonym, the only identifier the decision log holds. Because the profile is written before the
API answers 202, the next decision for that customer sees the event (read-your-writes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.fastinit import fast_init
from engine.types import SECONDS_PER_DAY
from feature_store.keys import Keys
from feature_store.profiles import MAX_CART, MAX_PURCHASES, MAX_VIEWS, new_pseudonym
from feature_store.resp import RedisClient, Script

DEDUPE_WINDOW = 200  # event ids remembered per customer
DEDUPE_TTL_S = 7 * SECONDS_PER_DAY

APPLY_EVENTS = Script(r"""
local profile_key, seen_key = KEYS[1], KEYS[2]
local max_views, max_cart, max_purchases = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, ttl, pid = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]

local function split(s, sep)
  local out = {}
  if s == nil or s == '' then return out end
  for part in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = part end
  return out
end
local function push_front(list, item, cap)
  local out = {item}
  for _, x in ipairs(list) do
    if x ~= item and #out < cap then out[#out + 1] = x end
  end
  return out
end
local function remove(list, item)
  local out = {}
  for _, x in ipairs(list) do if x ~= item then out[#out + 1] = x end end
  return out
end

local raw = redis.call('GET', profile_key)
local p = {}
if raw then p = cjson.decode(raw) end
local views, cart = split(p['v'], ','), split(p['k'], ',')
local purchases = {}
for _, chunk in ipairs(split(p['p'], ';')) do
  local item, count, first, last = string.match(chunk, '^(.*):(%d+):(%d+):(%d+)$')
  if item then purchases[#purchases + 1] = {item, tonumber(count), tonumber(first), tonumber(last)} end
end
local orders, spend, updated = tonumber(p['o'] or '0'), tonumber(p['m'] or '0'), tonumber(p['u'] or '0')

local status = {}
local changed = false
for i = 7, #ARGV, 6 do
  local event_id, etype, item = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local qty, price, ts = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  if redis.call('ZSCORE', seen_key, event_id) then
    status[#status + 1] = 0
  else
    redis.call('ZADD', seen_key, ts, event_id)
    status[#status + 1] = 1
    changed = true
    if ts > updated then updated = ts end
    if etype == 'view_item' or etype == 'email_click' then
      views = push_front(views, item, max_views)
    elseif etype == 'add_to_cart' then
      cart = push_front(cart, item, max_cart)
    elseif etype == 'purchase' then
      local day = math.floor(ts / 86400)
      cart = remove(cart, item)
      local found = nil
      for idx, pu in ipairs(purchases) do if pu[1] == item then found = idx end end
      local entry = {item, 1, day, day}
      if found then
        local old = table.remove(purchases, found)
        entry = {item, old[2] + 1, math.min(old[3], day), math.max(old[4], day)}
      end
      table.insert(purchases, 1, entry)
      while #purchases > max_purchases do table.remove(purchases) end
      orders = orders + 1
      spend = spend + qty * price
    end
  end
end

if changed then
  local chunks = {}
  for _, pu in ipairs(purchases) do
    chunks[#chunks + 1] = pu[1] .. ':' .. pu[2] .. ':' .. pu[3] .. ':' .. pu[4]
  end
  p['v'] = table.concat(views, ',')
  p['k'] = table.concat(cart, ',')
  p['p'] = table.concat(chunks, ';')
  -- Zero orders and spend are left out, as feature_store.profiles writes them (nil removes the field).
  p['o'] = orders > 0 and tostring(orders) or nil
  p['m'] = spend ~= 0 and string.format('%.2f', spend) or nil
  p['u'] = string.format('%d', updated)
  if not p['ps'] then p['ps'] = pid end
  for _, f in ipairs({'v', 'k', 'p'}) do if p[f] == '' then p[f] = nil end end
  redis.call('SET', profile_key, cjson.encode(p))
  local size = redis.call('ZCARD', seen_key)
  if size > window then redis.call('ZREMRANGEBYRANK', seen_key, 0, size - window - 1) end
  redis.call('EXPIRE', seen_key, ttl)
end
return status
""")


@fast_init
@dataclass(frozen=True, slots=True)
class LiveEvent:
    event_id: str
    customer_id: str
    type: str
    item_id: str
    quantity: int
    price: float
    timestamp: int  # unix seconds


class EventWriter:
    """Applies a batch of events; returns, per event, True if accepted and False if a duplicate."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def _call(self, customer_id: str, events: Sequence[LiveEvent]) -> tuple[str | int | float, ...]:
        args: list[str | int | float] = [MAX_VIEWS, MAX_CART, MAX_PURCHASES, DEDUPE_WINDOW, DEDUPE_TTL_S]
        args.append(new_pseudonym())  # used only if the customer has none yet
        for e in events:
            args += [e.event_id, e.type, e.item_id, e.quantity, e.price, e.timestamp]
        k = self.keys
        return (2, k.profile(customer_id), k.seen_events(customer_id), *args)

    async def apply(self, events: Sequence[LiveEvent]) -> list[bool]:
        by_customer: dict[str, list[int]] = {}
        for i, e in enumerate(events):
            by_customer.setdefault(e.customer_id, []).append(i)
        groups = list(by_customer.items())
        calls = [self._call(c, [events[i] for i in idx]) for c, idx in groups]
        replies = await self.client.run_script(APPLY_EVENTS, calls)
        out = [False] * len(events)
        for (_, idx), statuses in zip(groups, replies, strict=True):
            for i, s in zip(idx, statuses, strict=True):
                out[i] = bool(s)
        return out
