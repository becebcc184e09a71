"""Open-loop HTTP/1.1 load generator: fixed or Poisson arrivals, latency measured from the scheduled send
time (no coordinated omission), a keep-alive connection pool on asyncio Protocols, loopback targets only."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import ipaddress
import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

import numpy as np

__all__ = [
    "LoadResult",
    "ProtocolError",
    "Request",
    "ResponseParser",
    "check_loopback",
    "max_sustained_rate",
    "post_bodies",
    "run_open_loop",
    "run_rate_sweep",
    "schedule",
]

# A response head larger than this is not something our server sends; refuse it rather than buffer forever.
_MAX_HEAD_BYTES: Final = 64 * 1024
# Timeouts are checked by a periodic sweep instead of one timer per request: that keeps the per-request
# cost to a few list operations, at the price of timeouts firing up to this late (irrelevant next to
# timeouts of a second or more).
_MAX_SWEEP_S: Final = 0.01


@dataclass(frozen=True)
class Request:
    """One HTTP request to replay; the wire bytes are built once before the run."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def post_bodies(path: str, bodies: Sequence[bytes], headers: tuple[tuple[str, str], ...] = ()) -> list[Request]:
    """POST requests to one path, one per body (the usual "list of JSON payloads" case)."""
    return [Request("POST", path, body, headers) for body in bodies]


@dataclass(frozen=True, eq=False)
class LoadResult:
    """What one open-loop run at one arrival rate measured (warm-up requests excluded)."""

    rate: float  # target arrival rate, requests per second
    duration_s: float  # length of the measured window
    sent: int  # requests scheduled in the window; each ends as completed, error or timeout
    completed: int  # a full response arrived (any status)
    errors: int  # connect failures, resets, malformed responses
    timeouts: int  # no response within timeout_s of the scheduled time (in flight or still queued)
    status_counts: dict[int, int]
    latencies_ms: np.ndarray  # one per completed request, from its scheduled time to the response end
    achieved_rate: float  # completed / time from window start to the last completion (at least duration_s)
    waited: int = 0  # requests that found no idle connection at their scheduled time
    connections_opened: int = 0
    send_lag_p99_ms: float = math.nan  # scheduler lateness when a connection was free: the generator's own noise
    cpu_s: float = math.nan  # process CPU time spent during the run (includes warm-up and drain)
    wall_s: float = math.nan  # whole run: warm-up + window + drain
    poisson: bool = False
    error_kinds: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        """Latency percentile in ms, q in [0, 100]; "higher" so the value is one actually observed."""
        if self.latencies_ms.size == 0:
            return math.nan
        return float(np.percentile(self.latencies_ms, q, method="higher"))

    @property
    def p50(self) -> float:
        return self.percentile(50.0)

    @property
    def p95(self) -> float:
        return self.percentile(95.0)

    @property
    def p99(self) -> float:
        return self.percentile(99.0)

    @property
    def max(self) -> float:
        return float(self.latencies_ms.max()) if self.latencies_ms.size else math.nan

    @property
    def failed(self) -> int:
        """Requests that did not end in a 1xx-3xx response."""
        bad_status = sum(n for status, n in self.status_counts.items() if status >= 400)
        return self.errors + self.timeouts + bad_status

    def sustained(self, p99_budget_ms: float) -> bool:
        """The server kept up: ≥ 97% of the offered rate completed, nothing failed, p99 within budget.

        The offered rate is the number of requests the schedule put in the window over its length: the
        target for a fixed schedule, the actual draw for a Poisson one (which may be a few % off).
        """
        if self.sent == 0 or self.failed:
            return False
        offered = min(self.rate, self.sent / self.duration_s)
        return self.achieved_rate >= 0.97 * offered and self.p99 <= p99_budget_ms

    def summary(self) -> dict[str, float | int]:
        """Flat numbers for a report table row."""
        return {
            "rate": self.rate,
            "achieved": self.achieved_rate,
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "p50_ms": self.p50,
            "p95_ms": self.p95,
            "p99_ms": self.p99,
            "max_ms": self.max,
            "waited": self.waited,
            "connections": self.connections_opened,
            "send_lag_p99_ms": self.send_lag_p99_ms,
            "cpu_s": self.cpu_s,
        }


