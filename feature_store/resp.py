"""A lean asyncio Redis client for the request path: one multiplexed connection, replies in FIFO order.

redis-py's asyncio client spends ~100 µs of Python per command (pool, locks, packing); a decision has a
budget of a few milliseconds, so the request path talks RESP directly: commands are written on one
persistent connection (unix socket or TCP) and each waits for its reply with a deadline. A command
that times out leaves its slot in the FIFO, and its late reply is dropped when it arrives. Parsing is
hiredis (C).
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


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.pending:
                # A reply nobody asked for: the stream is out of step, so drop the connection.
                self._fail(RespConnectionError("unexpected reply from Redis"))
                return
            fut = self.pending.popleft()
            if fut.done():
                continue  # its caller gave up (timeout); the late reply is discarded
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(RespError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RespConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
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
        try:
            async with asyncio.timeout(self.timeout_s):
                if ep.unix_path:
                    _, proto = await loop.create_unix_connection(_Protocol, ep.unix_path)
                else:
                    _, proto = await loop.create_connection(_Protocol, ep.host, ep.port, ssl=ep.ssl_context())
        except (OSError, TimeoutError) as exc:
            raise RespConnectionError(f"cannot connect to Redis: {exc or type(exc).__name__}") from exc
        setup: list[tuple[Arg, ...]] = []
        if ep.password is not None:
            setup.append(("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password))
        if ep.db:
            setup.append(("SELECT", ep.db))
        if setup:
            await self._send(proto, setup)
        return proto

    def _write(self, proto: _Protocol, commands: Sequence[Sequence[Arg]]) -> list[asyncio.Future[Any]]:
        if len(proto.pending) + len(commands) > self.max_pending:
            raise RespConnectionError(f"more than {self.max_pending} commands waiting on Redis")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        proto.pending.extend(futures)
        assert proto.transport is not None
        proto.transport.write(b"".join(hiredis.pack_command(tuple(c)) for c in commands))  # type: ignore[arg-type]
        return futures

    async def _send(self, proto: _Protocol, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        return await self._replies(self._write(proto, commands))

    async def _replies(self, futures: list[asyncio.Future[Any]]) -> list[Any]:
        results = await self._settled(futures)
        first_error = next((r for r in results if isinstance(r, Exception)), None)
        if first_error is not None:
            raise first_error
        return results

    async def _settled(self, futures: list[asyncio.Future[Any]]) -> list[Any]:
        """Every reply in order, a failed one as its exception (so each error is retrieved); TimeoutError
        if they do not all arrive within the deadline."""
        results: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                for f in futures:
                    try:
                        results.append(await asyncio.shield(f))  # the deadline must not cancel the reply slot
                    except Exception as exc:
                        results.append(exc)
        except TimeoutError:
            # The deadline also passes when this process was busy (other requests' CPU work) while the replies
            # were already on the socket, and uvloop runs due timers before it reads. Look once more before
            # giving up, so a busy worker does not blame a healthy Redis and keep its circuit open.
            await asyncio.sleep(0)
            if not all(f.done() and not f.cancelled() for f in futures):
                raise
            results = [f.exception() or f.result() for f in futures]
        finally:
            for f in futures:
                if not f.done():
                    f.cancel()
        return results

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
