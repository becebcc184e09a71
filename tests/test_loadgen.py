"""The open-loop load generator against small real HTTP servers on 127.0.0.1 (and a unix socket)."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.loadgen import (
    LoadResult,
    ProtocolError,
    Request,
    ResponseParser,
    check_loopback,
    max_sustained_rate,
    post_bodies,
    run_open_loop,
    run_rate_sweep,
    schedule,
)

pytestmark = pytest.mark.timeout(60)


class _TinyServer:
    """A keep-alive HTTP/1.1 server whose behaviour is chosen by the request path."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.seen: set[str] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                _, path, _ = head[0].split(" ")
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length) if length else b"")
                if not await self.respond(path, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def respond(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write the response for path; False closes the connection."""
        first_time = path not in self.seen
        self.seen.add(path)
        if path.startswith("/sleep/"):
            await asyncio.sleep(int(path.split("/")[2]) / 1000)
        elif path.startswith("/stall/") and first_time:
            # Block the whole server, as a GC pause or a blocking call would: nothing is read or written.
            time.sleep(int(path.split("/")[2].partition("?")[0]) / 1000)
        elif path == "/hang":
            await reader.read()  # never answer; return once the client gives up and closes
            return False
        elif path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for chunk in (b"hello ", b"x" * 5000, b"world"):
                writer.write(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\nX-Trailer: yes\r\n\r\n")
            await writer.drain()
            return True
        elif path == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            return False
        elif path == "/until-close":
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody without a length")
            await writer.drain()
            return False
        elif path == "/then-close":  # a keep-alive response, then the server drops the idle connection
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return False
        elif path == "/no-content":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            return True
        elif path.startswith("/status/"):
            writer.write(b"HTTP/1.1 %s X\r\nContent-Length: 0\r\n\r\n" % path.split("/")[2].encode())
            return True
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}')
        return True


@contextmanager
def _serve_in_thread(start: Callable[[_TinyServer], Coroutine[Any, Any, asyncio.Server]]) -> Iterator[_TinyServer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    state = _TinyServer()
    server = asyncio.run_coroutine_threadsafe(start(state), loop).result(5)

    async def stop() -> None:
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield state
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, _TinyServer]]:
    ports: list[int] = []

    async def start(state: _TinyServer) -> asyncio.Server:
        srv = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        ports.append(srv.sockets[0].getsockname()[1])
        return srv

    with _serve_in_thread(start) as state:
        yield ports[0], state


def _run(
    port: int,
    requests: list[Request],
    rate: float,
    duration_s: float,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    **kw: object,
) -> LoadResult:
    kw.setdefault("warmup_s", 0.1)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run_open_loop("127.0.0.1", port, requests, rate, duration_s, **kw))  # type: ignore[arg-type]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def _outcomes_add_up(result: LoadResult) -> None:
    assert result.completed + result.errors + result.timeouts == result.sent
    assert sum(result.status_counts.values()) == result.completed == result.latencies_ms.size


def test_all_requests_complete_with_200_and_counts_add_up(server, loop_factory):
    port, state = server
    bodies = [b'{"customer_id": "c%d"}' % i for i in range(7)]
    result = _run(port, post_bodies("/v1/recommendations", bodies), rate=200, duration_s=1.0, loop_factory=loop_factory)
    assert result.sent == 200
    assert result.completed == result.sent
    assert result.status_counts == {200: result.sent}
    assert result.errors == result.timeouts == 0
    assert (result.latencies_ms > 0).all()
    assert result.achieved_rate > 0
    assert set(bodies) <= set(state.bodies)  # the pre-encoded bodies arrive intact
    _outcomes_add_up(result)


def test_latency_includes_the_server_time(server):
    port, _ = server
    result = _run(port, [Request("GET", "/sleep/20")], rate=50, duration_s=0.6)
    assert result.completed == result.sent == 30
    assert result.latencies_ms.min() >= 20.0 * 0.999


def test_requests_scheduled_during_a_stall_carry_it_in_their_latency(server):
    port, _ = server
    # 200 req/s; the 60th request blocks the server for 300 ms. With only 4 connections, a closed-loop
    # client would record about 4 slow requests; measured from the schedule, the ~60 requests due during
    # the stall each carry the part of the stall still ahead of them.
    requests = [Request("GET", "/")] * 199 + [Request("GET", f"/stall/300?{uuid.uuid4().hex}")]
    requests = requests[140:] + requests[:140]  # the stalling request is the 60th of the window
    result = _run(port, requests, rate=200, duration_s=1.0, warmup_s=0.0, max_connections=4, timeout_s=2.0)
    assert result.completed == result.sent == 200
    assert result.timeouts == result.errors == 0
    assert result.max >= 300.0 * 0.999
    assert (result.latencies_ms >= 150).sum() >= 20
    assert result.waited > 0


def test_hung_requests_time_out_while_the_rest_complete(server, loop_factory):
    port, _ = server
    requests = [Request("GET", "/")] * 9 + [Request("GET", "/hang")]
    started = time.monotonic()
    result = _run(port, requests, rate=100, duration_s=1.0, loop_factory=loop_factory, warmup_s=0.0, timeout_s=0.25)
    assert time.monotonic() - started < 30  # bounded by itself, generously
    assert result.timeouts == result.sent // 10
    assert result.completed == result.sent - result.timeouts
    assert result.errors == 0
    assert result.status_counts == {200: result.completed}
    assert not result.sustained(p99_budget_ms=1e9)
    _outcomes_add_up(result)


def test_a_server_stalled_past_the_timeout_gives_timeouts_not_a_stalled_generator(server):
    port, _ = server
    requests = [Request("GET", f"/stall/600?{uuid.uuid4().hex}")] + [Request("GET", "/")] * 99
    result = _run(port, requests, rate=100, duration_s=1.0, warmup_s=0.0, timeout_s=0.2)
    assert result.timeouts >= 30  # those due in the first 400 ms of the 600 ms stall cannot make it
    assert result.completed >= 30  # the generator kept its schedule and the server recovered
    _outcomes_add_up(result)


def test_chunked_close_delimited_and_bodiless_responses_parse(server, loop_factory):
    port, _ = server
    paths = ["/chunked", "/close", "/until-close", "/no-content", "/"]
    result = _run(port, [Request("GET", p) for p in paths], rate=100, duration_s=0.5, loop_factory=loop_factory)
    assert result.errors == result.timeouts == 0
    assert result.status_counts == {200: 40, 204: 10}


def test_the_event_loop_timer_fallback_also_keeps_the_schedule(server, monkeypatch):
    from benchmarks import loadgen

    monkeypatch.setattr(loadgen, "_make_clock", loadgen._LoopClock)
    port, _ = server
    result = _run(port, [Request("GET", "/")], rate=200, duration_s=0.5)
    assert result.status_counts == {200: 100}


def test_connections_the_server_closes_while_idle_are_replaced_without_errors(server, loop_factory):
    port, _ = server
    # The FIN follows each response at once: a real race (FIN still in flight when the next request goes
    # out) would be counted as an error, as it is for any client, so requests are spaced 40 ms apart.
    result = _run(port, [Request("GET", "/then-close")], rate=25, duration_s=0.6, loop_factory=loop_factory)
    assert result.status_counts == {200: 15}
    assert result.errors == 0
    assert result.connections_opened >= 15


def test_error_statuses_are_counted_and_break_sustained(server):
    port, _ = server
    result = _run(port, [Request("GET", "/"), Request("GET", "/status/503")], rate=100, duration_s=0.4)
    assert result.status_counts == {200: 20, 503: 20}
    assert result.errors == 0
    assert not result.sustained(p99_budget_ms=1e9)


def test_a_closed_port_counts_connection_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket closes
    result = _run(port, [Request("GET", "/")], rate=100, duration_s=0.3, timeout_s=0.5)
    assert result.completed == 0
    assert result.errors == result.sent == 30
    assert result.error_kinds == {"connect": 30}
    assert max_sustained_rate([result], 1e9) is None


def test_unix_socket_target(tmp_path: Path):
    path = str(tmp_path / "s.sock")

    async def start(state: _TinyServer) -> asyncio.Server:
        return await asyncio.start_unix_server(state.handle, path)

    with _serve_in_thread(start):
        result = _run(0, [Request("GET", "/")], rate=100, duration_s=0.3, unix_path=path)
    assert result.status_counts == {200: 30}


def test_rate_sweep_runs_each_rate_and_can_stop_early(server):
    port, _ = server
    results = run_rate_sweep(
        "127.0.0.1",
        port,
        [("GET", "/", b"")],
        [50, 100, 150],
        0.3,
        warmup_s=0.1,
        pause_s=0.05,
        stop_when=lambda r: r.rate >= 100,
    )
    assert [r.rate for r in results] == [50, 100]
    assert [r.completed for r in results] == [15, 30]


def test_uvicorn_streaming_response_is_read_as_chunked():
    import uvicorn

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"a" * 10, b"b" * 3000):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.01)
        result = _run(port, [Request("GET", "/")], rate=100, duration_s=0.3)
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()
    assert result.status_counts == {200: 30}
    assert result.errors == result.timeouts == 0


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.10", "8.8.8.8", "::2", "example.com", "0.0.0.0"])
def test_non_loopback_hosts_are_refused(host):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(host)
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_open_loop(host, 80, [Request("GET", "/")], 10, 0.1))


@pytest.mark.parametrize(
    "request_",
    [
        Request("GET", "no-slash"),
        Request("GET", "/a b"),
        Request("G T", "/"),
        Request("GET", "/", headers=(("X-A", "1\r\nX-Injected: 1"),)),
        Request("POST", "/", b"{}", headers=(("Content-Length", "2"),)),
    ],
)
def test_malformed_requests_are_refused_before_the_run(request_):
    with pytest.raises(ValueError):
        asyncio.run(run_open_loop("127.0.0.1", 9, [request_], 10, 0.1))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts_are_accepted(host):
    check_loopback(host)


def test_fixed_schedule_is_evenly_spaced_and_splits_off_the_warmup():
    times, n_warm = schedule(100, 2.0, warmup_s=0.5)
    assert n_warm == 50
    assert len(times) - n_warm == 200
    assert times[n_warm] == pytest.approx(0.5)
    assert np.diff(times) == pytest.approx(np.full(len(times) - 1, 0.01))


def test_poisson_schedule_is_seeded_and_has_the_right_mean():
    times, n_warm = schedule(1000, 5.0, warmup_s=1.0, poisson=True, seed=7)
    again, _ = schedule(1000, 5.0, warmup_s=1.0, poisson=True, seed=7)
    other, _ = schedule(1000, 5.0, warmup_s=1.0, poisson=True, seed=8)
    assert np.array_equal(times, again)
    assert not np.array_equal(times[:100], other[:100])
    assert times[-1] < 6.0 and times[n_warm] >= 1.0 > times[n_warm - 1]
    assert np.diff(times).mean() == pytest.approx(1e-3, rel=0.05)


def _result(rate: float, achieved: float, p99: float, **kw: object) -> LoadResult:
    n = int(rate)
    fields: dict[str, object] = {
        "rate": rate,
        "duration_s": 1.0,
        "sent": n,
        "completed": n,
        "errors": 0,
        "timeouts": 0,
        "status_counts": {200: n},
        "latencies_ms": np.full(n, p99),
        "achieved_rate": achieved,
    }
    fields.update(kw)
    return LoadResult(**fields)  # type: ignore[arg-type]


def test_sustained_needs_rate_no_failures_and_the_p99_budget():
    assert _result(1000, 990, p99=5).sustained(10)
    assert not _result(1000, 900, p99=5).sustained(10)
    assert not _result(1000, 990, p99=20).sustained(10)
    assert not _result(1000, 990, p99=5, errors=1).sustained(10)
    assert not _result(1000, 990, p99=5, timeouts=1).sustained(10)
    results = [_result(1000, 1000, 2), _result(2000, 1999, 8), _result(4000, 3000, 50)]
    assert max_sustained_rate(results, 10) == 2000
    assert math.isnan(_result(1000, 0, 1, latencies_ms=np.empty(0)).p99)


_RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello", 200, True),
    (b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n", 201, True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, True),
    (b"HTTP/1.1 503 Unavailable\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbad", 503, False),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n",
        200,
        True,
    ),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nT: 1\r\nU: 2\r\n\r\n", 200, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", 304, True),
]


@given(st.sampled_from(_RESPONSES), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_parser_completes_exactly_at_the_end_however_the_bytes_are_split(case, cuts):
    raw, status, keep_alive = case
    points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    parser = ResponseParser()
    parser.start()
    results = [parser.feed(raw[a:b]) for a, b in itertools.pairwise(points)]
    assert results[-1] == status
    assert not any(results[:-1])
    assert parser.keep_alive is keep_alive


def test_parser_handles_head_responses_and_close_delimited_bodies():
    parser = ResponseParser()
    parser.start(head_request=True)
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n") == 200
    parser.start()
    assert parser.feed(b"HTTP/1.0 200 OK\r\n\r\nsome body") == 0
    assert parser.eof() == 200
    assert not parser.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
    ],
)
def test_parser_rejects_malformed_responses(raw):
    parser = ResponseParser()
    parser.start()
    with pytest.raises(ProtocolError):
        parser.feed(raw)


def test_parser_rejects_unsolicited_bytes():
    with pytest.raises(ProtocolError):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n\r\n")
