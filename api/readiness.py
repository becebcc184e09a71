"""Waiting for a `nextbest serve` process to become ready (used by the demo, benchmarks and tests)."""

from __future__ import annotations

import subprocess
import time

import httpx


class ServerNotReadyError(RuntimeError):
    """The server process exited, or did not answer /readyz in time."""


def wait_until_ready(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    """Poll /readyz until it answers 200; fail early if the process exits, and stop it on time-out."""
    deadline = time.monotonic() + timeout_s
    # One client for every poll: a new one builds an SSL context each time (about 40 ms).
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerNotReadyError(f"the server exited with code {proc.returncode} (its messages are above)")
            try:
                if client.get(f"{base_url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.1)
    proc.terminate()
    raise ServerNotReadyError(f"the server was not ready within {timeout_s:.0f}s")
