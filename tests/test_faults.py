"""Proof under faults: a real `nextbest serve` (two workers) on a Redis of its own, broken on purpose.

Redis is stopped under load, paused, and crashed and restarted from its append-only file; an API worker is
killed while it ingests; a corrupt and a half-written model version are pushed live. Every test is bounded
in time and traffic, localhost only, and leaves the stack healthy for the next one (each starts by waiting
for personal answers, so the order of the tests does not matter).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from engine.registry import MANIFEST, Registry
from feature_store.keys import Keys
from feature_store.server import EmbeddedRedis
from tests.conftest import load_shop
from tests.test_serve import _serve, _stop

BUDGET_S = 0.050  # the README's promise: an answer, fallback or not, within 50 ms
REDIS_TIMEOUT_S = 0.020  # NEXTBEST_REDIS_TIMEOUT_MS's default: the request path's budget for one round trip
STORE_DOWN = {"redis_unavailable", "redis_circuit_open"}


@dataclass
class Stack:
    server: EmbeddedRedis
    keys: Keys
    registry: Registry
    proc: Any  # the `nextbest serve` process (subprocess.Popen)
    base: str
    customers: list[str]  # known customers with personalisation consent

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, socket_timeout=5)

    def workers(self) -> list[psutil.Process]:
        """The uvicorn worker processes (children of `nextbest serve` running the multiprocessing spawn)."""
        children = psutil.Process(self.proc.pid).children()
        return [p for p in children if any("spawn_main" in part for part in _cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return list(p.cmdline())
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def stack(shop_dir, trained, shop, tmp_path_factory) -> Iterator[Stack]:
    """One Redis (append-only, the production setting) and one two-worker API, shared by the fault tests."""
    root = tmp_path_factory.mktemp("faults")
    server = EmbeddedRedis(root / "redis", appendonly=True).start()
    keys = Keys("nb")
    load_shop(server.url, keys, shop_dir)
    registry = Registry(root / "registry")
    shutil.copytree(trained.registry.root, registry.root)
    consenting = shop.customers[shop.customers["consent_personalization"]]["customer_id"]
    buyers = shop.events[shop.events["type"] == "purchase"]["customer_id"].value_counts().index
    customers = [str(c) for c in buyers if c in set(consenting)][:40]
    proc, base = _serve(server.url, keys, registry.root, root / "var", workers=2)
    try:
        yield Stack(server, keys, registry, proc, base, customers)
    finally:
        _stop(proc)
        server.stop()


# ---- helpers ---------------------------------------------------------------------------------------------


def _latency_limit(healthy: list[float], budget: float) -> float:
    """The budget; or, on a machine too busy to keep it even while Redis is healthy (the test's client, the
    two workers and whatever else runs share the cores), the slowest healthy answer plus one Redis timeout:
    a fallback does no more work than a healthy answer and waits at most one timeout on Redis."""
    slowest = max(healthy)
    if slowest + REDIS_TIMEOUT_S <= budget:
        return budget
    print(f"\nbusy machine: a healthy answer took {slowest * 1000:.0f} ms, so the limit is that plus one timeout")
    return slowest + REDIS_TIMEOUT_S


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `predicate` held; fails naming `what` after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what}: not reached within {timeout_s} s")


def _personal(base: str, customer: str) -> bool:
    # A fresh connection each time, so the kernel hands the requests to both workers.
    body = {"customer_id": customer, "placement": "home"}
    try:
        r = httpx.post(f"{base}/v1/recommendations", json=body, timeout=2)
    except httpx.TransportError:
        return False
    return r.status_code == 200 and r.json()["fallback"] is False


def _wait_until_healthy(stack: Stack, timeout_s: float = 10.0) -> float:
    """Both workers up and answering personally: several fresh-connection requests in a row are personal."""
    streak = [0]

    def ok() -> bool:
        if len(stack.workers()) != 2:
            streak[0] = 0
            return False
        streak[0] = streak[0] + 1 if _personal(stack.base, stack.customers[0]) else 0
        return streak[0] >= 8

    return _wait_for(ok, timeout_s, "personal answers from both workers")


@dataclass
class Answer:
    kind: str
    sent: float  # monotonic time the request was sent
    latency: float  # seconds, measured by the client
    status: int
    body: dict[str, Any]


def _request(c: httpx.Client, kind: str, customer: str) -> httpx.Response:
    if kind == "recs":
        return c.post("/v1/recommendations", json={"customer_id": customer, "placement": "home"})
    if kind == "offers":
        return c.post("/v1/offers/next-best", json={"customer_id": customer, "channel": "web", "limit": 2})
    return c.get(f"/v1/email/slots/fault-load/{customer}")


def _valid_content(a: Answer) -> bool:
    """What a caller can always use: items for a widget, product slots for an email, a well-formed offers list."""
    if a.kind == "recs":
        return bool(len(a.body["items"]) == 10)
    if a.kind == "email":
        return bool(sum(s["type"] == "product" for s in a.body["slots"]) == 4)
    return isinstance(a.body["offers"], list)


@dataclass
class Load:
    """Mixed traffic from a few threads at a fixed total rate, every answer recorded."""

    base: str
    customers: list[str]
    threads: int = 3
    rate: float = 100.0  # requests per second, all threads together
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, n: int) -> None:
        kinds = ("recs", "offers", "email")
        period = self.threads / self.rate
        # No keep-alive: each request connects anew, so the traffic reaches both workers.
        with httpx.Client(base_url=self.base, timeout=2, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            k = n
            next_at = time.monotonic()
            while not self._stop.is_set():
                kind, customer = kinds[k % 3], self.customers[k % len(self.customers)]
                t0 = time.monotonic()
                try:
                    r = _request(c, kind, customer)
                    latency = time.monotonic() - t0
                    self.answers.append(Answer(kind, t0, latency, r.status_code, r.json()))
                except (httpx.HTTPError, ValueError) as exc:
                    self.errors.append(f"{kind} {customer}: {type(exc).__name__}: {exc}")
                k += self.threads
                next_at += period
                time.sleep(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


class Stalls:
    """A thread that sleeps 5 ms at a time and records when it woke far too late: moments when this machine
    did not run the test's processes at all (other jobs on the shared cores), whatever Redis did."""

    def __init__(self, threshold_s: float = 0.030) -> None:
        self.threshold_s = threshold_s
        self.seen: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(0.005)
            if time.monotonic() - t0 > self.threshold_s:
                self.seen.append((t0, time.monotonic()))

    def during(self, start: float, end: float) -> float:
        """The longest stall overlapping [start, end]."""
        return max((min(b, end) - max(a, start) for a, b in self.seen if a < end and b > start), default=0.0)

    def __enter__(self) -> Stalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1)


