"""The nextbest command line, end to end on small data and a real Redis."""

import shutil

import pandas as pd
import pytest
import redis
from typer.testing import CliRunner

from api.cli import app
from api.settings import get_settings


@pytest.fixture
def cli_env(monkeypatch, redis_url, keys, tmp_path):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("NEXTBEST_KEY_PREFIX", keys.prefix)
    monkeypatch.setenv("NEXTBEST_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _keys_under(redis_url: str, prefix: str) -> list[bytes]:
    return list(redis.Redis.from_url(redis_url).scan_iter(f"{prefix}:*"))


def test_generate_train_load_pipeline(cli_env, tmp_path, redis_url, keys):
    runner = CliRunner()
    shop = tmp_path / "shop"
    r = runner.invoke(app, ["generate", "--out", str(shop), "--customers", "400", "--items", "80", "--days", "40"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--data", str(shop), "--factors", "16", "--iterations", "3"])
    assert r.exit_code == 0, r.output
    assert "published model version" in r.output
    r = runner.invoke(app, ["load", "--data", str(shop)])
    assert r.exit_code == 0, r.output
    assert "loaded 400 profiles and 80 items" in r.output
    r = runner.invoke(app, ["registry", "list"])
    assert r.exit_code == 0 and r.output.startswith("*")


def test_a_bad_row_is_reported_and_nothing_is_loaded(cli_env, tmp_path, shop_dir, redis_url, keys):
    bad = tmp_path / "bad"
    shutil.copytree(shop_dir, bad)
    events = pd.read_parquet(bad / "events.parquet")
    events.to_csv(bad / "events.csv", index=False)
    (bad / "events.parquet").unlink()
    lines = (bad / "events.csv").read_text().splitlines()
    cells = lines[41].split(",")
    cells[2] = "teleport"  # the type column
    lines[41] = ",".join(cells)
    (bad / "events.csv").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["load", "--data", str(bad)])
    assert r.exit_code == 2
    flat = " ".join(r.output.split())
    assert "events.csv, line 42, column 'type'" in flat and "teleport" in flat
    assert _keys_under(redis_url, keys.prefix) == []


def test_serve_refuses_an_invalid_rules_file_with_a_clear_error(cli_env, tmp_path, monkeypatch):
    rules = tmp_path / "rules.yaml"
    rules.write_text("placements:\n  home:\n    sources: {als: 1.0}\n    colour: blue\n")
    monkeypatch.setenv("NEXTBEST_RULES_FILE", str(rules))
    get_settings.cache_clear()
    r = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert r.exit_code == 2
    assert "placements.home.colour" in " ".join(r.output.split())
