"""The export step end to end (runner on synthetic data): ONNX and .pt2 files of trained,
factored, PCN, pruned and DCTpS models equal torch, compressed layers stay compressed after
onnxruntime's optimisation, int8_static on LeNet-5 is >= 3.5x smaller and agrees with fp32,
the files are job artifacts, and a failed export fails the job with the exporter's message and
stores no export."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sqlalchemy import select

import core.export
from core.data import fashion_mnist, synthetic
from core.errors import ExportError
from service.db import session_scope
from service.orm import Artifact, Model
from tests.worker.conftest import TINY_CONV4, TINY_MLP, get_job, run_ok, spec
from worker import runner
from worker.datasets import SYSTEM_DIR, has_fashion_mnist

TINY_LENET300 = {"name": "lenet300", "input_shape": [1, 8, 8]}
TRAIN = {"op": "train", "epochs": 1, "batch_size": 32, "lr": 0.003}
EXPORT = {"op": "export", "formats": ["onnx", "pt2"]}


def artifacts(settings, store, tmp_path, job_id) -> dict[str, tuple[str, object]]:
    """{name: (kind, local path)} of a job's stored artifacts."""
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        found = {}
        for a in rows:
            path = tmp_path / f"{job_id}-{a.name}"
            store.get_to_file(a.storage_key, path)
            found[a.name] = (a.kind, path)
        return found


def check_fp32(record: dict, torch_accuracy: float, *, compressed: bool = True) -> None:
    """ORT equals torch within the tolerance; the weights survive ORT's basic optimisation
    without folding back (initializer bytes within 5 % of the torch parameter bytes)."""
    assert record["verified"], record["reason"]
    assert record["relative_diff"] <= 1e-4 and record["top1_agreement"] == 1.0
    assert record["accuracy"] == pytest.approx(torch_accuracy, abs=1e-9)
    if compressed:
        ratio = record["optimized_initializer_bytes"] / record["param_bytes"]
        assert 0.95 <= ratio <= 1.05, (record["optimized_initializer_bytes"],
                                       record["param_bytes"])
    assert record["latency_ms"]["batch_1"] > 0 and record["latency_ms"]["batch_256"] > 0
    assert record["speedup_vs_start"]["batch_256"] == pytest.approx(
        record["start_latency_ms"]["batch_256"] / record["latency_ms"]["batch_256"])
    assert "macs_ratio" in record


def test_onnx_and_pt2_after_training_are_artifacts_that_run_without_slimline(
        settings, store, submit, tmp_path):
    job_id, result = run_ok(settings, submit, spec(TINY_LENET300, [TRAIN, EXPORT]))
    train, export = result["steps"]
    assert export["params"] == train["params"] and export["accuracy"] == train["accuracy"]
    check_fp32(export["onnx"], export["accuracy"])
    assert export["onnx"]["opset"] == export["onnx"]["file_opset"] == 18
    assert export["pt2"]["verified"] and export["pt2"]["max_abs_diff"] <= 1e-5
    assert export["start"]["compressed"] is False and export["macs_ratio"] == 1.0
    assert export["samples"] == 256 and sum(export["samples_from"].values()) == 256
    assert {"processor", "node", "onnxruntime", "threads"} <= set(export["machine"])
    assert export["verified"] is True

    files = artifacts(settings, store, tmp_path, job_id)
    assert files["model.onnx"][0] == files["model.pt2"][0] == "export"
    assert "model.int8.onnx" not in files
    _, test = synthetic("synthetic-tiny", 1)
    x = test.x[:32]
    session = ort.InferenceSession(str(files["model.onnx"][1]),
                                   providers=["CPUExecutionProvider"])
    onnx_out = session.run(["logits"], {"input": x.numpy()})[0]
    program = torch.export.load(str(files["model.pt2"][1])).module()
    with torch.no_grad():
        pt2_out = program(x).numpy()
    np.testing.assert_allclose(onnx_out, pt2_out, atol=1e-5)
    assert (onnx_out.argmax(1) == test.y[:32].numpy()).mean() == pytest.approx(
        (pt2_out.argmax(1) == test.y[:32].numpy()).mean())


