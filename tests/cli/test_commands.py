"""The `slimline` commands that read and manage what the API holds: status (summary table and
--json), submit --wait's summary, list jobs|models|datasets, upload and upload-dataset, cancel,
events (--follow over server-sent events), curves, delete — against the real API app with jobs
run inline by the worker's runner (tests/cli/conftest.py)."""
from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app as cli_app
from cli.client import sse_messages
from cli.render import duration, event_line
from core import models as zoo
from service import queue
from tests.worker.conftest import PNG_MAGIC, TINY_MLP
from worker import runner

SPEC = {"model": {"arch": TINY_MLP}, "dataset": "synthetic-tiny", "seed": 0,
        "steps": [{"op": "train", "epochs": 2, "batch_size": 32},
                  {"op": "pcn", "layers": ["fc1"], "select": {"dims": 4}, "samples": 64}]}


def invoke(args: list[str]):
    return CliRunner().invoke(cli_app.app, args)


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


def clean_error(result, *words: str) -> None:
    """A failed command: exit 1, `error: ...` naming `words`, no traceback."""
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, result.output


@pytest.fixture
def spec_file(tmp_path):
    def write(spec: dict, name: str = "spec.json"):
        path = tmp_path / name
        path.write_text(json.dumps(spec))
        return str(path)

    return write


@pytest.fixture
def done_job(api, spec_file):
    """A succeeded job's id (submitted with --wait: the job runs inline)."""
    result = invoke(["submit", spec_file(SPEC), "--wait"])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def held(monkeypatch):
    """Submitted jobs stay queued (nothing runs them)."""
    monkeypatch.setattr(queue, "enqueue_job", lambda job_id, q, s=None: None)


def test_submit_wait_prints_the_summary_table_not_a_dict(done_job):
    out = done_job.output
    job_id = last_line(done_job)
    assert f"job {job_id}" in out and "succeeded" in out
    assert "{'total'" not in out and "'trainable'" not in out  # no raw Python dict
    for word in ("status", "progress", "100.0%", "ETA", "model", "before", "after", "steps",
                 "train", "pcn", "val_accuracy"):
        assert word in out, word


def test_status_prints_a_short_table_and_json_the_document(done_job):
    job_id = last_line(done_job)
    result = invoke(["status", job_id])
    assert result.exit_code == 0, result.output
    job = json.loads(invoke(["status", job_id, "--json"]).output)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["eta_s"] is None
    out = result.output
    assert len(out) < 4000 and '"spec"' not in out  # a summary, not the 8 KB document
    assert job["result"]["model_id"] in out and "100.0%" in out and "done" in out
    lines = [line for line in out.splitlines() if " train " in f" {line} "]
    assert lines and "2 epoch(s)" in lines[0]
    # --wait on a finished job prints the same summary and exits 0
    waited = invoke(["status", job_id, "--wait"])
    assert waited.exit_code == 0 and job["result"]["model_id"] in waited.output


