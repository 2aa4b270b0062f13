from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
import zipfile

import httpx
import pytest

from tests.api.conftest import MAX_UPLOAD, safetensors_bytes, stored_objects


def upload(client, data: bytes, filename: str = "m.safetensors", **form):
    return client.post("/v1/models", files={"file": (filename, io.BytesIO(data))},
                       data={"name": "lenet"} | form)


def test_upload_get_list_download(client, settings):
    data = safetensors_bytes()
    r = upload(client, data, arch='{"name": "lenet300"}')
    assert r.status_code == 201, r.text
    model = r.json()
    assert set(model) >= {"id", "name", "arch", "format", "size_bytes", "sha256", "params",
                          "created_at"}
    assert model["arch"] == {"name": "lenet300", "num_classes": 10}
    assert model["format"] == "safetensors" and model["params"]["total"] == 266610
    assert model["sha256"] == hashlib.sha256(data).hexdigest()
    assert r.headers["location"] == f"/v1/models/{model['id']}"
    assert client.get(f"/v1/models/{model['id']}").json() == model
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [model["id"]]
    blob = client.get(f"/v1/models/{model['id']}/file")
    assert blob.status_code == 200 and blob.content == data
    assert len(stored_objects(settings)) == 1


def test_pt_upload_is_accepted_by_magic(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    r = upload(client, buf.getvalue(), "m.pt", arch='{"name": "lenet300"}')
    assert r.status_code == 201 and r.json()["format"] == "pt"


@pytest.mark.parametrize(("data", "filename"), [
    (b"hello world", "model.txt"),
    (b"hello world", "model.safetensors"),  # wrong magic
    (b"not a zip at all", "model.pt"),
])
def test_wrong_format_is_415(client, settings, data, filename):
    r = upload(client, data, filename)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "UnsupportedFormat" and ".safetensors" in r.json()["detail"]
    assert stored_objects(settings) == []


def test_invalid_checkpoint_is_422_and_stores_nothing(client, settings):
    r = upload(client, safetensors_bytes(b"INVALID" + b"\0" * 9))
    assert r.status_code == 422 and r.json()["error"] == "InvalidCheckpoint"
    assert "fc1.weight" in r.json()["detail"]
    assert stored_objects(settings) == [] and client.get("/v1/models").json()["items"] == []


def test_inspector_crash_is_503_without_traceback(client, settings):
    r = upload(client, safetensors_bytes(b"CRASH" + b"\0" * 11))
    assert r.status_code == 503 and "Traceback" not in r.json()["detail"]
    assert stored_objects(settings) == []


def test_bad_arch_json_is_422(client):
    r = upload(client, safetensors_bytes(), arch="{not json")
    assert r.status_code == 422 and "arch" in r.json()["detail"]


def test_missing_file_part_and_not_multipart(client):
    r = client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"1")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = client.post("/v1/models", json={"name": "x"})
    assert r.status_code == 415


def test_oversize_upload_with_content_length_is_413(client, settings):
    r = upload(client, safetensors_bytes(b"\0" * (MAX_UPLOAD + 1024 * 1024)))
    assert r.status_code == 413 and r.json()["error"] == "UploadTooLarge"
    assert stored_objects(settings) == []
    assert list((settings.home / "tmp").iterdir()) == []


def test_oversize_upload_is_refused_while_streaming(client, settings):
    """A chunked body (no Content-Length) just over the limit: refused as the bytes arrive."""
    chunks_sent = []

    def body():
        head = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; "
                b"filename=\"m.safetensors\"\r\n\r\n")
        yield head
        for _ in range(64):  # 64 x 8 KiB = 512 KiB, 8x the limit
            chunks_sent.append(1)
            yield b"\0" * 8192
        yield b"\r\n--B--\r\n"

    r = client.post("/v1/models", content=body(),
                    headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413, r.text
    assert stored_objects(settings) == []
    assert list((settings.home / "tmp").iterdir()) == []


def test_oversize_upload_over_real_socket_gets_413(app, keys, settings):
    """Through uvicorn: the client sees the 413 response, not a connection reset."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        data = safetensors_bytes(b"\0" * (4 * 1024 * 1024))
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models",
                       files={"file": ("m.safetensors", data)},
                       headers={"Authorization": f"Bearer {keys['a']}"}, timeout=30)
        assert r.status_code == 413, r.text
    finally:
        server.should_exit = True
        thread.join(10)
    assert stored_objects(settings) == []


def test_db_failure_after_store_removes_the_object(client, settings, monkeypatch):
    from service import model_registry

    def broken_flush(self, *a, **k):
        raise RuntimeError("database went away")

    monkeypatch.setattr("sqlalchemy.orm.Session.flush", broken_flush)
    with pytest.raises(RuntimeError):
        upload(client, safetensors_bytes())
    assert stored_objects(settings) == []
    assert model_registry  # imported for clarity of what is exercised
