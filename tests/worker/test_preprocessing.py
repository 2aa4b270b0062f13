"""Preprocessing travels with the model (issue 14): `worker.inputs.prepare_data` fits the data to
the model once (shapes, per-channel normalization, layout) and jobs record it in the output
model's arch, so a chained job applies it again."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from core import models as zoo
from core.data import ArrayDataset, channel_stats, split, synthetic
from core.errors import DatasetError, SpecError
from service.db import session_scope
from service.model_registry import register_model
from service.orm import JobEvent, Model
from tests.worker.conftest import TINY_MLP, get_job, run_ok, spec, stored_model_path
from worker import runner
from worker.inputs import prepare_data

TRAIN = {"op": "train", "epochs": 1, "batch_size": 32}


def tiny() -> tuple[ArrayDataset, ArrayDataset]:
    train, test = synthetic("synthetic-tiny", 0)
    return train, test


def prepare(arch, train, test, normalize=None, can_adapt=False):
    return prepare_data(zoo.build(arch), train, test, normalize=normalize, seed=3,
                        can_adapt=can_adapt)


def events_of(settings, job_id: str, kind: str) -> list[dict]:
    with session_scope(settings) as session:
        return [e.data for e in session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == kind)).all()]


def stored_model(settings, store, tenant_id, tmp_path, arch) -> str:
    """A Model row of the tenant holding a freshly built `arch` (as an upload would)."""
    model = zoo.build(arch, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "upload.safetensors"
    zoo.save(model, path)
    with session_scope(settings) as session:
        return register_model(session, store, tenant_id=tenant_id, name="upload",
                              arch=model.slimline_arch, fmt="safetensors",
                              params={"total": 0, "trainable": 0, "nonzero": 0}, path=path).id


# ---- prepare_data ----

def test_a_zoo_model_with_nothing_set_reads_the_data_as_before():
    train, test = tiny()
    prepared = prepare(TINY_MLP, train, test)
    plain = split(train, test, 3)
    for got, want in zip((prepared.splits.train, prepared.splits.val, prepared.splits.test),
                         (plain.train, plain.val, plain.test), strict=True):
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    assert prepared.input_shape == [1, 8, 8]
    assert prepared.preprocessing is None and prepared.summary is None and not prepared.events


def test_standardize_uses_the_training_split_statistics_for_every_split():
    train, test = tiny()
    train.x.mul_(3.0).add_(0.5)  # far from mean 0 / std 1 to start with
    prepared = prepare(TINY_MLP, train, test, "standardize")
    x = prepared.splits.train.x
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    mean, std = channel_stats(split(train, test, 3).train)  # the training split, not val/test
    assert prepared.preprocessing == {"layout": "NCHW", "mean": mean, "std": std}
    assert std[0] > 1.5  # the raw data really was scaled
    raw_test = split(train, test, 3).test.x
    assert torch.allclose(prepared.splits.test.x, (raw_test - mean[0]) / std[0], atol=1e-5)
    assert prepared.summary["source"] == "standardize"
    assert [kind for kind, _ in prepared.events] == ["preprocessing"]


def test_given_statistics_are_applied_per_channel_and_must_match_the_channels():
    train = ArrayDataset(torch.rand(40, 3, 4, 4), torch.randint(0, 10, (40,)))
    arch = TINY_MLP | {"input_shape": [3, 4, 4]}
    prepared = prepare(arch, train, None, {"mean": [0.1, 0.5, 0.9], "std": [1, 2, 4]})
    raw = split(train, None, 3).train.x
    for c, (m, s) in enumerate([(0.1, 1), (0.5, 2), (0.9, 4)]):
        assert torch.allclose(prepared.splits.train.x[:, c], (raw[:, c] - m) / s)
    with pytest.raises(SpecError, match="normalize.mean has 1 entries but the data has 3"):
        prepare(arch, train, None, {"mean": [0.5], "std": [1]})


def test_the_stored_preprocessing_applies_and_a_spec_that_changes_it_wins_with_a_warning():
    train, test = tiny()
    arch = TINY_MLP | {"preprocessing": {"layout": "NCHW", "mean": [0.5], "std": [0.25]}}
    stored = prepare(arch, train, test)
    raw = split(train, test, 3).train.x
    assert torch.allclose(stored.splits.train.x, (raw - 0.5) / 0.25)
    assert stored.summary["source"] == "model"
    assert not [e for kind, e in stored.events if kind == "warning"]
    overridden = prepare(arch, train, test, "none")
    assert torch.equal(overridden.splits.train.x, raw)
    assert overridden.preprocessing == {"layout": "NCHW", "mean": None, "std": None}
    (warning,) = [e for kind, e in overridden.events if kind == "warning"]
    assert warning["code"] == "normalize_overrides_model" and "overrides" in warning["message"]
    same = prepare(arch, train, test, {"mean": [0.5], "std": [0.25]})
    assert not [e for kind, e in same.events if kind == "warning"]  # no change, no warning


def test_nhwc_and_flat_layouts_feed_the_model_its_own_shape():
    train = ArrayDataset(torch.rand(30, 3, 2, 5), torch.randint(0, 10, (30,)))
    # an NHWC model reads [H, W, C] = [2, 5, 3] (a zoo MLP flattens whatever it gets)
    nhwc = prepare(TINY_MLP | {"input_shape": [2, 5, 3],
                               "preprocessing": {"layout": "NHWC"}}, train, None)
    raw = split(train, None, 3).train.x
    assert nhwc.input_shape == [2, 5, 3]
    assert torch.equal(nhwc.splits.train.x, raw.permute(0, 2, 3, 1))
    assert nhwc.splits.train.x[4, 1, 3, 2] == raw[4, 2, 1, 3]
    flat = prepare(TINY_MLP | {"input_shape": [3, 2, 5], "preprocessing": {"layout": "flat"}},
                   train, None, "standardize")
    assert flat.input_shape == [30] and flat.splits.test.x.shape[1:] == (30,)
    mean, std = flat.preprocessing["mean"], flat.preprocessing["std"]
    assert len(mean) == 3  # per channel, before flattening
    expected = ((raw - torch.tensor(mean).view(1, 3, 1, 1))
                / torch.tensor(std).view(1, 3, 1, 1)).flatten(1)
    assert torch.allclose(flat.splits.train.x, expected, atol=1e-6)


def test_shapes_are_adapted_only_for_a_stored_model_and_only_by_replication_and_resizing():
    train, test = synthetic("synthetic-blobs", 0)  # (1, 28, 28)
    arch = TINY_MLP | {"input_shape": [3, 32, 32]}
    with pytest.raises(DatasetError, match="set input_shape in the arch"):
        prepare(arch, train, test)  # a fresh arch: the user sets its input_shape
    adapted = prepare(arch, train, test, can_adapt=True)
    assert adapted.input_shape == [3, 32, 32]
    assert adapted.splits.test.x.shape[1:] == (3, 32, 32)
    assert torch.equal(adapted.splits.train.x[:, 0], adapted.splits.train.x[:, 2])
    warnings = [e for kind, e in adapted.events if kind == "warning"]
    assert {w["part"] for w in warnings} == {"training", "test"}
    message = warnings[0]["message"]
    assert "replicated to 3" in message and "28x28 to 32x32" in message
    assert adapted.preprocessing is None  # nothing to record: the model is unchanged
    assert adapted.summary["adapted"][0] == {"part": "training", "from": [1, 28, 28],
                                             "to": [3, 32, 32]}
    rgb = ArrayDataset(torch.rand(20, 3, 28, 28), torch.zeros(20, dtype=torch.int64))
    with pytest.raises(DatasetError, match="a single channel is replicated"):
        prepare(TINY_MLP | {"input_shape": [4, 28, 28]}, rgb, None, can_adapt=True)
    vectors = ArrayDataset(torch.rand(20, 1, 1, 64), torch.zeros(20, dtype=torch.int64))
    with pytest.raises(DatasetError, match="nothing else is adapted"):
        prepare(arch, vectors, None, can_adapt=True)  # a feature vector is not an image


def test_labels_beyond_the_model_classes_stay_an_error():
    train, test = tiny()
    with pytest.raises(DatasetError, match="num_classes=5"):
        prepare(TINY_MLP | {"num_classes": 5}, train, test, can_adapt=True)


# ---- jobs ----

def test_standardize_is_recorded_in_the_output_model_and_a_chained_job_reuses_it(
        settings, store, submit, tmp_path):
    first_id, first = run_ok(settings, submit, spec(TINY_MLP, [TRAIN, {"op": "evaluate"}])
                             | {"normalize": "standardize"})
    train, test = synthetic("synthetic-tiny", 1)
    mean, std = channel_stats(split(train, test, 1).train)
    assert first["preprocessing"] == {"layout": "NCHW", "mean": mean, "std": std,
                                      "source": "standardize", "adapted": []}
    recorded = {"layout": "NCHW", "mean": mean, "std": std}
    with session_scope(settings) as session:
        assert session.get(Model, first["model_id"]).arch["preprocessing"] == recorded
    path = stored_model_path(settings, store, tmp_path, first["model_id"])
    assert zoo.read_arch(path)["preprocessing"] == recorded  # in the checkpoint itself
    assert events_of(settings, first_id, "preprocessing")[0]["source"] == "standardize"

    # chained: normalize unset → the stored statistics; the model scores the same on them
    _, second = run_ok(settings, submit, spec(first["model_id"], [{"op": "evaluate"}]))
    assert second["preprocessing"]["source"] == "model"
    assert second["preprocessing"]["mean"] == mean
    assert second["before"]["accuracy"] == pytest.approx(first["after"]["accuracy"])
    with session_scope(settings) as session:
        assert session.get(Model, second["model_id"]).arch["preprocessing"] == recorded

    # a spec that changes them wins, says so, and the output records what was applied
    third_id, third = run_ok(settings, submit, spec(first["model_id"], [{"op": "evaluate"}])
                             | {"normalize": "none"})
    assert third["preprocessing"]["source"] == "none"
    (warning,) = events_of(settings, third_id, "warning")
    assert warning["code"] == "normalize_overrides_model"
    with session_scope(settings) as session:
        assert session.get(Model, third["model_id"]).arch["preprocessing"]["mean"] is None


def test_a_flat_model_trains_calibrates_and_evaluates_on_flat_vectors(
        settings, store, submit, tenant_id, tmp_path):
    arch = TINY_MLP | {"preprocessing": {"layout": "flat", "mean": [0.5], "std": [0.5]}}
    model_id = stored_model(settings, store, tenant_id, tmp_path, arch)
    _, result = run_ok(settings, submit, spec(model_id, [
        TRAIN | {"epochs": 3, "lr": 0.003},
        {"op": "pcn", "layers": ["fc1"], "select": {"dims": 8}, "samples": 100},
        {"op": "snip", "sparsity": 0.5}, {"op": "evaluate"}]))
    assert result["preprocessing"]["layout"] == "flat"
    assert result["preprocessing"]["source"] == "model"
    assert result["steps"][1]["layers"]["fc1"]["in_dim"] == 64
    assert result["steps"][0]["accuracy"] > 0.5  # 10 classes: it learned on the flat inputs
    with session_scope(settings) as session:
        assert session.get(Model, result["model_id"]).arch["preprocessing"] == {
            "layout": "flat", "mean": [0.5], "std": [0.5]}


def test_one_channel_28x28_data_is_adapted_to_a_stored_3x32x32_model_with_a_warning(
        settings, store, submit, tenant_id, tmp_path):
    arch = {"name": "mlp", "input_shape": [3, 32, 32], "widths": [16]}
    model_id = stored_model(settings, store, tenant_id, tmp_path, arch)
    job_id = submit(spec(model_id, [TRAIN, {"op": "evaluate"}]) | {"dataset": "synthetic-blobs"})
    assert runner.run_job(job_id, settings) == "succeeded", get_job(settings, job_id).error_message
    result = get_job(settings, job_id).result
    warnings = events_of(settings, job_id, "warning")
    assert [w["code"] for w in warnings] == ["input_adapted", "input_adapted"]
    assert warnings[0]["from"] == [1, 28, 28] and warnings[0]["to"] == [3, 32, 32]
    assert "resized from 28x28 to 32x32" in warnings[0]["message"]
    assert result["preprocessing"]["adapted"][0]["to"] == [3, 32, 32]
    assert result["after"]["accuracy"] > 0.5  # blobs are easy once they reach the model
    with session_scope(settings) as session:
        assert "preprocessing" not in session.get(Model, result["model_id"]).arch


class _NHWCNet(torch.nn.Module):
    """Reads (N, H, W, C) images, as a model trained with a channels-last pipeline would."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        return self.fc(x.flatten(1))


