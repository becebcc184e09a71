"""Erasure of one customer (right to be forgotten): every key under the customer's hash tag, at once.

The decision log never holds the customer id, only a random pseudonym kept in the profile; after
erasure the log's entries (in Redis and in exported files) can no longer be tied to the person, i.e.
they are irreversibly pseudonymised.
"""

from __future__ import annotations

from feature_store.keys import Keys
from feature_store.resp import Arg, LeanRedis, Script

# One script, so a cap reserved while erasing cannot leave a key behind. The per-scope cap keys are
# named by the cap_scopes hash; they share the customer's hash tag, so they are on the same slot.
ERASE = Script(r"""
local scopes_key, cap_prefix = KEYS[ARGV[1] + 0], ARGV[2]
local existed = {}
for i, key in ipairs(KEYS) do existed[i] = redis.call('EXISTS', key) end
local caps = 0
for _, scope in ipairs(redis.call('HKEYS', scopes_key)) do caps = caps + redis.call('DEL', cap_prefix .. scope) end
redis.call('DEL', unpack(KEYS))
existed[#existed + 1] = caps
return existed
""")


async def erase_customer(client: LeanRedis, keys: Keys, customer_id: str) -> list[str]:
    """Delete every key of the customer; returns what existed (e.g. ["profile", "event_dedupe", "caps"])."""
    named = keys.customer_keys(customer_id)
    scopes_at = list(named).index("cap_scopes") + 1
    cap_prefix = keys.caps(customer_id, "")
    call: tuple[Arg, ...] = (len(named), *named.values(), scopes_at, cap_prefix)
    ((*existed, caps),) = await client.run_script(ERASE, [call])
    erased = [name for name, flag in zip(named, existed, strict=True) if int(flag)]
    return erased + (["caps"] if int(caps) else [])
