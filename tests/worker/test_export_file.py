"""`python -m worker.export_file` (the API's on-demand exporter): one JSON line, the exporter's
ExportError as a 422 reply, nothing left at --output on failure."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from core import export as core_export
from core import models as zoo
from core.errors import ExportError
from tests.worker.conftest import TINY_MLP
from worker import export_file


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    zoo.save(zoo.build(TINY_MLP), path)
    return path


def reply(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # the exporter's chatter went to stderr
    return json.loads(lines[0])


def test_pt2_export_replies_ok_and_loads(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert export_file.main(["--input", str(checkpoint), "--format", "pt2",
                             "--output", str(out)]) == 0
    answer = reply(capsys)
    assert answer["ok"] and answer["bytes"] == out.stat().st_size
    x = torch.randn(3, *TINY_MLP["input_shape"])
    model = zoo.load(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(out).module()(x), model(x))


@pytest.mark.parametrize(("error", "words"), [
    (ExportError("layer 'fc1' (op aten::weird) cannot be exported; replace it"), "fc1"),
    (RuntimeError("something inside torch"), "RuntimeError"),
])
def test_a_failed_export_is_a_422_reply_and_leaves_nothing(checkpoint, tmp_path, capsys,
                                                          monkeypatch, error, words):
    out = tmp_path / "m.onnx"

    def fail(model, shape, path, **kwargs):
        path.write_bytes(b"half")
        raise error

    monkeypatch.setattr(core_export, "export_onnx", fail)
    assert export_file.main(["--input", str(checkpoint), "--format", "onnx",
                             "--output", str(out)]) == 0
    answer = reply(capsys)
    assert answer["ok"] is False and answer["status"] == 422
    assert answer["error"] == "ExportError" and words in answer["detail"]
    assert not out.exists()


def test_a_flat_layout_model_exports_with_the_inputs_its_jobs_feed_it(tmp_path, capsys):
    """A model whose preprocessing layout is `flat` reads (N, D) in its jobs (and their export
    step); the on-demand file takes the same input."""
    arch = {**TINY_MLP, "preprocessing": {"layout": "flat", "mean": None, "std": None}}
    source, out = tmp_path / "flat.safetensors", tmp_path / "flat.onnx"
    zoo.save(zoo.build(arch), source)
    assert export_file.main(["--input", str(source), "--format", "onnx",
                             "--output", str(out)]) == 0
    assert reply(capsys)["ok"]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    c, h, w = TINY_MLP["input_shape"]
    assert len(dims) == 2 and dims[1].dim_value == c * h * w
