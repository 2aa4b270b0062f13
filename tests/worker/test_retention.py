"""Retention: a job whose steps leave its stored input model unchanged (evaluate, analyze,
measure, export) stores no copy of it (worker.finish.unchanged_input), while a compressing job
still stores its model; deleting either kind of job or the model afterwards leaves no row
pointing at a missing object (service.deletion)."""
from __future__ import annotations

from sqlalchemy import func, select

from service.db import session_scope
from service.deletion import delete_job, delete_model
from service.orm import Artifact, Job, Model
from tests.worker.conftest import TINY_MLP, get_job, run_ok, spec, stored_files
from worker.finish import same_arch

TRAIN = {"op": "train", "epochs": 1, "batch_size": 32}
READ_ONLY = [{"op": "evaluate"}, {"op": "analyze", "kinds": ["spectrum"], "layers": ["fc1"]},
             {"op": "measure"}, {"op": "export", "formats": ["onnx"]}]


def model_objects(store) -> list[str]:
    return [k for k in stored_files(store) if k.startswith("models/")]


def models(settings) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(Model))


def artifacts(settings, job_id: str) -> dict[str, Artifact]:
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        for row in rows:
            session.expunge(row)
        return {a.name: a for a in rows}


def test_an_analyze_only_job_keeps_no_copy_and_a_compressing_job_stores_one(
        settings, store, submit, tenant_id):
    _, trained = run_ok(settings, submit, spec(TINY_MLP, [TRAIN]))
    source = trained["model_id"]
    assert trained["model_unchanged"] is False
    objects, rows = model_objects(store), models(settings)
    with session_scope(settings) as session:
        source_row = session.get(Model, source)
        source_key, source_size = source_row.storage_key, source_row.size_bytes

    job_id, result = run_ok(settings, submit, spec(source, READ_ONLY))
    assert result["model_id"] == source and result["model_unchanged"] is True
    assert result["after"]["checkpoint_bytes"] == source_size
    assert model_objects(store) == objects and models(settings) == rows  # no copy
    kept = artifacts(settings, job_id)
    assert kept["model.safetensors"].storage_key == source_key  # the input model's object
    assert kept["model.onnx"].kind == "export"  # the export is the job's own artifact
    assert kept["model.onnx"].storage_key.startswith(f"jobs/{tenant_id}/{job_id}/")
    assert store.exists(kept["model.onnx"].storage_key)

    # a step that changes the weights stores the model as before
    pruned_id, pruned = run_ok(settings, submit, spec(source, [
        {"op": "magnitude", "sparsity": 0.5}, {"op": "evaluate"}]))
    assert pruned["model_unchanged"] is False and pruned["model_id"] != source
    assert len(model_objects(store)) == len(objects) + 1 and models(settings) == rows + 1
    with session_scope(settings) as session:
        assert session.get(Model, pruned["model_id"]).source_job_id == pruned_id

    # deleting the analyze-only job leaves the input model (its model artifact's object)
    with session_scope(settings) as session:
        delete_job(session, store, tenant_id, job_id)
    assert store.exists(source_key) and not store.exists(kept["model.onnx"].storage_key)
    assert not [k for k in stored_files(store) if k.startswith(f"jobs/{tenant_id}/{job_id}/")]


def test_deleting_the_input_model_marks_the_jobs_that_returned_it(settings, store, submit,
                                                                  tenant_id):
    _, trained = run_ok(settings, submit, spec(TINY_MLP, [TRAIN]))
    source = trained["model_id"]
    job_id, result = run_ok(settings, submit, spec(source, [{"op": "evaluate"}]))
    assert result["model_id"] == source
    with session_scope(settings) as session:
        delete_model(session, store, tenant_id, source)
    after = get_job(settings, job_id).result
    assert after["model_id"] is None and after["deleted_model_id"] == source
    assert "model.safetensors" not in artifacts(settings, job_id)
    assert model_objects(store) == []
    with session_scope(settings) as session:  # every artifact row left has its object
        keys = session.scalars(select(Artifact.storage_key)).all()
    assert keys and all(store.exists(k) for k in keys)


def test_a_read_only_job_that_sets_preprocessing_stores_its_model(settings, store, submit):
    _, trained = run_ok(settings, submit, spec(TINY_MLP, [TRAIN]))
    before = models(settings)
    job = spec(trained["model_id"], [{"op": "evaluate"}]) | {"normalize": "standardize"}
    _, result = run_ok(settings, submit, job)
    # the output's arch records the statistics the input's lacks: a new model
    assert result["model_unchanged"] is False and result["model_id"] != trained["model_id"]
    assert models(settings) == before + 1


def test_same_arch_reads_preprocessing_defaults():
    arch = {"name": "mlp", "input_shape": [1, 8, 8]}
    assert same_arch(arch, arch | {"preprocessing": {"layout": "NCHW"}})
    assert same_arch(arch | {"preprocessing": {"mean": [0.5], "std": [0.2]}},
                     arch | {"preprocessing": {"layout": "NCHW", "mean": [0.5], "std": [0.2]}})
    assert not same_arch(arch, arch | {"preprocessing": {"layout": "NCHW", "mean": [0.5],
                                                         "std": [0.2]}})
    assert not same_arch(arch, arch | {"input_shape": [1, 4, 4]})


def test_a_job_on_a_fresh_arch_stores_its_model_even_when_read_only(settings, store, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [{"op": "evaluate"}]))
    assert result["model_unchanged"] is False
    with session_scope(settings) as session:
        assert session.get(Model, result["model_id"]) is not None
        assert session.get(Job, get_job(settings, session.get(
            Model, result["model_id"]).source_job_id).id) is not None
