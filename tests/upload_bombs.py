"""Hostile upload files for the limit tests: a zip-bomb `.npz` (a few MB that inflate to GiBs,
a valid zip numpy would load) and a safetensors file with a huge header."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

CHUNK = 8 * 1024 * 1024


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    text += " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _deflate_zeros(prefix: bytes, zeros: int) -> tuple[list[bytes], int, int, int]:
    """A raw deflate stream of `prefix` + `zeros` zero bytes as (pieces, repeat count of
    pieces[1], crc, compressed size): one fully flushed 8 MiB block of zeros is repeated, so
    nothing of the inflated size is ever compressed or held."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero = bytes(CHUNK)
    chunks, rest = divmod(zeros, CHUNK)
    first = co.compress(prefix) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(zero) + co.flush(zlib.Z_FULL_FLUSH) if chunks else b""
    last = co.compress(bytes(rest)) + co.flush()
    crc = zlib.crc32(prefix)
    for _ in range(chunks):
        crc = zlib.crc32(zero, crc)
    crc = zlib.crc32(bytes(rest), crc)
    return [first, block, last], chunks, crc, len(first) + chunks * len(block) + len(last)


def write_zip(path: Path, members: list[tuple[str, bytes, int]]) -> int:
    """A zip64-sized zip of deflated members (name, prefix bytes, then that many zero bytes);
    returns the file size."""
    central = b""
    with open(path, "wb") as f:
        for name, prefix, zeros in members:
            (first, block, last), repeat, crc, csize = _deflate_zeros(prefix, zeros)
            usize, offset, fname = len(prefix) + zeros, f.tell(), name.encode()
            extra = struct.pack("<HHQQ", 1, 16, usize, csize)
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 8, 0, 0x21, crc,
                                0xFFFFFFFF, 0xFFFFFFFF, len(fname), len(extra)) + fname + extra)
            f.write(first)
            f.writelines(block for _ in range(repeat))
            f.write(last)
            cd_extra = struct.pack("<HHQQQ", 1, 24, usize, csize, offset)
            central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 8, 0, 0x21, crc,
                                   0xFFFFFFFF, 0xFFFFFFFF, len(fname), len(cd_extra), 0, 0, 0, 0,
                                   0xFFFFFFFF) + fname + cd_extra
        cd_offset = f.tell()
        f.write(central)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                            len(central), cd_offset, 0))
        return f.tell()


