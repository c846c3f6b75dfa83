"""Settings, read from `BGTASKS_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.paths import default_data_dir


class Settings(BaseSettings):
    """Everything the service can be told. Each field is `BGTASKS_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="BGTASKS_", extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory holding log.txt, README.md and the task registry.",
    )
    delay: float = Field(
        1.0, ge=0, le=3600, description="Seconds each task waits before it writes (slow mail)."
    )
    retention: int = Field(
        10_000, ge=10, le=10_000_000, description="Finished requests kept in the registry."
    )
    lock_timeout: float = Field(
        5.0, gt=0, le=600, description="Seconds to wait for the registry's lock before failing."
    )
    drain_timeout: float | None = Field(
        None,
        ge=0,
        le=86400,
        description="On shutdown, seconds to wait for unfinished tasks; None waits for all.",
    )
    max_running: int = Field(
        10_000, ge=1, le=1_000_000, description="Tasks allowed to run at once; more wait."
    )
