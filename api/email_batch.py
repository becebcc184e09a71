"""The pre-send batch: recipients in chunks, decided here and on the other workers, lines in recipient order.

A chunk is one round trip per step for its recipients (see `EmailSlots.slots_many`). Chunks overlap:
while one waits on Redis the next is decided, and with peers (the other workers of this server, see
`api.peers`) chunks are decided here and there, each worker taking the next chunk as soon as it finishes
one, so one batch uses every worker's core. Lines still go out in recipient order. A chunk in flight when
the client goes away still finishes, so what it decided is stored and logged (a later call reads it back).
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
LOOKAHEAD = 4  # chunks per worker started beyond the next one to send, at most (finished ones wait in memory)
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
    """Every recipient's line, in order, a chunk at a time; chunks shared with the peers as they have room.

    Each worker (this one and every peer) has `CHUNKS_IN_FLIGHT` places. The first chunks go round-robin;
    after that, a chunk goes to whichever worker just finished one, so a worker that is ahead (less busy, or
    its Redis replies sooner) takes more, and a chunk that is done early does not wait for the one before it
    to free its place. Lines still go out in recipient order: chunks finished ahead of the next one to send
    are kept (at most `LOOKAHEAD` places' worth). A peer that failed gets no more of this batch's chunks.
    """
    peers = runtime.peers.others() if runtime.peers is not None else []
    places: deque[Path | None] = deque([None, *peers] * CHUNKS_IN_FLIGHT)  # None: here
    lookahead = LOOKAHEAD * (1 + len(peers))
    starts = range(0, len(recipients), BATCH_CHUNK)
    tasks: dict[int, asyncio.Task[bytes]] = {}
    owner: dict[asyncio.Task[bytes], Path | None] = {}  # running chunks and where they run
    started = sent = 0
    while sent < len(starts):
        while places and started < len(starts) and started - sent < lookahead:
            where = places.popleft()
            start = starts[started]
            job = ChunkJob(campaign_id, placement, slots, start, recipients[start : start + BATCH_CHUNK])
            task = asyncio.create_task(_on_peer(runtime, where, job) if where is not None else _local(runtime, job))
            _RUNNING.add(task)
            task.add_done_callback(_RUNNING.discard)
            tasks[started], owner[task] = task, where
            started += 1
        head = tasks[sent]
        if head.done():
            del tasks[sent]
            sent += 1
            yield head.result()
            continue
        done, _ = await asyncio.wait(owner, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            where = owner.pop(task)
            if where is None or runtime.peers is None or runtime.peers.usable(where):
                places.append(where)
