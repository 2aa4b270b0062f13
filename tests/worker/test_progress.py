"""Job progress weighted by each step's expected cost (worker.progress): monotonic, moving within a
train step's epochs, a long train step weighing more than a short pcn step, ending at 1.0, with
an ETA (`eta_s`) while the job runs."""
from __future__ import annotations

import threading
import time

from service.db import session_scope
from service.events import eta_seconds, list_events
from service.orm import Job
from service.spec import JobSpec
from service.submission import job_document
from tests.worker.conftest import TINY_MLP, get_job, spec
from worker import reporter as reporter_module
from worker import runner
from worker.progress import DataSizes, WeightedProgress, step_costs

TRAIN = {"op": "train", "epochs": 3, "batch_size": 8}  # 32 batches per epoch on synthetic-tiny
PCN = {"op": "pcn", "layers": ["fc1"], "select": {"dims": 8}, "samples": 200}


def progress_events(settings, job_id):
    with session_scope(settings) as session:
        return [e.data for e in list_events(session, job_id, 0, 100_000) if e.kind == "progress"]


def test_costs_weigh_a_long_train_step_over_a_short_pcn_step():
    steps = JobSpec.model_validate(spec(TINY_MLP, [TRAIN | {"epochs": 20}, PCN])).steps
    train, pcn = step_costs(steps, DataSizes(train=60_000, val=5_000, test=10_000))
    assert train > 50 * pcn
    weights = WeightedProgress([train, pcn])
    assert weights.at(0, 1.0) > 0.95  # the train step is nearly all of the job
    assert weights.at(0, 0.5) == weights.at(0, 1.0)  # never moves back
    assert weights.at(1, 1.0) == 1.0


def test_progress_is_monotonic_moves_within_epochs_and_ends_at_one(settings, submit,
                                                                   monkeypatch):
    monkeypatch.setattr(reporter_module, "PROGRESS_MIN_INTERVAL_S", 0.0)  # every batch
    job_id = submit(spec(TINY_MLP, [TRAIN, PCN]))
    assert runner.run_job(job_id, settings) == "succeeded"
    events = progress_events(settings, job_id)
    values = [e["progress"] for e in events]
    assert values == sorted(values), "progress moved back"
    assert get_job(settings, job_id).progress == 1.0
    # several distinct values during one epoch of the multi-batch train step
    first_epoch = {e["progress"] for e in events if e["stage"] == "train epoch 1/3"}
    assert len(first_epoch) >= 10
    assert max(first_epoch) < min(e["progress"] for e in events if e["stage"] == "train 1/3")
    # the train step (3 epochs x 256 samples) weighs more than the pcn step (200 samples)
    train_done = next(e["progress"] for e in events if e["stage"].startswith("train done"))
    assert 0.5 < train_done < 0.999
    assert all("eta_s" in e for e in events)
    assert any(isinstance(e["eta_s"], float) and e["eta_s"] >= 0 for e in events)


def test_progress_writes_are_throttled_within_a_stage(settings, submit):
    assert reporter_module.PROGRESS_MIN_INTERVAL_S == 1.0
    job_id = submit(spec(TINY_MLP, [TRAIN | {"epochs": 2}]))
    started = time.monotonic()
    assert runner.run_job(job_id, settings) == "succeeded"
    wall = time.monotonic() - started
    in_epochs = [e for e in progress_events(settings, job_id)
                 if e["stage"].startswith("train epoch")]
    # 64 batches; the first of each epoch is written, then at most one a second
    assert 2 <= len(in_epochs) <= 2 + wall


def test_eta_while_running_and_none_once_done(settings, submit):
    job_id = submit(spec(TINY_MLP, [TRAIN | {"epochs": 40, "batch_size": 4}]))
    worker = threading.Thread(target=runner.run_job, args=(job_id, settings))
    worker.start()
    seen = []
    deadline = time.monotonic() + 120
    try:
        while worker.is_alive() and time.monotonic() < deadline:
            with session_scope(settings) as session:
                doc = job_document(session.get(Job, job_id))
            if doc["status"] == "running" and doc["progress"] >= 0.05:
                seen.append(doc)
                if len(seen) >= 2:
                    break
            time.sleep(0.2)
    finally:
        with session_scope(settings) as session:
            session.get(Job, job_id).cancel_requested = True
        worker.join(timeout=120)
    assert len(seen) >= 2, "the job never reported progress while running"
    for doc in seen:
        assert isinstance(doc["eta_s"], float) and doc["eta_s"] > 0
        assert doc["stage"].startswith("train")
    assert seen[1]["progress"] >= seen[0]["progress"]
    job = get_job(settings, job_id)
    assert job.status == "canceled" and eta_seconds(job) is None
