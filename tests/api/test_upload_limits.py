"""Bounded uploads: zip bombs and huge safetensors headers refused before they cost the API
memory, multipart limits that hold for chunked bodies, control characters, the inspector's
memory/CPU/wall-clock caps and its concurrency slots, the upload quota, and temp files that never
outlive their upload (not even a SIGKILLed API). The RSS tests run a real uvicorn process."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.auth import create_api_key
from service.db import dispose_engines, session_scope, upgrade_db
from service.settings import Settings
from tests.api.conftest import safetensors_bytes, stored_objects
from tests.upload_bombs import huge_header_safetensors, zip_bomb_npz

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_npz() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(x_train=rng.random((20, 1, 4, 4), dtype=np.float32),
                     y_train=rng.integers(0, 3, 20))


def tmp_entries(settings: Settings) -> list[Path]:
    root = settings.home / "tmp"
    return sorted(root.iterdir()) if root.exists() else []


def client_for(settings: Settings, keys: dict[str, str], **changes) -> TestClient:
    app = create_app(Settings(**settings.model_dump() | changes))
    return TestClient(app, headers={"Authorization": f"Bearer {keys['a']}"})


# ---- datasets are judged from the zip directory / safetensors header, out of process ----------

def test_zip_bomb_npz_is_refused_from_its_directory(settings, keys, tmp_path):
    bomb = tmp_path / "bomb.npz"
    zip_bomb_npz(bomb, 512 * MiB)  # 0.5 MB inflating to 512 MiB: under max_dataset_bytes
    with client_for(settings, keys, max_upload_bytes=4 * MiB) as c:
        r = c.post("/v1/datasets", files={"file": ("d.npz", bomb.read_bytes())})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InvalidDataset"
    assert "SLIMLINE_MAX_DECOMPRESSION_RATIO" in r.json()["detail"]
    assert "zip bomb" in r.json()["detail"]
    assert stored_objects(settings) == [] and tmp_entries(settings) == []


def test_dataset_over_max_dataset_bytes_is_413(settings, keys):
    with client_for(settings, keys, max_dataset_bytes=1000) as c:
        r = c.post("/v1/datasets", files={"file": ("d.npz", good_npz())})
    assert r.status_code == 413, r.text
    assert "SLIMLINE_MAX_DATASET_BYTES" in r.json()["detail"]
    assert tmp_entries(settings) == []


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
def test_safetensors_header_over_the_cap_is_413_before_parsing(settings, keys, tmp_path, route):
    path = tmp_path / "big.safetensors"
    huge_header_safetensors(path, 8 * 1024)
    with client_for(settings, keys, max_safetensors_header_bytes=4096) as c:
        r = c.post(route, files={"file": ("m.safetensors", path.read_bytes())})
    assert r.status_code == 413, r.text
    assert "SLIMLINE_MAX_SAFETENSORS_HEADER_BYTES" in r.json()["detail"]
    assert tmp_entries(settings) == [] and stored_objects(settings) == []


def test_safetensors_dataset_whose_sizes_lie_is_422(client, settings):
    # the header declares F32 [2, 2] (16 bytes) in a 4-byte data range
    header = json.dumps({"x_train": {"dtype": "F32", "shape": [2, 2],
                                     "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 4
    r = client.post("/v1/datasets", files={"file": ("d.safetensors", data)})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InvalidDataset" and "x_train" in r.json()["detail"]
    assert tmp_entries(settings) == []


def test_the_api_process_never_imports_numpy():
    code = "import api.app, sys; api.app.create_app; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- multipart limits --------------------------------------------------------------------

def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: bytes = b"B") -> bytes:
    body = b""
    for name, value, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disp.encode("utf-8",
                                                                              "surrogateescape")
        body += b"\r\n\r\n" + value + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def _chunked(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("where", ["preamble", "epilogue", "fields"])
def test_chunked_body_over_the_limit_is_413(settings, keys, where):
    """No Content-Length; the file part is small, the rest of the body is not."""
    junk = b"j" * (2 * MiB)
    file_part = [("file", safetensors_bytes(), "m.safetensors")]
    if where == "fields":
        body = _multipart(file_part + [(f"f{i}", b"v" * 60_000, None) for i in range(15)])
        limits = {"max_upload_bytes": 64 * 1024, "max_form_fields": 100}
    else:
        body = _multipart(file_part)
        body = junk + b"\r\n" + body if where == "preamble" else body + junk
        limits = {}
    with client_for(settings, keys, **limits) as c:
        r = c.post("/v1/models", content=_chunked(body),
                   headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413, r.text
    assert "SLIMLINE_MAX_UPLOAD_BYTES" in r.json()["detail"]
    assert tmp_entries(settings) == [] and stored_objects(settings) == []


def test_too_many_form_fields_is_413(client, settings):
    form = {f"f{i}": "x" for i in range(20)}
    r = client.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                    data=form)
    assert r.status_code == 413, r.text
    assert "SLIMLINE_MAX_FORM_FIELDS" in r.json()["detail"]
    assert tmp_entries(settings) == []


def test_oversize_text_field_is_413(client, settings):
    r = client.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                    data={"arch": "x" * (65 * 1024)})
    assert r.status_code == 413 and "'arch'" in r.json()["detail"]


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
def test_nul_in_name_is_422_naming_the_field(client, settings, route):
    data = safetensors_bytes() if route == "/v1/models" else good_npz()
    filename = "m.safetensors" if route == "/v1/models" else "d.npz"
    r = client.post(route, files={"file": (filename, data)}, data={"name": "a\x00b"})
    assert r.status_code == 422, r.text
    assert "'name'" in r.json()["detail"] and "NUL" in r.json()["detail"]
    r = client.post(route, files={"file": (filename, data)}, data={"name": "line\nbreak"})
    assert r.status_code == 422 and "'name'" in r.json()["detail"]
    assert tmp_entries(settings) == [] and stored_objects(settings) == []


def test_control_characters_in_filename_and_bad_utf8_are_422(client, settings):
    body = _multipart([("file", safetensors_bytes(), "m\x01.safetensors")])
    r = client.post("/v1/models", content=body,
                    headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 422 and "file name" in r.json()["detail"]
    body = _multipart([("file", safetensors_bytes(), "m.safetensors"),
                       ("name", b"\xff\xfe", None)])
    r = client.post("/v1/models", content=body,
                    headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]
    # a multi-line arch (pretty JSON) is fine
    r = client.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                    data={"arch": '{\n  "name": "lenet300"\n}'})
    assert r.status_code == 201, r.text
    assert tmp_entries(settings) == []


# ---- the inspector's limits and slots ----------------------------------------------------

def test_inspector_over_its_memory_cap_is_413(settings, keys):
    with client_for(settings, keys, inspect_memory_bytes=256 * MiB) as c:
        r = c.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes(b"HOG"))})
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "256 MiB" in detail and "SLIMLINE_INSPECT_MEMORY_BYTES" in detail
    assert tmp_entries(settings) == [] and stored_objects(settings) == []


def test_inspector_over_its_cpu_time_is_413(settings, keys):
    with client_for(settings, keys, inspect_cpu_s=1) as c:
        t0 = time.monotonic()
        r = c.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes(b"SPIN"))})
    assert r.status_code == 413, r.text
    assert "SLIMLINE_INSPECT_CPU_S" in r.json()["detail"]
    assert time.monotonic() - t0 < 20
    assert tmp_entries(settings) == []


def test_inspector_wall_clock_timeout_kills_the_child(settings, keys, monkeypatch):
    monkeypatch.setenv("FAKE_INSPECT_SLOW_S", "30")
    with client_for(settings, keys, inspect_timeout_s=1) as c:
        t0 = time.monotonic()
        r = c.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes(b"SLOW"))})
    assert r.status_code == 413, r.text
    assert "SLIMLINE_INSPECT_TIMEOUT_S" in r.json()["detail"]
    assert time.monotonic() - t0 < 10
    assert tmp_entries(settings) == []


def _two_at_once(c: TestClient) -> list[httpx.Response]:
    results: list[httpx.Response] = []

    def post(payload: bytes) -> None:
        results.append(c.post("/v1/models", files={"file": ("m.safetensors", payload)}))

    slow = threading.Thread(target=post, args=(safetensors_bytes(b"SLOW"),))
    slow.start()
    time.sleep(1.0)  # the slow one holds the only slot now
    post(safetensors_bytes())
    slow.join(30)
    return results


def test_second_upload_while_the_slot_is_busy_gets_503(settings, keys, monkeypatch):
    monkeypatch.setenv("FAKE_INSPECT_SLOW_S", "3")
    with client_for(settings, keys, inspect_concurrency=1, inspect_queue_s=0) as c:
        quick, slow = _two_at_once(c)
    assert quick.status_code == 503, quick.text
    assert quick.json()["error"] == "Overloaded" and int(quick.headers["retry-after"]) >= 1
    assert "SLIMLINE_INSPECT_CONCURRENCY" in quick.json()["detail"]
    assert slow.status_code == 201, slow.text
    assert tmp_entries(settings) == [] and len(stored_objects(settings)) == 1


def test_second_upload_waits_for_a_slot_within_the_queue_time(settings, keys, monkeypatch):
    monkeypatch.setenv("FAKE_INSPECT_SLOW_S", "2")
    with client_for(settings, keys, inspect_concurrency=1, inspect_queue_s=20) as c:
        results = _two_at_once(c)
    assert [r.status_code for r in results] == [201, 201]
    assert len(stored_objects(settings)) == 2


def test_upload_quota_applies_to_both_routes(settings, keys):
    with client_for(settings, keys, max_uploads_per_hour=1) as c:
        assert c.post("/v1/models",
                      files={"file": ("m.safetensors", safetensors_bytes())}).status_code == 201
        for route, payload, name in [("/v1/models", safetensors_bytes(), "m.safetensors"),
                                     ("/v1/datasets", good_npz(), "d.npz")]:
            r = c.post(route, files={"file": (name, payload)})
            assert r.status_code == 429, r.text
            assert "SLIMLINE_MAX_UPLOADS_PER_HOUR" in r.json()["detail"]
            assert int(r.headers["retry-after"]) >= 1
    assert tmp_entries(settings) == []


# ---- a real uvicorn process: RSS, and a SIGKILL mid-upload ---------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class ApiProcess:
    """`python -m uvicorn api.app:app` on a free port, with its settings in the environment."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home, self.port = home, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
        self.env = clean | {"SLIMLINE_HOME": str(home), "SLIMLINE_AUTH": "on",
                            "SLIMLINE_INSPECT_MODULE": "tests.api.fake_inspect",
                            "SLIMLINE_BROKER_URL": "filesystem://"} | env
        self.log = home / f"api-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ApiProcess:
        log = open(self.log, "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning"], cwd=REPO, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the API did not start: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def api_home(tmp_path) -> Iterator[tuple[Path, str]]:
    home = tmp_path / "home"
    settings = Settings(home=home, auth="on")
    upgrade_db(settings)
    with session_scope(settings) as session:
        key = create_api_key(session, "k", "alice")
    dispose_engines()
    yield home, key


