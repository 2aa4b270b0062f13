"""The Celery configuration shared by the API's client (service.queue) and the worker app."""
from __future__ import annotations

from typing import Any

from service.settings import Settings

TASK_NAME = "slimline.run_job"
# the coordinator of an auto-compress search (service.search): runs for a moment, then returns
TICK_TASK_NAME = "slimline.auto_tick"
QUEUES = ("cpu", "gpu")


def filesystem_folders(settings: Settings) -> dict[str, Any]:
    """The filesystem transport's folders (created here): in = out, processed messages kept,
    and the exchange table (kombu's `control_folder`, which defaults to ./control in the cwd)."""
    queue = settings.broker_folder / "queue"
    processed = settings.broker_folder / "processed"
    control = settings.broker_folder / "control"
    for folder in (queue, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    # the transport polls its folder; its default (1 s) was 0.97 s of a trivial job's 1.06 s
    return {"data_folder_in": str(queue), "data_folder_out": str(queue),
            "data_folder_processed": str(processed), "processed_folder": str(processed),
            "store_processed": False, "control_folder": str(control),
            "polling_interval": settings.filesystem_poll_s}


def celery_config(settings: Settings) -> dict[str, Any]:
    from kombu import Exchange, Queue

    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # each queue its own direct exchange and routing key, so a `gpu` job never lands on `cpu`
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name)
                        for name in QUEUES],
        "task_default_queue": "cpu",
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "worker_hijack_root_logger": False,
    }
    if settings.uses_filesystem_broker:
        config["broker_transport_options"] = filesystem_folders(settings)
    else:
        # Redis: a task unacknowledged this long is redelivered; longer than any job.
        config["broker_transport_options"] = {"visibility_timeout": 12 * 3600}
    return config
