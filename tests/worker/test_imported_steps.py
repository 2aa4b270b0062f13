"""Jobs on imported models (bring your own model), run by the worker end to end: an imported
MobileNetV2-/ViT-style graph stored as an upload is trained one epoch on a subset, pruned with
SNIP, PCN-transformed (the widest layers), factored (the rest) and exported; the output
checkpoint reloads from its file alone, the ONNX file equals torch, and the layers a method
cannot handle (depthwise convs) are left untouched and reported with the reason."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from sqlalchemy import select

import core.graph
from core import models as cm
from core.data import synthetic
from core.graph import canonical, graph_for
from core.lowrank import LowRankLayer
from core.pcn import PCNConv2d, PCNLinear
from core.train import evaluate
from service.db import session_scope
from service.errors import InvalidSpec
from service.model_registry import register_model, store_graph
from service.orm import Artifact, JobEvent
from tests.core.test_imported_methods import TanhPatches, import_module, imported
from tests.worker.conftest import get_job, run_ok, stored_model_path
from worker import runner

STEPS = [
    {"op": "train", "epochs": 1, "batch_size": 32, "max_batches": 6, "lr": 0.003},
    {"op": "snip", "sparsity": 0.5, "batch_size": 32},
    {"op": "pcn", "select": {"energy": 0.9}, "samples": 128},  # the widest layers
    {"op": "lowrank", "target": {"param_ratio": 0.6}, "score": "relative_error"},  # the rest
    {"op": "export", "formats": ["onnx"]},
]


def upload(settings, store, tenant_id, tmp_path, name: str) -> tuple[str, torch.nn.Module]:
    """A Model row holding the imported architecture `name` (as the intake stores it)."""
    model = imported(name)
    path = tmp_path / f"{name}.safetensors"
    cm.save(model, path)
    with session_scope(settings) as session:
        row = register_model(session, store, tenant_id=tenant_id, name=name,
                             arch=model.slimline_arch, fmt="safetensors",
                             params={"total": 0, "trainable": 0, "nonzero": 0}, path=path)
        return row.id, model


def job(model_id: str, steps: list[dict]) -> dict:
    return {"model": model_id, "dataset": "synthetic-blobs", "steps": steps, "seed": 3}


def events(settings, job_id: str, kind: str) -> list[dict]:
    with session_scope(settings) as session:
        return [e.data for e in session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == kind)).all()]


def test_train_snip_pcn_lowrank_export_on_an_imported_model(settings, store, submit, tenant_id,
                                                            tmp_path):
    name = "mobilenetv2"  # depthwise convs; tests/core/test_imported_methods.py has all three
    model_id, original = upload(settings, store, tenant_id, tmp_path, name)
    job_id, result = run_ok(settings, submit, job(model_id, STEPS))
    train, snip, pcn, lowrank, export = result["steps"]
    assert train["epochs"] == 1 and snip["kept"] == round(0.5 * snip["prunable"])
    assert snip["untouched"] == {}
    assert lowrank["weight_ratio"] <= 0.6 + 1e-9 and lowrank["target_met"]
    assert pcn["layers"] and all(r["dims"] <= r["in_dim"] for r in pcn["layers"].values())
    assert result["after"]["params"]["total"] < result["before"]["params"]["total"]
    assert result["after"]["macs"] < result["before"]["macs"]

    depthwise = {n for n, m in original.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    # depthwise convs: left as they are, reported with the reason
    assert depthwise and set(lowrank["untouched"]) == depthwise == set(pcn["untouched"])
    assert all(r.startswith("depthwise conv (groups=") and "lowrank" in r
               for r in lowrank["untouched"].values())
    assert not depthwise & set(lowrank["layers"]) and not depthwise & set(pcn["layers"])
    (record,) = events(settings, job_id, "lowrank")
    assert record["untouched"] == lowrank["untouched"]
    (record,) = events(settings, job_id, "pcn")
    assert record["untouched"] == pcn["untouched"]

    # the output checkpoint reloads from its file alone (the graph travels in its metadata)
    path = stored_model_path(settings, store, tmp_path, result["model_id"])
    out = cm.load(path)
    assert out.slimline_arch["name"] == "graph"
    assert out.slimline_arch["graph"] == original.slimline_arch["graph"]
    kinds = {type(m) for m in out.modules()}
    assert LowRankLayer in kinds and kinds & {PCNLinear, PCNConv2d}
    _, test = synthetic("synthetic-blobs", 3)
    assert evaluate(out, test, device="cpu")["accuracy"] == result["after"]["accuracy"]
    # the snip masks of the layers neither replaced nor factored (the depthwise convs) stay
    masks = getattr(out, "slimline_masks", None) or {}
    assert set(masks) == depthwise

    record = export["onnx"]
    assert export["verified"] and record["verified"], record.get("reason")
    assert record["relative_diff"] <= 1e-4 and record["top1_agreement"] == 1.0
    with session_scope(settings) as session:
        names = {a.name for a in session.scalars(
            select(Artifact).where(Artifact.job_id == job_id)).all()}
    assert {"model.onnx", "curves.json"} <= names


def test_a_depthwise_layer_named_for_lowrank_fails_with_the_reason(settings, store, submit,
                                                                   tenant_id, tmp_path):
    model_id, original = upload(settings, store, tenant_id, tmp_path, "mobilenetv2")
    depthwise = next(n for n, m in original.named_modules()
                     if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
    for step, needle in (
            ({"op": "lowrank", "target": {"param_ratio": 0.5}, "layers": [depthwise]},
             f"lowrank cannot handle '{depthwise}' (depthwise conv (groups="),
            ({"op": "pcn", "select": {"dims": 2}, "layers": [depthwise], "samples": 64},
             f"pcn cannot handle '{depthwise}' (depthwise conv (groups="),
            ({"op": "lowrank", "target": {"param_ratio": 0.5}, "layers": ["fc1"]},
             "an imported model's layers are named after its graph's modules")):
        job_id = submit(job(model_id, [step]))
        assert runner.run_job(job_id, settings) == "failed"
        failed = get_job(settings, job_id)
        assert failed.error_code == "SpecError" and needle in failed.error_message, \
            failed.error_message


def test_synflow_and_analyze_on_an_imported_model(settings, store, submit, tenant_id, tmp_path):
    model_id, original = upload(settings, store, tenant_id, tmp_path, "mobilenetv2")
    depthwise = next(n for n, m in original.named_modules()
                     if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
    job_id, result = run_ok(settings, submit, job(model_id, [
        {"op": "synflow", "sparsity": 0.9, "rounds": 5},
        {"op": "analyze", "kinds": ["spectrum", "elbow"], "layers": [depthwise, "classifier"]},
        {"op": "dctps", "density": 0.2},
        {"op": "evaluate"}]))
    synflow, analyze, dctps, _ = result["steps"]
    assert synflow["collapsed"] == [] and synflow["activations_as_relu"] > 0
    for kind in ("spectrum", "elbow"):
        assert list(analyze[kind]) == ["classifier"]
        assert analyze["skipped"][kind][depthwise].startswith("depthwise conv (groups=")
    assert dctps["untouched"] == {} and dctps["total_nnz"] > 0
    curves = json.loads(_curves(settings, store, tmp_path, job_id))
    assert curves["dctps"] and curves["pruning"]


def _curves(settings, store, tmp_path, job_id: str) -> str:
    with session_scope(settings) as session:
        (key,) = [a.storage_key for a in session.scalars(select(Artifact).where(
            Artifact.job_id == job_id, Artifact.name == "curves.json")).all()]
    path = tmp_path / f"{job_id}-curves.json"
    store.get_to_file(key, path)
    return path.read_text()


def test_a_job_on_an_imported_graph_arch_builds_it_from_the_tenants_stored_graph(
        settings, store, submit, tenant_id, tmp_path, monkeypatch):
    model = imported("vit")
    arch = copy.deepcopy(model.slimline_arch)
    sha = arch["graph"]
    steps = [{"op": "train", "epochs": 1, "batch_size": 32, "max_batches": 2},
             {"op": "evaluate"}]
    fresh = {"model": {"arch": arch}, "dataset": "synthetic-blobs", "steps": steps, "seed": 3}
    with pytest.raises(InvalidSpec, match=f"model.arch.graph: none of your models is built on "
                                          f"graph {sha}"):
        submit(fresh)
    # a model on that graph whose graph object is gone: the worker says so
    model_id, _ = upload(settings, store, tenant_id, tmp_path, "vit")
    job_id = submit(fresh)
    assert runner.run_job(job_id, settings) == "failed"
    failed = get_job(settings, job_id)
    assert failed.error_code == "SpecError" and f"graph {sha} is not stored for you" in \
        failed.error_message, failed.error_message
    # as the intake stores it: once per tenant, content-addressed
    ir = tmp_path / "graph.json"
    ir.write_text(canonical(graph_for(sha)), encoding="utf-8")
    with session_scope(settings) as session:
        store_graph(session, store, tenant_id, sha, ir)
    monkeypatch.delitem(core.graph._GRAPHS, sha)  # the worker must fetch it from the store
    job_id, result = run_ok(settings, submit, fresh)
    assert result["steps"][0]["epochs"] == 1
    out = cm.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert out.slimline_arch["graph"] == sha and model_id != result["model_id"]


def test_snip_on_a_model_whose_first_linear_does_not_read_the_input(settings, store, submit,
                                                                     tenant_id, tmp_path):
    model = import_module(TanhPatches())
    path = tmp_path / "patches.safetensors"
    cm.save(model, path)
    with session_scope(settings) as session:
        model_id = register_model(session, store, tenant_id=tenant_id, name="patches",
                                  arch=model.slimline_arch, fmt="safetensors",
                                  params={"total": 0, "trainable": 0, "nonzero": 0},
                                  path=path).id
    job_id, result = run_ok(settings, submit, job(model_id, [
        {"op": "snip", "sparsity": 0.5, "batch_size": 32, "init": "ldi"}]))
    assert result["steps"][0]["kept"] == round(0.5 * result["steps"][0]["prunable"])
    (record,) = events(settings, job_id, "pruning")
    assert record["first_layer"] == "embed" and record["heatmap"] is None
    assert record["heatmap_of"].startswith("none")
    with session_scope(settings) as session:
        names = {a.name for a in session.scalars(
            select(Artifact).where(Artifact.job_id == job_id)).all()}
    assert "pruning.png" in names


def test_a_job_on_an_imported_model_resumes_from_its_checkpoint(settings, store, submit,
                                                                tenant_id, tmp_path,
                                                                monkeypatch):
    from tests.worker.test_resume import WorkerDied, die_after_checkpoints, lose_worker

    model_id, original = upload(settings, store, tenant_id, tmp_path, "vit")
    steps = [{"op": "train", "epochs": 2, "batch_size": 32, "max_batches": 3, "lr": 0.003},
             {"op": "pcn", "select": {"energy": 0.9}, "samples": 64},
             {"op": "train", "epochs": 1, "batch_size": 32, "max_batches": 3},
             {"op": "evaluate"}]
    _, reference = run_ok(settings, submit, job(model_id, steps))
    expected = cm.load(stored_model_path(settings, store, tmp_path,
                                         reference["model_id"])).state_dict()
    job_id = submit(job(model_id, steps))
    die_after_checkpoints(monkeypatch, 4)  # after the pcn step: a checkpoint with its edits
    with pytest.raises(WorkerDied):
        runner.run_job(job_id, settings)
    monkeypatch.undo()
    lose_worker(settings, job_id)
    # a fresh worker process has not seen the graph: the checkpoint carries it
    monkeypatch.delitem(core.graph._GRAPHS, original.slimline_arch["graph"])
    assert runner.run_job(job_id, settings) == "succeeded"
    result = get_job(settings, job_id).result
    assert result["attempts"] == 2 and [r["step"] for r in result["resumes"]] == [2]
    got = cm.load(stored_model_path(settings, store, tmp_path, result["model_id"])).state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
