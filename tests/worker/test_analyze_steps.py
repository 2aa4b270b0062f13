"""The analyze step end to end (runner on synthetic-tiny): results and curves per kind and layer,
plots, the model left unchanged, progress, principal angles against a tenant's other model, and
the init variance the spectrum assumes."""
from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

from core import models as zoo
from service.db import session_scope
from service.errors import NotFound
from service.events import list_events
from service.model_registry import register_model
from service.orm import Artifact
from tests.worker.conftest import PNG_MAGIC, TINY_MLP, get_job, run_ok, spec, stored_model_path
from worker import runner

TRAIN = {"op": "train", "epochs": 2, "batch_size": 32, "lr": 0.003}


def load(settings, store, tmp_path, model_id):
    return zoo.load(stored_model_path(settings, store, tmp_path, model_id))


def artifacts(settings, store, job_id):
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        return {a.name: b"".join(store.open_stream(a.storage_key)) for a in rows}


def test_analyze_reports_every_kind_and_leaves_the_model_unchanged(settings, store, submit,
                                                                   tmp_path):
    job_id, result = run_ok(settings, submit, spec(TINY_MLP, [
        TRAIN, {"op": "analyze", "kinds": ["unit_pruning", "spectrum", "elbow"],
                "layers": ["fc1", "fc2", "fc3"], "seeds": 2, "k": 5}]))
    trained, analysis = result["steps"]
    assert analysis["layers"] == ["fc1", "fc2", "fc3"]
    assert analysis["metric"] == "val_accuracy" and analysis["validation_samples"] > 0
    # unit pruning: fc3's units are the classes
    assert set(analysis["unit_pruning"]) == {"fc1", "fc2"}
    assert "fc3" in analysis["skipped"]["unit_pruning"]
    fc1 = analysis["unit_pruning"]["fc1"]
    assert fc1["units"] == 64 and fc1["counts"][0] == 0 and len(fc1["counts"]) == 10
    for order in ("magnitude", "frame_potential", "random_mean", "random_std"):
        assert len(fc1[order]) == len(fc1["counts"])
    assert fc1["magnitude"][0] == fc1["frame_potential"][0] == fc1["random_mean"][0]
    # spectrum: the zoo's glorot init of a model built by the service
    spec_fc1 = analysis["spectrum"]["fc1"]
    assert spec_fc1["init_scheme"] == "glorot" and spec_fc1["init_source"] == "arch"
    assert spec_fc1["variance"] == pytest.approx(2 / (64 + 64), rel=1e-5)
    assert analysis["init"]["scheme"] == "glorot"
    # elbow: knee and accuracies at a few ranks including the knee and k
    elbow = analysis["elbow"]["fc2"]
    ranks = [p["rank"] for p in elbow["ranks"]]
    assert elbow["knee"] in ranks and 5 in ranks and elbow["full_rank"] in ranks
    full = next(p["accuracy"] for p in elbow["ranks"] if p["rank"] == elbow["full_rank"])
    assert full == pytest.approx(trained["val_accuracy"], abs=0.05)

    # the model is unchanged: same metrics, same weights as a job that only trains
    assert analysis["params"] == trained["params"]
    assert analysis["accuracy"] == trained["accuracy"]
    _, plain = run_ok(settings, submit, spec(TINY_MLP, [TRAIN]))
    a = load(settings, store, tmp_path, result["model_id"]).state_dict()
    b = load(settings, store, tmp_path, plain["model_id"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    files = artifacts(settings, store, job_id)
    for name in ("unit_pruning.png", "spectrum.png", "elbow.png"):
        assert files[name].startswith(PNG_MAGIC), name
    assert "angles.png" not in files
    curves = json.loads(files["curves.json"])["analysis"]
    assert set(curves) == {"unit_pruning", "spectrum", "elbow"}
    (point,) = curves["spectrum"]["fc2"]
    assert point["step"] == 1 and len(point["eigenvalues"]) == 32
    assert len(point["init_eigenvalues"]) == 32 and len(point["grid"]) == len(point["density"])
    (point,) = curves["unit_pruning"]["fc1"]
    assert len(point["random"][0]["accuracies"]) == 2
    (point,) = curves["elbow"]["fc1"]
    assert len(point["residual"]) == 65 and point["residual"][-1] == 0
    with session_scope(settings) as session:
        stages = [e.data.get("stage") for e in list_events(session, job_id, 0, 10_000)
                  if e.kind == "progress"]
        kinds = [e.data.get("kind") for e in list_events(session, job_id, 0, 10_000)
                 if e.kind == "analysis"]
    assert any(s and s.startswith("analyze: unit_pruning fc2") for s in stages)
    assert kinds == ["unit_pruning", "spectrum", "elbow"]


def test_principal_angles_against_the_tenants_other_models(settings, store, submit, tmp_path,
                                                           tenant_id):
    _, first = run_ok(settings, submit, spec(TINY_MLP, [TRAIN], seed=1))
    _, other = run_ok(settings, submit, spec(TINY_MLP, [TRAIN], seed=2))
    angles = {"op": "analyze", "kinds": ["angles"], "layers": ["fc1", "fc2"], "k": 8}
    job_id, same = run_ok(settings, submit, spec(first["model_id"], [
        angles | {"other_model": first["model_id"]}]))
    _, indep = run_ok(settings, submit, spec(first["model_id"], [
        angles | {"other_model": other["model_id"]}]))
    for layer in ("fc1", "fc2"):
        itself, independent = same["steps"][0]["angles"][layer], indep["steps"][0]["angles"][layer]
        assert itself["k"] == 8 and len(itself["angles"]) == 8
        assert itself["max"] < 1e-2  # a subspace with itself: 0 degrees
        assert independent["mean"] > 30  # independent initialisations: far apart
        assert independent["random_mean"] > 30
    assert artifacts(settings, store, job_id)["angles.png"].startswith(PNG_MAGIC)

    # unknown or another tenant's model: refused at submission
    with pytest.raises(NotFound, match="other_model"):
        submit(spec(first["model_id"], [angles | {"other_model": "01nosuchmodel"}]))
    from service.auth import get_or_create_tenant

    with session_scope(settings) as session:
        mallory = get_or_create_tenant(session, "mallory").id
    model = zoo.build(TINY_MLP)
    path = tmp_path / "foreign.safetensors"
    zoo.save(model, path)
    with session_scope(settings) as session:
        foreign = register_model(session, store, tenant_id=mallory, name="f",
                                 arch=model.slimline_arch, fmt="safetensors",
                                 params={"total": 0, "trainable": 0, "nonzero": 0},
                                 path=path).id
        # the same tenant's upload of another shape: a failed job naming the layer
        wide = zoo.build(TINY_MLP | {"widths": [48, 32]})
        zoo.save(wide, path)
        upload = register_model(session, store, tenant_id=tenant_id, name="wide",
                                arch=wide.slimline_arch, fmt="safetensors",
                                params={"total": 0, "trainable": 0, "nonzero": 0},
                                path=path).id
    with pytest.raises(NotFound, match="other_model"):
        submit(spec(first["model_id"], [angles | {"other_model": foreign}]))
    job_id = submit(spec(first["model_id"], [angles | {"other_model": upload}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and "same layer shapes" in job.error_message
    assert "fc1" in job.error_message

    # an uploaded model: the spectrum assumes PyTorch's default init unless told otherwise
    _, uploaded = run_ok(settings, submit, spec(upload, [
        {"op": "analyze", "kinds": ["spectrum"], "layers": ["fc1"]}]))
    info = uploaded["steps"][0]["spectrum"]["fc1"]
    assert info["init_scheme"] == "torch" and info["init_source"] == "upload"
    assert info["variance"] == pytest.approx(1 / (3 * 64), rel=1e-5)
    _, told = run_ok(settings, submit, spec(upload, [
        {"op": "analyze", "kinds": ["spectrum"], "layers": ["fc1"], "init": "kaiming"}]))
    assert told["steps"][0]["spectrum"]["fc1"]["init_source"] == "step"


@pytest.mark.parametrize(("step", "needle"), [
    ({"op": "analyze", "kinds": ["angles"]}, "give other_model"),
    ({"op": "analyze", "kinds": ["spectrum"], "other_model": "x"}, "only used with kinds"),
    ({"op": "analyze", "kinds": ["spectrum"], "seeds": 3}, "seeds: only used"),
    ({"op": "analyze", "kinds": ["elbow", "elbow"]}, "twice"),
    ({"op": "analyze", "counts": [4, 2]}, "strictly increasing"),
    ({"op": "analyze", "kinds": ["redundancy"]}, "unit_pruning"),
    ({"op": "analyze", "sparsity": 0.5}, "sparsity"),
    ({"op": "dctps", "density": 0}, "density must be a number in (0, 1]"),
    ({"op": "dctps", "density": 1.5}, "e.g. 0.01"),
    ({"op": "dctps", "allocation": "even"}, "'epl', 'epf', 'uniform' or 'erk'"),
    ({"op": "dctps", "alpha": "learned"}, 'alpha must be "trainable"'),
    ({"op": "dctps", "sparsity": 0.9}, "sparsity"),
])
def test_bad_dctps_and_analyze_specs_are_rejected(step, needle):
    from pydantic import ValidationError

    from service.spec import JobSpec

    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec(TINY_MLP, [step]))
    assert needle in str(info.value)


def test_unit_pruning_counts_that_do_not_fit_a_layer_fail_clearly(settings, submit):
    job_id = submit(spec(TINY_MLP, [{"op": "analyze", "kinds": ["unit_pruning"],
                                     "counts": [0, 40], "seeds": 1}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and "fc2 has 32 units" in job.error_message


def test_every_analysis_kind_of_the_spec_has_an_analysis():
    from typing import get_args

    from service.methods.analyze import AnalysisKind
    from worker.step_analyze import ANALYSES

    assert set(get_args(AnalysisKind)) == set(ANALYSES)
