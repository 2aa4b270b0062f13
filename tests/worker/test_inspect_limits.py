"""The inspector's limits: the address-space cap (a `.pt` zip bomb), a safetensors header over
the cap refused unparsed, declared sizes that do not match the file, the dataset mode's zip
directory checks (before anything is decompressed), and the one-copy model build."""
from __future__ import annotations

import asyncio
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file

from api.inspect_client import Inspector
from core import models as zoo
from service.errors import InvalidCheckpoint, SlimlineError, UploadTooLarge
from service.settings import Settings
from tests.upload_bombs import write_zip, zip_bomb_npz, zip_bomb_pt
from worker.inspect import build_from_upload, main

MiB = 1024 * 1024
ARCH = {"name": "mlp", "input_shape": [1, 4, 4], "widths": [8]}


def run_cli(args: list[str], capsys) -> dict:
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def dataset(path: Path, capsys, fmt: str = "npz", *extra: str) -> dict:
    return run_cli(["--kind", "dataset", "--input", str(path), "--format", fmt, *extra], capsys)


def good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.random((20, 1, 4, 4), dtype=np.float32),
            "y_train": rng.integers(0, 3, 20), "x_test": rng.random((6, 1, 4, 4),
                                                                    dtype=np.float32),
            "y_test": np.array([0, 1, 2, 3, 0, 1])}


# ---- the subprocess under its caps (through the API's client) ------------------------------

def test_pt_zip_bomb_over_the_memory_cap_is_413(tmp_path):
    """1 MB of `.pt` that torch.load would inflate to 1 GiB, under a 1 GiB address-space cap."""
    bomb = tmp_path / "bomb.pt"
    assert zip_bomb_pt(bomb, 1024 * MiB) < 2 * MiB
    settings = Settings(home=tmp_path / "home", inspect_memory_bytes=1024 * MiB)
    inspector = Inspector(settings)
    with pytest.raises(UploadTooLarge) as err:
        asyncio.run(inspector.checkpoint(bomb, "pt", ARCH, tmp_path / "out.safetensors"))
    assert "1024 MiB" in err.value.detail
    assert "SLIMLINE_INSPECT_MEMORY_BYTES" in err.value.detail
    assert not (tmp_path / "out.safetensors").exists()


def test_a_real_model_fits_the_default_caps(tmp_path):
    """torch imports and a model validates under the default 4 GiB address space."""
    src, out = tmp_path / "m.safetensors", tmp_path / "out.safetensors"
    torch.manual_seed(0)
    zoo.save(zoo.build(ARCH), src)
    inspector = Inspector(Settings(home=tmp_path / "home"))
    result = asyncio.run(inspector.checkpoint(src, "safetensors", None, out))
    assert result.params["total"] == 16 * 8 + 8 + 8 * 10 + 10
    assert zoo.read_arch(out)["widths"] == [8]


def test_dataset_bomb_is_refused_by_the_subprocess(tmp_path):
    bomb = tmp_path / "bomb.npz"
    zip_bomb_npz(bomb, 256 * MiB)
    inspector = Inspector(Settings(home=tmp_path / "home", inspect_memory_bytes=128 * MiB))
    with pytest.raises(SlimlineError) as err:  # refused from the directory, under 128 MiB
        asyncio.run(inspector.dataset(bomb, "npz"))
    assert err.value.status == 422 and "SLIMLINE_MAX_DECOMPRESSION_RATIO" in err.value.detail


# ---- safetensors: header cap before parsing, layout against the file --------------------

def _safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_safetensors_header_over_the_cap_is_refused_unparsed(tmp_path, capsys, kind):
    src = tmp_path / "m.safetensors"
    src.write_bytes(_safetensors(b"{" + b"not json at all " * 200, b""))  # never parsed
    args = ["--kind", kind, "--input", str(src), "--format", "safetensors",
            "--output", str(tmp_path / "o"), "--max-header-bytes", "1024"]
    reply = run_cli(args, capsys)
    assert reply["ok"] is False and reply["status"] == 413
    assert "SLIMLINE_MAX_SAFETENSORS_HEADER_BYTES" in reply["detail"]


def test_safetensors_checkpoint_whose_offsets_lie_is_422(tmp_path, capsys):
    header = json.dumps({"fc1.weight": {"dtype": "F32", "shape": [8, 16],
                                        "data_offsets": [0, 64]}}).encode()
    src = tmp_path / "m.safetensors"
    src.write_bytes(_safetensors(header, b"\0" * 64))
    reply = run_cli(["--input", str(src), "--format", "safetensors", "--arch", json.dumps(ARCH),
                     "--output", str(tmp_path / "o")], capsys)
    assert reply["ok"] is False and reply["status"] == 422
    assert "fc1.weight" in reply["detail"] and "512 bytes" in reply["detail"]


# ---- datasets: the zip directory is judged before anything is decompressed ---------------

