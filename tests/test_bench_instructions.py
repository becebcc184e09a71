"""`nextbest bench email-instructions`: the phases it counts, the callgrind totals it reads, the tools it needs."""

from pathlib import Path

import pytest
from rich.console import Console

from api.settings import Settings
from benchmarks.instructions import (
    PHASES,
    InstructionsError,
    callgrind_total,
    measure_phases,
    run_email_instructions_bench,
)
from feature_store.keys import Keys
from tests.conftest import load_shop

KEYS_SETTING = "t1:test-signing-key-0123456789abcdef"


def test_the_phases_decide_every_recipient_then_read_each_back_with_one_command(
    redis_url: str, keys: Keys, shop_dir: Path, shop, registry_root: Path
):
    load_shop(redis_url, keys, shop_dir)
    ids = [str(c) for c in shop.customers["customer_id"]]
    # A refresh far away: no background reads while the phases count Redis's commands.
    settings = Settings(
        registry_dir=registry_root, key_prefix=keys.prefix, email_signing_keys=KEYS_SETTING, refresh_interval_s=3600
    )
    decide, back = measure_phases(redis_url, ids[:300], ids[300:364], count=False, settings=settings)
    assert (decide["phase"], back["phase"]) == PHASES
    assert decide["recipients"] == back["recipients"] == 300
    assert decide["errors"] == back["errors"] == decide["redis_fallbacks"] == back["redis_fallbacks"] == 0
    # A read-back: one MGET per recipient (profile and stored content), the catalog version once per chunk of 256.
    assert back["redis_commands"] == 300 + 2
    # A first decision also runs the store-and-reserve script and writes the decision log.
    assert decide["redis_commands"] > 4 * 300


def test_a_callgrind_dump_is_read_by_its_totals_line(tmp_path: Path):
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("# callgrind format\nversion: 1\nevents: Ir\nsummary: 0\nfn=(1) main\n3 5\ntotals: 18286326\n")
    assert callgrind_total(dump) == 18_286_326
    other = tmp_path / "other.txt"
    other.write_text("summary: 12\n")
    with pytest.raises(InstructionsError, match="0 'totals:' lines"):
        callgrind_total(other)


def test_without_valgrind_the_benchmark_stops_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run there
    with pytest.raises(InstructionsError, match="valgrind and callgrind_control not found"):
        run_email_instructions_bench(Console(quiet=True), quick=True, out_dir=tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
