"""All runtime configuration, from environment variables (prefix NEXTBEST_, plus REDIS_URL)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEXTBEST_", extra="ignore")

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "NEXTBEST_REDIS_URL"),
        description="Redis to use; unset = start the embedded redis-server under data_dir",
    )
    data_dir: Path = Field(Path("var"), description="embedded Redis files, generated data, default registry")
    registry_dir: Path | None = Field(None, description="model registry root (default: <data_dir>/registry)")
    rules_file: Path | None = Field(None, description="business rules YAML (default: the bundled rules)")
    key_prefix: str = Field("nb", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(2, ge=1, le=64)
    redis_timeout_ms: float = Field(20.0, gt=0, le=5000, description="budget for one Redis round trip")
    breaker_failures: int = Field(3, ge=1, description="consecutive Redis failures that open the circuit")
    breaker_reset_s: float = Field(2.0, gt=0, description="seconds before an open circuit lets a probe through")
    refresh_interval_s: float = Field(1.0, gt=0, le=3600, description="how often to check for new models/catalog")
    log_level: str = "info"
    gc_young_objects: int = Field(
        20_000,
        ge=100,
        le=1_000_000,
        description="net new objects between young garbage collections (CPython's default, 700, makes a batch's "
        "short-lived objects be scanned and promoted again and again: 4 % of its CPU)",
    )
    caps_timeout_ms: float = Field(
        100.0,
        gt=0,
        le=5000,
        description="budget of the cap reservation on the request path (a write; longer than a read, bounded so "
        "a Redis that stalls writes, as in a failover, cannot hold every offers answer)",
    )
    arms_refresh_s: float = Field(
        5.0, gt=0, le=3600, description="how often workers re-read the bandit state (impressions, successes)"
    )
    decision_log: bool = Field(True, description="append every decision to the decision log stream")
    exploration: bool = Field(True, description="use each placement's exploration policy (off: greedy everywhere)")
    feedback_window_s: int = Field(
        86_400, ge=60, le=90 * 86_400, description="how long a decision accepts feedback (its record's TTL)"
    )
    log_max_entries: int = Field(
        2_000_000, ge=1_000, description="cap on unexported log entries (a safety net: export drains the log)"
    )
    email_signing_keys: SecretStr | None = Field(
        None,
        description="click-link keys 'kid:secret,kid:secret' (first signs, all verify); unset: a random demo key "
        "kept in Redis (shared by every worker and replica on that Redis; not for real emails)",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="API keys as 'name:scope+scope:sha256hex' entries (comma or newline separated); unset = open",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on this port too, without a key (for a scraper)"
    )
    peers_dir: Path | None = Field(
        None,
        description="set by `nextbest serve` with several workers: where each worker's socket is, for sharing the "
        "chunks of a pre-send batch; unset = a batch is decided by the worker that received it",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="this service's address as email recipients reach it (click links point here); "
        "default http://<host>:<port>",
    )

    @property
    def click_base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def registry_path(self) -> Path:
        return self.registry_dir or self.data_dir / "registry"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take; the message names each variable."""


def _variable(field: str) -> str:
    return "REDIS_URL" if field == "redis_url" else f"NEXTBEST_{field.upper()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment; `SettingsError` names every variable with a bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            name = str(e["loc"][0]) if e["loc"] else "?"
            field = Settings.model_fields.get(name)
            secret = field is not None and SecretStr in (field.annotation, *get_args(field.annotation))  # never echoed
            value = "(a secret, not shown)" if secret else repr(e.get("input"))
            problems.append(f"{_variable(name)}={value}: {e['msg']}")
        raise SettingsError("; ".join(problems)) from None