@pytest.mark.service
def test_hostile_uploads_leave_the_api_rss_bounded(api_home, tmp_path):
    """A 2 MB zip bomb (2 GiB inflated) and a safetensors file with a 92 MB header, uploaded
    to a real API process with the default limits: both refused, the API's peak RSS grows by
    less than 100 MB, nothing stored, no temp file left."""
    home, key = api_home
    bomb = tmp_path / "bomb.npz"
    zip_bomb_npz(bomb, 2048 * MiB)
    big_header = tmp_path / "header.safetensors"
    huge_header_safetensors(big_header, 92 * MiB)
    api = ApiProcess(home).start()
    try:
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=api.url, headers=auth, timeout=120) as http:
            warm = http.post("/v1/datasets", files={"file": ("d.npz", good_npz())})
            assert warm.status_code == 201, warm.text
            before = _status(api.proc.pid)["VmRSS"]
            with open(bomb, "rb") as f:
                r = http.post("/v1/datasets", files={"file": ("bomb.npz", f)})
            assert r.status_code in (413, 422), r.text
            assert "SLIMLINE_MAX_" in r.json()["detail"]
            t0 = time.monotonic()
            with open(big_header, "rb") as f:
                r = http.post("/v1/models", files={"file": ("m.safetensors", f)})
            elapsed = time.monotonic() - t0
            assert r.status_code == 413, r.text
            assert "SLIMLINE_MAX_SAFETENSORS_HEADER_BYTES" in r.json()["detail"]
            with open(big_header, "rb") as f:
                r = http.post("/v1/datasets", files={"file": ("d.safetensors", f)})
            assert r.status_code == 413, r.text
            after = _status(api.proc.pid)
        assert after["VmHWM"] - before < 100 * MiB, (before, after)
        assert elapsed < 8, elapsed  # upload of 92 MB over loopback, no parsing
        assert not list((home / "tmp").iterdir())
        objects = home / "objects"
        assert len([p for p in objects.rglob("*") if p.is_file()]) == 1  # the warm-up only
    finally:
        api.stop()


