"""worker.celery_app / worker.tasks: the Celery wiring (no broker needed)."""
from __future__ import annotations

from worker import runner
from worker.celery_app import app
from worker.tasks import run_job


def test_task_is_registered_by_name_with_late_acks():
    task = app.tasks["slimline.run_job"]
    assert task.name == run_job.name == "slimline.run_job"
    assert task.acks_late and task.reject_on_worker_lost
    assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1
    assert {q.name for q in app.conf.task_queues} == {"cpu", "gpu"}


def test_task_only_passes_the_id_to_the_runner(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_job", lambda job_id: calls.append(job_id) or "succeeded")
    assert run_job.run("01abc") == "succeeded"
    assert calls == ["01abc"]


def test_each_queue_has_its_own_routing():
    queues = app.amqp.queues
    for name in ("cpu", "gpu"):
        assert queues[name].routing_key == name and queues[name].exchange.name == name
