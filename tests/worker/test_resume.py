"""Resumable jobs: a run that dies after a checkpoint is re-queued by the reconciler and the next
attempt continues from the checkpoint — computing exactly what an uninterrupted run computes,
with no epoch counted twice; a database outage does not fail a running job."""
from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
import torch

from core import models as zoo
from service.db import session_scope
from service.events import list_events
from service.orm import Job, utcnow
from service.reconcile import reconcile_once
from tests.worker.conftest import TINY_MLP, get_job, spec, stored_files, stored_model_path
from worker import runner
from worker.checkpoint import Checkpointer

PLATEAU = [
    {"op": "train", "epochs": 5, "batch_size": 32, "lr": 0.003, "lr_steps": [3],
     "track": ["effective_dim"]},
    {"op": "pcn", "when": "plateau", "layers": ["fc1", "fc2"], "select": {"dims": 8},
     "samples": 200, "plateau_delta": 1.0, "plateau_min_epochs": 3},
    {"op": "train", "epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.05},
    {"op": "evaluate"},
]


class WorkerDied(BaseException):
    """Stands for SIGKILL: not an Exception, so the runner cannot handle it."""


def die_after_checkpoints(monkeypatch, n: int) -> None:
    original = Checkpointer.save
    calls = {"n": 0}

    def save(self, *args, **kwargs):
        saved = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= n:
            raise WorkerDied
        return saved

    monkeypatch.setattr(Checkpointer, "save", save)


def weights(settings, store, tmp_path, job_id) -> dict[str, torch.Tensor]:
    model_id = get_job(settings, job_id).result["model_id"]
    return zoo.load(stored_model_path(settings, store, tmp_path, model_id)).state_dict()


def lose_worker(settings, job_id: str) -> None:
    """What a dead worker leaves: a running row whose heartbeat goes stale."""
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job.status == "running"
        job.heartbeat_at = utcnow() - timedelta(hours=1)
    passed = reconcile_once(settings)
    assert passed.requeued == [job_id] and job_id in passed.sent
    assert get_job(settings, job_id).status == "queued"


def epoch_pairs(settings, job_id) -> Counter:
    with session_scope(settings) as session:
        return Counter((e.data["step"], e.data["epoch"])
                       for e in list_events(session, job_id, 0, 10_000) if e.kind == "epoch")


@pytest.mark.parametrize("die_at", [2, 4, 5, 7])
def test_resumed_job_equals_uninterrupted_run(settings, store, submit, tmp_path, monkeypatch,
                                              die_at):
    """die_at counts checkpoints: 2 = epoch 2 of the first train step, before its plateau
    transform (epoch 3); 4 = epoch 5, after it (the second train call); 5 = the boundary
    before the pcn step; 7 = epoch 1 of the second train step (SGD)."""
    steps = PLATEAU
    reference = submit(spec(TINY_MLP, steps))
    assert runner.run_job(reference, settings) == "succeeded"
    expected = weights(settings, store, tmp_path, reference)
    ref_result = get_job(settings, reference).result

    job_id = submit(spec(TINY_MLP, steps))
    die_after_checkpoints(monkeypatch, die_at)
    with pytest.raises(WorkerDied):
        runner.run_job(job_id, settings)
    monkeypatch.undo()
    pointer = get_job(settings, job_id).checkpoint
    assert pointer is not None and pointer["seq"] == die_at
    lose_worker(settings, job_id)
    assert runner.run_job(job_id, settings) == "succeeded"

    job = get_job(settings, job_id)
    assert job.attempts == 2 and job.checkpoint is None
    resumes = job.result["resumes"]
    assert len(resumes) == 1 and resumes[0]["attempt"] == 2
    assert (resumes[0]["step"], resumes[0]["epoch"]) == (pointer["step"], pointer["epoch"])
    got = weights(settings, store, tmp_path, job_id)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert job.result["after"]["accuracy"] == ref_result["after"]["accuracy"]
    assert [s["op"] for s in job.result["steps"]] == [s["op"] for s in steps]
    assert [h["epoch"] for h in job.result["steps"][0]["history"]] == [1, 2, 3, 4, 5]
    pairs = epoch_pairs(settings, job_id)
    assert pairs == epoch_pairs(settings, reference)  # every epoch once, as without the crash
    assert max(pairs.values()) == 1
    with session_scope(settings) as session:
        statuses = [e.data for e in list_events(session, job_id, 0, 10_000)
                    if e.kind == "status"]
    assert [d["status"] for d in statuses] == ["queued", "running", "queued", "running",
                                               "resumed", "succeeded"]
    assert not [f for f in stored_files(store) if f.startswith("checkpoints/")]
    assert not list(runner.work_root(settings).iterdir())  # no temp dir left behind


def test_lost_before_any_checkpoint_restarts_and_max_attempts_fail(settings, submit,
                                                                  monkeypatch):
    job_id = submit(spec(TINY_MLP, [{"op": "train", "epochs": 2, "batch_size": 64}]))
    settings.job_max_attempts = 2
    die_after_checkpoints(monkeypatch, 1)
    with pytest.raises(WorkerDied):
        runner.run_job(job_id, settings)
    with session_scope(settings) as session:  # as if it died before its first checkpoint
        session.get(Job, job_id).checkpoint = None
    lose_worker(settings, job_id)
    with pytest.raises(WorkerDied):
        runner.run_job(job_id, settings)
    monkeypatch.undo()
    with session_scope(settings) as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(hours=1)
    passed = reconcile_once(settings)
    assert passed.failed == [job_id]
    job = get_job(settings, job_id)
    assert job.status == "failed" and job.error_code == "WorkerLost"
    assert "SLIMLINE_JOB_MAX_ATTEMPTS=2" in job.error_message
    with session_scope(settings) as session:
        resumed = [e.data for e in list_events(session, job_id) if e.kind == "status"
                   and e.data["status"] == "resumed"]
    assert resumed and resumed[0]["checkpoint_at"] is None and resumed[0]["epoch"] == 0


def test_database_outage_does_not_fail_a_running_job(settings, submit, monkeypatch):
    """Progress, event and cancel-check writes that fail because the database is unreachable
    are skipped (events kept and written later); the job succeeds with every event."""
    from sqlalchemy.exc import OperationalError

    job_id = submit(spec(TINY_MLP, [{"op": "train", "epochs": 4, "batch_size": 64},
                                    {"op": "evaluate"}]))
    original = runner.JobReporter._write
    calls = {"n": 0}

    def flaky(self, fn, *, tolerate=True):
        calls["n"] += 1
        if 3 <= calls["n"] <= 12:  # an outage in the middle of training
            if not tolerate:
                raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
            return original(self, lambda s: (_ for _ in ()).throw(
                OperationalError("SELECT 1", {}, Exception("connection refused"))))
        return original(self, fn, tolerate=tolerate)

    monkeypatch.setattr(runner.JobReporter, "_write", flaky)
    assert runner.run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    assert job.status == "succeeded" and job.attempts == 1
    assert sorted(epoch_pairs(settings, job_id)) == [(0, 1), (0, 2), (0, 3), (0, 4)]


def test_unreadable_checkpoint_starts_over_instead_of_failing(settings, store, submit,
                                                             monkeypatch):
    job_id = submit(spec(TINY_MLP, [{"op": "train", "epochs": 3, "batch_size": 64}]))
    die_after_checkpoints(monkeypatch, 2)
    with pytest.raises(WorkerDied):
        runner.run_job(job_id, settings)
    monkeypatch.undo()
    pointer = get_job(settings, job_id).checkpoint
    store.delete(f"{pointer['prefix']}/state.json")  # an object lost from the store
    lose_worker(settings, job_id)
    assert runner.run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    (entry,) = job.result["resumes"]
    assert entry["epoch"] == 0 and "checkpoint_unreadable" in entry
    assert sorted(epoch_pairs(settings, job_id)) == [(0, 1), (0, 2), (0, 3)]
    assert not [f for f in stored_files(store) if f.startswith("checkpoints/")]
