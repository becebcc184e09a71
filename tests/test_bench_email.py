"""`nextbest bench email-batch`: the CPU accounting of a phase, on known numbers."""

import math
import subprocess
import sys
import time

import psutil
import pytest

from benchmarks.email import CPU_HEADERS, _cpu_row
from benchmarks.proctree import cpu_seconds, serve_processes


def test_a_phase_cpu_row_splits_the_machine_by_process_and_prices_the_target():
    cpu = {
        "serve (parent)": 0.5,
        "worker 1": 8.0,
        "worker 2": 9.0,
        "resource tracker": 0.1,
        "redis-server": 1.2,
        "load generator": 0.4,
    }
    row = _cpu_row("decide and store", cpu, busy_s=20.0, wall_s=10.0, recipients=20_000)
    assert len(row) == len(CPU_HEADERS)
    # cores: workers, serve parent + helpers, redis, load generator, the rest of the machine, the machine
    assert row[0] == "decide and store"
    assert row[1:] == pytest.approx([1.7, 0.06, 0.12, 0.04, 0.08, 2.0, 0.85, 4.55])


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ninput()"
# A stand-in for `nextbest serve`: it starts one child (a worker that burns 0.3 s of CPU) and waits.
PARENT = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}])"


def test_the_process_tree_labels_a_child_as_a_worker_and_times_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        procs = serve_processes(psutil.Process(parent.pid), psutil.Process())
        assert [k for k in procs if k.startswith("worker")] == ["worker 1"]
        while cpu_seconds(procs)["worker 1"] < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_seconds(procs)["worker 1"] >= 0.25  # the worker's own CPU, not its parent's
        assert cpu_seconds(procs)["serve (parent)"] < 0.25
    finally:
        parent.communicate(b"\n", timeout=10)  # the worker reads the newline and both exit
    assert math.isnan(cpu_seconds(procs)["worker 1"])  # a process that is gone
