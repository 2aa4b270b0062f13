"""`slimline download <job|model> --format onnx|pt2|safetensors [-o PATH]` (cli/app.py,
cli/client.fetch_model) against the real API app in-process, the job run inline."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app as cli_app
from cli import client as cli_client
from core import models as zoo
from tests.worker.conftest import TINY_MLP


@pytest.fixture
def job(api, tmp_path) -> dict:
    """A succeeded train → pcn job on the tiny MLP."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "model": {"arch": TINY_MLP}, "dataset": "synthetic-tiny", "seed": 0,
        "steps": [{"op": "train", "epochs": 1},
                  {"op": "pcn", "layers": ["fc1"], "select": {"dims": 4}}]}))
    result = CliRunner().invoke(cli_app.app, ["submit", str(spec), "--wait"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli_app.app, ["status", result.output.strip().splitlines()[-1],
                                              "--json"])
    return json.loads(result.output)


def test_download_a_job_as_onnx_and_a_model_as_pt2(job, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    runner_ = CliRunner()
    checkpoint = tmp_path / "model.safetensors"
    result = runner_.invoke(cli_app.app, ["download", job["id"], "-o", str(checkpoint)])
    assert result.exit_code == 0, result.output
    model = zoo.load(checkpoint).eval()
    x = torch.randn(3, *TINY_MLP["input_shape"])
    with torch.no_grad():
        want = model(x).numpy()

    onnx_path = tmp_path / "m.onnx"
    result = runner_.invoke(cli_app.app, ["download", job["id"], "--format", "onnx",
                                          "-o", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    monkeypatch.chdir(tmp_path)  # no -o: <model id>.pt2 in the current directory
    model_id = job["result"]["model_id"]
    result = runner_.invoke(cli_app.app, ["download", model_id, "-f", "pt2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"{model_id}.pt2"
    program = torch.export.load(tmp_path / f"{model_id}.pt2")
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(x).numpy(), want, rtol=1e-4, atol=1e-5)


def test_unknown_format_and_unknown_id_are_clean_errors(api, tmp_path):
    result = CliRunner().invoke(cli_app.app, ["download", "x", "--format", "tflite"])
    assert result.exit_code == 2 and "tflite" in result.output
    result = CliRunner().invoke(cli_app.app, ["download", "nosuchid", "-f", "onnx",
                                              "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "NotFound" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


def _mock_http(answers: list[httpx.Response]) -> httpx.Client:
    seen = iter(answers)
    return httpx.Client(base_url="http://t", transport=httpx.MockTransport(lambda _: next(seen)))


def test_fetch_model_retries_a_busy_api(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_client.time, "sleep", lambda s: None)
    ok = httpx.Response(200, content=b"ONNX", headers={
        "content-disposition": 'attachment; filename="m.onnx"'})
    busy = httpx.Response(503, json={"error": "Overloaded", "detail": "busy"},
                          headers={"retry-after": "5"})
    with _mock_http([busy, busy, ok]) as http:
        assert cli_client.fetch_model(http, "m", tmp_path / "m.onnx", "onnx") == 4
    assert (tmp_path / "m.onnx").read_bytes() == b"ONNX"
    with _mock_http([busy] * 4) as http, pytest.raises(Exception) as exc:
        cli_client.fetch_model(http, "m", tmp_path / "again.onnx", "onnx")
    assert type(exc.value).__name__ == "Exit" and not (tmp_path / "again.onnx").exists()


def test_fetch_model_refuses_a_server_that_ignores_the_format(tmp_path):
    old = httpx.Response(200, content=b"SAFETENSORS", headers={
        "content-disposition": 'attachment; filename="m.safetensors"'})
    with _mock_http([old]) as http, pytest.raises(Exception) as exc:
        cli_client.fetch_model(http, "m", tmp_path / "m.onnx", "onnx")
    assert type(exc.value).__name__ == "Exit" and not (tmp_path / "m.onnx").exists()
