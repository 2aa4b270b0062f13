"""Settings from `SLIMLINE_*` environment variables; unset ones fall back to the embedded default
under `SLIMLINE_HOME` (SQLite file, Celery filesystem broker, local object directory)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
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

    # ---- bounded resources (issue 11); every limit is a 4xx that names the setting ----
    # the checkpoint/dataset inspector subprocess: address-space and CPU-time caps, and how many
    # run at once per API process (a request waits up to inspect_queue_s for a slot, else 503)
    inspect_memory_bytes: int = Field(default=4096 * MiB, ge=64 * MiB)
    inspect_cpu_s: int = Field(default=120, ge=1)
    inspect_concurrency: int = Field(default=2, ge=1)
    inspect_queue_s: float = Field(default=30.0, ge=0)
    # uploads: a safetensors header over this is refused before it is parsed; datasets are
    # refused past this decompressed size or compression ratio (zip bombs)
    max_safetensors_header_bytes: int = Field(default=16 * MiB, ge=1024)
    max_dataset_bytes: int = Field(default=2048 * MiB, ge=1)
    max_decompression_ratio: float = Field(default=100.0, ge=1)
    max_form_fields: int = Field(default=16, ge=1)
    max_json_bytes: int = Field(default=1 * MiB, ge=1024)
    # `{"arch": ...}` specs: the built model's size, checked at submission (torch-free)
    max_model_params: int = Field(default=100_000_000, ge=1)
    max_model_macs: int = Field(default=20_000_000_000, ge=1)
    # per-tenant quotas (429 with Retry-After)
    max_active_jobs: int = Field(default=50, ge=1)  # queued + running, per tenant
    max_total_epochs: int = Field(default=1000, ge=1)  # summed over a job's train steps
    max_uploads_per_hour: int = Field(default=200, ge=1)  # models + datasets, per tenant
    max_event_streams: int = Field(default=10, ge=1)  # open SSE streams per tenant and process
    # the API under load: requests handled at once per process, how many may wait for a slot
    # (past that: 503 + Retry-After at once), the DB pool and how long a request waits for it
    # (8: the routes are CPU-bound Python; more in progress at once only adds GIL contention
    # and tail latency on a small machine; slots + 8 threads stay under the pool's 30)
    api_max_concurrency: int = Field(default=8, ge=1)
    api_max_waiting: int = Field(default=64, ge=0)
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    # operators: a token that sees /metrics totals and /readyz details (Bearer <token>)
    metrics_token: SecretStr | None = None

    # ---- reliability (issue 11) ----
    # a job is run at most this many times (the first run + resumes after a lost worker)
    job_max_attempts: int = Field(default=3, ge=1)
    # the reconciler re-sends a queued job whose message may be lost after this long (then
    # doubling per re-send), and runs every reconcile_interval_s in every worker and API process
    dispatch_grace_s: float = Field(default=60.0, gt=0)
    reconcile_interval_s: float = Field(default=15.0, gt=0)
    # an auto-compress search whose coordinator has not run for this long is run by the
    # reconciler (it normally runs whenever one of its trials ends)
    search_tick_s: float = Field(default=60.0, gt=0)
    # a running job keeps computing through a database outage this long before it gives up
    db_outage_tolerance_s: float = Field(default=600.0, ge=0)
    # temp files of dead processes (interrupted uploads, killed workers) older than this are
    # removed at start-up and periodically
    temp_max_age_s: float = Field(default=3600.0, ge=0)
    # torch threads per worker process (default: the CPUs this process may use / concurrency)
    worker_threads: int | None = Field(default=None, ge=1)
    # the embedded broker's poll period (Celery filesystem transport)
    filesystem_poll_s: float = Field(default=0.1, gt=0)

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
        """Root of the Celery filesystem transport's folders (when broker_url is filesystem)."""
        return self.home / "broker"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment (tests build `Settings(...)` explicitly)."""
    return Settings()
