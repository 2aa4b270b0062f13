from __future__ import annotations

from service.celery_config import celery_config
from service.settings import Settings, get_settings


def test_embedded_defaults_live_under_home(tmp_path, monkeypatch):
    for var in ("DATABASE_URL", "BROKER_URL", "STORAGE_URL", "AUTH"):
        monkeypatch.delenv(f"SLIMLINE_{var}", raising=False)
    s = Settings(home=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path}/slimline.db"
    assert s.broker_url == "filesystem://" and s.broker_folder == tmp_path / "broker"
    assert s.storage_url == (tmp_path / "objects").as_uri()
    assert s.auth == "on" and s.max_upload_bytes == 200 * 1024 * 1024 and s.max_epochs == 200


def test_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLINE_HOME", str(tmp_path))
    monkeypatch.setenv("SLIMLINE_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("SLIMLINE_STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("SLIMLINE_AUTH", "off")
    monkeypatch.setenv("SLIMLINE_MAX_UPLOAD_BYTES", "1234")
    s = Settings()
    assert s.home == tmp_path and s.database_url.startswith("postgresql")
    assert s.storage_url == "s3://bucket/prefix" and s.auth == "off"
    assert s.max_upload_bytes == 1234
    get_settings.cache_clear()
    assert get_settings().max_upload_bytes == 1234
    get_settings.cache_clear()


def test_celery_config_filesystem_and_redis(tmp_path):
    conf = celery_config(Settings(home=tmp_path))
    opts = conf["broker_transport_options"]
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(tmp_path / "broker/queue")
    assert (tmp_path / "broker/processed").is_dir()
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["task_reject_on_worker_lost"] and conf["task_default_queue"] == "cpu"
    assert {q.name for q in conf["task_queues"]} == {"cpu", "gpu"}
    redis = celery_config(Settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    assert "data_folder_in" not in redis["broker_transport_options"]
