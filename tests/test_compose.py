"""docker-compose.yml and the Dockerfile agree with the CLI and the settings (Docker itself is
not needed: the files are parsed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SLIMLINE_SERVICES = {name: svc for name, svc in SERVICES.items()
                     if isinstance(svc.get("command"), list) and svc["command"][0] == "slimline"}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_the_stack_has_every_part():
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker",
            "worker-gpu"} <= set(SERVICES)
    assert set(SLIMLINE_SERVICES) == {"migrate", "api", "worker", "worker-gpu"}


@pytest.mark.parametrize("name", sorted(SLIMLINE_SERVICES))
def test_service_command_is_a_cli_command(name):
    args = SLIMLINE_SERVICES[name]["command"][1:]
    # --help is eager: the exit code is 0 only if the command and every option given exist
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, (name, args, result.output)


@pytest.mark.parametrize("name", sorted(SLIMLINE_SERVICES))
def test_service_env_vars_are_settings(name):
    fields = set(Settings.model_fields)
    env = environment(SLIMLINE_SERVICES[name])
    names = [k for k in env if k.startswith("SLIMLINE_")]
    assert names, f"{name} sets no SLIMLINE_* variables"
    unknown = [k for k in names if k.removeprefix("SLIMLINE_").lower() not in fields]
    assert not unknown, f"{name}: {unknown} are not fields of service.settings.Settings"
    settings = Settings(**{k.removeprefix("SLIMLINE_").lower(): v for k, v in env.items()
                           if k.startswith("SLIMLINE_")})
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url.startswith("redis://")
    assert settings.storage_url.startswith("s3://") and settings.auth == "on"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)


def test_ordering_and_healthchecks():
    for name in ("api", "worker", "worker-gpu"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    for name in ("redis", "minio"):
        assert SERVICES[name]["healthcheck"]["test"]
    assert "mc mb" in " ".join(SERVICES["minio-init"]["command"])
    worker = SERVICES["worker"]["command"]
    assert worker[worker.index("--queues") + 1] == "cpu"


def test_gpu_worker_reserves_an_nvidia_gpu():
    gpu = SERVICES["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"][gpu["command"].index("--queues") + 1] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert "profiles" not in SERVICES["worker"]


def test_dockerfile_pins_torch_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert "ARG TORCH_VARIANT=cpu" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert text.index("torch==") < text.index("pip install -e .")  # torch first
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)
    cmd = re.search(r'^CMD \["slimline", "api"', text, re.MULTILINE)
    assert cmd is not None
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
