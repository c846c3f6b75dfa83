"""Settings, read from `BGTASKS_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.paths import default_data_dir

ENV_PREFIX = "BGTASKS_"


class Settings(BaseSettings):
    """Everything the service can be told. Each field is `BGTASKS_<NAME>` in the environment.

    Every number must be finite: NaN and infinities are refused, as no rule can hold for them.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory holding log.txt, README.md and the task registry.",
    )
    delay: float = Field(
        1.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds each task waits before it writes (slow mail).",
    )
    retention: int = Field(
        10_000, ge=10, le=10_000_000, description="Finished requests kept in the registry."
    )
    lock_timeout: float = Field(
        5.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description="Seconds to wait for the registry's lock before failing.",
    )
    drain_timeout: float | None = Field(
        None,
        ge=0,
        le=86400,
        allow_inf_nan=False,
        description="On shutdown, seconds to wait for unfinished tasks; None waits for all.",
    )
    max_running: int = Field(
        10_000, ge=1, le=1_000_000, description="Tasks allowed to run at once; more wait."
    )
    max_attempts: int = Field(
        5, ge=1, le=100, description="Attempts a task gets before it is failed for good."
    )
    retry_base: float = Field(
        0.5,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds: the longest wait before a second attempt; it doubles with each"
        " attempt after (a random wait up to that, the 'full jitter' backoff).",
    )
    retry_max: float = Field(
        60.0,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description="Seconds: the longest wait between two attempts, however many failed.",
    )
    admin_token: SecretStr | None = Field(
        None,
        min_length=16,
        description="A bearer token that lets requests from other machines retry and cancel"
        " tasks (from this machine, loopback needs none).",
    )
    database_url: str | None = Field(
        None,
        pattern=r"^postgres(ql)?://",
        description="A PostgreSQL database (postgresql://USER@HOST:PORT/DB) to keep the registry"
        " in, shared by processes on many machines; by default, SQLite in the data directory.",
    )

    @model_validator(mode="after")
    def _retry_max_covers_base(self) -> Settings:
        if self.retry_max < self.retry_base:
            raise ValueError(
                f"{ENV_PREFIX}RETRY_MAX ({self.retry_max:g} s) is shorter than"
                f" {ENV_PREFIX}RETRY_BASE ({self.retry_base:g} s)"
            )
        return self

    metrics: bool = Field(
        True, description="Keep Prometheus metrics in the data directory and serve /metrics."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as uvicorn writes them, or one JSON object per line."
    )


class SettingsError(ValueError):
    """A setting that cannot be used, described in one line that names its variable."""


def load_settings(**values: Any) -> Settings:
    """Settings from the environment, with `values` taking precedence. Raises SettingsError
    naming the first bad one as `BGTASKS_<NAME>`, the rule it breaks and what it was given."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(describe_error(exc)) from None


def describe_error(exc: ValidationError) -> str:
    """One line for the first error pydantic found: `BGTASKS_DELAY: Input should be ... (got
    'nan')`."""
    first = exc.errors()[0]
    if not first["loc"]:  # a rule between settings: its message names them
        return str(first["msg"]).removeprefix("Value error, ")
    name = ".".join(str(part) for part in first["loc"])
    return f"{ENV_PREFIX}{name.upper()}: {first['msg']} (got {first.get('input')!r})"