# ---- Redis stopped under load ----------------------------------------------------------------------------


def test_with_redis_stopped_under_load_every_answer_is_fallback_content_within_50ms_and_personal_ones_resume(
    stack: Stack,
) -> None:
    _wait_until_healthy(stack)
    with Stalls() as stalls, Load(stack.base, stack.customers) as load:
        time.sleep(1.0)
        stop_begin = time.monotonic()
        stack.server.stop()  # SIGTERM: Redis saves its append-only file and goes away
        stopped = time.monotonic()
        time.sleep(2.0)
        restart_begin = time.monotonic()
        stack.server.start()  # same data directory: the append-only file brings everything back
        restarted = time.monotonic()

        def personal_again() -> bool:
            return any(a.sent > restarted and a.kind == "recs" and not a.body["fallback"] for a in load.answers)

        recovery_s = _wait_for(personal_again, 6.0, "personal answers after Redis came back")
        time.sleep(0.5)

    assert not load.errors, load.errors[:5]
    outage = [a for a in load.answers if stopped <= a.sent and a.sent + a.latency <= restart_begin]
    assert len(outage) >= 150, f"only {len(outage)} requests during the outage"  # ~100 req/s for 2 s
    assert {a.kind for a in outage} == {"recs", "offers", "email"}
    for a in outage:
        assert a.status == 200, (a.kind, a.status, a.body)
        assert a.body["fallback"] is True and a.body["fallback_reason"] in STORE_DOWN, (a.kind, a.body)
        assert _valid_content(a), (a.kind, a.body)
    assert all(a.status == 200 and _valid_content(a) for a in load.answers)  # before, during and after
    # Everything from the stop on, the restart and the recovery included, is held to the budget.
    healthy = [a.latency for a in load.answers if a.sent + a.latency < stop_begin]
    limit = _latency_limit(healthy, BUDGET_S)
    over = [a for a in load.answers if a.sent >= stop_begin and a.latency > limit]
    # A few answers over the limit (1 %) are excused, and only when Redis cannot be the cause: the machine
    # stalled the test's own process for most of the excess (the sleeping thread saw it), or the answer came
    # from an open circuit, which makes no Redis call at all (its time is the CPU's and the scheduler's).
    unexplained = [
        a
        for a in over
        if a.body.get("fallback_reason") != "redis_circuit_open"
        and stalls.during(a.sent, a.sent + a.latency) < (a.latency - limit) / 2
    ]
    described = [
        (round(a.latency * 1000, 1), a.kind, f"{a.sent - stopped:+.2f}s", a.body.get("fallback_reason")) for a in over
    ]
    assert not unexplained and len(over) <= len(load.answers) // 100, (
        f"answers over {limit * 1000:.0f} ms (ms, kind, sent after the stop, reason): {described};"
        f" machine stalls seen: {[(round(a - stopped, 2), round((b - a) * 1000)) for a, b in stalls.seen]}"
    )
    around = sorted(a.latency for a in load.answers if a.sent >= stop_begin)
    print(
        f"\nredis stopped: {len(outage)} answers during the 2 s outage, max {max(a.latency for a in outage) * 1000:.1f}"
        f" ms; from the stop on: p99 {statistics.quantiles(around, n=100)[98] * 1000:.1f} ms, max"
        f" {around[-1] * 1000:.1f} ms (healthy before: max {max(healthy) * 1000:.1f} ms); personal again"
        f" {recovery_s:.2f} s after Redis was back; {len(over)} over the limit, none waiting on Redis"
    )
    _wait_until_healthy(stack)  # both workers close their circuit by themselves, without a restart


