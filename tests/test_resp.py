"""The lean request-path Redis client against a real server: replies, errors, timeouts, reconnects."""

import asyncio
import time

import pytest
import redis

from feature_store.resp import Endpoint, LeanRedis, RespConnectionError, RespError
from feature_store.server import EmbeddedRedis


def run(coro):
    return asyncio.run(coro)


def test_replies_arrive_in_order_for_concurrent_commands(redis_url, keys):
    async def main():
        c = LeanRedis(redis_url, 1.0)
        await c.pipeline([("SET", f"{keys.prefix}:k{i}", str(i)) for i in range(200)])
        got = await asyncio.gather(*(c.execute("GET", f"{keys.prefix}:k{i}") for i in range(200)))
        await c.close()
        return got

    assert run(main()) == [str(i).encode() for i in range(200)]


def test_an_error_reply_raises_and_the_connection_stays_usable(redis_url, keys):
    async def main():
        c = LeanRedis(redis_url, 1.0)
        await c.execute("SET", f"{keys.prefix}:s", "x")
        with pytest.raises(RespError, match="WRONGTYPE"):
            await c.execute("HGETALL", f"{keys.prefix}:s")
        value = await c.execute("GET", f"{keys.prefix}:s")
        await c.close()
        return value

    assert run(main()) == b"x"


def test_a_paused_server_gives_timeouts_and_late_replies_are_dropped(redis_url, keys):
    admin = redis.Redis.from_url(redis_url)

    async def main():
        c = LeanRedis(redis_url, 0.05)
        await c.execute("SET", f"{keys.prefix}:p", "1")
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        with pytest.raises(TimeoutError):
            await c.execute("GET", f"{keys.prefix}:p")
        await asyncio.sleep(0.4)  # the pause ends; the late reply arrives and must be discarded
        await c.execute("SET", f"{keys.prefix}:p", "2")
        value = await c.execute("GET", f"{keys.prefix}:p")
        await c.close()
        return value

    assert run(main()) == b"2"


def test_a_stopped_server_fails_fast_and_a_restarted_one_is_reconnected(tmp_path):
    server = EmbeddedRedis(tmp_path / "r", appendonly=True).start()

    async def main():
        c = LeanRedis(server.url, 0.2)
        await c.execute("SET", "k", "v")
        server.stop()
        with pytest.raises(RespConnectionError):
            await c.execute("GET", "k")
        with pytest.raises(RespConnectionError):
            await c.execute("GET", "k")  # reconnect attempt fails: nothing listens
        server.start()
        value = await c.execute("GET", "k")
        await c.close()
        return value

    try:
        assert run(main()) == b"v"
    finally:
        server.stop()


def test_too_many_waiting_commands_are_refused(redis_url):
    async def main():
        c = LeanRedis(redis_url, 1.0, max_pending=5)
        with pytest.raises(RespConnectionError, match="waiting"):
            await c.pipeline([("PING",)] * 6)
        assert await c.execute("PING") == b"PONG"
        await c.close()

    run(main())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:///tmp/r.sock?db=2", Endpoint(unix_path="/tmp/r.sock", db=2)),
        ("redis://localhost:6380/3", Endpoint(host="localhost", port=6380, db=3)),
        ("redis://:s%40cret@10.0.0.1", Endpoint(host="10.0.0.1", password="s@cret")),
        ("redis://app:pw@h:1/0", Endpoint(host="h", port=1, username="app", password="pw")),
    ],
)
def test_redis_urls_are_parsed(url, expected):
    assert Endpoint.from_url(url) == expected


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="scheme"):
        Endpoint.from_url("http://localhost")


def test_a_pipeline_is_one_write_and_one_wait(redis_url, keys):
    async def main():
        c = LeanRedis(redis_url, 1.0)
        proto = await c._connection()
        transport = proto.transport
        assert transport is not None
        writes: list[bytes] = []
        real_write = transport.write

        def counting_write(data) -> None:
            writes.append(data)
            real_write(data)

        transport.write = counting_write  # type: ignore[method-assign]
        replies = await c.pipeline([("SET", f"{keys.prefix}:a", "1"), ("GET", f"{keys.prefix}:a"), ("PING",)])
        await c.close()
        return writes, replies

    writes, replies = run(main())
    assert len(writes) == 1 and replies == [b"OK", b"1", b"PONG"]


def test_an_error_in_a_pipeline_is_its_own_reply_and_the_others_still_arrive(redis_url, keys):
    async def main():
        c = LeanRedis(redis_url, 1.0)
        k = f"{keys.prefix}:mixed"
        commands = [("SET", k, "x"), ("HGET", k, "f"), ("GET", k)]
        settled = await (await c.send_settled(commands))
        with pytest.raises(RespError, match="WRONGTYPE"):
            await c.pipeline(commands)
        after = await c.execute("GET", k)
        await c.close()
        return settled, after

    settled, after = run(main())
    assert settled[0] == b"OK" and isinstance(settled[1], RespError) and settled[2] == b"x"
    assert after == b"x"


def test_a_timed_out_pipeline_drops_all_its_late_replies(redis_url, keys):
    admin = redis.Redis.from_url(redis_url)

    async def main():
        c = LeanRedis(redis_url, 0.05)
        k = f"{keys.prefix}:late"
        await c.execute("SET", k, "old")
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        with pytest.raises(TimeoutError):
            await c.pipeline([("GET", k)] * 5)
        await asyncio.sleep(0.4)  # five late replies arrive; none may be taken for the next commands
        got = await c.pipeline([("SET", k, "new"), ("GET", k), ("PING",)])
        await c.close()
        return got

    assert run(main()) == [b"OK", b"new", b"PONG"]


def test_a_connect_that_completes_while_the_loop_is_busy_is_not_given_up(redis_url):
    """Under uvloop a due timer runs before the connect's completion is read: a worker busy past the
    budget (a batch's CPU work) must not turn a made connection into a failure."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        done = asyncio.Event()

        async def busy() -> None:
            while not done.is_set():
                time.sleep(0.03)  # longer than the 20 ms budget
                await asyncio.sleep(0)

        hog = asyncio.create_task(busy())
        await asyncio.sleep(0)
        try:
            c = LeanRedis(redis_url, 0.02)
            replies = [await c.execute("PING") for _ in range(3)]
            await c.close()
            return replies
        finally:
            done.set()
            await hog

    assert uvloop.run(main()) == [b"PONG"] * 3
