"""Erasure of one customer (right to be forgotten): every key under the customer's hash tag, at once.

The decision log never holds the customer id, only a random pseudonym kept in the profile; after
erasure the log's entries (in Redis and in exported files) can no longer be tied to the person, i.e.
they are irreversibly pseudonymised.
"""

from __future__ import annotations

from feature_store.keys import Keys
from feature_store.resp import Arg, RedisClient, Script

# One script, so a cap reserved or an email stored while erasing cannot leave a key behind. The per-scope
# cap keys are named by the cap_scopes hash and the per-campaign email keys by the email_campaigns set;
# they share the customer's hash tag, so they are on the same slot.
ERASE = Script(r"""
local scopes_key, cap_prefix = KEYS[ARGV[1] + 0], ARGV[2]
local campaigns_key, email_prefix = KEYS[ARGV[3] + 0], ARGV[4]
local existed = {}
for i, key in ipairs(KEYS) do existed[i] = redis.call('EXISTS', key) end
local caps, emails = 0, 0
for _, scope in ipairs(redis.call('HKEYS', scopes_key)) do caps = caps + redis.call('DEL', cap_prefix .. scope) end
for _, c in ipairs(redis.call('SMEMBERS', campaigns_key)) do emails = emails + redis.call('DEL', email_prefix .. c) end
redis.call('DEL', unpack(KEYS))
existed[#existed + 1] = caps
existed[#existed + 1] = emails
return existed
""")


async def erase_customer(client: RedisClient, keys: Keys, customer_id: str) -> list[str]:
    """Delete every key of the customer; returns what existed (e.g. ["profile", "event_dedupe", "caps"])."""
    named = keys.customer_keys(customer_id)
    scopes_at = list(named).index("cap_scopes") + 1
    campaigns_at = list(named).index("email_campaigns") + 1
    cap_prefix, email_prefix = keys.caps(customer_id, ""), keys.email_content(customer_id, "")
    call: tuple[Arg, ...] = (len(named), *named.values(), scopes_at, cap_prefix, campaigns_at, email_prefix)
    ((*existed, caps, emails),) = await client.run_script(ERASE, [call])
    erased = [name for name, flag in zip(named, existed, strict=True) if int(flag)]
    return erased + (["caps"] if int(caps) else []) + (["email_content"] if int(emails) else [])
