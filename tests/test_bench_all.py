"""`nextbest bench all --quick` runs every benchmark end to end and writes every report and plot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXPECTED = (
    "recs",
    "ltv",
    "ope",
    "regret",
    "offer-models",
    "memory",
    "serving",
    "latency",
    "offers",
    "email",
    "email-batch",
    "ingest",
)


@pytest.mark.timeout(900)
def test_bench_all_quick_writes_every_report_with_its_plots(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    env = {**os.environ, "NEXTBEST_DATA_DIR": str(tmp_path / "var"), "NEXTBEST_LOG_LEVEL": "warning"}
    env.pop("REDIS_URL", None)  # the benchmarks start their own embedded Redis
    exe = Path(sys.executable).with_name("nextbest")
    done = subprocess.run(
        [str(exe), "bench", "all", "--quick", "--out", str(out)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = {p.stem for p in out.glob("*.md")}
    for name in EXPECTED:
        assert any(r == name or r.startswith(f"{name}-quick") or r == f"{name}-quick" for r in reports), (
            f"no report for {name}: {sorted(reports)}"
        )
    for md in out.glob("*.md"):
        text = md.read_text(encoding="utf-8")
        assert "## How this was produced" in text and "Commit:" in text, md.name
        assert (out / f"{md.stem}.json").exists() or md.stem.endswith("results"), md.name
        for png in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text):
            assert (out / png).stat().st_size > 1000, f"{md.name} shows {png}, which is missing or empty"
    assert len(list(out.glob("*.png"))) >= len(EXPECTED)