# ---- Redis slow --------------------------------------------------------------------------------------------


def _http(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload


def _parse(data: bytes) -> tuple[int, dict[str, Any]] | None:
    """(status, JSON body) once `data` holds a whole response, else None."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:"))
    if len(rest) < length:
        return None
    return int(lines[0].split()[1]), json.loads(rest[:length])


def _burst_requests(customers: list[str], n: int, campaign: str) -> list[tuple[str, bytes]]:
    out = []
    for k in range(n):
        customer = customers[k % len(customers)]
        if k % 3 == 0:
            out.append(("recs", _http("POST", "/v1/recommendations", {"customer_id": customer, "placement": "home"})))
        elif k % 3 == 1:
            body = {"customer_id": customer, "channel": "web", "limit": 2}
            out.append(("offers", _http("POST", "/v1/offers/next-best", body)))
        else:
            out.append(("email", _http("GET", f"/v1/email/slots/{campaign}/{customer}")))
    return out


class Burst:
    """`n` keep-alive connections, opened and warmed in advance, then one request on each at the same moment.

    A raw-socket client, so the time measured is the server's (queueing included) and not a Python HTTP
    client's: each request is timed from its own send to the last byte of its answer.
    """

    def __init__(self, port: int, n: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
        self.by_fd = {sock.fileno(): sock for sock in self.socks}
        self.send([("warm", _http("GET", "/healthz"))] * n)  # accepted by a worker before the clock starts

    def send(self, requests: list[tuple[str, bytes]]) -> list[tuple[str, float, int, dict[str, Any]]]:
        sel = selectors.DefaultSelector()
        started: dict[socket.socket, float] = {}
        for sock, (_, raw) in zip(self.socks, requests, strict=True):
            started[sock] = time.monotonic()
            sock.sendall(raw)
            sel.register(sock, selectors.EVENT_READ)
        buffers = {sock: b"" for sock in self.socks}
        done: dict[socket.socket, tuple[float, int, dict[str, Any]]] = {}
        deadline = time.monotonic() + 5
        while len(done) < len(self.socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                sock = self.by_fd[key.fd]
                buffers[sock] += sock.recv(1 << 16)
                parsed = _parse(buffers[sock])
                if parsed is not None:
                    done[sock] = (time.monotonic() - started[sock], *parsed)
                    sel.unregister(sock)
        sel.close()
        assert len(done) == len(self.socks), f"{len(self.socks) - len(done)} requests unanswered after 5 s"
        return [(kind, *done[sock]) for sock, (kind, _) in zip(self.socks, requests, strict=True)]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _connected_clients(stack: Stack) -> int:
    c = stack.client()
    try:
        return int(c.info("clients")["connected_clients"])
    finally:
        c.close()


def test_a_paused_redis_gives_quick_fallbacks_without_a_pile_up_and_latency_recovers(stack: Stack) -> None:
    _wait_until_healthy(stack)
    burst = Burst(stack.port, 50)
    try:
        burst.send(_burst_requests(stack.customers, 50, "fault-pause"))  # decides and stores the email content
        clients_before = _connected_clients(stack)
        normal = burst.send(_burst_requests(stack.customers, 50, "fault-pause"))
        pauser = stack.client()
        pauser.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        paused_at = time.monotonic()
        during = burst.send(_burst_requests(stack.customers, 50, "fault-pause"))
        again = burst.send(_burst_requests(stack.customers, 50, "fault-pause"))  # the circuits are open by now
        still_paused = time.monotonic() - paused_at < 1.4
        pauser.close()
        assert still_paused, "the bursts outlasted the pause: the machine is too slow for this test to mean anything"
        limit = _latency_limit([x[1] for x in normal], 0.100)
        # Quick means no pile-up: an answer waits at most one Redis timeout besides the work any answer does.
        # Answers queued behind each other's timeouts would take 50 timeouts (1 s), and answers waiting for
        # Redis itself the pause's 1.5 s. Twice the healthy limit (at least 200 ms) tells those apart from a
        # quick fallback, with room for the jitter of a shared 2-core machine (once 103 ms against 100 ms).
        room = 2 * limit
        for kind, latency, status, body in during + again:
            assert status == 200 and body["fallback"] is True and body["fallback_reason"] in STORE_DOWN, (kind, body)
            assert latency <= room, (
                f"{kind} took {latency * 1000:.0f} ms while Redis was paused ({body['fallback_reason']})"
            )
        recovered_s = _wait_until_healthy(stack)
        # A worker whose circuit is half-open lets one probe through and answers the requests beside it from
        # the fallback; a burst or two later every answer is personal again.
        after: list[tuple[str, float, int, dict[str, Any]]] = []

        def all_personal() -> bool:
            after[:] = burst.send(_burst_requests(stack.customers, 50, "fault-pause"))
            return all(status == 200 and not body["fallback"] for _, _, status, body in after)

        _wait_for(all_personal, 5.0, "a burst answered personally by both workers")
    finally:
        burst.close()
    # The commands that timed out were answered (and dropped) when the pause ended; nothing queues any more:
    # latency is back to what it was before (within the noise of a shared machine).
    assert max(x[1] for x in after) <= max(limit, 2 * max(x[1] for x in normal))
    clients_after = _connected_clients(stack)
    assert clients_after <= clients_before, f"Redis connections grew from {clients_before} to {clients_after}"
    ms = [round(max(x[1] for x in b) * 1000, 1) for b in (normal, during, again, after)]
    print(
        f"\nredis paused: max latency of 50 concurrent requests before {ms[0]} ms, during {ms[1]} ms and {ms[2]} ms,"
        f" after {ms[3]} ms; personal again {recovered_s:.2f} s after; connections {clients_before} -> {clients_after}"
    )


# ---- a corrupt or half-written model version ---------------------------------------------------------------


def _tiny_onnx(path: Path) -> None:
    """A real propensity model (LightGBM → ONNX, as training exports one), over three made-up features."""
    import lightgbm as lgb
    import numpy as np

    from training.propensity import ModelSpec, export_onnx

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=0.5, size=300) > 0).astype(np.float64)
    params = {"objective": "binary", "num_leaves": 4, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=5)
    export_onnx(booster, path, ModelSpec("purchase_30d", "purchased_next_30d", "binary"), ["f0", "f1", "f2"])


def _copy_of_live(registry: Registry) -> tuple[Path, dict[str, Any]]:
    """A staging folder holding the live version's files (no manifest), and the manifest's own fields."""
    live = registry.verify(registry.live_version() or "")
    staging = registry.stage()
    shutil.copytree(live.path, staging, dirs_exist_ok=True)
    (staging / MANIFEST).unlink()
    meta = {k: v for k, v in live.manifest.items() if k not in {"format", "version", "created", "files"}}
    return staging, meta


def _onnx_truncated_before_commit(registry: Registry) -> tuple[str, str]:
    # Checksums match (the file was cut before the manifest was written): only loading it can tell.
    staging, meta = _copy_of_live(registry)
    (staging / "propensity").mkdir()
    doc = {"feature_names": ["f0", "f1", "f2"], "models": {"purchase_30d": {"kind": "binary", "label": "y"}}}
    (staging / "propensity" / "models.json").write_text(json.dumps(doc))
    onnx_file = staging / "propensity" / "purchase_30d.onnx"
    _tiny_onnx(onnx_file)
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    return registry.commit(staging, meta, activate=False).version, "purchase_30d.onnx: is not a loadable ONNX model"


def _npy_truncated_after_commit(registry: Registry) -> tuple[str, str]:
    staging, meta = _copy_of_live(registry)
    version = registry.commit(staging, meta, activate=False).version
    factors = registry.root / version / "item_factors.npy"
    factors.write_bytes(factors.read_bytes()[:-64])
    return version, "item_factors.npy: checksum mismatch"


def _manifest_never_written(registry: Registry) -> tuple[str, str]:
    # A copy interrupted before its last step: every file there, no manifest.
    staging, _ = _copy_of_live(registry)
    version = "20990101T000000.000Z-halfdone"
    staging.rename(registry.root / version)
    return version, "manifest.json: missing (incomplete version)"


def _readyz(base: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/readyz", timeout=2).json())


def _refused_loads(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=2).text
    prefix = 'nextbest_model_loads_total{result="refused"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _every_worker(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """`check` true on 8 fresh-connection requests in a row (the kernel spreads them over both workers)."""
    streak = [0]

    def ok() -> bool:
        streak[0] = streak[0] + 1 if check() else 0
        return streak[0] >= 8

    _wait_for(ok, timeout_s, what)


@pytest.mark.parametrize(
    "break_version", [_onnx_truncated_before_commit, _npy_truncated_after_commit, _manifest_never_written]
)
def test_a_broken_model_version_forced_live_is_refused_and_the_old_one_keeps_serving(stack: Stack, break_version):
    _wait_until_healthy(stack)
    old = stack.registry.live_version()
    assert old is not None and _readyz(stack.base)["model_version"] == old
    refused_before = _refused_loads(stack.base)
    bad, error = break_version(stack.registry)
    (stack.registry.root / "LIVE").write_text(bad + "\n")  # forced live by hand, past `nextbest train`'s checks
    try:

        def refused() -> bool:
            ready = _readyz(stack.base)
            return ready["model_version"] == old and error in (ready["model_error"] or "")

        _every_worker(refused, 10.0, f"both workers refusing version {bad}")
        for _ in range(10):
            r = httpx.post(
                f"{stack.base}/v1/recommendations",
                json={"customer_id": stack.customers[1], "placement": "home"},
                timeout=2,
            )
            assert r.status_code == 200 and r.json()["model_version"] == old
            assert r.json()["fallback_reason"] in {None, *STORE_DOWN}, r.json()  # never for want of a model
        time.sleep(1.0)  # five refresh periods: a refused version is not loaded (and refused) again and again
        assert _refused_loads(stack.base) - refused_before == 2  # once per worker
    finally:
        stack.registry.activate(old)  # the operator rolls LIVE back
        shutil.rmtree(stack.registry.root / bad)
    _every_worker(lambda: _readyz(stack.base)["model_error"] is None, 10.0, "the error cleared after the rollback")


# ---- an API worker killed while ingesting ---------------------------------------------------------------------


@dataclass
class Ingest:
    """Batches of purchase events, one per customer and batch, posted back to back on one connection."""

    base: str
    run: str
    customers: int = 100
    sent: list[list[dict[str, Any]]] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)  # batch numbers answered 202
    unanswered: list[int] = field(default_factory=list)  # batch numbers that got no answer
    in_flight: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def batch(self, n: int) -> list[dict[str, Any]]:
        now = int(time.time())
        return [
            {
                "event_id": f"{self.run}-b{n}-c{c}",
                "customer_id": f"{self.run}-c{c}",
                "type": "purchase",
                "item_id": f"i{(n + c) % 50}",
                "price": float(1 + n % 7),
                "timestamp": now,
            }
            for c in range(self.customers)
        ]

    def loop(self, batches: int) -> None:
        with httpx.Client(base_url=self.base, timeout=5) as c:  # keep-alive: one connection, one worker
            for n in range(batches):
                if self.stop.is_set():
                    return
                events = self.batch(n)
                self.sent.append(events)
                self.in_flight.set()
                try:
                    r = c.post("/v1/events", json={"events": events})
                except httpx.TransportError:
                    self.unanswered.append(n)
                    continue
                finally:
                    self.in_flight.clear()
                assert r.status_code == 202, r.text
                assert r.json() == {"accepted": len(events), "duplicates": 0, "rejected": []}, r.text
                self.acked.append(n)


def _worker_serving(stack: Stack) -> psutil.Process | None:
    """The worker holding this test process's open connection to the API."""
    ours = {
        conn.laddr.port
        for conn in psutil.Process().net_connections("tcp")
        if conn.raddr and conn.raddr.port == stack.port and conn.status == psutil.CONN_ESTABLISHED
    }
    for worker in stack.workers():
        for conn in worker.net_connections("tcp"):
            if conn.raddr and conn.raddr.port in ours and conn.status == psutil.CONN_ESTABLISHED:
                return worker
    return None


def test_a_worker_killed_while_ingesting_loses_no_acknowledged_event_and_retries_apply_once(stack: Stack) -> None:
    _wait_until_healthy(stack)
    ingest = Ingest(stack.base, f"k{uuid.uuid4().hex[:6]}")
    sender = threading.Thread(target=ingest.loop, args=(60,), daemon=True)
    sender.start()
    killed: list[int] = []
    try:
        for _ in range(3):  # kill until a request is cut off mid-flight (almost always the first time)
            _wait_for(lambda: len(ingest.acked) >= 10 + 10 * len(killed), 20.0, "events acknowledged")
            _wait_until_two_workers(stack)
            victim = _worker_serving(stack)
            assert victim is not None, "no worker holds the sender's connection"
            _wait_for(ingest.in_flight.is_set, 5.0, "a batch in flight")
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)
            _wait_for(lambda: not ingest.in_flight.is_set(), 5.0, "the sender noticing")
            if ingest.unanswered:
                break
        sender.join(60)
    finally:
        ingest.stop.set()
        sender.join(10)
    assert ingest.unanswered, f"no request was cut off by {len(killed)} kills"
    assert len(ingest.acked) + len(ingest.unanswered) == len(ingest.sent) == 60

    # Every event answered 202 is in Redis: in its customer's dedupe set, counted in the profile.
    client = stack.client()
    seen = client.pipeline(transaction=False)
    for n in ingest.acked:
        for e in ingest.sent[n]:
            seen.zscore(stack.keys.seen_events(e["customer_id"]), e["event_id"])
    missing = sum(score is None for score in seen.execute())
    assert missing == 0, f"{missing} acknowledged events are not in Redis"

    # Re-sending what got no answer is safe: each event is accepted once, or reported a duplicate if the killed
    # worker had written it; either way it is applied exactly once.
    resent = []
    for n in ingest.unanswered:
        r = httpx.post(f"{stack.base}/v1/events", json={"events": ingest.sent[n]}, timeout=5)
        assert r.status_code == 202
        body = r.json()
        assert body["accepted"] + body["duplicates"] == ingest.customers and body["rejected"] == []
        resent.append(body)
    for c in range(ingest.customers):
        customer = f"{ingest.run}-c{c}"
        profile = json.loads(client.get(stack.keys.profile(customer)) or b"{}")
        assert int(profile["o"]) == 60, (customer, profile)  # one purchase per batch, none counted twice
        assert float(profile["m"]) == sum(1 + n % 7 for n in range(60)), (customer, profile)
    client.close()
    print(f"\nworker killed: {len(killed)} kill(s), {len(ingest.acked)} batches acknowledged, re-sent: {resent}")
    _wait_until_healthy(stack, timeout_s=30.0)  # uvicorn replaces the killed worker


