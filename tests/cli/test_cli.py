"""The `slimline` command line (cli/app.py): keys, migrations, and submit → status → download
against the real API app (in-process TestClient) with the job run inline by the worker's runner."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app as cli_app
from core import models as zoo
from service.auth import resolve_key
from service.db import session_scope
from tests.worker.conftest import TINY_MLP


def test_keys_create_prints_the_key_last(settings, env):
    result = CliRunner().invoke(cli_app.app, ["keys", "create", "--name", "ci", "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    assert key.startswith("sl_")
    with session_scope(settings) as session:
        assert resolve_key(session, key)


def test_db_upgrade_creates_the_database(tmp_path, monkeypatch, env):
    monkeypatch.setenv("SLIMLINE_HOME", str(tmp_path / "fresh"))
    result = CliRunner().invoke(cli_app.app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fresh" / "slimline.db").exists()


def test_submit_wait_status_download(api, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "model": {"arch": TINY_MLP}, "dataset": "synthetic-tiny", "seed": 0,
        "steps": [{"op": "train", "epochs": 1},
                  {"op": "pcn", "layers": ["fc1"], "select": {"dims": 4}}]}))
    runner_ = CliRunner()
    result = runner_.invoke(cli_app.app, ["submit", str(spec), "--wait"])
    assert result.exit_code == 0, result.output
    job_id = result.output.strip().splitlines()[-1]

    result = runner_.invoke(cli_app.app, ["status", job_id, "--json"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["status"] == "succeeded" and job["progress"] == 1.0

    out = tmp_path / "model.safetensors"
    result = runner_.invoke(cli_app.app, ["download", job_id, "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = zoo.load(out)
    assert model.fc1.dims == 4
    # a model id works too
    again = tmp_path / "again.safetensors"
    result = runner_.invoke(cli_app.app, ["download", job["result"]["model_id"], "-o", str(again)])
    assert result.exit_code == 0 and again.read_bytes() == out.read_bytes()


def test_errors_are_one_clean_line(api, tmp_path):
    result = CliRunner().invoke(cli_app.app, ["status", "no-such-job"])
    assert result.exit_code == 1
    assert "NotFound" in result.output and "Traceback" not in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"arch": TINY_MLP}, "dataset": "synthetic-tiny",
                               "steps": [{"op": "frobnicate"}]}))
    result = CliRunner().invoke(cli_app.app, ["submit", str(bad)])
    assert result.exit_code == 1 and "frobnicate" in result.output


def test_unreachable_api_says_how_to_fix_it(env):
    result = CliRunner().invoke(cli_app.app, ["status", "x", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "slimline up" in result.output
