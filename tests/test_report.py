"""Benchmark reports: Markdown + JSON + PNG on disk, with the record of how the benchmark ran."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from benchmarks.report import Report, environment, format_value, new_figure


def _report() -> Report:
    report = Report("latency", "Decision latency", params={"rate": 2000.0, "seed": 7, "rates": [500, 1000]})
    report.add_text("Open-loop load against `POST /v1/recommendations`.")
    report.add_table(
        "Latency by rate",
        ["rate", "p50 ms", "p99 ms", "errors"],
        [[500, 1.23456, 4.5, 0], [1000, np.float64(2.0), float("nan"), np.int64(3)]],
        note="p99 budget 10 ms",
    )
    fig, ax = new_figure()
    ax.plot([1, 2, 3], [1, 4, 9])
    report.add_figure(fig, "latency_cdf.png", "Latency CDF")
    return report


def test_write_produces_markdown_json_and_png(tmp_path: Path):
    md_path = _report().write(tmp_path / "reports")
    assert md_path == tmp_path / "reports" / "latency.md"
    assert (tmp_path / "reports" / "latency.json").is_file()
    png = (tmp_path / "reports" / "latency_cdf.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_markdown_holds_the_tables_text_and_figures(tmp_path: Path):
    md = _report().write(tmp_path).read_text()
    assert md.startswith("# Decision latency\n")
    assert "Open-loop load against" in md
    assert "### Latency by rate" in md
    assert "| rate | p50 ms | p99 ms | errors |" in md
    assert "| 500 | 1.23 | 4.50 | 0 |" in md
    assert "| 1000 | 2.00 | – | 3 |" in md
    assert "*p99 budget 10 ms*" in md
    assert "![Latency CDF](latency_cdf.png)" in md


def test_markdown_says_how_it_was_produced(tmp_path: Path):
    md = _report().write(tmp_path).read_text()
    how = md[md.index("## How this was produced") :]
    for needle in ("Command: `", "Commit: `", "wall time", "Machine:", "GiB RAM", "Python: ", "numpy "):
        assert needle in how
    assert "| rate | 2000.0 |" in how  # parameters exactly as given, not rounded
    assert "| rates | [500, 1000] |" in how
    assert "### Datasets" in how


def test_json_holds_tables_params_and_environment(tmp_path: Path):
    report = _report()
    report.write(tmp_path)
    data = json.loads((tmp_path / "latency.json").read_text())
    assert data["name"] == "latency"
    assert data["params"] == {"rate": 2000.0, "seed": 7, "rates": [500, 1000]}
    table = data["tables"][0]
    assert table["headers"] == ["rate", "p50 ms", "p99 ms", "errors"]
    assert table["rows"] == [[500, 1.23456, 4.5, 0], [1000, 2.0, None, 3]]  # raw values, NaN as null
    assert data["figures"] == [{"file": "latency_cdf.png", "caption": "Latency CDF"}]
    assert {"command", "git_commit", "cores", "memory_gib", "packages", "started_utc"} <= data["environment"].keys()
    # The machine's speed when the report started and when it was written, so drifting machines compare fairly.
    probe = data["environment"]["speed_probe_ms"]
    assert probe["start"] == report.speed_at_start_ms and probe["start"] > 0 and probe["end"] > 0
    assert (
        f"took {probe['start']} ms of CPU at the start and {probe['end']} ms at the end"
        in (tmp_path / "latency.md").read_text()
    )


def test_dataset_checksum_and_size_are_recorded(tmp_path: Path):
    data_file = tmp_path / "ratings.csv"
    content = b"user,item,rating\n" + b"1,2,5\n" * 300_000  # more than one read block
    data_file.write_bytes(content)
    report = _report()
    report.add_dataset("ratings", data_file)
    report.write(tmp_path / "out")
    expected = hashlib.sha256(content).hexdigest()
    recorded = json.loads((tmp_path / "out" / "latency.json").read_text())["datasets"]
    assert recorded == [{"name": "ratings", "path": str(data_file), "size_bytes": len(content), "sha256": expected}]
    assert expected in (tmp_path / "out" / "latency.md").read_text()


def test_environment_describes_the_machine_without_its_host_name():
    import socket

    env = environment()
    assert isinstance(env["cores"], int) and env["cores"] >= 1
    assert isinstance(env["memory_gib"], float) and env["memory_gib"] > 0
    assert "numpy" in env["packages"]  # type: ignore[operator]
    assert isinstance(env["wall_time_s"], float) and env["wall_time_s"] >= 0
    hostname = socket.gethostname()
    assert all(hostname not in str(v) for k, v in env.items() if k != "command")


def test_secrets_on_the_command_line_are_not_recorded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("sys.argv", ["nextbest", "bench", "--api-key", "s3cr3t", "--token=abc", "--rate", "5"])
    command = environment()["command"]
    assert command == "nextbest bench --api-key '***' '--token=***' --rate 5"


def test_print_shows_tables_on_the_terminal():
    console = Console(record=True, width=120)
    _report().print(console)
    text = console.export_text()
    assert "Latency by rate" in text and "1.23" in text and "latency_cdf.png" in text


@pytest.mark.parametrize(
    ("value", "precision", "text"),
    [
        (1.23456, None, "1.23"),
        (0.012345, None, "0.0123"),
        (123.456, None, "123"),
        (12345.6, None, "12346"),
        (1.5e-5, None, "1.50e-05"),
        (0.0, None, "0"),
        (2.0, 1, "2.0"),
        (math.nan, None, "–"),
        (math.inf, None, "∞"),
        (np.float32(0.5), None, "0.500"),
        (np.int64(42), None, "42"),
        (True, None, "True"),
        (None, None, "–"),
        ("text", None, "text"),
    ],
)
def test_numbers_are_formatted_to_three_significant_digits_or_the_given_precision(value, precision, text):
    assert format_value(value, precision) == text


def test_bad_names_and_ragged_rows_are_refused():
    with pytest.raises(ValueError, match="file stem"):
        Report("../escape", "x")
    report = Report("r", "t")
    with pytest.raises(ValueError, match="row 0"):
        report.add_table("t", ["a", "b"], [[1]])
    fig, _ = new_figure()
    with pytest.raises(ValueError, match="plain name"):
        report.add_figure(fig, "sub/dir.png", "c")
    report.add_figure(fig, "plot", "c")
    with pytest.raises(ValueError, match="already used"):
        report.add_figure(fig, "plot.png", "c")


def test_pipes_in_cells_do_not_break_the_table(tmp_path: Path):
    report = Report("pipes", "Pipes")
    report.add_table("t", ["a|b"], [["x|y\nz"]])
    md = report.write(tmp_path).read_text()
    assert "| a\\|b |" in md and "| x\\|y z |" in md
