"""The same flow on the embedded default: `slimline up` with SQLite, Celery's filesystem
transport and the local object store — no servers at all."""
from __future__ import annotations

import pytest

from tests.stack.flows import run_compression_flow

pytestmark = pytest.mark.service


def test_upload_job_download_on_embedded_default(embedded_stack, tmp_path):
    with embedded_stack.client() as client:  # the embedded default runs with auth off
        assert client.get("/readyz").status_code == 200
        run_compression_flow(client, tmp_path)
    home = embedded_stack.home
    assert any(home.rglob("*.sqlite*")) or any(home.rglob("*.db"))
    assert any(p.suffix == ".safetensors" for p in (home / "objects").rglob("*"))
