"""The measure step (runner on synthetic data, and its handler on a model in hand): every cost
kind equals `core.budget.costs` of the job's model, the model is not changed, latency and the
ONNX file's bytes when asked, an int8_dynamic file smaller than fp32 scoring close to it, the
`applies` counts of a model with a depthwise conv, and the spec's bounds."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import core.models as cm
from core.budget import BUDGET_KINDS, costs
from core.data import Splits, synthetic
from core.export import export_onnx
from core.import_pt2 import graph_from_program
from core.pcn_budget import SHAPE_KINDS, pcn_minimum
from service.methods.measure import MAX_LATENCY_BATCH
from service.spec import JobSpec
from service.submission import spec_document
from tests.worker.conftest import TINY_CONV4, TINY_MLP, run_ok, spec, stored_model_path
from worker import steps
from worker.context import StepContext

TINY_LENET300 = {"name": "lenet300", "input_shape": [1, 8, 8]}
TRAIN = {"op": "train", "epochs": 2, "batch_size": 32, "lr": 0.003}
MEASURE = {"op": "measure"}


class Quiet:
    """A reporter that records nothing and never cancels."""

    def progress(self, fraction: float, stage: str) -> None:
        pass

    def event(self, kind: str, data: dict) -> None:
        pass

    def should_cancel(self) -> bool:
        return False


def context(model: nn.Module, settings, workdir: Path, masks=None) -> StepContext:
    train, test = synthetic("synthetic-tiny", 1)
    val = train.subset(torch.arange(32))
    return StepContext(model=model, splits=Splits(train, val, test), input_shape=[1, 8, 8],
                       device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                       settings=settings, job_id="measure-test", reporter=Quiet(),
                       workdir=workdir, masks=masks)


def measure(ctx: StepContext, **fields) -> dict:
    step = JobSpec.model_validate(spec(TINY_MLP, [MEASURE | fields])).steps[0]
    return steps.run_step(ctx, step)


def test_costs_latency_and_bytes_of_a_pruned_model_through_the_worker(
        settings, store, submit, tmp_path):
    _, result = run_ok(settings, submit, spec(TINY_CONV4, [
        TRAIN, {"op": "magnitude", "sparsity": 0.5}, MEASURE,
        MEASURE | {"latency_batch_size": 16, "bytes": True}]))
    _, pruned, plain, timed = result["steps"]
    model = cm.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    expected = costs(model, [1, 8, 8])
    assert plain["cost"] == expected and set(plain["cost"]) == set(BUDGET_KINDS)
    assert expected["nonzero_params"] < expected["total_params"]  # the masks count as zeros
    assert {k: timed["cost"][k] for k in BUDGET_KINDS} == expected
    # the model is not changed: the runner's metrics after each measure step are the pruned one's
    for step in (plain, timed):
        assert (step["params"], step["macs"], step["accuracy"]) == \
            (pruned["params"], pruned["macs"], pruned["accuracy"])
    assert plain["val_accuracy"] == timed["val_accuracy"] and 0 <= plain["val_accuracy"] <= 1
    assert "onnx" not in plain and "latency" not in plain and plain["quantize"] is None
    assert {"processor", "node", "onnxruntime", "threads", "provider"} <= set(plain["machine"])

    latency = timed["latency"]
    assert timed["cost"]["latency_ms"] == latency["ms"] > 0
    assert latency["batch_size"] == 16 and latency["file"] == "model.onnx"
    assert latency["threads"] == timed["machine"]["threads"] == max(1, torch.get_num_threads())
    # bytes: the file the export step would write for this model, byte for byte the same size
    export_onnx(model, [1, 8, 8], tmp_path / "again.onnx")
    assert timed["cost"]["bytes"] == (tmp_path / "again.onnx").stat().st_size
    assert timed["cost"]["bytes"] == timed["onnx"]["fp32_bytes"] > 4 * expected["total_params"]
    assert "dense weights holding zeros" in timed["masks_note"]


def test_int8_dynamic_is_smaller_and_scores_close_to_fp32(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_LENET300, [
        TRAIN, MEASURE | {"bytes": True},
        MEASURE | {"bytes": True, "quantize": "int8_dynamic", "latency_batch_size": 1}]))
    train, fp32, int8 = result["steps"]
    assert fp32["val_accuracy"] >= 0.5, "a model that learned: agreement means something"
    assert int8["quantize"] == "int8_dynamic" and int8["onnx"]["file"] == "model.int8.onnx"
    assert int8["fp32_val_accuracy"] == fp32["val_accuracy"]
    assert abs(int8["val_accuracy"] - fp32["val_accuracy"]) <= 0.08  # 2 of 26 images
    assert int8["cost"]["bytes"] == int8["onnx"]["int8_bytes"]
    assert int8["onnx"]["fp32_bytes"] == fp32["cost"]["bytes"]
    assert fp32["cost"]["bytes"] / int8["cost"]["bytes"] >= 3, (fp32["cost"], int8["cost"])
    assert int8["onnx"]["quantization"]["method"].endswith("quantize_dynamic")
    assert int8["latency"]["file"] == "model.int8.onnx" and int8["cost"]["latency_ms"] > 0
    assert int8["params"] == train["params"]  # quantizing a file leaves the model as it is


def test_the_model_its_mode_and_its_masks_are_left_as_they_were(settings, tmp_path):
    torch.manual_seed(0)
    model = cm.build(TINY_MLP).train()
    masks = {"fc1": torch.rand(model.fc1.weight.shape) > 0.5}
    with torch.no_grad():
        model.fc1.weight.mul_(masks["fc1"])
    before = copy.deepcopy(model.state_dict())
    workdir = tmp_path / "work"
    workdir.mkdir()
    ctx = context(model, settings, workdir, masks={k: v.clone() for k, v in masks.items()})
    record = measure(ctx, latency_batch_size=4, bytes=True, quantize="int8_dynamic",
                     report=True)
    assert ctx.model is model and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(ctx.masks) == {"fc1"} and torch.equal(ctx.masks["fc1"], masks["fc1"])
    assert {k: record["cost"][k] for k in BUDGET_KINDS} == costs(model, [1, 8, 8])
    assert record["cost"]["nonzero_params"] < record["cost"]["total_params"]
    assert list(workdir.iterdir()) == [], "the exported files are not kept"
    assert record["applies"] == {"pcn": 3, "pcn_output": 2, "lowrank": 3, "channel_prune": 2,
                                 "snip": 3, "dctps": 3}
    # pcn's smallest model without output pruning, per kind its shapes decide
    assert record["floors"] == {"pcn": {k: pcn_minimum(model, k, input_shape=[1, 8, 8])
                                        for k in SHAPE_KINDS}}
    assert record["floors"]["pcn"]["macs"] < record["cost"]["macs"]


class Depthwise(nn.Module):
    """A dense stem conv, a depthwise conv (pcn and lowrank refuse it; it is sliced with the
    stem's channels), a pointwise conv and the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(torch.relu(self.pw(x)).mean((2, 3)))


def test_applies_counts_differ_per_method_on_a_depthwise_model(settings, tmp_path):
    program = torch.export.export(
        Depthwise().eval(), (torch.randn(2, 1, 8, 8),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    model = cm.import_graph(*graph_from_program(program))
    record = measure(context(model, settings, tmp_path), report=True)
    # layers: stem, dw, pw, fc; the depthwise conv is left out by pcn and lowrank only; unit
    # groups: the stem's channels (through dw) and pw's; the classifier's outputs are not units
    assert record["applies"] == {"pcn": 3, "pcn_output": 2, "lowrank": 3, "channel_prune": 2,
                                 "snip": 4, "dctps": 4}
    assert record["applies_counts"]["channel_prune"] == "unit_groups"
    assert record["applies_counts"]["pcn"] == "layers"
    assert set(record["floors"]["pcn"]) == set(SHAPE_KINDS)  # an imported graph too
    assert record["cost"] == costs(model, [1, 8, 8])
    assert "onnx" not in record and "latency" not in record


# ---- the spec ---------------------------------------------------------------------------

def job(*step_list: dict) -> dict:
    return spec(TINY_MLP, list(step_list))


@pytest.mark.parametrize("fields", [
    {}, {"latency_batch_size": 1}, {"latency_batch_size": MAX_LATENCY_BATCH, "bytes": True},
    {"quantize": "int8_dynamic", "report": True}, {"quantize": None, "bytes": False},
])
def test_accepted_and_round_trips(fields):
    parsed = JobSpec.model_validate(job(MEASURE | fields))
    assert JobSpec.model_validate(spec_document(parsed)) == parsed
    stored = spec_document(parsed)["steps"][0]
    assert stored["op"] == "measure"
    assert stored.get("latency_batch_size") == fields.get("latency_batch_size")
    assert stored.get("quantize") == fields.get("quantize")


def test_anywhere_in_a_job_and_after_dctps():
    JobSpec.model_validate(job(MEASURE, TRAIN, MEASURE, {"op": "dctps"}, MEASURE,
                               {"op": "export", "formats": ["onnx"]}))


@pytest.mark.parametrize(("fields", "needle"), [
    ({"latency_batch_size": 0}, "latency_batch_size\n  Input should be greater than or equal to 1"),
    ({"latency_batch_size": MAX_LATENCY_BATCH + 1},
     f"latency_batch_size\n  Input should be less than or equal to {MAX_LATENCY_BATCH}"),
    ({"quantize": "int8_static"}, "quantize\n  Input should be 'int8_dynamic'"),
    ({"bytes": "lots"}, "bytes\n  Input should be a valid boolean"),
    ({"latency_ms": 3}, "latency_ms\n  Extra inputs are not permitted"),
    ({"batch_size": 256}, "batch_size\n  Extra inputs are not permitted"),
])
def test_refused_naming_the_field(fields, needle):
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job(MEASURE | fields))
    assert needle in str(err.value)