@pytest.mark.parametrize(("arch", "method"), [
    (TINY_CONV4, {"op": "lowrank", "target": {"param_ratio": 0.4}, "blocking": "alds",
                  "score": "magnitude"}),
    (TINY_CONV4, {"op": "pcn", "select": {"dims": 4}, "layers": ["conv3", "fc1"]}),
    (TINY_MLP, {"op": "pcn", "select": {"dims": 8}, "output_based": True}),
])
def test_factored_and_pcn_models_stay_compressed_in_the_file(settings, submit, arch, method):
    _, result = run_ok(settings, submit, spec(arch, [TRAIN, method, EXPORT]))
    export = result["steps"][-1]
    check_fp32(export["onnx"], export["accuracy"])
    assert export["pt2"]["verified"], export["pt2"]["reason"]
    assert export["pt2"]["accuracy"] == export["accuracy"]
    assert export["macs_ratio"] == pytest.approx(result["steps"][1]["macs"] /
                                                 result["steps"][0]["macs"])
    assert export["macs_ratio"] < 1
    assert export["onnx"]["layers"], "the export names the compressed layers' forms"


def test_pruned_and_dctps_models_export_and_say_what_they_save(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        TRAIN, {"op": "magnitude", "sparsity": 0.8}, EXPORT]))
    export = result["steps"][-1]
    check_fp32(export["onnx"], export["accuracy"], compressed=False)
    assert "dense weights holding zeros" in export["masks_note"]
    assert export["onnx"]["param_bytes"] >= 4 * result["steps"][0]["params"]["total"]

    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        TRAIN, {"op": "dctps", "density": 0.1}, EXPORT | {"formats": ["onnx"]}]))
    onnx = result["steps"][-1]["onnx"]
    assert onnx["verified"], onnx["reason"]
    assert {onnx["dctps"], onnx["dctps_alternative"]["dctps"]} == {"dense", "implicit"}
    assert onnx["dctps_alternative"]["verified"], onnx["dctps_alternative"]["reason"]


@pytest.mark.skipif(not has_fashion_mnist(SYSTEM_DIR),
                    reason=f"Fashion-MNIST is not in {SYSTEM_DIR}")
def test_int8_static_on_lenet5_is_smaller_and_agrees_with_fp32(settings, store, submit,
                                                               tmp_path):
    # a LeNet-5 that has learned (Fashion-MNIST, 60 batches): agreement on a model whose logits
    # are all alike would mean nothing; 10,000 test images
    job_id, result = run_ok(settings, submit, {
        "model": {"arch": {"name": "lenet5"}}, "dataset": "fashion-mnist", "seed": 1,
        "steps": [{"op": "train", "epochs": 1, "batch_size": 64, "max_batches": 60},
                  EXPORT | {"formats": ["onnx"], "quantize": "int8_static",
                            "calibration_samples": 128, "samples": 1000}]})
    export = result["steps"][-1]
    fp32, int8 = export["onnx"], export["onnx_int8"]
    check_fp32(fp32, export["accuracy"], compressed=False)
    assert int8["verified"], int8["reason"]
    assert fp32["bytes"] / int8["bytes"] >= 3.5, (fp32["bytes"], int8["bytes"])
    assert int8["quantization"]["format"] == "QDQ"
    assert int8["quantization"]["calibration_samples"] == 128
    assert len(int8["quantization"]["float_nodes"]) == 1  # the logits' Gemm
    # top-1 of the int8 file against the fp32 file on the whole test split
    files = artifacts(settings, store, tmp_path, job_id)
    assert files["model.int8.onnx"][0] == "export"
    _, test = fashion_mnist(SYSTEM_DIR)
    x = test.x.numpy()
    out = {name: ort.InferenceSession(str(files[name][1]), providers=["CPUExecutionProvider"])
           .run(None, {"input": x})[0] for name in ("model.onnx", "model.int8.onnx")}
    agreement = (out["model.onnx"].argmax(1) == out["model.int8.onnx"].argmax(1)).mean()
    assert agreement >= 0.99, agreement
    assert fp32["accuracy"] > 0.6  # a trained model: agreement on it means something
    assert abs(int8["accuracy"] - fp32["accuracy"]) < 0.01


def test_a_failed_export_fails_the_job_with_its_message_and_stores_no_export(
        settings, submit, monkeypatch):
    message = ("ONNX export failed at layer 'fc1' (Linear): UnsupportedOp: aten::frobnicate. "
               "Replace or rewrite that module")

    def fail(*args, **kwargs):
        raise ExportError(message)

    monkeypatch.setattr(core.export, "export_onnx", fail)
    job_id = submit(spec(TINY_MLP, [TRAIN, EXPORT]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "ExportError" and job.error_message == message
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        assert not [a for a in rows if a.kind == "export"]
        assert session.scalars(select(Model).where(Model.source_job_id == job_id)).first() \
            is None