def test_valid_datasets_stored_deflated_fortran_and_safetensors(tmp_path, capsys):
    arrays = good_arrays()
    want = {"input_shape": [1, 4, 4], "counts": {"train": 20, "test": 6}, "num_classes": 4}
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez_compressed(tmp_path / "b.npz", **arrays)
    np.savez(tmp_path / "c.npz", **(arrays | {"x_train": np.asfortranarray(arrays["x_train"])}))
    np_save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                 str(tmp_path / "d.safetensors"))
    for name in ("a.npz", "b.npz", "c.npz"):
        assert dataset(tmp_path / name, capsys) == {"ok": True, "meta": want}, name
    assert dataset(tmp_path / "d.safetensors", capsys, "safetensors") == {"ok": True,
                                                                          "meta": want}


def test_nan_found_in_a_memory_mapped_array(tmp_path, capsys):
    x = np.zeros((5000, 1, 4, 4), dtype=np.float32)
    x[4321, 0, 1, 2] = np.inf
    np.savez(tmp_path / "a.npz", x_train=x, y_train=np.zeros(5000, dtype=np.int64))
    reply = dataset(tmp_path / "a.npz", capsys)
    assert reply["ok"] is False and "NaN or infinite" in reply["detail"]


def test_npz_over_max_dataset_bytes_is_413(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", **good_arrays())
    reply = dataset(tmp_path / "a.npz", capsys, "npz", "--max-dataset-bytes", "1000")
    assert reply["status"] == 413 and "SLIMLINE_MAX_DATASET_BYTES" in reply["detail"]


def test_npz_member_bomb_next_to_real_arrays_is_422(tmp_path, capsys):
    """The total ratio is diluted by stored members; the member's own ratio still counts."""
    x = np.random.default_rng(0).random((4096, 64), dtype=np.float32)  # 1 MiB, incompressible
    npy = io.BytesIO()
    np.save(npy, x)
    bomb_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(bomb_header, {"descr": "<i8", "fortran_order": False,
                                                       "shape": (8 * MiB,)})
    write_zip(tmp_path / "a.npz", [("x_train.npy", npy.getvalue(), 0),
                                   ("y_train.npy", bomb_header.getvalue(), 64 * MiB)])
    reply = dataset(tmp_path / "a.npz", capsys, "npz", "--max-ratio", "50")
    assert reply["status"] == 422 and "'y_train.npy'" in reply["detail"]
    assert "SLIMLINE_MAX_DECOMPRESSION_RATIO" in reply["detail"]


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _lying_npy() -> bytes:
    """A .npy header declaring 1000 float64 (8000 bytes) in front of 24 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": (1000,)})
    return buf.getvalue() + b"\0" * 24


@pytest.mark.parametrize(("members", "needle"), [
    ({f"a{i}.npy": b"" for i in range(20)}, "members"),
    ({"x_train.npy": _npy(np.zeros(3)), "notes.txt": b"hi"}, "not a .npy"),
    ({"x_train.npy": b"\x93NUMPY garbage"}, "not a valid .npy"),
    ({"x_train.npy": _lying_npy()}, "declares shape"),
    ({"x_train.npy": _npy(np.array([{"a": 1}], dtype=object))}, "pickled"),
])
def test_malformed_npz_is_422(tmp_path, capsys, members, needle):
    _zip(tmp_path / "a.npz", members)
    reply = dataset(tmp_path / "a.npz", capsys)
    assert reply["ok"] is False and reply["status"] == 422, reply
    assert reply["error"] == "InvalidDataset" and needle in reply["detail"], reply


def test_truncated_npz_is_422(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", **good_arrays())
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "a.npz").write_bytes(data[: len(data) // 2])
    reply = dataset(tmp_path / "a.npz", capsys)
    assert reply["status"] == 422 and "truncated" in reply["detail"]


# ---- the model is built holding its weights once --------------------------------------------

def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtypes", ["float64", "mixed"])
def test_one_copy_build_matches_from_tensors(dtypes):
    torch.manual_seed(0)
    tensors = {k: v.clone() for k, v in zoo.build(ARCH).state_dict().items()}
    if dtypes == "float64":
        tensors = {k: v.double() for k, v in tensors.items()}
    else:
        tensors["fc1.weight"] = tensors["fc1.weight"].half()
    expected = zoo.from_tensors(ARCH, {k: v.clone() for k, v in tensors.items()})
    built = build_from_upload(ARCH, tensors)
    _same(built, expected)
    assert not any(p.is_meta for p in built.parameters())


def test_one_copy_build_refuses_what_from_tensors_refuses():
    tensors = {k: v.clone() for k, v in zoo.build(ARCH).state_dict().items()}
    tensors["fc2.weight"][0, 0] = float("nan")
    with pytest.raises(Exception, match="non-finite"):
        build_from_upload(ARCH, tensors)


def test_tied_tensors_take_the_copying_path():
    tensors = {k: v.clone() for k, v in zoo.build(ARCH).state_dict().items()}
    tensors["fc1.bias"] = tensors["fc1.weight"][0, :8]  # shares fc1.weight's storage
    built = build_from_upload(ARCH, tensors)
    assert built.fc1.bias.untyped_storage().data_ptr() != \
        built.fc1.weight.untyped_storage().data_ptr()


def test_invalid_checkpoint_error_class_is_kept(tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(b"short")
    inspector = Inspector(Settings(home=tmp_path / "home"))
    with pytest.raises(InvalidCheckpoint):
        asyncio.run(inspector.checkpoint(src, "safetensors", ARCH, tmp_path / "o"))
