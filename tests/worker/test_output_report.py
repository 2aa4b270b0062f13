"""The output model of a job carries its prunability report (worker.finish), and a report that
cannot be made never fails the job."""
from __future__ import annotations

from service.db import session_scope
from service.orm import Model
from tests.worker.conftest import TINY_MLP, run_ok, spec
from worker import finish


def _report(settings, model_id: str):
    with session_scope(settings) as session:
        return session.get(Model, model_id).report


def test_output_model_has_a_report_of_the_compressed_model(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "train", "epochs": 1},
        {"op": "pcn", "layers": ["fc1"], "select": {"dims": 4}, "samples": 100}]))
    report = _report(settings, result["model_id"])
    assert report is not None
    assert report["totals"]["params"] == result["after"]["params"]["total"]
    assert any(layer["name"].startswith("fc1") for layer in report["layers"])


def test_a_failing_report_leaves_the_model_without_one(settings, submit, monkeypatch):
    def broken(model):
        raise RuntimeError("boom")
    monkeypatch.setattr(finish, "prunability_report", broken)
    _, result = run_ok(settings, submit, spec(TINY_MLP, [{"op": "train", "epochs": 1}]))
    assert _report(settings, result["model_id"]) is None
