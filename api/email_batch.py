"""The pre-send batch: recipients in chunks, decided here and on the other workers, lines in recipient order.

A chunk is one round trip per step for its recipients (see `EmailSlots.slots_many`). Chunks overlap:
while one waits on Redis the next is decided, and with peers (the other workers of this server, see
`api.peers`) every `1 + len(peers)`-th chunk is decided here and the others there, so one batch uses
every worker's core. Lines still go out in recipient order. A chunk in flight when the client goes away
still finishes, so what it decided is stored and logged (a later call reads it back).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from api import metrics
from api.email import YIELD_EVERY, SlotsRequest
from api.peers import ChunkJob, PeerError
from api.schemas import ID_PATTERN

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger("nextbest")
BATCH_CHUNK = 256  # recipients per round trip
CHUNKS_IN_FLIGHT = 2  # per worker: one chunk is decided while the one before waits on Redis
PEER_TIMEOUT_S = 30.0  # a peer silent this long is skipped and its chunk decided here
_RUNNING: set[asyncio.Task[bytes]] = set()  # chunks in flight, held until done (the loop keeps weak references)
_ID = re.compile(ID_PATTERN)


def recipient_id(entry: Any) -> str:
    """The customer id of one recipients entry: a string, or {"customer_id": ...}; ValueError says what is wrong."""
    if isinstance(entry, dict):
        extra = set(entry) - {"customer_id"}
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)}")
        entry = entry.get("customer_id")
    if not isinstance(entry, str) or not _ID.fullmatch(entry):  # fullmatch: `$` also matches before a final \n
        raise ValueError('a customer id (1-128 characters, no spaces or braces) or {"customer_id": ...}')
    return entry


async def chunk_lines(runtime: Runtime, job: ChunkJob) -> bytes:
    """One chunk's NDJSON lines: each recipient's content as the single call gives it, or its entry's error."""
    good: list[tuple[int, SlotsRequest]] = []
    out: dict[int, bytes] = {}
    for k, entry in enumerate(job.recipients, start=job.start):
        try:
            cid = recipient_id(entry)
        except ValueError as exc:
            out[k] = orjson.dumps(
                {"index": k, "customer_id": None, "error": f"recipients[{k}]: {exc}", "content": None}
            )
            continue
        good.append((k, SlotsRequest(job.campaign_id, cid, job.placement, job.slots)))
    answers = await runtime.email.slots_many([r for _, r in good])
    state = runtime.state
    assert state is not None
    for n, ((k, r), answer) in enumerate(zip(good, answers, strict=True)):
        if n and not n % YIELD_EVERY:
            await asyncio.sleep(0)
        content = runtime.email_renderer.body(answer, state)
        out[k] = orjson.dumps({"index": k, "customer_id": r.customer_id, "error": None, "content": content})
    return b"".join(out[k] + b"\n" for k in sorted(out))


async def _on_peer(runtime: Runtime, peer: Path, job: ChunkJob) -> bytes:
    assert runtime.peers is not None
    try:
        lines = await runtime.peers.run(peer, job, PEER_TIMEOUT_S)
    except PeerError as exc:
        log.warning("batch chunk at recipient %d decided here: peer failed (%s)", job.start, exc)
        runtime.peers.forget(peer)
        metrics.EMAIL_BATCH_CHUNKS.labels("local_after_peer_failed").inc()
        return await chunk_lines(runtime, job)
    metrics.EMAIL_BATCH_CHUNKS.labels("peer").inc()
    return lines


async def _local(runtime: Runtime, job: ChunkJob) -> bytes:
    lines = await chunk_lines(runtime, job)
    metrics.EMAIL_BATCH_CHUNKS.labels("local").inc()
    return lines


async def batch_lines(
    runtime: Runtime, campaign_id: str, placement: str, slots: int, recipients: list[Any]
) -> AsyncIterator[bytes]:
    """Every recipient's line, in order, a chunk at a time; chunks shared round-robin with the peers."""
    peers = runtime.peers.others() if runtime.peers is not None else []
    width = 1 + len(peers)
    in_flight: deque[asyncio.Task[bytes]] = deque()
    for c, start in enumerate(range(0, len(recipients), BATCH_CHUNK)):
        job = ChunkJob(campaign_id, placement, slots, start, recipients[start : start + BATCH_CHUNK])
        turn = c % width
        task = asyncio.create_task(_on_peer(runtime, peers[turn - 1], job) if turn else _local(runtime, job))
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)
        in_flight.append(task)
        if len(in_flight) >= CHUNKS_IN_FLIGHT * width:
            yield await in_flight.popleft()
    while in_flight:
        yield await in_flight.popleft()
