"""The workers of one `nextbest serve` share the chunks of a pre-send batch.

A batch arrives on one connection, and the kernel hands a connection to whichever worker accepts first:
two batches started together often land on the same worker, and one batch alone would use one core of
several. So each worker also listens on a private Unix socket in a directory of its server
(`NEXTBEST_PEERS_DIR`, set by `nextbest serve` when it starts more than one worker), and a batch sends
some of its chunks to the other workers there. A chunk is a list of recipients; the peer decides, stores,
logs and renders them exactly as a local chunk would, and answers with the chunk's NDJSON lines.

A peer that is gone, refuses, answers what is not its chunk's lines, or stays silent past the budget
costs nothing but time: the chunk is then decided here, and the peer is left out for a few seconds (a
socket nobody listens on, left by a worker that died, is removed). Deciding twice is safe, because a
first call stores its content only if none is stored (the second decision finds the first one's content
and serves it).

Frame: 4-byte big-endian length, then the body (a job: orjson of {campaign_id, placement, slots, start,
recipients}; an answer: one status byte, b"+" lines or b"-" error text). Only processes of the same user
reach the socket (mode 0600 in a 0700 directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("nextbest.peers")

MAX_FRAME = 256 * 1024 * 1024  # a chunk's lines are a few hundred KB; anything near this is not ours
FORGET_S = 5.0  # a peer that failed is left out this long (a restarted worker comes back under a new pid)
_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class ChunkJob:
    campaign_id: str
    placement: str
    slots: int
    start: int
    recipients: list[Any]

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as the object of its fields

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkJob:
        d = orjson.loads(data)
        job = cls(str(d["campaign_id"]), str(d["placement"]), int(d["slots"]), int(d["start"]), list(d["recipients"]))
        if job.start < 0 or job.slots < 1:
            raise ValueError(f"bad chunk job: start {job.start}, slots {job.slots}")
        return job


class PeerError(Exception):
    """A peer could not decide a chunk (gone, refused, timed out, or failed)."""


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME}-byte limit")
    return await reader.readexactly(size)


def _frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


def _check_lines(peer: Path, job: ChunkJob, lines: bytes) -> None:
    """A line per recipient, in order, each a JSON object of ours: anything else is not served."""
    got = lines.split(b"\n")
    if got[-1:] != [b""] or len(got) - 1 != len(job.recipients):
        raise PeerError(f"{peer.name}: {len(got) - 1} lines for {len(job.recipients)} recipients")
    for k, line in enumerate(got[:-1], start=job.start):
        if not (line.startswith(b'{"index":%d,' % k) and line.endswith(b"}")):
            raise PeerError(f"{peer.name}: line {k - job.start} is not recipient {k}'s: {line[:80]!r}")


class Peers:
    """This worker's socket, and the sockets of the other workers of the same server."""

    def __init__(self, directory: Path, handler: Callable[[ChunkJob], Awaitable[bytes]]) -> None:
        self.directory = directory
        self.path = directory / f"{os.getpid()}.sock"
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._failed: dict[Path, float] = {}

    async def start(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a process of the same pid that died
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            await self._server.wait_closed()
            self._server = None

    def others(self) -> list[Path]:
        """The other workers' sockets (read from the directory each time: one small listing per batch)."""
        now = time.monotonic()
        self._failed = {p: t for p, t in self._failed.items() if now - t < FORGET_S}
        try:
            return sorted(p for p in self.directory.glob("*.sock") if p != self.path and p not in self._failed)
        except OSError:
            return []

    def forget(self, peer: Path) -> None:
        """A peer that failed is left out for a while."""
        self._failed[peer] = time.monotonic()

    def usable(self, peer: Path) -> bool:
        """Whether a peer may be given chunks (it has not failed within the last `FORGET_S`)."""
        failed_at = self._failed.get(peer)
        return failed_at is None or time.monotonic() - failed_at >= FORGET_S

    async def run(self, peer: Path, job: ChunkJob, timeout_s: float) -> bytes:
        """The chunk's NDJSON lines as the peer decided them; PeerError if it did not."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(peer))
                writer.write(_frame(job.to_bytes()))
                await writer.drain()
                answer = await _read_frame(reader)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if isinstance(exc, ConnectionRefusedError):
                # Nobody listens: the socket of a worker that died (a restarted one listens under its new pid).
                with contextlib.suppress(OSError):
                    peer.unlink()
            raise PeerError(f"{peer.name}: {type(exc).__name__}: {exc}") from exc
        finally:
            if writer is not None:
                writer.close()
        if answer[:1] != b"+":
            raise PeerError(f"{peer.name}: {answer[1:].decode('utf-8', 'replace')[:500]}")
        lines = answer[1:]
        _check_lines(peer, job, lines)
        return lines

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                job = ChunkJob.from_bytes(await _read_frame(reader))
            except (asyncio.IncompleteReadError, ValueError, KeyError, TypeError) as exc:
                writer.write(_frame(b"-bad job: " + str(exc).encode()))
                return
            try:
                lines = await self._handler(job)
            except Exception as exc:  # the caller decides the chunk itself; this worker keeps serving
                log.exception("a batch chunk from a peer failed")
                writer.write(_frame(b"-" + f"{type(exc).__name__}: {exc}".encode()))
                return
            writer.write(_frame(b"+" + lines))
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the asking worker went away; it decides the chunk itself
        finally:
            writer.close()
