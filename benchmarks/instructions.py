"""`nextbest bench email-instructions`: the instructions a worker executes per batch recipient, counted by
callgrind, so that two commits compare on a machine whose speed drifts.

`nextbest bench email-batch` reports what the target is about (recipients per second), but on a shared
machine the same code decides anywhere from 2,700 to 5,000 recipients/s minutes apart: a change worth a
few percent does not show. Instructions do not drift. A child process runs what a serve worker runs for
the pre-send batch (`api.email_batch.chunk_lines`: read, decide, reserve, store, log, render, in chunks of
256) under `valgrind --tool=callgrind`, with counting switched on only around the measured phases, once
for recipients new to the campaign (decide and store) and once for the same recipients again (read back).
Redis runs outside valgrind; its share is reported as commands per recipient (`INFO commandstats`).

An instruction count is not a time: a cache miss counts nothing, and `rep stos` (how glibc clears large
arrays) counts one per byte. The exploration draws from random decision ids, so the same commit gives
counts that differ in the last few thousandths.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console

from benchmarks.email import FULL, QUICK, SIGNING_KEYS, EmailSpec, _serve_shop
from benchmarks.report import Report

if TYPE_CHECKING:
    from api.settings import Settings

PHASES = ("decide and store", "read back")
HEADERS = [
    "phase",
    "recipients",
    "instructions per recipient",
    "Redis commands per recipient",
    "errors",
    "Redis fallbacks",
]
RECIPIENTS = 1_024  # four chunks of 256: enough for a count within a few thousandths, about 5 minutes under valgrind
WARMUP = 512  # recipients of another campaign, decided and read back before counting (caches, first imports)
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


class InstructionsError(RuntimeError):
    """valgrind or callgrind_control is missing, or the counted child failed."""


def callgrind_total(path: Path) -> int:
    """The instruction total of one callgrind output file: its 'totals:' line. (A dump made on request, as
    each phase's is, has 'summary: 0': callgrind fills the summary only in the file written at exit.)"""
    found = _TOTALS.findall(path.read_text(errors="replace"))
    if len(found) != 1:
        raise InstructionsError(f"{path}: {len(found)} 'totals:' lines, not one (not a callgrind output file?)")
    return int(found[0])


def _counting(on: bool) -> None:
    """Switch callgrind's counting on or off for this process, and dump the counts when switching off (one
    output file per measured phase). Outside valgrind, `callgrind_control` finds no process: nothing happens."""
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", pid], capture_output=True, check=False)
    if not on:
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=False)


