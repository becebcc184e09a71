"""Open-loop HTTP/1.1 load generator: sends on a fixed or Poisson schedule (benchmarks.pacing) over a keep-alive
pool of asyncio connections to a loopback server, latency measured from each scheduled send time."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

import numpy as np

from benchmarks.http_wire import ProtocolError, ResponseParser, encode_request, host_header
from benchmarks.pacing import Clock, LoopClock, make_clock, schedule

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

# Seams kept under their old names: the tests swap _make_clock for _LoopClock to exercise the fallback clock,
# which only takes effect because _Run.drive() looks the factory up in this module.
_make_clock = make_clock
_LoopClock = LoopClock

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

    def table_row(self) -> list[object]:
        """The cells under `TABLE_HEADERS`, as every serving report shows a rate."""
        return [
            self.rate,
            round(self.achieved_rate, 1),
            round(self.p50, 2),
            round(self.p95, 2),
            round(self.p99, 2),
            round(self.max, 2),
            self.errors + self.timeouts,
            sum(v for k, v in self.status_counts.items() if k != 200),
        ]

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


TABLE_HEADERS = ("rate (req/s)", "achieved", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors", "non-200")


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
        self.clock: Clock  # set by drive(): both need the running loop
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
    header = host_header(host, port)
    wire = [encode_request(r if isinstance(r, Request) else Request(*r), header) for r in requests]
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


def run_side_by_side(
    targets: Sequence[tuple[str, int]],
    requests: Sequence[Request | tuple[str, str, bytes]],
    rate: float,
    duration_s: float,
    *,
    warmup_s: float = 1.0,
    timeout_s: float = 2.0,
) -> list[LoadResult]:
    """Open loops against several servers at once, `rate` each, on one event loop.

    For A/B comparisons on a shared machine: whatever slows the machine down during the window slows
    every target alike, so the difference between them is the difference between the servers.
    """
    for host, _ in targets:
        check_loopback(host)

    async def together() -> list[LoadResult]:
        runs = [
            run_open_loop(host, port, requests, rate, duration_s, timeout_s=timeout_s, warmup_s=warmup_s)
            for host, port in targets
        ]
        return list(await asyncio.gather(*runs))

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(together())


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
