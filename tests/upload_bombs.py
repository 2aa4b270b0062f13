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


def zip_bomb_npz(path: Path, inflated_bytes: int = 2 * 1024**3, name: str = "x_train") -> int:
    """Write an `.npz` whose one member is a float32 `.npy` of zeros inflating to about
    `inflated_bytes` (a multiple of 8 MiB); returns the file size. The deflate stream repeats
    one fully flushed block, so it is built in about a second per 2 GiB (the CRC)."""
    header = _npy_header((inflated_bytes // 4 // 64, 64))
    chunks = inflated_bytes // CHUNK
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = co.compress(header) + co.flush(zlib.Z_FULL_FLUSH)
    zero = bytes(CHUNK)
    block = co.compress(zero) + co.flush(zlib.Z_FULL_FLUSH)
    tail = co.flush()
    crc = zlib.crc32(header)
    for _ in range(chunks):
        crc = zlib.crc32(zero, crc)
    usize = len(header) + chunks * CHUNK
    csize = len(first) + chunks * len(block) + len(tail)
    fname = f"{name}.npy".encode()
    local_extra = struct.pack("<HHQQ", 1, 16, usize, csize)
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                        0xFFFFFFFF, len(fname), len(local_extra)) + fname + local_extra
    with open(path, "wb") as f:
        f.write(local + first)
        for _ in range(chunks):
            f.write(block)
        f.write(tail)
        cd_offset = f.tell()
        cd_extra = struct.pack("<HHQQQ", 1, 24, usize, csize, 0)
        central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 8, 0, 0x21, crc,
                              0xFFFFFFFF, 0xFFFFFFFF, len(fname), len(cd_extra), 0, 0, 0, 0,
                              0xFFFFFFFF) + fname + cd_extra
        f.write(central)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), cd_offset, 0))
        return f.tell()


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