def max_sustained_rate(results: Sequence[LoadResult], p99_budget_ms: float) -> float | None:
    """The highest target rate the server sustained within the p99 budget, None if none was."""
    ok = [r.rate for r in results if r.sustained(p99_budget_ms)]
    return max(ok) if ok else None


def check_loopback(host: str) -> None:
    """Raise ValueError unless host is a loopback address or a name resolving only to loopback ones.

    The generator can saturate whatever it points at; it is only ever meant for a local server.
    """
    if host.lower().rstrip(".") == "localhost":
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    else:
        addresses = {host.strip("[]")}
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"refusing host {host!r}: the load generator only targets loopback") from None
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
            raise ValueError(f"refusing host {host!r} ({address}): the load generator only targets loopback")


def schedule(
    rate: float, duration_s: float, *, warmup_s: float = 0.0, poisson: bool = False, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Send times in seconds from the start, and how many of them fall in the warm-up.

    The measured window is [warmup_s, warmup_s + duration_s); a fixed schedule puts a request exactly
    at warmup_s + k / rate.
    """
    if not (rate > 0 and duration_s > 0 and warmup_s >= 0):
        raise ValueError(f"need rate > 0, duration_s > 0, warmup_s >= 0; got {rate}, {duration_s}, {warmup_s}")
    if not poisson:
        n_warm = math.floor(warmup_s * rate + 1e-9)
        n_meas = max(1, round(duration_s * rate))
        return warmup_s + np.arange(-n_warm, n_meas, dtype=np.float64) / rate, n_warm
    rng = np.random.default_rng(seed)
    end = warmup_s + duration_s
    expected = end * rate
    gaps = rng.exponential(1.0 / rate, size=int(expected + 6 * math.sqrt(expected) + 16))
    times = np.cumsum(gaps)
    while times[-1] < end:  # astronomically rare with the 6-sigma margin, but never silently short
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=len(times)))])
    times = times[times < end]
    return times, int(np.searchsorted(times, warmup_s))


def _encode(request: Request | tuple[str, str, bytes], host_header: str) -> tuple[bytes, bool]:
    if not isinstance(request, Request):
        request = Request(*request)
    method = request.method.upper()
    # The bytes go on the wire verbatim: refuse what would split or smuggle a request.
    if not method.isalpha() or not request.path.startswith("/") or any(c.isspace() for c in request.path):
        raise ValueError(f"malformed request line in {request!r}: method letters only, path from '/', no spaces")
    if any("\r" in part or "\n" in part for header in request.headers for part in header):
        raise ValueError(f"line break in a header of {request!r}")
    names = {name.lower() for name, _ in request.headers}
    if names & {"content-length", "transfer-encoding", "host"}:
        raise ValueError(f"{request!r}: Content-Length, Transfer-Encoding and Host are set by the generator")
    lines = [f"{method} {request.path} HTTP/1.1", f"Host: {host_header}"]
    if "user-agent" not in names:
        lines.append("User-Agent: nextbest-loadgen")
    if request.body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(request.body)}")
        if request.body and "content-type" not in names:
            lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in request.headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + request.body, method == "HEAD"


class ProtocolError(Exception):
    """The server's bytes are not a well-formed HTTP/1.1 response."""


_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(8)


class ResponseParser:
    """Incremental HTTP/1.1 response parser for one request at a time (the client never pipelines).

    feed() returns the status code once the whole response, body included, has arrived, else 0.
    """

    __slots__ = ("_buf", "_head_request", "_remaining", "_state", "_status", "keep_alive")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _IDLE
        self._remaining = 0
        self._status = 0
        self._head_request = False
        self.keep_alive = True

    def start(self, *, head_request: bool = False) -> None:
        """Expect the response to a newly sent request."""
        self._state = _HEAD
        self._head_request = head_request
        self._status = 0
        self.keep_alive = True

    def feed(self, data: bytes) -> int:
        if self._state == _IDLE:
            raise ProtocolError("data received while no request was outstanding")
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise ProtocolError("response head too large")
                    return 0
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._parse_head(head):
                    return self._finish()
            elif state == _BODY:
                if len(buf) >= self._remaining:
                    del buf[: self._remaining]
                    return self._finish()
                self._remaining -= len(buf)
                buf.clear()
                return 0
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    return 0
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line!r}") from None
                if size < 0:
                    raise ProtocolError(f"bad chunk size {line!r}")
                self._state, self._remaining = (_TRAILER, 0) if size == 0 else (_CHUNK_DATA, size)
            elif state == _CHUNK_DATA:
                if len(buf) < self._remaining:
                    self._remaining -= len(buf)
                    buf.clear()
                    return 0
                del buf[: self._remaining]
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return 0
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise ProtocolError("trailer too large")
                    return 0
                del buf[: end + 2]
                if end == 0:
                    return self._finish()
            else:  # _UNTIL_CLOSE: the body ends when the server closes the connection
                buf.clear()
                return 0

    def eof(self) -> int:
        """The server closed the connection: the status if that completed a close-delimited body, else 0."""
        if self._state == _UNTIL_CLOSE:
            self._state = _IDLE
            return self._status
        return 0

    def _parse_head(self, head: bytes) -> bool:
        """Set up body parsing from the head; True if the response has no body (it is complete)."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        try:
            status = int(status_line[9:12])
        except ValueError:
            raise ProtocolError(f"bad status line {status_line[:80]!r}") from None
        keep_alive = status_line[7:8] == b"1"  # HTTP/1.1 defaults to keep-alive, 1.0 to close
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise ProtocolError(f"bad Content-Length {value!r}") from None
                if length < 0:
                    raise ProtocolError(f"bad Content-Length {value!r}")
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("unexpected protocol upgrade")
            return False  # interim response: the real one follows, stay in _HEAD
        self._status = status
        self.keep_alive = keep_alive
        if self._head_request or status in (204, 304):
            return True
        if chunked:  # takes precedence over Content-Length (RFC 9112 §6.3)
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length == 0:
                return True
            self._state, self._remaining = _BODY, length
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        return False

    def _finish(self) -> int:
        self._state = _IDLE
        if self._buf:
            raise ProtocolError(f"{len(self._buf)} unexpected bytes after the response")
        return self._status


class _Clock(Protocol):
    """Calls back once at an absolute time.monotonic() value; arm() replaces the previous arming."""

    def arm(self, when: float) -> None: ...
    def close(self) -> None: ...


class _TimerfdClock:
    """A Linux timerfd watched by the event loop: wakes within ~50 µs of the due time.

    The event loops' own timers have millisecond granularity (libuv's clock; epoll's timeout), which
    would add up to 1 ms of artificial latency to every request, and waiting less than that makes
    uvloop spin. A timerfd costs one epoll wake-up per tick, sleeps precisely and never spins.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._libc = _libc()
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        self._loop = loop
        self._callback = callback
        self._spec = _ITimerSpec()  # reused: arming allocates nothing
        loop.add_reader(fd, self._fire)

    def arm(self, when: float) -> None:
        when = max(when, 1e-9)  # an all-zero time would disarm the timer instead of firing it
        sec = int(when)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = int((when - sec) * 1e9)
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # re-armed after it became readable: the new time has not come yet
            return
        self._callback()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class _LoopClock:
    """Fallback on the event loop's timers (millisecond granularity, so sends may be ~1 ms late)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        delay = when - time.monotonic()
        # uvloop rounds delays to whole milliseconds; a sub-millisecond wait would become a busy loop.
        self._handle = self._loop.call_later(max(delay, 0.001), self._callback) if delay > 0 else None
        if self._handle is None:
            self._handle = self._loop.call_soon(self._callback)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_CLOCK_MONOTONIC: Final = 1
_TFD_TIMER_ABSTIME: Final = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _make_clock(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> _Clock:
    # The timerfd is armed with time.monotonic() values, so it must be the same clock.
    if sys.platform == "linux" and time.get_clock_info("monotonic").implementation.endswith("(CLOCK_MONOTONIC)"):
        try:
            return _TimerfdClock(loop, callback)
        except (OSError, AttributeError, NotImplementedError):
            pass  # no timerfd (old kernel, seccomp) or a loop without add_reader
    return _LoopClock(loop, callback)


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying at most one request at a time."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.idx = -1  # index of the request in flight, -1 when idle
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, idx: int) -> None:
        self.idx = idx
        data, head = self.run.wire[idx % len(self.run.wire)]
        self.parser.start(head_request=head)
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            status = self.parser.feed(data)
        except ProtocolError:
            self.run.fail(self, "protocol")
            return
        if status:
            self.run.complete(self, status)

    def eof_received(self) -> bool:
        # Act on the server's FIN at once rather than at connection_lost, so a connection the server
        # closed while idle is never handed the next request.
        self._gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        if self.closed:
            return
        status = self.parser.eof() if self.idx >= 0 else 0
        if status:
            self.run.complete(self, status)
        if not self.closed:
            self.run.fail(self, "reset")

    def abort(self) -> None:
        """Drop the connection now (RST): used when its state is unknown (timeout, bad response)."""
        self.closed = True
        self.idx = -1
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close an idle connection politely (FIN)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


_Connect = Callable[[Callable[[], _Connection]], Awaitable[tuple[asyncio.BaseTransport, _Connection]]]


class _Run:
    """The state of one open-loop run: schedule, connection pool, queue of requests waiting for a
    connection, and the tallies. Callbacks only; the one coroutine is the scheduler in drive()."""

    def __init__(
        self,
        *,
        connect: _Connect,
        wire: list[tuple[bytes, bool]],
        times: np.ndarray,
        n_warm: int,
        max_connections: int,
        timeout_s: float,
    ) -> None:
        self.connect = connect
        self.wire = wire
        self.times: list[float] = times.tolist()  # list indexing is much cheaper than numpy scalars
        self.n_warm = n_warm
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.sweep_s = min(_MAX_SWEEP_S, timeout_s / 10)
        self.t0 = 0.0
        self.next_i = 0
        self.next_sweep = 0.0
        self.clock: _Clock  # set by drive(): both need the running loop
        self.done: asyncio.Future[None]
        self.idle: list[_Connection] = []  # LIFO: hot connections stay hot, cold ones may be dropped by the server
        self.busy: set[_Connection] = set()
        self.pending: deque[int] = deque()
        self.n_open = 0
        self.n_connecting = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = False
        # tallies, measured window only
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.status_counts: dict[int, int] = {}
        self.error_kinds: dict[str, int] = {}
        self.timeouts = 0
        self.waited = 0
        self.opened = 0
        self.last_end = 0.0

    # -- scheduling -------------------------------------------------------------------------------------

    async def drive(self) -> None:
        """Dispatch every request at its time, then drain; returns when each has an outcome."""
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.clock = _make_clock(loop, self.safe_tick)
        self.t0 = time.monotonic()
        self.next_sweep = self.sweep_s
        # The run ends by itself timeout_s after the last send; this bound only turns a bug into an error.
        bound = 2 * (self.times[-1] + self.timeout_s) + 10 if self.times else 10
        try:
            self.safe_tick()
            await asyncio.wait_for(self.done, bound)
        except TimeoutError:
            raise RuntimeError(f"load generator did not finish within {bound:.0f} s (bug)") from None
        finally:
            self.clock.close()
            self.finished = True

    def safe_tick(self) -> None:
        # tick() runs as a loop callback: an exception there would only be logged and leave drive()
        # waiting forever, so hand it to drive() instead.
        try:
            self.tick()
        except Exception as exc:
            if not self.done.done():
                self.done.set_exception(exc)

    def tick(self) -> None:
        times = self.times
        n = len(times)
        i = self.next_i
        now = time.monotonic() - self.t0
        # Everything already due goes out now: if the loop was late, requests leave in a burst and the
        # lateness is part of their latency, as it would be for real clients arriving on time.
        while i < n and times[i] <= now:
            self.dispatch(i, now)
            i += 1
        self.next_i = i
        if now >= self.next_sweep:
            self.sweep(now)
            self.next_sweep = now + self.sweep_s
        if i < n:
            self.clock.arm(self.t0 + min(times[i], self.next_sweep))
        elif self.busy or self.pending:
            # Drain: in-flight and queued requests complete or time out, so this ends by itself.
            self.clock.arm(self.t0 + self.next_sweep)
        elif not self.done.done():
            self.done.set_result(None)

    def dispatch(self, i: int, now: float) -> None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:  # defensive: closed connections leave the pool in drop()
                continue
            if i >= self.n_warm:
                self.lags.append(now - self.times[i])
            self.send(conn, i)
            return
        self.pending.append(i)
        if i >= self.n_warm:
            self.waited += 1
        if self.n_open + self.n_connecting < self.max_connections:
            self.open()

    def send(self, conn: _Connection, i: int) -> None:
        self.busy.add(conn)
        conn.send(i)

    def release(self, conn: _Connection) -> None:
        """conn is free: give it the oldest waiting request, or park it."""
        if self.pending and not self.finished:
            self.send(conn, self.pending.popleft())
        else:
            self.busy.discard(conn)
            self.idle.append(conn)

    def sweep(self, now: float) -> None:
        deadline = now - self.timeout_s
        times = self.times
        for conn in [c for c in self.busy if c.idx >= 0 and times[c.idx] < deadline]:
            self.record_timeout(conn.idx)
            self.drop(conn)
            conn.abort()
        pending = self.pending
        while pending and times[pending[0]] < deadline:
            self.record_timeout(pending.popleft())
        # Connections lost or failed while requests wait: keep trying (each failure is counted).
        while self.pending and self.n_open + self.n_connecting < min(self.max_connections, len(self.pending)):
            self.open()

    # -- connections ------------------------------------------------------------------------------------

    def open(self) -> None:
        self.n_connecting += 1
        task = asyncio.get_running_loop().create_task(self._connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        try:
            _, conn = await asyncio.wait_for(self.connect(lambda: _Connection(self)), self.timeout_s)
        except (OSError, TimeoutError):
            self.n_connecting -= 1
            if self.pending:  # the request that asked for this connection fails instead of waiting
                self.record_error(self.pending.popleft(), "connect")
            return
        self.n_connecting -= 1
        self.n_open += 1
        self.opened += 1
        if self.finished:
            conn.abort()
            self.n_open -= 1
            return
        self.release(conn)

    def drop(self, conn: _Connection) -> None:
        """Forget conn (closed, failed or timed out)."""
        if not conn.closed:
            self.n_open -= 1
        conn.closed = True
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    # -- outcomes ---------------------------------------------------------------------------------------

    def complete(self, conn: _Connection, status: int) -> None:
        end = time.monotonic() - self.t0
        i = conn.idx
        conn.idx = -1
        if i >= self.n_warm:
            self.latencies.append(end - self.times[i])
            self.status_counts[status] = self.status_counts.get(status, 0) + 1
            self.last_end = max(self.last_end, end)
        if conn.parser.keep_alive and not conn.closed:
            self.release(conn)
        else:
            self.drop(conn)
            conn.abort()
            if self.pending and self.n_open + self.n_connecting < self.max_connections:
                self.open()

    def fail(self, conn: _Connection, kind: str) -> None:
        if conn.idx >= 0:
            self.record_error(conn.idx, kind)
        self.drop(conn)
        conn.abort()
        if self.pending and self.n_open + self.n_connecting < self.max_connections:
            self.open()

    def record_error(self, i: int, kind: str) -> None:
        if i >= self.n_warm:
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def record_timeout(self, i: int) -> None:
        if i >= self.n_warm:
            self.timeouts += 1

    async def close(self) -> None:
        self.finished = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in self.busy:
            conn.abort()
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        self.busy.clear()


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def run_open_loop(
    host: str,
    port: int,
    requests: Sequence[Request | tuple[str, str, bytes]],
    rate: float,
    duration_s: float,
    *,
    max_connections: int = 64,
    timeout_s: float = 2.0,
    warmup_s: float = 1.0,
    poisson: bool = False,
    seed: int = 0,
    unix_path: str | None = None,
) -> LoadResult:
    """Send requests (cycled) at `rate` per second for warmup_s + duration_s and measure the window.

    Each request's latency runs from its scheduled time, so time spent waiting for a free connection or
    for a stalled server counts. A request without a response timeout_s after its scheduled time is
    abandoned (its connection closed) and counted as a timeout. The run ends by itself at most
    timeout_s (plus a sweep) after the last scheduled time. With unix_path, connects to that socket and
    uses host only for the Host header.
    """
    check_loopback(host)
    if not requests:
        raise ValueError("no requests to send")
    if max_connections < 1 or timeout_s <= 0:
        raise ValueError(f"need max_connections >= 1 and timeout_s > 0; got {max_connections}, {timeout_s}")
    times, n_warm = schedule(rate, duration_s, warmup_s=warmup_s, poisson=poisson, seed=seed)
    header = _host_header(host, port)
    wire = [_encode(r, header) for r in requests]
    loop = asyncio.get_running_loop()

    def connect(factory: Callable[[], _Connection]) -> Awaitable[tuple[asyncio.BaseTransport, _Connection]]:
        if unix_path is not None:
            return loop.create_unix_connection(factory, unix_path)
        return loop.create_connection(factory, host, port)

    run = _Run(
        connect=connect,
        wire=wire,
        times=times,
        n_warm=n_warm,
        max_connections=max_connections,
        timeout_s=timeout_s,
    )
    cpu0, wall0 = time.process_time(), time.monotonic()
    try:
        await run.drive()
    finally:
        await run.close()
    cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0

    sent = len(times) - n_warm
    completed = len(run.latencies)
    errors = sum(run.error_kinds.values())
    # Nothing may vanish: every scheduled request has exactly one outcome.
    assert completed + errors + run.timeouts == sent, (completed, errors, run.timeouts, sent)
    window = max(duration_s, run.last_end - warmup_s)
    lags = np.asarray(run.lags)
    return LoadResult(
        rate=rate,
        duration_s=duration_s,
        sent=sent,
        completed=completed,
        errors=errors,
        timeouts=run.timeouts,
        status_counts=dict(sorted(run.status_counts.items())),
        latencies_ms=np.asarray(run.latencies, dtype=np.float64) * 1e3,
        achieved_rate=completed / window,
        waited=run.waited,
        connections_opened=run.opened,
        send_lag_p99_ms=float(np.percentile(lags, 99) * 1e3) if lags.size else math.nan,
        cpu_s=cpu_s,
        wall_s=wall_s,
        poisson=poisson,
        error_kinds=dict(run.error_kinds),
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    # uvloop costs 10-30% less CPU per request than asyncio here; fall back to asyncio where it is missing.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return cast(asyncio.AbstractEventLoop, uvloop.new_event_loop())


def run_rate_sweep(
    host: str,
    port: int,
    requests: Sequence[Request | tuple[str, str, bytes]],
    rates: Sequence[float],
    duration_s: float,
    *,
    pause_s: float = 1.0,
    stop_when: Callable[[LoadResult], bool] | None = None,
    max_connections: int = 64,
    timeout_s: float = 2.0,
    warmup_s: float = 1.0,
    poisson: bool = False,
    seed: int = 0,
    unix_path: str | None = None,
) -> list[LoadResult]:
    """Run run_open_loop at each rate in turn on one event loop (uvloop when installed).

    pause_s lets the server settle between rates; stop_when(result) ends the sweep early (e.g. once the
    server clearly cannot keep up, higher rates only waste time). The other keywords are run_open_loop's.
    """
    check_loopback(host)

    async def sweep() -> list[LoadResult]:
        results: list[LoadResult] = []
        for k, rate in enumerate(rates):
            if k:
                await asyncio.sleep(pause_s)
            result = await run_open_loop(
                host,
                port,
                requests,
                rate,
                duration_s,
                max_connections=max_connections,
                timeout_s=timeout_s,
                warmup_s=warmup_s,
                poisson=poisson,
                seed=seed,
                unix_path=unix_path,
            )
            results.append(result)
            if stop_when is not None and stop_when(result):
                break
        return results

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(sweep())
