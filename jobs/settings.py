"""Settings from `SLIMLINE_*` environment variables; unset ones fall back to the embedded default
under `SLIMLINE_HOME` (SQLite file, Celery filesystem broker, local object directory)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMLINE_", extra="ignore")

    home: Path = Path("./.slimline")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    auth: Literal["on", "off"] = "on"
    default_tenant: str = "default"
    data_dir: Path | None = None
    max_upload_bytes: int = Field(default=200 * MiB, ge=1)
    max_epochs: int = Field(default=200, ge=1)
    job_heartbeat_timeout_s: float = Field(default=300.0, gt=0)
    # `python -m <inspect_module>` validates uploaded checkpoints in a subprocess (tests swap it).
    inspect_module: str = "worker.inspect"
    inspect_timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'slimline.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.storage_url:
            self.storage_url = (self.home / "objects").as_uri()
        return self

    @property
    def broker_folder(self) -> Path:
        """Root of the Celery filesystem transport's folders (used when broker_url is filesystem)."""
        return self.home / "broker"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment (tests build `Settings(...)` explicitly)."""
    return Settings()