@pytest.mark.service
def test_api_killed_mid_upload_leaves_a_dir_the_next_start_removes(api_home):
    home, key = api_home
    api = ApiProcess(home).start()
    body_head = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; "
                 b"filename=\"m.safetensors\"\r\n\r\n")
    total = 8 * MiB
    sock = socket.create_connection(("127.0.0.1", api.port))
    try:
        sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\n"
                     + f"Authorization: Bearer {key}\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=B\r\n"
                     + f"Content-Length: {len(body_head) + total}\r\n\r\n".encode() + body_head)
        sock.sendall(b"\0" * (total // 2))  # half the file, then the API dies
        tmp = home / "tmp"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = [p for p in tmp.glob("upload-*/upload") if p.stat().st_size > 0] \
                if tmp.exists() else []
            if left:
                break
            time.sleep(0.1)
        assert left, "the upload never reached its temp file"
        leaked = left[0].parent
        assert leaked.name.startswith(f"upload-{api.proc.pid}-")
        api.stop(signal.SIGKILL)
    finally:
        sock.close()
    assert leaked.exists()  # SIGKILL ran no cleanup
    (tmp / "unrelated-young-file").write_bytes(b"kept: no owner, younger than temp_max_age_s")
    second = ApiProcess(home).start()
    try:
        assert not leaked.exists(), "the start-up sweep did not remove the dead upload's dir"
        assert (tmp / "unrelated-young-file").exists()
    finally:
        second.stop()
