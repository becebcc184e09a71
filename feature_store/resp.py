"""A lean asyncio Redis client for the request path: one multiplexed connection, replies in FIFO order.

redis-py's asyncio client spends ~100 µs of Python per command (pool, locks, packing); a decision has a
budget of a few milliseconds, so the request path talks RESP directly: commands are written on one
persistent connection (unix socket or TCP), and each write (one command or a pipeline) waits for its
replies with a deadline, on one future. A write that times out leaves its slots in the FIFO, and its late
replies are dropped when they arrive. Parsing is hiredis (C).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

Arg = bytes | str | int | float
# Loop turns a connect that missed its deadline still gets, in case the deadline passed while this process was
# busy and the connection was made meanwhile (a connect to a live server takes one or two). Replies get one.
CONNECT_GRACE_TURNS = 4


class RespError(Exception):
    """Redis answered with an error reply."""


class RespConnectionError(ConnectionError):
    """The connection could not be made, was lost, or is overloaded."""


@dataclass(frozen=True)
class Endpoint:
    unix_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False  # rediss://: TLS with certificate and host name checks
    ca_file: str | None = None  # ?ssl_ca_certs=<file>: trust this CA (a private one) instead of the system's

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        u = urlparse(url)
        query = parse_qs(u.query)
        db = int(query.get("db", ["0"])[0])
        password = unquote(u.password) if u.password else None
        username = unquote(u.username) if u.username else None
        if u.scheme == "unix":
            return cls(unix_path=u.path, db=db, username=username, password=password)
        if u.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"unsupported Redis URL scheme {u.scheme!r} "
                "(use redis://, rediss://, unix://, or redis+cluster:// / rediss+cluster:// for a Redis Cluster)"
            )
        if u.path and u.path.strip("/"):
            db = int(u.path.strip("/"))
        return cls(
            host=u.hostname or "127.0.0.1",
            port=u.port or 6379,
            db=db,
            username=username,
            password=password,
            tls=u.scheme == "rediss",
            ca_file=query.get("ssl_ca_certs", [None])[0],
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.tls else None


@dataclass(frozen=True)
class Script:
    """A Lua script, run by its SHA1 and loaded into the server on first use (or after a restart)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class RedisClient(Protocol):
    """What the request path needs from Redis: `LeanRedis` (one server) or `ClusterLeanRedis` (a Redis Cluster,
    feature_store.cluster); `feature_store.cluster.connect` picks one from the URL."""

    async def execute(self, *args: Arg) -> Any: ...

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]: ...

    async def pipeline_written(self, commands: Sequence[Sequence[Arg]]) -> Coroutine[Any, Any, list[Any]]: ...

    async def run_script(self, script: Script, calls: Sequence[Sequence[Arg]]) -> list[Any]: ...

    async def close(self) -> None: ...


async def _done_after_all(awaited: asyncio.Future[Any], turns: int) -> bool:
    """Whether `awaited`, whose deadline just passed, completes within `turns` more turns of the loop.

    The deadline also passes when this process was busy (other requests' CPU work) while the answer was
    already on the socket, and uvloop runs due timers before it reads: looking again before giving up
    keeps a busy worker from blaming a healthy Redis (and failing what it was about to get).
    """
    for _ in range(turns):
        if awaited.done():
            break
        await asyncio.sleep(0)
    return awaited.done() and not awaited.cancelled()


