"""`nextbest bench soak`: the per-window aggregation on known numbers, and a short soak end to end."""

import json
import math

import numpy as np
import orjson
import pytest
from rich.console import Console

from benchmarks.loadgen import LoadResult
from benchmarks.soak import (
    Window,
    kind_window,
    memory_growth,
    run_soak_bench,
    scrape_counters,
    warmup_windows,
    window_json,
)


def _result(status_counts, latencies_ms, *, errors=0, timeouts=0):
    completed = sum(status_counts.values())
    return LoadResult(
        rate=10.0,
        duration_s=10.0,
        sent=completed + errors + timeouts,
        completed=completed,
        errors=errors,
        timeouts=timeouts,
        status_counts=status_counts,
        latencies_ms=np.asarray(latencies_ms, dtype=np.float64),
        achieved_rate=completed / 10.0,
    )


def test_a_window_counts_non_2xx_answers_timeouts_and_connection_errors_as_errors():
    result = _result({200: 95, 202: 2, 302: 1, 503: 2}, np.arange(1, 101), errors=3, timeouts=4)
    w = kind_window("offers", result)
    assert (w.non_2xx, w.timeouts, w.conn_errors, w.errors) == (3, 4, 3, 10)
    assert (w.sent, w.completed, w.achieved_rate) == (107, 100, 10.0)
    assert (w.p50_ms, w.p99_ms, w.max_ms) == (51.0, 100.0, 100.0)


def test_a_clean_window_of_accepted_event_batches_has_no_errors():
    w = kind_window("events", _result({202: 40}, [5.0] * 40))
    assert w.errors == 0
    assert w.p99_ms == 5.0


def test_a_window_with_failed_requests_is_written_as_json_with_its_statuses():
    kind = kind_window("events", _result({202: 8, 503: 2}, [5.0] * 10, timeouts=1))
    window = Window(0, 10.0, {"events": kind}, {"worker 1": 200.0}, {"worker 1": 40.0}, 5.0, 10, 3, {}, (11,))
    doc = orjson.loads(orjson.dumps(window_json(window), option=orjson.OPT_SERIALIZE_NUMPY))
    assert doc["kinds"]["events"]["bad_statuses"] == {"503": 2}
    assert doc["kinds"]["events"]["timeouts"] == 1
    assert "latencies_ms" not in doc["kinds"]["events"]


def test_memory_growth_runs_from_the_first_window_after_the_warm_up_to_the_last():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    growth = memory_growth(
        times,
        {"steady": [100.0, 200.0, 202.0, 204.0, 206.0], "leaking": [50.0, 50.0, 60.0, 70.0, 80.0]},
        warmup=1,
    )
    steady, leaking = growth
    assert (steady.first_mb, steady.last_mb, steady.delta_mb) == (200.0, 206.0, 6.0)
    assert steady.pct == pytest.approx(3.0)
    assert steady.slope_mb_per_min == pytest.approx(2.0)
    assert steady.flat  # 6 MB is within 5 % of 200 MB
    assert leaking.delta_mb == 30.0 and leaking.pct == pytest.approx(60.0)
    assert not leaking.flat


def test_memory_growth_skips_samples_of_a_process_that_was_gone():
    (g,) = memory_growth([0.0, 1.0, 2.0], {"worker": [math.nan, 10.0, 11.0]}, warmup=0)
    assert (g.first_mb, g.last_mb) == (10.0, 11.0)


def test_warm_up_covers_its_seconds_but_never_more_than_a_third_of_the_windows():
    assert warmup_windows(60, 10.0, 60.0) == 6
    assert warmup_windows(4, 5.0, 15.0) == 1
    assert warmup_windows(2, 10.0, 60.0) == 0


def test_server_counters_are_summed_over_placements_by_reason():
    text = "\n".join(
        [
            "# HELP nextbest_fallbacks_total Decisions answered with fallback content",
            'nextbest_fallbacks_total{placement="home",reason="redis_timeout"} 3.0',
            'nextbest_fallbacks_total{placement="pdp",reason="redis_timeout"} 2.0',
            'nextbest_email_slots_total{result="stored"} 7.0',
            'nextbest_decisions_total{placement="home"} 100.0',
        ]
    )
    assert scrape_counters(text) == {"fallbacks:redis_timeout": 5.0, "email_slots:stored": 7.0}


def test_a_short_quick_soak_writes_its_report_and_plots_with_zero_errors(shop_dir, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTBEST_DATA_DIR", str(tmp_path / "var"))
    out = tmp_path / "reports"
    path = run_soak_bench(
        Console(width=160, quiet=True),
        quick=True,
        out_dir=out,
        minutes=0.3,
        shop_dir=shop_dir,
        registry_dir=trained.registry.root,
    )
    assert path == out / "soak-quick.md"
    assert (out / "soak-quick_latency.png").stat().st_size > 0
    assert (out / "soak-quick_memory.png").stat().st_size > 0
    windows = json.loads((out / "soak-quick.windows.json").read_text())
    assert len(windows) >= 2
    for w in windows:
        assert {"recommendations", "offers", "email first", "events"} <= set(w["kinds"])
        for kind in w["kinds"].values():
            assert kind["non_2xx"] + kind["timeouts"] + kind["conn_errors"] == 0, (w["index"], kind)
            assert kind["completed"] == kind["sent"] > 0
        assert w["rss_mb"]["worker 1"] > 0 and w["rss_mb"]["worker 2"] > 0 and w["rss_mb"]["redis-server"] > 0
    assert "email read-back" in windows[1]["kinds"]
    assert windows[-1]["counters"].get("email_slots:stored", 0) > 0  # read-backs found the stored content
    assert "**Verdict.** Zero errors" in path.read_text()