def _wait_until_two_workers(stack: Stack) -> None:
    _wait_for(lambda: len(stack.workers()) == 2, 30.0, "two live workers")


# ---- Redis restart with append-only persistence --------------------------------------------------------------


def _customer_state(client: redis.Redis, keys: Keys, customers: list[str]) -> dict[str, Any]:
    """Every key of these customers: its value (read by type) and whether it expires."""
    out: dict[str, Any] = {}
    for customer in customers:
        for key in sorted(client.scan_iter(f"{keys.prefix}:{keys.customer_tag(customer)}:*")):
            kind = client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            value: Any = {
                "string": client.get,
                "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                "hash": lambda k: sorted(client.hgetall(k).items()),
                "list": lambda k: client.lrange(k, 0, -1),
                "set": lambda k: sorted(client.smembers(k)),
            }[kind](key)
            out[key.decode()] = (kind, value, client.ttl(key) > 0)
    return out


def _offers(base: str, customer: str) -> dict[str, Any]:
    """A non-fallback offers answer (a cap reservation may meet a timeout on a busy machine: asked again)."""
    answer: dict[str, Any] = {}

    def got() -> bool:
        r = httpx.post(
            f"{base}/v1/offers/next-best", json={"customer_id": customer, "channel": "web", "limit": 3}, timeout=2
        )
        assert r.status_code == 200, r.text
        answer.update(r.json())
        return answer["fallback"] is False

    _wait_for(got, 3.0, f"a non-fallback offers answer for {customer}")
    return answer