class _Batch:
    """The replies one write waits for: `size` of them, in order, then `future` gets the list (an error
    reply as its `RespError`). One future per write, not per command: a pipeline of 500 commands is one
    wake-up of its caller."""

    __slots__ = ("future", "replies", "size")

    def __init__(self, future: asyncio.Future[list[Any]], size: int) -> None:
        self.future = future
        self.size = size
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: collections.deque[_Batch] = collections.deque()
        self.waiting = 0  # replies still due, over every pending batch
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not pending:
                # A reply nobody asked for: the stream is out of step, so drop the connection.
                self._fail(RespConnectionError("unexpected reply from Redis"))
                return
            batch = pending[0]
            batch.replies.append(RespError(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply)
            self.waiting -= 1
            if len(batch.replies) == batch.size:
                pending.popleft()
                if not batch.future.done():  # else its caller gave up (timeout): the late replies are dropped
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RespConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        while self.pending:
            batch = self.pending.popleft()
            if not batch.future.done():
                batch.future.set_exception(exc)
        self.waiting = 0
        if self.transport is not None:
            self.transport.abort()


class LeanRedis:
    def __init__(self, url: str, timeout_s: float, max_pending: int = 10_000) -> None:
        self.endpoint = Endpoint.from_url(url)
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and self._proto.lost is None:
                return self._proto
            self._proto = await self._connect()
            return self._proto

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        if ep.unix_path:
            opening = loop.create_task(loop.create_unix_connection(_Protocol, ep.unix_path))
        else:
            opening = loop.create_task(loop.create_connection(_Protocol, ep.host, ep.port, ssl=ep.ssl_context()))
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    _, proto = await asyncio.shield(opening)
            except TimeoutError:
                if not await _done_after_all(opening, CONNECT_GRACE_TURNS):
                    raise
                _, proto = opening.result()
        except (OSError, TimeoutError) as exc:
            raise RespConnectionError(f"cannot connect to Redis: {str(exc) or type(exc).__name__}") from exc
        finally:
            if not opening.done():
                opening.cancel()
        setup: list[tuple[Arg, ...]] = []
        if ep.password is not None:
            setup.append(("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password))
        if ep.db:
            setup.append(("SELECT", ep.db))
        if setup:
            await self._send(proto, setup)
        return proto

    def _write(self, proto: _Protocol, commands: Sequence[Sequence[Arg]]) -> _Batch:
        if proto.waiting + len(commands) > self.max_pending:
            raise RespConnectionError(f"more than {self.max_pending} commands waiting on Redis")
        batch = _Batch(asyncio.get_running_loop().create_future(), len(commands))
        if not commands:
            batch.future.set_result(batch.replies)
            return batch
        proto.pending.append(batch)
        proto.waiting += len(commands)
        assert proto.transport is not None
        proto.transport.write(b"".join(hiredis.pack_command(tuple(c)) for c in commands))  # type: ignore[arg-type]
        return batch

    async def _send(self, proto: _Protocol, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        return await self._replies(self._write(proto, commands))

    async def _replies(self, batch: _Batch) -> list[Any]:
        results = await self._settled(batch)
        first_error = next((r for r in results if isinstance(r, RespError)), None)
        if first_error is not None:
            raise first_error
        return results

    async def _settled(self, batch: _Batch) -> list[Any]:
        """Every reply in order, an error reply as its `RespError`; TimeoutError if they do not all arrive
        within the deadline, the connection's error if it is lost first."""
        future = batch.future
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(future)  # the deadline must not cancel the reply slots
        except TimeoutError:
            if not await _done_after_all(future, 1):
                raise
            return future.result()
        finally:
            if not future.done():
                future.cancel()  # its replies, when they come, are dropped

    async def execute(self, *args: Arg) -> Any:
        proto = await self._connection()
        return (await self._send(proto, [args]))[0]

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands in one write and one round trip; replies in order (RespError on an error reply)."""
        proto = await self._connection()
        return await self._send(proto, commands)

    async def pipeline_written(self, commands: Sequence[Sequence[Arg]]) -> Coroutine[Any, Any, list[Any]]:
        """Write the commands now and return an awaitable of their replies (same deadline as `pipeline`).

        For writes whose reply need not hold up an answer: once this returns, the commands are on the
        connection ahead of anything sent after them, and Redis runs them in that order.
        """
        proto = await self._connection()
        return self._replies(self._write(proto, commands))

    async def send_settled(self, commands: Sequence[Sequence[Arg]]) -> Coroutine[Any, Any, list[Any]]:
        """Write the commands now; the awaitable gives every reply in order, an error reply as its `RespError`
        instead of raising it (a routing client such as `ClusterLeanRedis` acts on MOVED/ASK per command)."""
        proto = await self._connection()
        return self._settled(self._write(proto, commands))

    async def run_script(self, script: Script, calls: Sequence[Sequence[Arg]]) -> list[Any]:
        """One EVALSHA per call (numkeys, keys…, args…), all in one round trip; loads the script on NOSCRIPT.

        Retrying the whole batch after a load is safe: NOSCRIPT means none of the calls ran.
        """
        commands = [("EVALSHA", script.sha, *call) for call in calls]
        try:
            return await self.pipeline(commands)
        except RespError as exc:
            if "NOSCRIPT" not in str(exc):
                raise
            await self.execute("SCRIPT", "LOAD", script.source)
            return await self.pipeline(commands)

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
