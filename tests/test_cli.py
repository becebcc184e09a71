"""The nextbest command line, end to end on small data and a real Redis."""

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import redis
from rich.console import Console
from typer.testing import CliRunner

from api.auth import ApiKeyAuth, parse_keys
from api.cli import app
from api.console import print_error
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
    cells[2] = "[bold]teleport"  # the type column, with what rich would read as markup
    lines[41] = ",".join(cells)
    (bad / "events.csv").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["load", "--data", str(bad)])
    assert r.exit_code == 2
    # One line, the path whole however long (never folded at the terminal's width), the value as it is.
    (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert f"{bad / 'events.csv'}, line 42, column 'type'" in line and "'[bold]teleport'" in line
    assert _keys_under(redis_url, keys.prefix) == []


def test_serve_refuses_an_invalid_rules_file_with_a_clear_error(cli_env, tmp_path, monkeypatch):
    rules = tmp_path / "rules.yaml"
    rules.write_text("placements:\n  home:\n    sources: {als: 1.0}\n    colour: blue\n")
    monkeypatch.setenv("NEXTBEST_RULES_FILE", str(rules))
    get_settings.cache_clear()
    r = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert r.exit_code == 2
    assert "placements.home.colour" in " ".join(r.output.split())


_MAIN = """
import sys
from pathlib import Path
from api import cli
sys.argv = ["nextbest", *sys.argv[1:]]
try:
    cli.main()
except SystemExit:
    pass
print("imported:", ",".join(sorted(m for m in sys.modules if m.startswith("benchmarks."))))
"""


@pytest.mark.parametrize(
    ("args", "listed", "imported"),
    [
        (["registry", "--help"], None, False),
        (["--help"], "bench", False),
        (["bench", "--help"], "regret", True),
    ],
)
def test_only_the_bench_command_loads_the_benchmark_modules(args, listed, imported):
    """scipy, matplotlib and LightGBM cost every other command (a server restart among them) about 3 s; the
    top-level help still lists the bench group, and `bench --help` its commands."""
    done = subprocess.run([sys.executable, "-c", _MAIN, *args], capture_output=True, text=True, check=False)
    modules = done.stdout.rsplit("imported:", 1)[1].strip()
    assert ("benchmarks.regret" in modules.split(",")) is imported, modules
    if listed:
        assert listed in done.stdout.rsplit("imported:", 1)[0]


@pytest.mark.parametrize(
    "message",
    [
        "[Errno 2] No such file or directory: '/var/lib/a/rather/long/folder/name/for/a/narrow/terminal/events.csv'",
        "events.csv, line 7, column 'type': unknown event type '[bold]x[/bold]' \\",
    ],
)
def test_an_error_is_one_line_with_the_message_exactly_as_given(message: str) -> None:
    out = io.StringIO()
    print_error(Console(file=out, width=40), message)
    assert out.getvalue() == f"error: {message}\n"


@pytest.mark.parametrize("scopes", ["email", "decide,email,ingest,admin"])
def test_a_new_key_and_its_entry_print_whole_and_the_entry_admits_the_key(scopes: str) -> None:
    r = CliRunner().invoke(app, ["keys", "new", "--name", "esp", "--scopes", scopes], env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.output
    key_line, entry_line = r.output.splitlines()
    key = key_line.rsplit(" ", 1)[1]
    entry = entry_line.rsplit(" ", 1)[1]
    (parsed,) = parse_keys(entry)  # ':email:' printed as an emoji, or a folded hash, would not parse
    assert parsed.name == "esp" and parsed.scopes == frozenset(scopes.split(","))
    auth = ApiKeyAuth(lambda *_: None, [parsed])  # type: ignore[arg-type]
    assert auth.identify(b"Bearer " + key.encode()) == parsed


def test_the_demo_on_a_port_in_use_stops_at_once_and_says_so(cli_env, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = CliRunner().invoke(app, ["demo", "--port", str(port)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: port {port} on 127.0.0.1 is in use")
    assert not (tmp_path / "var" / "demo-shop").exists()  # nothing generated or trained first


def test_an_empty_registry_lists_no_version_and_says_how_to_make_one(cli_env, tmp_path):
    r = CliRunner().invoke(app, ["registry", "list"])
    assert r.exit_code == 0
    assert r.output == f"no model versions in {tmp_path / 'var' / 'registry'} (`nextbest train` publishes one)\n"


def test_a_bad_setting_is_one_error_line_naming_each_variable(tmp_path):
    exe = Path(sys.executable).with_name("nextbest")
    env = {**os.environ, "NEXTBEST_DATA_DIR": str(tmp_path), "NEXTBEST_PORT": "abc", "NEXTBEST_WORKERS": "0"}
    done = subprocess.run([str(exe), "registry", "list"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith("error: NEXTBEST_PORT='abc': Input should be a valid integer")
    assert "NEXTBEST_WORKERS='0': Input should be greater than or equal to 1" in done.stdout
    assert len(done.stdout.splitlines()) == 1 and "Traceback" not in done.stdout + done.stderr
