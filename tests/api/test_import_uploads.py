"""Bring-your-own-model intake through the API with the real inspector subprocess: `.pt2` and
`.onnx` uploads of architectures outside the zoo become imported models with a prunability
report; hostile files are a 4xx with nothing executed (a marker file a payload would create never
appears) and nothing left behind (no Model row, no stored object, no temp file)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.app import create_app
from service.settings import Settings
from tests.api.conftest import stored_objects

pytest.importorskip("torch")
pytest.importorskip("onnx")

ARCHS = ("mobilenetv2", "resnet18", "vit")


@pytest.fixture
def real_client(settings, keys, enqueued):
    from fastapi.testclient import TestClient

    real = Settings(**settings.model_dump() | {"inspect_module": "worker.inspect",
                                               "max_upload_bytes": 8 * 1024 * 1024})
    with TestClient(create_app(real), headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The three test architectures exported as .pt2 and .onnx (weights inside the file)."""
    import torch

    from tests.import_models import example_input, export_pt2, make

    root = tmp_path_factory.mktemp("exports")
    out: dict[tuple[str, str], Path] = {}
    for name in ARCHS:
        model = make(name)
        out[name, "pt2"] = export_pt2(model, root / f"{name}.pt2")
        path = root / f"{name}.onnx"
        torch.onnx.export(model, (example_input(),), str(path), dynamo=True, opset_version=18,
                          input_names=["x"], output_names=["logits"], external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1,
                                                                    max=4096)}},
                          verbose=False)
        out[name, "onnx"] = path
    return out


def upload(client, path: Path, filename: str | None = None, **fields: str):
    with open(path, "rb") as f:
        return client.post("/v1/models", files={"file": (filename or path.name, f)},
                           data=fields)


def graph_objects(settings: Settings) -> list[Path]:
    return [p for p in stored_objects(settings) if p.relative_to(
        settings.home / "objects").parts[0] == "graphs"]


def assert_nothing_left(client, settings: Settings) -> None:
    assert client.get("/v1/models").json()["items"] == []
    assert stored_objects(settings) == []
    assert list((settings.home / "tmp").iterdir()) == []


# ---- accepted ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("name", ARCHS)
def test_imported_upload_has_a_report(real_client, settings, files, name, fmt):
    r = upload(real_client, files[name, fmt], mean="0.5", std="0.25", num_classes="10",
               input_shape="1,28,28")
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["format"] == fmt
    arch = model["arch"]
    assert arch["name"] == "graph" and arch["input_shape"] == [1, 28, 28]
    assert arch["preprocessing"] == {"layout": "NCHW", "mean": [0.5], "std": [0.25]}
    got = real_client.get(f"/v1/models/{model['id']}").json()
    assert got == model
    report = got["report"]
    assert report["totals"]["params"] > 0 and report["totals"]["macs"] > 0
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers and all(layer["kind"] and layer["methods"] is not None
                          for layer in layers.values())
    head = {"mobilenetv2": "classifier", "resnet18": "fc", "vit": "head"}[name]
    assert any(n.endswith(head) for n in layers), sorted(layers)
    if name == "mobilenetv2":  # depthwise convs are reported untouched by lowrank
        assert any(layer["untouched"] for layer in layers.values())
    # the list leaves the report out; the graph is stored once under its sha
    listed = real_client.get("/v1/models").json()["items"]
    assert [m["id"] for m in listed] == [model["id"]] and "report" not in listed[0]
    keys = [p.relative_to(settings.home / "objects").as_posix()
            for p in graph_objects(settings)]
    assert keys == [f"graphs/{_tenant(settings)}/{arch['graph']}.json"]


def _tenant(settings: Settings) -> str:
    from service.db import session_scope
    from service.orm import Model

    with session_scope(settings) as session:
        return session.query(Model).first().tenant_id  # type: ignore[union-attr]


