"""The learning loop's log: decisions with propensities, feedback, export to Parquet, and erasure."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from feature_store.decision_log import ENTRY_FIELD
from feature_store.log_export import ExportError, LogExporter
from tests.clear_text import in_clear
from tests.conftest import load_shop

T = "2026-11-01T12:00:00Z"


@pytest.fixture
def client(redis_url, keys, shop_dir, registry_root) -> Iterator[TestClient]:
    load_shop(redis_url, keys, shop_dir)
    # A generous Redis budget: on a busy test machine a 20 ms read could time out, and a decision answered
    # without Redis is (by design) not logged; these tests are about what is logged, not about speed.
    settings = Settings(
        registry_dir=registry_root,
        key_prefix=keys.prefix,
        refresh_interval_s=0.1,
        arms_refresh_s=0.1,
        redis_timeout_ms=2000,
    )
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        yield c


@pytest.fixture
def r(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _buyer(shop) -> str:
    consenting = shop.customers[shop.customers["consent_personalization"]]["customer_id"]
    return str(consenting.iloc[3])


def _log(r: redis.Redis, keys) -> list[dict[str, Any]]:
    entries: Any = r.xrange(keys.log_stream)
    return [orjson.loads(fields[b"e"]) for _, fields in entries]


def _pseudonym(r: redis.Redis, keys, customer: str) -> str:
    raw: Any = r.get(keys.profile(customer))
    value: str = orjson.loads(raw)["ps"]
    return value


def _decide(client: TestClient, customer: str, placement: str = "home", limit: int = 8) -> dict[str, Any]:
    resp = client.post("/v1/recommendations", json={"customer_id": customer, "placement": placement, "limit": limit})
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


def test_an_id_in_clear_is_a_whole_token_not_letters_of_a_longer_one():
    assert in_clear("c3", '{"customer":"c3"}') and in_clear("c3", "key:{c:c3}:x")
    assert not in_clear("c3", '{"customer":"9b4d5bfbbe55c3b0"}') and not in_clear("c3", "c31 xc3 c3_")


def test_every_decision_is_logged_with_the_probability_of_each_shown_item(client, r, keys, shop):
    customer = _buyer(shop)
    answers = [_decide(client, customer, p) for p in ("home", "pdp", "cart", "home")]
    logged = {e["decision_id"]: e for e in _log(r, keys)}
    assert set(logged) == {a["decision_id"] for a in answers}
    pseudonym = _pseudonym(r, keys, customer)
    for answer in answers:
        entry = logged[answer["decision_id"]]
        assert entry["customer"] == pseudonym and not in_clear(customer, orjson.dumps(entry).decode())
        assert entry["placement"] == answer["placement"] and entry["model_version"] == answer["model_version"]
        assert len(entry["config_version"]) == 12 and entry["channel"] == "web"
        assert [a["item_id"] for a in entry["actions"]] == [i["item_id"] for i in answer["items"]]
        assert [a["position"] for a in entry["actions"]] == list(range(1, len(answer["items"]) + 1))
        assert all(0 < a["propensity"] <= 1 for a in entry["actions"])
    policies = {logged[a["decision_id"]]["placement"]: logged[a["decision_id"]]["policy"] for a in answers}
    assert policies == {"home": "softmax", "pdp": "epsilon_greedy", "cart": "softmax"}
    home = logged[answers[0]["decision_id"]]
    assert home["policy_params"]["temperature"] == 0.03
    # The shadow policy is logged beside the live one: its own list, and its probability for what was shown.
    shadow = home["shadow"]
    assert shadow["policy"] == "thompson_lift" and len(shadow["actions"]) == len(home["actions"])
    assert len(shadow["target_propensities"]) == len(home["actions"])
    assert all(0 <= p <= 1 for p in shadow["target_propensities"])
    assert all(0 < a["propensity"] <= 1 for a in shadow["actions"])


def test_an_unknown_customer_is_logged_without_a_pseudonym(client, r, keys):
    answer = _decide(client, "never-seen-before")
    (entry,) = [e for e in _log(r, keys) if e["decision_id"] == answer["decision_id"]]
    assert entry["customer"] is None and entry["fallback_reason"] == "unknown_customer"


def test_feedback_joins_its_decision_once_and_unknown_ones_are_refused(client, r, keys, shop):
    answer = _decide(client, _buyer(shop))
    did, item = answer["decision_id"], answer["items"][2]["item_id"]
    click = {"decision_id": did, "action": item, "reward": "click"}
    first = client.post("/v1/feedback", json=click)
    again = client.post("/v1/feedback", json=click)
    assert first.status_code == again.status_code == 202
    assert first.json()["status"] == "accepted" and first.json()["counted_as_success"] is True
    assert again.json()["status"] == "duplicate" and again.json()["counted_as_success"] is False
    purchase = client.post("/v1/feedback", json={"decision_id": did, "action": item, "reward": "purchase", "value": 42})
    assert purchase.json()["status"] == "accepted" and purchase.json()["reward"] == 42.0
    # A purchase after the click is a second reward for the log but not a second bandit success.
    assert purchase.json()["counted_as_success"] is False
    rewards = [e for e in _log(r, keys) if e["kind"] == "reward"]
    assert [(e["decision_id"], e["action"], e["reward_type"], e["reward"]) for e in rewards] == [
        (did, item, "click", 1.0),
        (did, item, "purchase", 42.0),
    ]
    assert int(r.hget(keys.arm_successes("home"), item)) == 1
    # Impressions are counted in memory and added to the shared state at each refresh (0.1 s here).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not r.hget(keys.arm_impressions("home"), item):
        time.sleep(0.05)
    assert int(r.hget(keys.arm_impressions("home"), item) or 0) >= 1

    unknown = client.post("/v1/feedback", json={**click, "decision_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "decision_id"]
    assert "unknown decision id" in unknown.json()["detail"][0]["msg"]
    not_shown = client.post("/v1/feedback", json={**click, "action": "not-an-item"})
    assert not_shown.status_code == 422 and not_shown.json()["detail"][0]["loc"] == ["body", "action"]
    for bad, field in [({**click, "reward": "like"}, "reward"), ({**click, "decision_id": "x"}, "decision_id")]:
        resp = client.post("/v1/feedback", json=bad)
        assert resp.status_code == 422 and field in resp.json()["detail"][0]["loc"]
    assert len([e for e in _log(r, keys) if e["kind"] == "reward"]) == 2  # refused ones changed nothing


def test_clicks_reach_the_bandit_state_every_worker_decides_with(client, keys, shop):
    customer = _buyer(shop)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    answer = _decide(client, customer, limit=10)
    clicked = answer["items"][-1]["item_id"]
    for _ in range(3):
        did = _decide(client, customer, limit=10)["decision_id"]
        client.post("/v1/feedback", json={"decision_id": did, "action": clicked, "reward": "click"})
    client.post("/v1/feedback", json={"decision_id": answer["decision_id"], "action": clicked, "reward": "click"})
    deadline = time.monotonic() + 5
    index = runtime.catalog.index[clicked]
    while time.monotonic() < deadline and runtime.arms["home"].successes[index] < 1:
        time.sleep(0.05)
    arms = runtime.arms["home"]
    assert arms.successes[index] >= 1 and arms.trials[index] >= arms.successes[index]


def _export(r: redis.Redis, keys, out: Path, **kw):
    return LogExporter(r, keys, batch=7).export(out, **kw)


def test_export_drains_the_stream_into_parquet(client, r, keys, shop, tmp_path):
    answers = [_decide(client, _buyer(shop), limit=5) for _ in range(6)]
    item = answers[0]["items"][0]["item_id"]
    client.post("/v1/feedback", json={"decision_id": answers[0]["decision_id"], "action": item, "reward": "click"})
    result = _export(r, keys, tmp_path / "log.parquet")
    assert (result.entries, result.decisions, result.rewards) == (7, 6, 1)
    table = pq.read_table(tmp_path / "log.parquet").to_pandas()
    decisions = table[table["kind"] == "decision"]
    assert len(decisions) == 6 * 5 and set(decisions["decision_id"]) == {a["decision_id"] for a in answers}
    assert ((decisions["propensity"] > 0) & (decisions["propensity"] <= 1)).all()
    assert (decisions["target_policy"] == "thompson_lift").all() and decisions["target_propensity"].notna().all()
    assert len(table[table["kind"] == "shadow"]) == 6 * 5
    reward = table[table["kind"] == "reward"].iloc[0]
    assert (reward["decision_id"], reward["action"], reward["reward"]) == (answers[0]["decision_id"], item, 1.0)
    assert r.xlen(keys.log_stream) == 0  # drained: acknowledged and deleted once written
    assert _export(r, keys, tmp_path / "next.parquet").file is None  # nothing new
    with pytest.raises(ExportError, match="already exists"):
        _decide(client, "c1")
        _export(r, keys, tmp_path / "log.parquet")
    with pytest.raises(ExportError, match="is not a folder"):
        _export(r, keys, tmp_path / "missing" / "log.parquet")
    assert r.xlen(keys.log_stream) == 1  # the refused exports touched nothing
    assert r.xpending(keys.log_stream, "export")["pending"] == 0  # and read nothing


class CrashError(Exception):
    pass


@pytest.mark.parametrize("step", ["write", "rename", "ack"])
def test_an_interrupted_export_rerun_loses_and_duplicates_nothing(client, r, keys, tmp_path, step):
    ids = [_decide(client, f"c{n}", limit=3)["decision_id"] for n in range(20)]

    def crash_at(name: str) -> None:
        if name == step:
            raise CrashError(name)

    with pytest.raises(CrashError):
        _export(r, keys, tmp_path / "a.parquet", max_entries=12, fault=crash_at)
    ids += [_decide(client, f"d{n}", limit=3)["decision_id"] for n in range(5)]  # traffic goes on meanwhile
    files = []
    for n in range(4):  # rerun until drained, as a cron job would
        result = _export(r, keys, tmp_path / f"b{n}.parquet", max_entries=12)
        files += [f for f in (result.file,) if f is not None]
    if step == "ack":  # the first file was complete: the rerun acknowledged it instead of rewriting it
        files.append(tmp_path / "a.parquet")
    assert not (tmp_path / "a.parquet.partial").exists()  # a half-done file is cleaned up by the rerun
    exported = [
        d
        for f in files
        for d in pq.read_table(f, columns=["kind", "decision_id"])
        .to_pandas()
        .query("kind == 'decision'")["decision_id"]
        .unique()
    ]
    assert sorted(exported) == sorted(ids)  # every decision exactly once, across files
    assert r.xlen(keys.log_stream) == 0


@pytest.mark.parametrize("step", [None, "write", "rename", "ack"])
def test_an_unreadable_entry_is_kept_once_under_its_id_and_the_rest_is_exported(client, r, keys, tmp_path, step):
    first = _decide(client, "c1", limit=3)["decision_id"]
    garbage = {
        r.xadd(keys.log_stream, {ENTRY_FIELD: b"{not json"}).decode(): b"{not json",
        r.xadd(keys.log_stream, {ENTRY_FIELD: b'{"kind": "decision"}'}).decode(): b'{"kind": "decision"}',
    }
    last = _decide(client, "c2", limit=3)["decision_id"]

    def crash_at(name: str) -> None:
        if name == step:
            raise CrashError(name)

    if step is not None:  # an interrupted run first: the rerun must neither lose nor double what it kept
        with pytest.raises(CrashError):
            _export(r, keys, tmp_path / "a.parquet", fault=crash_at)
    result = _export(r, keys, tmp_path / "b.parquet")
    files = [f for f in (tmp_path / "a.parquet", tmp_path / "b.parquet") if f.exists()]
    exported = set().union(*(set(pq.read_table(f).to_pandas()["decision_id"]) for f in files))
    assert exported == {first, last}
    kept = r.xrange(keys.log_unreadable)
    assert {sid.decode(): fields[ENTRY_FIELD.encode()] for sid, fields in kept} == garbage
    assert all(fields[b"why"] for _, fields in kept)
    if step in (None, "write", "rename"):  # the rerun read the entries again and names the ones it kept
        assert result.skipped == 2
        assert all(any(sid in p and keys.log_unreadable in p for p in result.problems) for sid in garbage)
    assert r.xlen(keys.log_stream) == 0


def test_an_export_started_while_another_runs_is_refused_and_changes_nothing(client, r, keys, tmp_path):
    ids = [_decide(client, f"c{n}", limit=3)["decision_id"] for n in range(6)]
    refused: list[str] = []

    def second_export(step: str) -> None:  # cron starts another export while the first is writing
        if step == "write":
            with pytest.raises(ExportError, match="another export is running") as exc:
                _export(r, keys, tmp_path / "second.parquet")
            refused.append(str(exc.value))

    first = _export(r, keys, tmp_path / "first.parquet", fault=second_export)
    assert refused and first.file == tmp_path / "first.parquet" and not (tmp_path / "second.parquet").exists()
    exported = pq.read_table(first.file).to_pandas().query("kind == 'decision'")["decision_id"]
    assert sorted(exported.unique()) == sorted(ids) and r.xlen(keys.log_stream) == 0
    assert not r.exists(keys.log_export_lock)  # released: the next export runs
    assert _export(r, keys, tmp_path / "third.parquet").file is None


def test_an_export_whose_lock_lapsed_stops_and_the_rerun_exports_each_entry_once(client, r, keys, tmp_path):
    ids = [_decide(client, f"c{n}", limit=3)["decision_id"] for n in range(6)]

    def lapse(step: str) -> None:
        if step == "write":
            r.delete(keys.log_export_lock)  # as if the process had stalled past the lock's TTL

    with pytest.raises(ExportError, match="lapsed"):
        _export(r, keys, tmp_path / "a.parquet", fault=lapse)
    result = _export(r, keys, tmp_path / "b.parquet")
    files = [
        f for f in (tmp_path / "a.parquet", tmp_path / "b.parquet", result.recovered_file) if f and Path(f).exists()
    ]
    exported = [
        d
        for f in set(map(str, files))
        for d in pq.read_table(f).to_pandas().query("kind == 'decision'")["decision_id"].unique()
    ]
    assert sorted(exported) == sorted(ids) and r.xlen(keys.log_stream) == 0


def test_erasure_leaves_no_key_of_the_customer_and_unlinks_the_log(client, r, keys, shop):
    customer = _buyer(shop)
    client.post(
        "/v1/events",
        json={"event_id": "er-1", "customer_id": customer, "type": "view_item", "item_id": "i5", "timestamp": T},
    )
    client.put(f"/v1/customers/{customer}/consent", json={"channels": {"email": False}, "source": "test"})
    did = _decide(client, customer)["decision_id"]
    pseudonym = _pseudonym(r, keys, customer)
    resp = client.delete(f"/v1/customers/{customer}")
    assert resp.status_code == 200
    body = resp.json()
    assert set(body["erased"]) == {"profile", "consent_evidence", "event_dedupe"}
    assert body["decision_log"].startswith("pseudonymised")
    # Scan the whole server: no key names the customer, and no value links the customer to the log.
    tag = f"{{c:{customer}}}".encode()
    leftover = [k for k in r.scan_iter(match=f"{keys.prefix}:*", count=1000) if tag in k]
    assert leftover == []
    strings = [k for k in r.scan_iter(match=f"{keys.prefix}:*", count=1000) if r.type(k) == b"string"]
    assert not any(pseudonym.encode() in (r.get(k) or b"") for k in strings)
    assert any(e["decision_id"] == did and e["customer"] == pseudonym for e in _log(r, keys))
    assert not any(f'"{customer}"' in orjson.dumps(e).decode() for e in _log(r, keys))
    again = client.delete(f"/v1/customers/{customer}")
    assert again.status_code == 200 and again.json()["erased"] == []
    assert _decide(client, customer)["fallback_reason"] == "unknown_customer"


def test_with_logging_and_exploration_off_decisions_are_greedy_and_unlogged(redis_url, keys, shop_dir, registry_root):
    load_shop(redis_url, keys, shop_dir)
    settings = Settings(registry_dir=registry_root, key_prefix=keys.prefix, decision_log=False, exploration=False)
    with TestClient(create_app(settings, redis_url=redis_url)) as c:
        first, second = _decide(c, "c3"), _decide(c, "c3")
    assert [i["item_id"] for i in first["items"]] == [i["item_id"] for i in second["items"]]
    assert redis.Redis.from_url(redis_url).xlen(keys.log_stream) == 0