def _capped(answer: dict[str, Any]) -> dict[str, str]:
    return {offer: why for offer, why in answer["not_shown"].items() if why.startswith("cap ")}


def test_profiles_consent_caps_and_email_content_survive_a_redis_crash_and_restart(stack: Stack) -> None:
    _wait_until_healthy(stack)
    base, run = stack.base, uuid.uuid4().hex[:6]
    withdrawn, buyer, email_to = stack.customers[10], stack.customers[11], stack.customers[12]
    withdraw = {"channels": {"personalization": False}, "source": "fault test"}
    assert httpx.put(f"{base}/v1/customers/{withdrawn}/consent", json=withdraw, timeout=2).status_code == 200
    event = {
        "event_id": f"{run}-purchase",
        "customer_id": buyer,
        "type": "purchase",
        "item_id": "i7",
        "price": 12.5,
        "timestamp": int(time.time()),
    }
    assert httpx.post(f"{base}/v1/events", json=event, timeout=2).json()["accepted"] == 1
    capped: dict[str, str] = {}
    for capped_customer in stack.customers[13:20]:  # offers run into their caps within a few calls
        for _ in range(4):
            capped = _capped(_offers(base, capped_customer))
            if capped:
                break
        if capped:
            break
    assert capped, "no offer reached its cap"
    email = httpx.get(f"{base}/v1/email/slots/restart-{run}/{email_to}", timeout=2).json()
    assert email["source"] == "decided" and email["fallback"] is False
    involved = [withdrawn, buyer, capped_customer, email_to]
    client = stack.client()
    before = _customer_state(client, stack.keys, involved)
    assert {key.rsplit(":", 1)[-1] for key in before} >= {"profile", "consent", "seen", "capkeys", "emails"}

    # A crash, not a shutdown: SIGKILL. What Redis acknowledged is in its append-only file already (written
    # before the reply; the kernel keeps it when only the process dies), which the buffer being empty shows.
    _wait_for(lambda: client.info("persistence")["aof_buffer_length"] == 0, 2.0, "the AOF buffer written")
    client.close()
    assert stack.server.process is not None
    stack.server.process.kill()
    stack.server.process.wait(10)
    stack.server.start()  # replays the append-only file
    client = stack.client()
    after = _customer_state(client, stack.keys, involved)
    client.close()
    assert after == before

    # And the API, which was not restarted, acts on it: consent, dedupe, caps and the stored email hold.
    _wait_until_healthy(stack)
    for _ in range(6):  # fresh connections: both workers
        r = httpx.post(f"{base}/v1/recommendations", json={"customer_id": withdrawn, "placement": "home"}, timeout=2)
        assert r.json()["fallback_reason"] == "no_personalization_consent"
        assert httpx.post(f"{base}/v1/events", json=event, timeout=2).json() == {
            "accepted": 0,
            "duplicates": 1,
            "rejected": [],
        }
        again = _capped(_offers(base, capped_customer))
        assert again.keys() >= capped.keys(), (capped, again)
        same = httpx.get(f"{base}/v1/email/slots/restart-{run}/{email_to}", timeout=2).json()
        assert same["source"] == "stored" and same["decision_id"] == email["decision_id"]
        assert [s.get("item_id") for s in same["slots"]] == [s.get("item_id") for s in email["slots"]]