def test_graph_is_stored_once_and_a_download_uploads_again(real_client, settings, files,
                                                           tmp_path):
    first = upload(real_client, files["vit", "pt2"]).json()
    again = upload(real_client, files["vit", "pt2"], name="again").json()
    assert first["arch"]["graph"] == again["arch"]["graph"]
    assert len(graph_objects(settings)) == 1
    blob = real_client.get(f"/v1/models/{first['id']}/file").content
    saved = tmp_path / "downloaded.safetensors"
    saved.write_bytes(blob)
    r = upload(real_client, saved, layout="NCHW", mean="0.1", std="0.3")
    assert r.status_code == 201, r.text
    back = r.json()
    assert back["format"] == "safetensors" and back["arch"]["graph"] == first["arch"]["graph"]
    assert back["arch"]["preprocessing"]["mean"] == [0.1]
    assert back["report"]["layers"] and len(graph_objects(settings)) == 1
    from core import models as zoo

    assert zoo.read_arch(saved)["graph"] == first["arch"]["graph"]


# ---- refused before the inspector: the form fields ----------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("input_shape", "3,x,32"), ("input_shape", "0,28,28"), ("layout", "CHW"),
    ("mean", "0.5,nan"), ("std", "0.5,-1"), ("num_classes", "ten"),
])
def test_bad_preprocessing_field_is_422_naming_it(real_client, settings, files, field, value):
    r = upload(real_client, files["resnet18", "pt2"], **{field: value})
    assert r.status_code == 422 and f"'{field}'" in r.json()["detail"], r.text
    assert_nothing_left(real_client, settings)


def test_arch_field_is_refused_for_a_graph_file(real_client, settings, files):
    r = upload(real_client, files["vit", "onnx"], arch='{"name": "lenet300"}')
    assert r.status_code == 422 and "'arch'" in r.json()["detail"]
    assert_nothing_left(real_client, settings)


def test_mismatching_fields_are_422(real_client, settings, files):
    r = upload(real_client, files["vit", "onnx"], input_shape="3,32,32")
    assert r.status_code == 422 and "input_shape 3,32,32" in r.json()["detail"], r.text
    r = upload(real_client, files["vit", "pt2"], mean="0.5,0.5,0.5", std="1,1,1")
    assert r.status_code == 422 and "3 values" in r.json()["detail"], r.text
    assert_nothing_left(real_client, settings)


# ---- hostile uploads ---------------------------------------------------------------------

def _custom_target(program: dict) -> None:
    for node in program["graph_module"]["graph"]["nodes"]:
        if node["target"] == "torch.ops.aten.gelu.default":
            node["target"] = "torch.ops.my_ns.foo.default"
            return
    raise AssertionError("no gelu node")


def _sympy_eval(marker: Path):
    payload = (f"Symbol('s77', positive=True, integer=True) + "
               f"__import__('os').system('touch {marker}')")

    def edit(program: dict) -> None:
        text = json.dumps(program).replace(
            json.dumps("Symbol('s77', positive=True, integer=True)")[1:-1], payload, 1)
        program.clear()
        program.update(json.loads(text))
    return edit


