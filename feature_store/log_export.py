"""Drain the decision log into Parquet through a consumer group, without losing or duplicating entries.

The protocol, in order:

1. Read the entries this exporter was given but has not acknowledged (an interrupted run), then new
   ones, up to `max_entries`, through the consumer group `export`.
2. Write them to `<out>.partial`, fsync, and compute its sha256.
3. Record in Redis which stream ids went to which file and its checksum (`{log}:export`).
4. Rename `<out>.partial` to `<out>` (atomic).
5. Acknowledge and delete those entries (XACK + XDEL in one transaction), then clear the record.

An interruption before step 4 leaves the entries unacknowledged: the next run exports them again,
and no finished file holds them. An interruption after step 4 is found by the next run from the
record: the file is there with its checksum, so the entries are acknowledged without being written a
second time. Either way every entry ends up in exactly one file.

An entry the exporter cannot read (not JSON, or not a decision log document) is not lost either: before
step 3 it is copied, bytes as they were and under its own stream id, to the stream `{log}:unreadable`
(named in the export's problems), and then acknowledged with the rest. An interrupted run copies it
again under the same id, which Redis refuses, so it is kept once.

One export runs at a time: each holds `{log}:export-lock` (a random token, an hour's TTL renewed at each
step), and another started meanwhile, by cron or by hand, is refused and changes nothing. Without it the
second would take the first's marker for an interrupted run, delete its partial file, and export its
pending entries a second time. A killed export's lock lapses with its TTL (or `DEL` it).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from engine.registry import sha256_file
from feature_store.cluster import SyncRedis
from feature_store.decision_log import ENTRY_FIELD
from feature_store.keys import Keys

GROUP = "export"
CONSUMER = "exporter"
LOCK_TTL_S = 3600  # renewed at each step; only a killed export leaves it to lapse
# Renew (ARGV[2] seconds) or release (ARGV[2] = 0) the lock, only while this export (ARGV[1]) holds it.
_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""

SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # decision | shadow | reward
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("customer", pa.string()),  # pseudonym; null for unknown customers
        pa.field("placement", pa.string()),
        pa.field("channel", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("config_version", pa.string()),
        pa.field("policy", pa.string()),
        pa.field("policy_params", pa.string()),  # JSON object
        pa.field("fallback_reason", pa.string()),
        pa.field("context_item", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("action", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("propensity", pa.float64()),
        pa.field("target_policy", pa.string()),
        pa.field("target_propensity", pa.float64()),
        pa.field("reward_type", pa.string()),
        pa.field("reward", pa.float64()),
    ]
)


class ExportError(RuntimeError):
    """The export cannot run as asked (e.g. the output file exists); nothing was acknowledged."""


@dataclass
class ExportResult:
    file: Path | None
    entries: int = 0
    rows: int = 0
    decisions: int = 0
    rewards: int = 0
    skipped: int = 0  # unreadable entries: kept out of the file, copied to `{log}:unreadable`, named in `problems`
    recovered: int = 0  # entries of an interrupted earlier run, acknowledged now (already in its file)
    recovered_file: str | None = None
    problems: list[str] = field(default_factory=list)


def _rows(stream_id: str, doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    base = {
        "stream_id": stream_id,
        "decision_id": doc["decision_id"],
        "ts": doc["ts"],
    }
    if doc["kind"] == "reward":
        yield base | {
            "kind": "reward",
            "action": doc["action"],
            "reward_type": doc["reward_type"],
            "reward": float(doc["reward"]),
        }
        return
    ctx = doc.get("context") or {}
    common = base | {
        "customer": doc.get("customer"),
        "placement": doc.get("placement"),
        "channel": doc.get("channel"),
        "model_version": doc.get("model_version"),
        "config_version": doc.get("config_version"),
        "fallback_reason": doc.get("fallback_reason"),
        "context_item": ctx.get("item_id"),
    }
    shadow = doc.get("shadow")
    targets = shadow["target_propensities"] if shadow else []
    for j, a in enumerate(doc["actions"]):
        yield common | {
            "kind": "decision",
            "policy": doc["policy"],
            "policy_params": orjson.dumps(doc.get("policy_params", {})).decode(),
            "position": a["position"],
            "action": a["item_id"],
            "score": a["score"],
            "propensity": a["propensity"],
            "target_policy": shadow["policy"] if shadow else None,
            "target_propensity": targets[j] if j < len(targets) else None,
        }
    if shadow:
        for a in shadow["actions"]:
            yield common | {
                "kind": "shadow",
                "policy": shadow["policy"],
                "policy_params": orjson.dumps(shadow.get("policy_params", {})).decode(),
                "position": a["position"],
                "action": a["item_id"],
                "propensity": a["propensity"],
            }


class LogExporter:
    def __init__(self, client: SyncRedis, keys: Keys, batch: int = 5_000) -> None:
        self.client = client
        self.keys = keys
        self.batch = batch

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.log_stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str, limit: int) -> list[tuple[str, dict[bytes, bytes] | None]]:
        """Up to `limit` entries: the unacknowledged ones from `start` = "0", or new ones with ">"."""
        out: list[tuple[str, dict[bytes, bytes] | None]] = []
        cursor = start
        while len(out) < limit:
            reply: Any = self.client.xreadgroup(
                GROUP, CONSUMER, {self.keys.log_stream: cursor}, count=min(self.batch, limit - len(out))
            )
            entries = reply[0][1] if reply else []
            if not entries:
                break
            for sid, fields in entries:
                out.append((sid.decode() if isinstance(sid, bytes) else str(sid), fields or None))
            if start == "0":
                cursor = out[-1][0]  # walk forward through the pending list
        return out

    def _ack(self, ids: list[str]) -> None:
        for i in range(0, len(ids), self.batch):
            chunk = ids[i : i + self.batch]
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.keys.log_stream, GROUP, *chunk)
            pipe.xdel(self.keys.log_stream, *chunk)
            pipe.execute()

    def _keep_unreadable(self, sid: str, raw: bytes, why: str) -> None:
        try:
            self.client.xadd(self.keys.log_unreadable, {ENTRY_FIELD: raw, "why": why}, id=sid)
        except redis.ResponseError as exc:
            if "equal or smaller" not in str(exc):  # not kept by an interrupted earlier run: a real failure
                raise

    def _pending_ids(self, first: str, last: str) -> list[str]:
        ids: list[str] = []
        cursor = first
        while True:
            rows: Any = self.client.xpending_range(
                self.keys.log_stream, GROUP, min=cursor, max=last, count=self.batch, consumername=CONSUMER
            )
            if not rows:
                return ids
            ids += [r["message_id"].decode() if isinstance(r["message_id"], bytes) else r["message_id"] for r in rows]
            cursor = "(" + ids[-1]

    def _recover(self, result: ExportResult) -> None:
        raw = self.client.get(self.keys.log_export)
        if raw is None:
            return
        marker = orjson.loads(raw)
        done = Path(marker["file"])
        if done.exists() and sha256_file(done) == marker["sha256"]:
            ids = self._pending_ids(marker["first"], marker["last"])
            self._ack(ids)
            result.recovered, result.recovered_file = len(ids), str(done)
        else:
            # The rename never happened: the entries are still pending and are exported now.
            done.with_name(done.name + ".partial").unlink(missing_ok=True)
        self.client.delete(self.keys.log_export)

    def export(
        self, out: Path, max_entries: int = 1_000_000, fault: Callable[[str], None] | None = None
    ) -> ExportResult:
        """Drain up to `max_entries` entries into the Parquet file `out` (see the module docstring).

        `fault` is called with the name of each step before it runs (tests interrupt the export there).
        Raises `ExportError` when another export is running.
        """
        lock = self.keys.log_export_lock
        token = secrets.token_hex(8)
        if not self.client.set(lock, token, nx=True, ex=LOCK_TTL_S):
            held = self.client.ttl(lock)
            raise ExportError(f"another export is running ({lock} is held for {held} s more); run again after it")
        try:
            return self._export(out, max_entries, fault, token)
        finally:
            self.client.eval(_LOCK, 1, lock, token, 0)

    def _step(self, name: str, token: str, fault: Callable[[str], None] | None) -> None:
        """Before each step: renew the lock (stop if it lapsed), then let a test interrupt there."""
        if not self.client.eval(_LOCK, 1, self.keys.log_export_lock, token, LOCK_TTL_S):
            raise ExportError(f"{self.keys.log_export_lock} lapsed during this export; run it again")
        if fault:
            fault(name)

    def _export(self, out: Path, max_entries: int, fault: Callable[[str], None] | None, token: str) -> ExportResult:
        self._ensure_group()
        result = ExportResult(file=None)
        self._recover(result)
        if out.exists():
            if result.recovered_file == str(out.resolve()):
                return result
            raise ExportError(f"{out} already exists; export into a new file")
        if not out.parent.is_dir():  # found before an entry is read: nothing is left pending
            raise ExportError(f"{out.parent} is not a folder; create it or export elsewhere")
        entries = self._read("0", max_entries)
        entries += self._read(">", max_entries - len(entries))
        if not entries:
            return result
        rows: list[dict[str, Any]] = []
        for sid, fields in entries:
            raw = fields.get(ENTRY_FIELD.encode()) if fields else None
            if raw is None:
                result.skipped += 1  # deleted while pending: nothing to write, acknowledged below
                continue
            try:
                doc = orjson.loads(raw)
                new_rows = list(_rows(sid, doc))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                self._keep_unreadable(sid, raw, why)
                result.skipped += 1
                result.problems.append(f"stream entry {sid}: unreadable ({why}); kept in {self.keys.log_unreadable}")
                continue
            rows += new_rows
            result.decisions += doc["kind"] == "decision"
            result.rewards += doc["kind"] == "reward"
        result.entries, result.rows = len(entries), len(rows)
        partial = out.with_name(out.name + ".partial")
        self._step("write", token, fault)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, partial, compression="zstd")
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        ids = [sid for sid, _ in entries]
        marker = {"file": str(out.resolve()), "sha256": sha256_file(partial), "first": ids[0], "last": ids[-1]}
        self.client.set(self.keys.log_export, orjson.dumps(marker))
        self._step("rename", token, fault)
        os.replace(partial, out)
        self._step("ack", token, fault)
        self._ack(ids)
        self.client.delete(self.keys.log_export)
        result.file = out
        return result