def test_an_imported_nhwc_graph_reads_permuted_normalized_data(
        settings, store, submit, tenant_id, tmp_path):
    from core.import_pt2 import graph_from_program
    from core.train import evaluate

    def channels_last(ds):  # normalized with the model's statistics, then (N, H, W, C)
        return ArrayDataset(((ds.x - 0.5) / 0.25).permute(0, 2, 3, 1).contiguous(), ds.y)

    train, test = synthetic("synthetic-tiny", 1)
    torch.manual_seed(0)
    net = _NHWCNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(30):  # trained on its own pipeline's inputs, so accuracy tells inputs apart
        optimizer.zero_grad()
        x = channels_last(train)
        torch.nn.functional.cross_entropy(net(x.x), x.y).backward()
        optimizer.step()
    net.eval()
    expected = evaluate(net, channels_last(test))["accuracy"]
    raw = ArrayDataset(test.x.permute(0, 2, 3, 1).contiguous(), test.y)
    assert expected > 0.6 and abs(evaluate(net, raw)["accuracy"] - expected) > 0.05
    program = torch.export.export(net, (torch.rand(2, 8, 8, 1),), dynamic_shapes={
        "x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    prep = {"layout": "NHWC", "mean": [0.5], "std": [0.25]}
    model = zoo.import_graph(*graph_from_program(program), preprocessing=prep)
    assert zoo.model_arch(model)["input_shape"] == [8, 8, 1]
    path = tmp_path / "nhwc.safetensors"
    zoo.save(model, path)
    with session_scope(settings) as session:
        model_id = register_model(session, store, tenant_id=tenant_id, name="nhwc",
                                  arch=zoo.model_arch(model), fmt="safetensors",
                                  params={"total": 0, "trainable": 0, "nonzero": 0},
                                  path=path).id
    _, result = run_ok(settings, submit, spec(model_id, [
        {"op": "evaluate"}, TRAIN, {"op": "snip", "sparsity": 0.5}, {"op": "evaluate"}]))
    # the job fed the model what it was exported for: normalized, channels last
    assert result["before"]["accuracy"] == pytest.approx(expected)
    assert result["steps"][0]["accuracy"] == result["before"]["accuracy"]
    assert result["preprocessing"]["layout"] == "NHWC"
    with session_scope(settings) as session:
        assert session.get(Model, result["model_id"]).arch["preprocessing"] == prep