def _hostile(kind: str, files, tmp: Path, marker: Path) -> tuple[Path, str]:
    """(file, upload name) of one hostile upload."""
    from tests import upload_bombs as bombs

    vit = files["vit", "pt2"]
    if kind == "pickled-constant":
        return bombs.pt2_pickled_constant(vit, tmp / "m.pt2", marker), "m.pt2"
    if kind == "pickled-sample-inputs":
        return bombs.pt2_pickled_sample_inputs(vit, tmp / "m.pt2", marker), "m.pt2"
    if kind == "sympy-eval":
        return bombs.pt2_edit_program(vit, tmp / "m.pt2", _sympy_eval(marker)), "m.pt2"
    if kind == "aotinductor":
        return bombs.pt2_with_entry(vit, tmp / "m.pt2", "data/aotinductor/model/model.so",
                                    b"\x7fELF" + bytes(64)), "m.pt2"
    if kind == "zip-bomb":
        bombs.pt2_zip_bomb(tmp / "bomb.pt2", 3 * 1024**3 // 2)  # under the 2 GiB cap
        return tmp / "bomb.pt2", "bomb.pt2"
    if kind == "path-traversal":
        return bombs.pt2_with_entry(vit, tmp / "m.pt2", "!vit/../../evil.txt"), "m.pt2"
    if kind == "custom-op":
        return bombs.pt2_edit_program(vit, tmp / "m.pt2", _custom_target), "m.pt2"
    if kind == "onnx-external-data":
        return bombs.onnx_external_data(tmp / "m.onnx", "../../etc/passwd"), "m.onnx"
    if kind == "onnx-custom-op":
        return bombs.onnx_custom_op(tmp / "m.onnx"), "m.onnx"
    if kind == "onnx-no-float-input":
        return bombs.onnx_integer_input(tmp / "m.onnx"), "m.onnx"
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "status", "words"), [
    ("pickled-constant", 422, ["'evil'", "pickled", "torch.export.save"]),
    ("pickled-sample-inputs", 422, ["sample inputs", "weights_only"]),
    ("sympy-eval", 422, ["symbolic shape expression", "__import__"]),
    ("aotinductor", 422, ["AOTInductor", "model.so", "torch.export.save"]),
    ("zip-bomb", 422, ["zip bomb", "weight_0"]),
    ("path-traversal", 422, ["traversal", "evil.txt"]),
    ("custom-op", 422, ["my_ns::foo", "not supported"]),
    ("onnx-external-data", 422, ["external", "../../etc/passwd"]),
    ("onnx-custom-op", 422, ["com.example::Scramble", "not supported"]),
    ("onnx-no-float-input", 422, ["int64", "float32"]),
])
def test_hostile_upload_is_refused_with_nothing_run_or_left(real_client, settings, files,
                                                            tmp_path, kind, status, words):
    marker = tmp_path / "pwned"
    path, filename = _hostile(kind, files, tmp_path, marker)
    r = upload(real_client, path, filename)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == "InvalidCheckpoint"
    assert all(w in body["detail"] for w in words), body["detail"]
    assert "Traceback" not in body["detail"]
    assert not marker.exists(), "a payload in the upload was executed"
    assert not (tmp_path.parent / "evil.txt").exists()
    assert_nothing_left(real_client, settings)


def test_not_a_zip_pt2_is_415(real_client, settings, tmp_path):
    path = tmp_path / "m.pt2"
    path.write_bytes(b"\x08\x07 not a zip")
    r = upload(real_client, path)
    assert r.status_code == 415 and "torch.export.save" in r.json()["detail"]
    assert_nothing_left(real_client, settings)


def test_pt2_over_the_size_cap_is_413(real_client, settings, files, tmp_path):
    from tests import upload_bombs as bombs

    bombs.pt2_zip_bomb(tmp_path / "big.pt2", 3 * 1024**3)  # over max_dataset_bytes (2 GiB)
    r = upload(real_client, tmp_path / "big.pt2")
    assert r.status_code == 413 and "SLIMLINE_MAX_DATASET_BYTES" in r.json()["detail"], r.text
    assert_nothing_left(real_client, settings)


def test_inspector_runs_with_weights_only_loads_forced(client, monkeypatch):
    """api.inspect_client starts the inspector with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 and without
    a TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD the API's environment may have."""
    import asyncio

    from tests.api.conftest import safetensors_bytes

    seen: dict[str, str] = {}
    real = asyncio.create_subprocess_exec

    async def spy(*args, env=None, **kwargs):
        seen.update(env or {})
        return await real(*args, env=env, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    r = client.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                    data={"arch": '{"name": "lenet300"}'})
    assert r.status_code == 201, r.text
    assert seen["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in seen