def measure_phases(
    redis_url: str, recipients: list[str], warmup: list[str], *, count: bool, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """Run the batch path in this process, phase by phase: per phase the recipients, lines with an error,
    recipients answered with bestsellers because Redis failed, and Redis commands (`count`: callgrind
    counts only inside each phase). `settings`: the server's, from the environment by default."""
    import redis
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.email_batch import BATCH_CHUNK, chunk_lines
    from api.peers import ChunkJob
    from api.settings import Settings

    r = redis.Redis.from_url(redis_url)
    out: list[dict[str, Any]] = []
    app = create_app(settings or Settings(), redis_url=redis_url)
    with TestClient(app, backend_options={"use_uvloop": True}) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        portal = client.portal
        assert portal is not None  # the client is running

        async def run(campaign: str, ids: list[str]) -> list[bytes]:
            chunks = []
            for k in range(0, len(ids), BATCH_CHUNK):
                job = ChunkJob(campaign, "email:weekly", 4, k, ids[k : k + BATCH_CHUNK])
                chunks.append(await chunk_lines(runtime, job))
            await runtime.log_writes_checked()  # the decisions' log writes, as part of the phase
            return chunks

        for _ in range(2):  # decide, then read back
            portal.call(run, "instructions-warmup", warmup)
        for phase in PHASES:
            r.config_resetstat()
            if count:
                _counting(True)
            chunks = portal.call(run, "instructions", recipients)
            if count:
                _counting(False)
            stats = r.info("commandstats")
            commands = sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_config", "cmdstat_info"))
            lines = [orjson.loads(line) for chunk in chunks for line in chunk.splitlines()]
            out.append(
                {
                    "phase": phase,
                    "recipients": len(lines),
                    "errors": sum(doc["error"] is not None for doc in lines),
                    "redis_fallbacks": sum(
                        str(doc["content"] and doc["content"]["fallback_reason"]).startswith("redis") for doc in lines
                    ),
                    "redis_commands": commands,
                }
            )
    return out


def run_email_instructions_bench(console: Console, *, quick: bool, out_dir: Path, recipients: int = RECIPIENTS) -> Path:
    spec: EmailSpec = QUICK if quick else FULL
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise InstructionsError(f"{' and '.join(missing)} not found: install valgrind (apt-get install valgrind)")
    report = Report(
        name="email-instructions-quick" if quick else "email-instructions",
        title="Email pre-send batch: instructions per recipient (callgrind)",
        params={**spec.__dict__, "recipients": recipients, "warmup": WARMUP, "chunk": 256},
    )
    server, registry_dir, ids, root = _serve_shop(spec, console, report)
    if len(ids) < recipients + WARMUP:
        raise InstructionsError(f"the shop has {len(ids)} customers, fewer than {recipients + WARMUP}")
    try:
        with tempfile.TemporaryDirectory(prefix="nextbest-callgrind-") as tmp:
            work = Path(tmp)
            (work / "ids.json").write_bytes(orjson.dumps({"recipients": ids[:recipients], "warmup": ids[-WARMUP:]}))
            env = {
                **os.environ,
                "NEXTBEST_REGISTRY_DIR": str(registry_dir),
                "NEXTBEST_DATA_DIR": str(root),
                "NEXTBEST_LOG_LEVEL": "warning",
                "NEXTBEST_EMAIL_SIGNING_KEYS": SIGNING_KEYS,
                "REDIS_URL": server.url,
                "OPENBLAS_NUM_THREADS": "1",  # as a serve worker runs
            }
            command = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={work / 'callgrind.out'}",
                sys.executable,
                "-m",
                "benchmarks.instructions",
                str(work),
            ]
            with console.status(f"{recipients:,} recipients, twice, under callgrind (about 5 minutes)"):
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join(done.stderr.splitlines()[-15:])
                raise InstructionsError(f"the counted child failed (exit {done.returncode}):\n{tail}")
            phases = orjson.loads((work / "phases.json").read_bytes())
            # One dump per phase, numbered in order (callgrind.out.1, .2), then the one at exit (nothing counted).
            dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
            if len(dumps) < len(PHASES):
                raise InstructionsError(f"expected a callgrind dump per phase, found {[p.name for p in dumps]}")
            totals = [callgrind_total(p) for p in dumps[: len(PHASES)]]
    finally:
        server.stop()
    rows = [
        [
            p["phase"],
            p["recipients"],
            round(total / p["recipients"]),
            round(p["redis_commands"] / p["recipients"], 2),
            p["errors"],
            p["redis_fallbacks"],
        ]
        for p, total in zip(phases, totals, strict=True)
    ]
    report.add_table(
        "Instructions the worker process executes per recipient, chunks of 256 as `POST /v1/email/slots:batch`",
        HEADERS,
        rows,
        note="callgrind's instruction count (Ir) of one process running `api.email_batch.chunk_lines` in process "
        "(no HTTP, no peers), every thread included (Python, numpy, hiredis, orjson, ONNX Runtime), counted only "
        "inside each phase after a warm-up; Redis runs outside valgrind and is shown as commands per recipient. "
        "'decide and store': every recipient new to the campaign; 'read back': the same recipients again. "
        "Instructions are not time (a cache miss counts nothing), but they do not drift with the machine: "
        "compare commits here, and times on `nextbest bench email-batch`.",
    )
    report.print(console)
    path = report.write(out_dir)
    console.print(f"report: {path}")
    return path


def _child(work: Path) -> None:
    ids = orjson.loads((work / "ids.json").read_bytes())
    phases = measure_phases(os.environ["REDIS_URL"], ids["recipients"], ids["warmup"], count=True)
    (work / "phases.json").write_bytes(orjson.dumps(phases))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the counted child of `nextbest bench email-instructions`")
    parser.add_argument("work", type=Path)
    _child(parser.parse_args().work)
