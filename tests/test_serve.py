"""`nextbest serve` as operators run it: a real uvicorn process with two workers."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from api.readiness import wait_until_ready
from tests.conftest import load_shop

BALANCER = "https://nb.shop.example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(
    redis_url: str,
    keys,
    registry: Path,
    data_dir: Path,
    workers: int,
    rules_file: Path | None = None,
    public_url: str | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "NEXTBEST_KEY_PREFIX": keys.prefix,
        "NEXTBEST_REGISTRY_DIR": str(registry),
        "NEXTBEST_DATA_DIR": str(data_dir),
        "NEXTBEST_LOG_LEVEL": "warning",
        "NEXTBEST_REFRESH_INTERVAL_S": "0.2",
    }
    if rules_file is not None:
        env["NEXTBEST_RULES_FILE"] = str(rules_file)
    if public_url is not None:
        env["NEXTBEST_PUBLIC_URL"] = public_url
    exe = Path(sys.executable).with_name("nextbest")
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--workers", str(workers)], env=env)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, proc, timeout_s=60)
    return proc, base


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(20)


@pytest.fixture
def server(redis_url, keys, shop_dir, trained, tmp_path):
    load_shop(redis_url, keys, shop_dir)
    proc, base = _serve(redis_url, keys, trained.registry.root, tmp_path / "var", workers=2)
    yield base
    _stop(proc)
    assert not list((tmp_path / "var").glob("prometheus-*")), "metrics files left behind"


@pytest.fixture
def two_servers(redis_url, keys, shop_dir, trained, tmp_path):
    """Two separate API processes on different ports, sharing one Redis (as replicas behind a balancer)."""
    load_shop(redis_url, keys, shop_dir)
    # Replicas behind one balancer: email links point at its address, whichever replica wrote them.
    started = [
        _serve(redis_url, keys, trained.registry.root, tmp_path / f"var{n}", workers=1, public_url=BALANCER)
        for n in range(2)
    ]
    yield [base for _, base in started]
    for proc, _ in started:
        _stop(proc)


def test_two_workers_answer_and_metrics_add_up_across_them(server):
    with httpx.Client(base_url=server, timeout=5) as c:
        for n in range(40):
            r = c.post("/v1/recommendations", json={"customer_id": f"c{n}", "placement": "home", "limit": 5})
            assert r.status_code == 200 and len(r.json()["items"]) == 5
        text = c.get("/metrics").text
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('nextbest_decisions_total{placement="home"}')
    )
    assert served == 40  # whichever worker answered /metrics counts both workers' decisions


def _fresh_connection_posts(base: str, path: str, body: dict[str, object], n: int) -> list[dict[str, Any]]:
    # A new connection per request, so the kernel spreads them over both worker processes.
    return [httpx.post(f"{base}{path}", json=body, timeout=5).json() for _ in range(n)]


def test_an_event_and_a_stock_out_reach_every_worker_on_the_next_request(server, shop, rules):
    consenting = shop.customers[shop.customers["consent_personalization"]]["customer_id"]
    customer = str(consenting.iloc[1])
    home = {"customer_id": customer, "placement": "home", "limit": 20}
    durable = set(shop.catalog[~shop.catalog["category"].isin(rules.categories.repurchase)]["item_id"])
    first = httpx.post(f"{server}/v1/recommendations", json=home, timeout=5).json()
    shown = [i["item_id"] for i in first["items"]]
    bought = next(i for i in shown if i in durable)
    sold_out = next(i for i in shown if i != bought)
    event = {"event_id": "x-1", "customer_id": customer, "type": "purchase", "item_id": bought, "timestamp": 1793000000}
    assert httpx.post(f"{server}/v1/events", json=event, timeout=5).status_code == 202
    assert (
        httpx.post(f"{server}/v1/catalog/items", json={"item_id": sold_out, "stock": 0}, timeout=5).status_code == 200
    )
    for answer in _fresh_connection_posts(server, "/v1/recommendations", home, 12):
        ids = {i["item_id"] for i in answer["items"]}
        assert bought not in ids and sold_out not in ids


def test_read_your_writes_and_feedback_hold_across_two_api_processes(two_servers, shop, rules):
    a, b = two_servers
    consenting = shop.customers[shop.customers["consent_personalization"]]["customer_id"]
    customer = str(consenting.iloc[2])
    home = {"customer_id": customer, "placement": "home", "limit": 20}
    durable = set(shop.catalog[~shop.catalog["category"].isin(rules.categories.repurchase)]["item_id"])
    first = httpx.post(f"{b}/v1/recommendations", json=home, timeout=5).json()
    bought = next(i["item_id"] for i in first["items"] if i["item_id"] in durable)
    event = {
        "event_id": "rw-1",
        "customer_id": customer,
        "type": "purchase",
        "item_id": bought,
        "timestamp": 1793000000,
    }
    assert httpx.post(f"{a}/v1/events", json=event, timeout=5).status_code == 202  # written through A ...
    after = httpx.post(f"{b}/v1/recommendations", json=home, timeout=5).json()  # ... read at once through B
    assert bought not in {i["item_id"] for i in after["items"]}

    # A decision made by B takes feedback through A, and a retry through B is recognised as a duplicate.
    clicked = after["items"][0]["item_id"]
    fb = {"decision_id": after["decision_id"], "action": clicked, "reward": "click"}
    assert httpx.post(f"{a}/v1/feedback", json=fb, timeout=5).json()["status"] == "accepted"
    assert httpx.post(f"{b}/v1/feedback", json=fb, timeout=5).json()["status"] == "duplicate"

    # Consent withdrawn through B applies to A's very next decision.
    withdraw = {"channels": {"personalization": False}, "source": "test"}
    assert httpx.put(f"{b}/v1/customers/{customer}/consent", json=withdraw, timeout=5).status_code == 200
    answer = httpx.post(f"{a}/v1/recommendations", json=home, timeout=5).json()
    assert answer["fallback_reason"] == "no_personalization_consent"


def test_caps_email_content_and_bandit_state_hold_across_two_api_processes(two_servers, shop, redis_url, keys):
    import concurrent.futures
    from collections import Counter

    import redis

    from engine.rules import load_rules

    a, b = two_servers
    rules = load_rules()
    customer = str(shop.customers[shop.customers["consent_email"]]["customer_id"].iloc[5])

    def offers(n: int) -> list[str]:
        body = {"customer_id": customer, "channel": "web", "limit": 3}
        r = httpx.post(f"{(a, b)[n % 2]}/v1/offers/next-best", json=body, timeout=10)
        return [o["offer_id"] for o in r.json()["offers"]]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        shown = Counter(o for answer in pool.map(offers, range(40)) for o in answer)
    # Every offer-scoped cap holds across both processes, and at least one was reached (the test can fail).
    limits = {
        oid: min(c.limit for c in offer.caps if c.scope == "offer")
        for oid, offer in rules.offers.items()
        if any(c.scope == "offer" for c in offer.caps)
    }
    assert shown and all(shown[oid] <= limit for oid, limit in limits.items() if oid in shown)
    assert any(shown[oid] == limit for oid, limit in limits.items())

    # The email content decided through A is what B returns, and the other way round.
    first = httpx.get(f"{a}/v1/email/slots/two-proc/{customer}", timeout=10).json()
    again = httpx.get(f"{b}/v1/email/slots/two-proc/{customer}", timeout=10).json()
    assert again["source"] == "stored" and again["slots"] == first["slots"]

    # Impressions of home decisions made by both processes add up in the shared bandit state.
    r = redis.Redis.from_url(redis_url)
    before = sum(int(v) for v in r.hvals(keys.arm_impressions("home")))
    answers = [
        httpx.post(
            f"{base}/v1/recommendations", json={"customer_id": customer, "placement": "home", "limit": 5}, timeout=10
        ).json()
        for base in (a, b) * 5
    ]
    shown_items = sum(len(x["items"]) for x in answers)
    deadline = time.monotonic() + 10
    while sum(int(v) for v in r.hvals(keys.arm_impressions("home"))) - before < shown_items:
        assert time.monotonic() < deadline, "impressions of both processes did not reach the shared state"
        time.sleep(0.1)
    assert sum(int(v) for v in r.hvals(keys.arm_impressions("home"))) - before == shown_items


def _chunks_by_place(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("nextbest_email_batch_chunks_total{"):
            label = line.split('decided_by="', 1)[1].split('"', 1)[0]
            out[label] = out.get(label, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_one_batch_is_decided_by_both_workers_and_reads_back_the_same_on_either(server, shop):
    """The worker that accepts a batch sends every other chunk to the other worker: one batch uses both
    cores. Lines stay in order, a recipient in chunks decided by different workers gets one content, and
    single calls, whichever worker answers them, read back what the batch stored."""
    from api.email_batch import BATCH_CHUNK

    customers = shop.customers["customer_id"].tolist()[:60]
    recipients = [customers[k % len(customers)] if k % 5 else f"new-{k}" for k in range(3 * BATCH_CHUNK + 20)]
    with httpx.Client(base_url=server, timeout=60) as c:
        deadline = time.monotonic() + 20
        while httpx.get(f"{server}/readyz", timeout=5).json()["batch_peers"] != 1:  # both workers listening
            assert time.monotonic() < deadline, "the two workers never saw each other's socket"
            time.sleep(0.2)
        before = _chunks_by_place(c.get("/metrics").text)
        r = c.post("/v1/email/slots:batch", json={"campaign_id": "fan-out", "recipients": recipients})
        assert r.status_code == 200, r.text
        lines = [orjson.loads(line) for line in r.content.splitlines()]
        after = _chunks_by_place(c.get("/metrics").text)
    assert [line["index"] for line in lines] == list(range(len(recipients)))
    assert [line["customer_id"] for line in lines] == recipients
    by_customer: dict[str, set[bytes]] = {}
    for line in lines:
        assert line["error"] is None and line["content"]["slots"], line
        by_customer.setdefault(line["customer_id"], set()).add(orjson.dumps(line["content"]["slots"]))
    assert all(len(v) == 1 for v in by_customer.values())
    # Four chunks: two decided by the worker that took the batch, two by the other one, none after a failure.
    done = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("local", "peer", "local_after_peer_failed")}
    assert done == {"local": 2.0, "peer": 2.0, "local_after_peer_failed": 0.0}
    for customer in [*(customers[j] for j in (1, 2, 3, 4, 6, 7)), "new-5", "new-700"]:
        for single in _fresh_connection_gets(server, f"/v1/email/slots/fan-out/{customer}", 2):
            assert single["source"] == "stored", customer
            assert {orjson.dumps(single["slots"])} == by_customer[customer]


def _fresh_connection_gets(base: str, path: str, n: int) -> list[dict[str, Any]]:
    return [httpx.get(f"{base}{path}", timeout=10).json() for _ in range(n)]


def _workers_sockets(master_pid: int) -> list[Path]:
    """The batch sockets in the directory of `nextbest serve` master_pid (each named after its worker's pid)."""
    for directory in Path(tempfile.gettempdir()).glob("nextbest-peers-*"):
        socks = sorted(directory.glob("*.sock"))
        for sock in socks:
            with contextlib.suppress(OSError):
                if int((Path("/proc") / sock.stem / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master_pid:
                    return socks
    return []


def test_a_batch_completes_when_a_worker_was_killed_and_the_dead_workers_socket_is_removed(
    redis_url, keys, shop_dir, trained, tmp_path, shop
):
    from api.email_batch import BATCH_CHUNK

    load_shop(redis_url, keys, shop_dir)
    proc, base = _serve(redis_url, keys, trained.registry.root, tmp_path / "var", workers=2)
    try:
        deadline = time.monotonic() + 20
        while len(socks := _workers_sockets(proc.pid)) != 2:
            assert time.monotonic() < deadline, f"two workers' sockets expected, found {socks}"
            time.sleep(0.2)
        peers_dir = socks[0].parent
        victim = socks[0]
        os.kill(int(victim.stem), signal.SIGKILL)
        deadline = time.monotonic() + 30  # uvicorn starts a new worker in its place, with its own socket
        while len(list(peers_dir.glob("*.sock"))) != 3:
            assert time.monotonic() < deadline, "no new worker replaced the killed one"
            time.sleep(0.2)
        customers = shop.customers["customer_id"].tolist()[:50]
        recipients = [customers[k % len(customers)] for k in range(4 * BATCH_CHUNK)]
        for n in range(2):  # whichever worker takes the batch, the dead worker's chunks are decided
            r = httpx.post(
                f"{base}/v1/email/slots:batch",
                json={"campaign_id": f"killed-{n}", "recipients": recipients},
                timeout=60,
            )
            assert r.status_code == 200
            lines = [orjson.loads(line) for line in r.content.splitlines()]
            assert [line["index"] for line in lines] == list(range(len(recipients)))
            assert all(line["error"] is None and line["content"]["slots"] for line in lines)
        deadline = time.monotonic() + 10
        while victim.exists():
            # A batch that offered the dead worker a chunk removed its socket; one more batch per worker at most.
            assert time.monotonic() < deadline, "the dead worker's socket is still there"
            httpx.post(f"{base}/v1/email/slots:batch", json={"campaign_id": "killed-x", "recipients": recipients})
        assert len(list(peers_dir.glob("*.sock"))) == 2
    finally:
        _stop(proc)
    assert not peers_dir.exists()  # `nextbest serve` removes the directory when it stops


def test_one_worker_on_the_embedded_redis_serves_what_nextbest_load_put_there(shop_dir, trained, tmp_path, shop):
    """No REDIS_URL and `--workers 1`: uvicorn builds the app in the serve process itself, which must use the
    embedded server that process started (its settings were first read before that, with no Redis at all)."""
    from feature_store.server import _socket_path

    data = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("NEXTBEST_")}
    env |= {"NEXTBEST_DATA_DIR": str(data), "NEXTBEST_REGISTRY_DIR": str(trained.registry.root)}
    env["NEXTBEST_LOG_LEVEL"] = "warning"
    exe = Path(sys.executable).with_name("nextbest")
    subprocess.run([str(exe), "load", "--data", str(shop_dir)], env=env, check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--workers", "1"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc, timeout_s=60)
        reasons = []
        with httpx.Client(base_url=base, timeout=5) as c:
            for customer in shop.customers["customer_id"].tolist()[:20]:
                r = c.post("/v1/recommendations", json={"customer_id": customer, "placement": "home", "limit": 4})
                assert r.status_code == 200 and len(r.json()["items"]) == 4, r.text
                reasons.append(r.json()["fallback_reason"])
            r = c.get(f"/v1/email/slots/one-worker/{customer}", params={"placement": "email:weekly", "slots": 4})
            # With no NEXTBEST_PUBLIC_URL, links point at this server: the port it was told, not the default.
            assert r.status_code == 200 and r.json()["slots"], r.text
            assert all(s["click_url"].startswith(f"{base}/v1/email/click/") for s in r.json()["slots"]), r.text
    finally:
        _stop(proc)
    # The profiles `load` wrote are read: personal answers, and no customer unknown or Redis missing.
    assert None in reasons and set(reasons) <= {None, "no_personalization_consent"}, reasons
    assert not _socket_path(data / "redis").exists()  # the embedded Redis was shut down with the server
    assert proc.returncode == 0