def test_status_of_a_failed_job_shows_its_error_and_wait_exits_1(api, spec_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the job must fail)")
    result = invoke(["submit", spec_file(SPEC | {"device": "cuda"}), "--wait"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    job_id = last_line(result)
    assert "DeviceUnavailable" in result.output
    status = invoke(["status", job_id])
    assert status.exit_code == 0 and "failed" in status.output
    assert "DeviceUnavailable" in status.output and "not run" in status.output
    assert invoke(["status", job_id, "--wait"]).exit_code == 1


def test_list_jobs_models_and_datasets(done_job, spec_file, held):
    finished = last_line(done_job)
    queued = last_line(invoke(["submit", spec_file(SPEC)]))
    jobs = invoke(["list", "jobs"])
    assert jobs.exit_code == 0, jobs.output
    assert finished in jobs.output and queued in jobs.output and "train,pcn" in jobs.output
    assert invoke(["list"]).output == jobs.output  # jobs are the default
    only = invoke(["list", "jobs", "--status", "queued"])
    assert queued in only.output and finished not in only.output
    one = json.loads(invoke(["list", "jobs", "--limit", "1", "--json"]).output)
    assert [j["id"] for j in one["items"]] == [queued]  # newest first
    bad = invoke(["list", "jobs", "--status", "sleeping"])
    clean_error(bad)

    model_id = json.loads(invoke(["status", finished, "--json"]).output)["result"]["model_id"]
    models = invoke(["list", "models"])
    assert models.exit_code == 0 and model_id in models.output and "mlp" in models.output
    datasets = invoke(["list", "datasets"])
    assert datasets.exit_code == 0 and "synthetic-tiny" in datasets.output
    assert "built-in" in datasets.output


def _npz(path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x_train=rng.random((48, 1, 8, 8), dtype=np.float32),
             y_train=rng.integers(0, 10, 48), x_test=rng.random((16, 1, 8, 8),
                                                                   dtype=np.float32),
             y_test=rng.integers(0, 10, 16))
    path.write_bytes(buf.getvalue())
    return path


def test_upload_model_and_dataset_then_delete_them(api, tmp_path, spec_file, held):
    model = zoo.build(TINY_MLP)
    checkpoint = tmp_path / "tiny.safetensors"
    zoo.save(model, checkpoint)
    up = invoke(["upload", str(checkpoint), "--name", "tiny"])
    assert up.exit_code == 0, up.output
    model_id = last_line(up)
    assert "uploaded model" in up.output and "prunability" in up.output

    data = invoke(["upload-dataset", str(_npz(tmp_path / "blobs.npz")), "--name", "blobs"])
    assert data.exit_code == 0, data.output
    dataset_id = last_line(data)
    assert "48 train" in data.output and "16 test" in data.output
    listed = invoke(["list", "datasets"])
    assert dataset_id in listed.output and "blobs" in listed.output and "1x8x8" in listed.output
    assert invoke(["upload-dataset", str(tmp_path / "nope.npz")]).exit_code == 2

    # a queued job uses both: 409 with the API's detail, no traceback
    job_id = last_line(invoke(["submit", spec_file(SPEC | {"model": model_id,
                                                           "dataset": dataset_id})]))
    clean_error(invoke(["delete", "model", model_id]), "InUse")
    clean_error(invoke(["delete", "dataset", dataset_id]), "InUse")
    clean_error(invoke(["delete", "job", job_id]), "cancel")  # queued: cancel it first
    canceled = invoke(["cancel", job_id])
    assert canceled.exit_code == 0 and f"job {job_id} canceled" in canceled.output

    for kind, ident in (("job", job_id), ("model", model_id), ("dataset", dataset_id)):
        result = invoke(["delete", kind, ident])
        assert result.exit_code == 0, result.output
        assert f"deleted {kind} {ident}" in result.output
        clean_error(invoke(["delete", kind, ident]), "NotFound")
    assert model_id not in invoke(["list", "models"]).output
    clean_error(invoke(["delete", "dataset", "synthetic-tiny"]))  # built in


def test_cancel_a_finished_job_is_a_clean_409(done_job):
    clean_error(invoke(["cancel", last_line(done_job)]), "succeeded")
    clean_error(invoke(["cancel", "no-such-job"]), "NotFound")


def test_events_print_one_line_each_and_follow_the_stream(done_job):
    job_id = last_line(done_job)
    result = invoke(["events", job_id])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    kinds = [line.split()[1] for line in lines]
    assert {"status", "progress", "epoch", "pcn"} <= set(kinds)
    assert kinds.count("epoch") == 2
    assert any("ETA" in line for line in lines if " progress " in line)
    as_json = [json.loads(line) for line in invoke(["events", job_id, "--json"]).output
               .strip().splitlines()]
    assert len(as_json) == len(lines) and all({"id", "kind", "data"} <= set(e) for e in as_json)
    later = invoke(["events", job_id, "--after", str(as_json[-3]["id"])])
    assert len(later.output.strip().splitlines()) == 2

    followed = invoke(["events", job_id, "--follow"])  # the SSE stream, until the job ended
    assert followed.exit_code == 0, followed.output
    streamed = [line for line in followed.output.strip().splitlines()
                if not line.startswith("job ")]
    assert streamed == lines
    assert followed.output.strip().endswith(f"job {job_id} succeeded")
    clean_error(invoke(["events", "no-such-job", "--follow"]), "NotFound")


def test_events_follow_a_running_job_live(api, settings, spec_file, held):
    job_id = last_line(invoke(["submit", spec_file(SPEC)]))
    worker = threading.Thread(target=runner.run_job, args=(job_id, settings))
    worker.start()
    try:
        followed = invoke(["events", job_id, "--follow"])
    finally:
        worker.join(timeout=120)
    assert followed.exit_code == 0, followed.output
    lines = followed.output.strip().splitlines()
    assert [line.split()[1] for line in lines].count("epoch") == 2
    assert any(" train epoch 1/2 " in line and "ETA" in line for line in lines)
    assert " status " in lines[-2] and "succeeded" in lines[-2]
    assert lines[-1] == f"job {job_id} succeeded"


def test_curves_saves_the_plots_and_the_curves(done_job, tmp_path, spec_file, held):
    job_id = last_line(done_job)
    out = tmp_path / "plots"
    result = invoke(["curves", job_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "training.png" in pngs
    for name in pngs:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["training"]) == 2
    assert str(out / "curves.json") in result.output

    queued = last_line(invoke(["submit", spec_file(SPEC)]))
    early = invoke(["curves", queued, "--out", str(tmp_path / "early")])
    assert early.exit_code == 0, early.output
    assert json.loads((tmp_path / "early" / "curves.json").read_text())["training"] == []
    assert "no plots yet" in early.output
    clean_error(invoke(["curves", "no-such-job"]), "NotFound")


def test_sse_parsing_and_event_lines():
    lines = ["retry: 2000", "", ": keep-alive", "", "id: 7", "event: progress",
             'data: {"id": 7, "kind": "progress", "created_at": "2026-01-01T10:00:00",',
             'data:  "data": {"progress": 0.5, "stage": "train epoch 2/3", "eta_s": 75.0}}', "",
             "event: end", 'data: {"status": "succeeded"}', ""]
    messages = list(sse_messages(iter(lines)))
    assert [m["event"] for m in messages] == ["progress", "end"] and messages[0]["id"] == "7"
    event = json.loads(messages[0]["data"])
    assert event_line(event) == ("10:00:00 progress     50.0% train epoch 2/3 "
                                 "(ETA 1 min 15 s)")
    assert duration(None) == "-" and duration(3725) == "1 h 02 min" and duration(9.6) == "10 s"


def test_upload_dataset_with_label_gaps_needs_the_flag(api, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "one_based.npz"
    np.savez(path, x_train=rng.random((40, 1, 8, 8), dtype=np.float32),
             y_train=np.arange(40) % 10 + 1)  # labels 1..10: class 0 never occurs
    refused = invoke(["upload-dataset", str(path)])
    assert refused.exit_code == 1
    assert "InvalidDataset" in refused.output and "subtract 1" in refused.output
    assert "Traceback" not in refused.output
    accepted = invoke(["upload-dataset", str(path), "--allow-label-gaps"])
    assert accepted.exit_code == 0, accepted.output
    assert "11 classes" in accepted.output


def test_download_of_a_job_whose_model_was_deleted_says_so(done_job, tmp_path):
    job_id = last_line(done_job)
    status = json.loads(invoke(["status", job_id, "--json"]).output)
    model_id = status["result"]["model_id"]
    assert invoke(["delete", "model", model_id]).exit_code == 0
    result = invoke(["download", job_id, "-o", str(tmp_path / "m.safetensors")])
    clean_error(result, model_id, "was deleted")
    assert not (tmp_path / "m.safetensors").exists()
