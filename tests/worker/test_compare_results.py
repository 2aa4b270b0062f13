"""service.compare on results the worker really stored (runner on synthetic data): the numbers
of a row are the job's own (`result.after`, the measure and export steps'), the export's bytes
are its artifact's size, and a file measured before a step that changed the layers is not used."""
from __future__ import annotations

from sqlalchemy import select

from service.compare import compare, job_fields
from service.db import session_scope
from service.orm import Artifact, Job
from tests.worker.conftest import TINY_MLP, run_ok, spec

TRAIN = {"op": "train", "epochs": 1, "batch_size": 32, "lr": 0.003}


def test_rows_from_measured_and_exported_jobs(settings, submit):
    measured, _ = run_ok(settings, submit, spec(TINY_MLP, [
        TRAIN, {"op": "measure", "bytes": True, "latency_batch_size": 4}]))
    exported, _ = run_ok(settings, submit, spec(TINY_MLP, [
        TRAIN, {"op": "lowrank", "target": {"param_ratio": 0.5}}, {"op": "evaluate"},
        {"op": "export", "formats": ["onnx"]}]))
    stale, _ = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "measure", "bytes": True, "latency_batch_size": 4},
        {"op": "pcn", "select": {"dims": 8}, "layers": ["fc2"]}]))
    with session_scope(settings) as session:
        jobs = [session.get(Job, job_id) for job_id in (measured, exported, stale)]
        docs = [job_fields(job) for job in jobs]
        onnx = session.scalar(select(Artifact).where(Artifact.job_id == exported,
                                                     Artifact.name == "model.onnx"))
        onnx_size = onnx.size_bytes
    report = compare(docs, "bytes")
    rows = {row["job_id"]: row for row in report["rows"]}

    m = rows[measured]
    result = docs[0]["result"]
    cost = result["steps"][1]["cost"]
    assert m["name"] == "train → measure" and m["model_id"] == result["model_id"]
    assert m["params"] == result["after"]["params"] and m["macs"] == result["after"]["macs"]
    assert m["accuracy"] == result["after"]["accuracy"]
    assert m["bytes"] == cost["bytes"] > 0 and m["latency_ms"] == cost["latency_ms"] > 0
    assert m["latency_batch_size"] == 4 and m["cost"] == m["bytes"]

    e = rows[exported]
    assert e["name"] == "train → lowrank → evaluate → export"
    assert e["bytes"] == onnx_size > 0  # the file the job stored
    assert e["latency_ms"] == docs[1]["result"]["steps"][3]["onnx"]["latency_ms"]["batch_256"]
    assert e["params"]["total"] < m["params"]["total"]  # factored

    s = rows[stale]  # measured before pcn changed fc2: no bytes, no latency
    assert s["bytes"] is None and s["latency_ms"] is None and s["cost"] is None
    assert s["params"]["total"] is not None and s["accuracy"] is not None
    assert set(report["pareto"]) <= {measured, exported} and report["pareto"]
    assert report["baseline"]["params"] == result["before"]["params"]
