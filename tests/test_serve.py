"""`nextbest serve` as operators run it: a real uvicorn process with two workers."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.readiness import wait_until_ready
from tests.conftest import load_shop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(redis_url, keys, shop_dir, trained, tmp_path):
    load_shop(redis_url, keys, shop_dir)
    port = _free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "NEXTBEST_KEY_PREFIX": keys.prefix,
        "NEXTBEST_REGISTRY_DIR": str(trained.registry.root),
        "NEXTBEST_DATA_DIR": str(tmp_path / "var"),
        "NEXTBEST_LOG_LEVEL": "warning",
    }
    exe = Path(sys.executable).with_name("nextbest")
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--workers", "2"], env=env)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, proc, timeout_s=60)
    yield base
    proc.terminate()
    proc.wait(20)
    assert not list((tmp_path / "var").glob("prometheus-*")), "metrics files left behind"


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
