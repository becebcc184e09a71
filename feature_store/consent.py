"""Consent changes: the profile's consent bits and an evidence trail, updated together in one Lua script."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from engine.types import CONSENT_CHANNELS
from feature_store.keys import Keys
from feature_store.profiles import new_pseudonym
from feature_store.resp import RedisClient, Script

MAX_EVIDENCE = 100  # consent changes kept per customer

SET_CONSENT = Script(r"""
local profile_key, evidence_key = KEYS[1], KEYS[2]
local mask, values, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local raw = redis.call('GET', profile_key)
local p = {}
if raw then p = cjson.decode(raw) end
local bits = tonumber(p['cs'] or '0')
bits = bit.bor(bit.band(bits, bit.bnot(mask)), bit.band(values, mask))
p['cs'] = tostring(bits)
if not p['ps'] then p['ps'] = ARGV[5] end
redis.call('SET', profile_key, cjson.encode(p))
redis.call('LPUSH', evidence_key, ARGV[4])
redis.call('LTRIM', evidence_key, 0, cap - 1)
return bits
""")


async def set_consent(
    client: RedisClient, keys: Keys, customer_id: str, changes: Mapping[str, bool], evidence: Mapping[str, object]
) -> frozenset[str]:
    """Apply consent changes (only the channels given) and keep the evidence; returns the consents now held."""
    mask = values = 0
    for i, channel in enumerate(CONSENT_CHANNELS):
        if channel in changes:
            mask |= 1 << i
            values |= (1 << i) if changes[channel] else 0
    command = (
        2,
        keys.profile(customer_id),
        keys.consent_evidence(customer_id),
        mask,
        values,
        MAX_EVIDENCE,
        orjson.dumps(dict(evidence)),
        new_pseudonym(),
    )
    (bits,) = await client.run_script(SET_CONSENT, [command])
    return frozenset(c for i, c in enumerate(CONSENT_CHANNELS) if int(bits) >> i & 1)
