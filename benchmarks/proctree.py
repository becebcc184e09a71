"""The processes a server benchmark measures, and their CPU time: the `nextbest serve` tree (parent,
workers, helpers), redis-server, and the load generator (this process)."""

from __future__ import annotations

import math

import psutil
import redis


def serve_processes(parent: psutil.Process, redis_server: psutil.Process) -> dict[str, psutil.Process]:
    """Labelled processes; worker n is the n-th worker by pid, so labels stay put between two looks."""
    procs = {"serve (parent)": parent}
    helpers: list[psutil.Process] = []
    workers: list[psutil.Process] = []
    for child in sorted(parent.children(recursive=True), key=lambda p: p.pid):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        (helpers if "resource_tracker" in cmd else workers).append(child)
    procs |= {f"worker {n}": w for n, w in enumerate(workers, 1)}
    procs |= {"resource tracker" if n == 0 else f"helper {n}": h for n, h in enumerate(helpers)}
    return procs | {"redis-server": redis_server, "load generator": psutil.Process()}


def redis_process(client: redis.Redis) -> psutil.Process:
    """The redis-server behind a client (it reports its own pid; the server may not be our child)."""
    return psutil.Process(int(client.info("server")["process_id"]))


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds per label so far (NaN for a process that is gone)."""
    out = {}
    for label, p in procs.items():
        try:
            t = p.cpu_times()
            out[label] = t.user + t.system
        except psutil.Error:
            out[label] = math.nan
    return out


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process) since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))