def zip_bomb_npz(path: Path, inflated_bytes: int = 2 * 1024**3, name: str = "x_train") -> int:
    """An `.npz` whose one member is a float32 `.npy` of zeros inflating to about
    `inflated_bytes` (a few MB for GiBs; numpy would load it); returns the file size. Built in
    about a second per 2 GiB (the CRC)."""
    header = _npy_header((inflated_bytes // 4 // 64, 64))
    return write_zip(path, [(f"{name}.npy", header, inflated_bytes // 4 // 64 * 64 * 4)])


def zip_bomb_pt(path: Path, inflated_bytes: int = 2 * 1024**3, key: str = "fc1.weight") -> int:
    """A `.pt` state dict (torch.save's zip format, members deflated) holding one float32
    tensor of zeros of about `inflated_bytes`: torch.load(weights_only=True) accepts it and
    allocates the whole tensor. Returns the file size."""
    import io
    import zipfile

    import torch

    template = 70001  # a BININT no other field of the pickle holds
    numel = inflated_bytes // 4
    buf = io.BytesIO()
    torch.save({key: torch.zeros(template)}, buf)
    members = []
    with zipfile.ZipFile(buf) as zf:
        for info in zf.infolist():
            data = zf.read(info)
            if info.filename.endswith("data.pkl"):
                old, new = struct.pack("<i", template), struct.pack("<i", numel)
                assert data.count(old) == 2, data
                members.append((info.filename, data.replace(old, new), 0))
            elif info.filename.endswith("data/0"):
                members.append((info.filename, b"", numel * 4))
            else:
                members.append((info.filename, data, 0))
    return write_zip(path, members)


def huge_header_safetensors(path: Path, header_bytes: int = 92 * 1024 * 1024) -> int:
    """A well-formed safetensors file (one 4-byte tensor) whose JSON header is padded with
    metadata to about `header_bytes`; returns the file size."""
    meta_len = max(0, header_bytes - 200)
    head = {"__metadata__": {"pad": "x" * meta_len},
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(head).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(b"\0\0\0\0")
        return f.tell()


# ---- hostile .pt2 archives (torch.export.save's zip format), built from an honest one ----

class Reduce:
    """Unpickling this runs `touch <marker>` (what a hostile pickle does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def read_entries(path: Path) -> dict[str, bytes]:
    """The entries of a zip, in order (name -> bytes)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def write_entries(path: Path, entries: dict[str, bytes]) -> Path:
    """A zip of `entries`, stored (as torch.export.save writes them)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _root(entries: dict[str, bytes]) -> str:
    return next(iter(entries)).split("/")[0]


def _torch_save(obj: object) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pt2_pickled_constant(src: Path, dest: Path, marker: Path) -> Path:
    """An honest archive plus a constant stored with `use_pickle` whose pickle runs
    `touch marker` (torch.export.load reads it with weights_only=False)."""
    entries = read_entries(src)
    root = _root(entries)
    cfg_name = f"{root}/data/constants/model_constants_config.json"
    config = json.loads(entries[cfg_name])
    config["config"]["evil"] = {
        "path_name": "tensor_0", "is_param": False, "use_pickle": True,
        "tensor_meta": {"dtype": 7, "sizes": [{"as_int": 1}], "requires_grad": False,
                        "device": {"type": "cpu", "index": None},
                        "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0},
                        "layout": 7}}
    entries[cfg_name] = json.dumps(config).encode()
    entries[f"{root}/data/constants/tensor_0"] = _torch_save(Reduce(marker))
    return write_entries(dest, entries)


def pt2_pickled_sample_inputs(src: Path, dest: Path, marker: Path) -> Path:
    """An honest archive whose sample inputs hold a pickle that runs `touch marker`
    (torch.export.load retries them with weights_only=False)."""
    entries = read_entries(src)
    entries[f"{_root(entries)}/data/sample_inputs/model.pt"] = _torch_save(
        ((Reduce(marker),), {}))
    return write_entries(dest, entries)


def pt2_with_entry(src: Path, dest: Path, name: str, data: bytes = b"\x7fELF") -> Path:
    """An honest archive plus one more entry; `name` is relative to the archive's folder
    unless it starts with '!' (then it is the raw entry name)."""
    entries = read_entries(src)
    entries[name[1:] if name.startswith("!") else f"{_root(entries)}/{name}"] = data
    return write_entries(dest, entries)


def pt2_edit_program(src: Path, dest: Path, edit: object) -> Path:
    """An honest archive whose models/model.json went through `edit(program) -> None`."""
    entries = read_entries(src)
    name = f"{_root(entries)}/models/model.json"
    program = json.loads(entries[name])
    edit(program)  # type: ignore[operator]
    entries[name] = json.dumps(program).encode()
    return write_entries(dest, entries)


def pt2_zip_bomb(path: Path, inflated_bytes: int = 2 * 1024**3) -> int:
    """A pt2-shaped archive whose one weight file is deflated zeros inflating to about
    `inflated_bytes`; returns the file size."""
    config = {"config": {"w": {
        "path_name": "weight_0", "is_param": True, "use_pickle": False,
        "tensor_meta": {"dtype": 7, "sizes": [{"as_int": inflated_bytes // 4}],
                        "requires_grad": True, "device": {"type": "cpu", "index": None},
                        "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0},
                        "layout": 7}}}}
    return write_zip(path, [
        ("model/archive_format", b"pt2", 0), ("model/archive_version", b"0", 0),
        ("model/byteorder", b"little", 0),
        ("model/models/model.json", b'{"graph_module": {}}', 0),
        ("model/data/weights/model_weights_config.json", json.dumps(config).encode(), 0),
        ("model/data/constants/model_constants_config.json", b'{"config": {}}', 0),
        ("model/data/weights/weight_0", b"", inflated_bytes // 4 * 4)])


# ---- hostile / unsupported ONNX files ----

def _onnx_linear(inputs: list[object], nodes: list[object], initializers: list[object],
                 path: Path, opset: int = 18) -> Path:
    import onnx
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def onnx_external_data(path: Path, location: str) -> Path:
    """A small linear ONNX model whose weight 'W' lives in an external file at `location`
    (relative to the upload; e.g. '../../etc/passwd')."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    weight = helper.make_tensor("W", TensorProto.FLOAT, [3, 4], [0.0] * 12)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1)
    return _onnx_linear([x], [node], [weight], path)


def onnx_custom_op(path: Path) -> Path:
    """A linear ONNX model followed by an op of a custom domain (`com.example.Scramble`)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
             helper.make_node("Scramble", ["h"], ["logits"], domain="com.example")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(nodes, "g", [x], [out], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def onnx_integer_input(path: Path) -> Path:
    """An ONNX model whose only input is int64 (token ids): no floating input."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "W")
    nodes = [helper.make_node("Cast", ["ids"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["xf", "W"], ["logits"], transB=1)]
    return _onnx_linear([x], nodes, [weight], path)
