"""The decision log: every decision and every reward, appended to one Redis Stream.

A decision entry holds what off-policy evaluation needs — the pseudonymous customer, the placement
and channel, model and config versions, the policy with its parameters, and every shown action with
its position, score and the probability with which the policy chose it (plus the shadow policy's
choices and its probabilities for the shown actions). Rewards arrive later through feedback and are
appended as their own entries, joined by decision id. `nextbest log export` drains the stream into
Parquet (feature_store.log_export). The format is documented in the README ("Decision log").

Feedback is checked against a short record of each decision (`{log}:d:<id>`, kept for the feedback
window): an unknown or expired decision id, or an action that was not shown, is refused, and a
repeated feedback is recognised as a duplicate — all in one Lua script on the log's slot, so the
check, the idempotency mark and the appended reward happen together or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from engine.types import Context, Decision
from feature_store.keys import Keys
from feature_store.resp import Arg, RedisClient, Script

LOG_FORMAT_VERSION = 1
ENTRY_FIELD = "e"  # each stream entry has one field holding the JSON document

RECORD_FEEDBACK = Script(r"""
local record_key, seen_key, stream = KEYS[1], KEYS[2], KEYS[3]
local action, kind, reward, entry, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local raw = redis.call('GET', record_key)
if not raw then return {'unknown', '', 0, 0} end
local rec = cjson.decode(raw)
local shown = false
for _, a in ipairs(rec['a']) do if a == action then shown = true end end
if not shown then return {'not_shown', rec['p'], 0, 0} end
if redis.call('SADD', seen_key, kind .. '|' .. action) == 0 then return {'duplicate', rec['p'], 0, 0} end
local first_success = 0
if reward > 0 and redis.call('SADD', seen_key, 'success|' .. action) == 1 then first_success = 1 end
local ttl = redis.call('TTL', record_key)
if ttl > 0 then redis.call('EXPIRE', seen_key, ttl) end
redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', entry)
return {'ok', rec['p'], first_success, rec['t']}
""")


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    status: str  # ok | duplicate | unknown | not_shown
    placement: str | None = None
    counted_as_success: bool = False


def decision_entry(
    decision: Decision,
    *,
    pseudonym: str | None,
    channel: str,
    config_version: str,
    context: Context,
    ts_ms: int,
) -> bytes:
    """The JSON document of one decision in the log (format version 1, see the README)."""
    shadow = decision.shadow
    doc: dict[str, Any] = {
        "v": LOG_FORMAT_VERSION,
        "kind": "decision",
        "decision_id": decision.decision_id,
        "ts": ts_ms,
        "customer": pseudonym,
        "placement": decision.placement,
        "channel": channel,
        "model_version": decision.model_version,
        "config_version": config_version,
        "policy": decision.policy,
        "policy_params": dict(decision.policy_params),
        "fallback_reason": decision.fallback_reason,
        "context": {"item_id": context.item_id, "cart": list(context.cart)},
        "actions": [
            {"item_id": i.item_id, "position": i.position, "score": i.score, "propensity": i.propensity}
            for i in decision.items
        ],
        "shadow": None
        if shadow is None
        else {
            "policy": shadow.policy,
            "policy_params": dict(shadow.params),
            "actions": [
                {"item_id": item, "position": pos, "propensity": p}
                for pos, (item, p) in enumerate(shadow.items, start=1)
            ],
            "target_propensities": list(shadow.target_propensities),
        },
    }
    return orjson.dumps(doc)


def reward_entry(decision_id: str, action: str, reward_type: str, reward: float, ts_ms: int) -> bytes:
    doc = {
        "v": LOG_FORMAT_VERSION,
        "kind": "reward",
        "decision_id": decision_id,
        "ts": ts_ms,
        "action": action,
        "reward_type": reward_type,
        "reward": reward,
    }
    return orjson.dumps(doc)


class DecisionLog:
    """Appends decisions and rewards; keeps each decision's shown actions for the feedback window."""

    def __init__(self, client: RedisClient, keys: Keys, *, max_entries: int, feedback_window_s: int) -> None:
        self.client = client
        self.keys = keys
        self.max_entries = max_entries
        self.window_s = feedback_window_s

    def _xadd(self, entry: bytes) -> tuple[Arg, ...]:
        # Approximate trimming is a safety net for a log nobody exports; export keeps it far below.
        return ("XADD", self.keys.log_stream, "MAXLEN", "~", self.max_entries, "*", ENTRY_FIELD, entry)

    async def record(
        self, decision: Decision, entry: bytes, *, track_arms: bool, window_s: int | None = None
    ) -> Coroutine[Any, Any, list[Any]]:
        """Write one decision to the log now; returns the awaitable of Redis's replies.

        The caller may answer before the replies arrive: the commands are already on the connection, so
        Redis appends the decision before anything sent later (feedback on it included). `track_arms`
        marks a placement whose bandit state learns from feedback on this decision (its impressions are
        counted by `add_impressions`). `window_s` overrides the feedback window for this decision (an
        email is clicked days after it was decided).
        """
        return await self.record_many([(decision, entry, track_arms, window_s)])

    async def record_many(
        self, decisions: Sequence[tuple[Decision, bytes, bool, int | None]]
    ) -> Coroutine[Any, Any, list[Any]]:
        """`record` for several (decision, entry, track_arms, window_s) in one write (the email batch)."""
        commands: list[tuple[Arg, ...]] = []
        for decision, entry, track_arms, window_s in decisions:
            shown = [i.item_id for i in decision.items]
            record = orjson.dumps({"p": decision.placement, "a": shown, "t": int(track_arms)})
            commands.append(self._xadd(entry))
            key = self.keys.logged_decision(decision.decision_id)
            commands.append(("SET", key, record, "EX", window_s or self.window_s))
        return await self.client.pipeline_written(commands)

    async def add_impressions(
        self, counts: Mapping[str, Mapping[str, int]], expected: Mapping[str, Mapping[str, float]] | None = None
    ) -> None:
        """Add impressions per placement and item to the shared bandit state, in one round trip.

        Workers count impressions in memory and add them here once per refresh: one HINCRBY per item
        and second instead of one per item and decision keeps Redis's work flat as traffic grows.
        """
        commands: list[tuple[Arg, ...]] = [
            ("HINCRBY", self.keys.arm_impressions(placement), item, n)
            for placement, items in counts.items()
            for item, n in items.items()
        ]
        commands += [
            ("HINCRBYFLOAT", self.keys.arm_expected(placement), item, repr(round(e, 6)))
            for placement, items in (expected or {}).items()
            for item, e in items.items()
        ]
        if commands:
            await self.client.pipeline(commands)

    async def feedback(self, decision_id: str, action: str, reward_type: str, reward: float) -> FeedbackResult:
        """Record a reward for a shown action; idempotent per (decision, action, reward type).

        The first positive reward of an action counts as a bandit success for its placement (only when
        the decision's placement tracks arms).
        """
        k = self.keys
        entry = reward_entry(decision_id, action, reward_type, reward, int(time.time() * 1000))
        call = (
            3,
            k.logged_decision(decision_id),
            k.feedback_seen(decision_id),
            k.log_stream,
            action,
            reward_type,
            repr(float(reward)),
            entry,
            self.max_entries,
        )
        ((status, placement, first_success, tracked),) = await self.client.run_script(RECORD_FEEDBACK, [call])
        status_s = status.decode() if isinstance(status, bytes) else str(status)
        placement_s = placement.decode() if isinstance(placement, bytes) else str(placement)
        success = status_s == "ok" and bool(first_success) and bool(tracked)
        if success:
            # Separate slot on Redis Cluster, so not inside the script; HINCRBY is atomic on its own.
            await self.client.execute("HINCRBY", k.arm_successes(placement_s), action, 1)
        return FeedbackResult(status_s, placement_s or None, success)

    async def read_arms(self, placement: str) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The placement's bandit state as stored: flat HGETALL replies of impressions, successes and
        expected clicks (item, value, item, value, …), turned into arrays by `arms_arrays`."""
        impressions, successes, expected = await self.client.pipeline(
            [
                ("HGETALL", self.keys.arm_impressions(placement)),
                ("HGETALL", self.keys.arm_successes(placement)),
                ("HGETALL", self.keys.arm_expected(placement)),
            ]
        )
        return impressions, successes, expected


def arms_arrays(flat: list[bytes], item_index: Mapping[bytes, int], size: int) -> npt.NDArray[np.float64]:
    """A flat HGETALL reply of item → count as an array aligned with the catalog (unknown items dropped).

    Vectorised where it counts: the counts are parsed by numpy, and the one Python step left is a dict
    lookup per item, so a 5,000-item placement takes about a millisecond.
    """
    out = np.zeros(size, dtype=np.float64)
    if not flat:
        return out
    idx = np.fromiter((item_index.get(f, -1) for f in flat[::2]), dtype=np.int64, count=len(flat) // 2)
    counts = np.asarray(flat[1::2]).astype(np.float64)
    known = idx >= 0
    out[idx[known]] = counts[known]
    return out
