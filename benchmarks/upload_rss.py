"""The API process's memory for a large model upload and a large dataset upload.

Starts a real `uvicorn api.app:app` (SQLite, local store, the real `worker.inspect` inspector)
with SLIMLINE_MAX_UPLOAD_BYTES raised for the run, warms it up with a small upload, then uploads
a model checkpoint (an MLP whose safetensors file is about --size-mb MB) and a dataset (an
uncompressed `.npz` of float32 images and int64 labels, about --size-mb MB). For each it
records, relative to the API's VmRSS before the upload:

* peak: the API's VmHWM after the upload minus that baseline (the high-water mark covers the
  whole request: receiving, inspecting, hashing, storing);
* steady: the API's VmRSS once the answer is back;
* the inspector subprocess's own peak RSS (its VmHWM, polled every 20 ms), the HTTP status and
  the wall time of the request.

    python benchmarks/upload_rss.py                    # 1024 MB each
    python benchmarks/upload_rss.py --size-mb 256 --code /path/to/other/checkout --label before

Markdown table to stdout, everything to benchmarks/out/upload_rss[-LABEL].json. Needs about
4x --size-mb of free disk (inputs, the received upload, the normalized copy, the store).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also runs as `python benchmarks/upload_rss.py`
from benchmarks.common import dump_results, run_meta  # noqa: E402

MB = 1000 * 1000
MiB = 1024 * 1024
_SETUP = """\
import sys
from service.auth import create_api_key
from service.db import session_scope, upgrade_db
from service.settings import Settings
s = Settings()
upgrade_db(s)
with session_scope(s) as session:
    print(create_api_key(session, "bench", "bench"))
"""


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


class ChildPeak(threading.Thread):
    """Polls the API's child processes (the inspector) and keeps their largest VmHWM."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for kid in _children(self.pid):
                self.peak = max(self.peak, _status(kid).get("VmHWM", 0))
            time.sleep(0.02)


def make_model(path: Path, size_mb: int) -> dict[str, Any]:
    """An MLP on 1x128x128 inputs with one hidden layer sized to make about size_mb MB."""
    inputs = 128 * 128
    hidden = max(8, int(size_mb * MB / 4 / (inputs + 11)))
    arch = {"name": "mlp", "input_shape": [1, 128, 128], "widths": [hidden]}
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    scale = np.float32(1 / np.sqrt(inputs))
    tensors = {"fc1.weight": rng.standard_normal((hidden, inputs), dtype=np.float32) * scale,
               "fc1.bias": np.zeros(hidden, np.float32),
               "fc2.weight": rng.standard_normal((10, hidden), dtype=np.float32) * scale,
               "fc2.bias": np.zeros(10, np.float32)}
    save_file(tensors, str(path))
    return arch


def make_dataset(path: Path, size_mb: int) -> None:
    n = int(size_mb * MB / (28 * 28 * 4 + 8))
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    np.savez(path, x_train=x, y_train=y)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(code: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    fh = open(log, "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    fh.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the API did not start")


def upload(http: httpx.Client, pid: int, route: str, path: Path, filename: str,
           data: dict[str, str]) -> dict[str, Any]:
    before = _status(pid)["VmRSS"]
    watcher = ChildPeak(pid)
    watcher.start()
    t0 = time.monotonic()
    with open(path, "rb") as f:
        r = http.post(route, files={"file": (filename, f)}, data=data)
    wall = time.monotonic() - t0
    watcher.stop.set()
    watcher.join()
    after = _status(pid)
    return {"route": route, "file_mb": round(path.stat().st_size / MB, 1),
            "status": r.status_code, "detail": "" if r.is_success else r.text[:300],
            "wall_s": round(wall, 2), "api_rss_before_mb": round(before / MB, 1),
            "api_peak_growth_mb": round((after["VmHWM"] - before) / MB, 1),
            "api_steady_growth_mb": round((after["VmRSS"] - before) / MB, 1),
            "inspector_peak_mb": round(watcher.peak / MB, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="the checkout whose API is measured (default: this one)")
    parser.add_argument("--label", default="")
    parser.add_argument("--inspect-memory-mb", type=int, default=0,
                        help="SLIMLINE_INSPECT_MEMORY_BYTES in MiB (default: the setting's)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="upload-rss-", dir=args.workdir))
    need = 5 * args.size_mb * MB
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"not enough free disk under {work}: {free / 1e9:.1f} GB, need "
              f"{need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    proc = None
    try:
        t = time.monotonic()
        model, data = work / "model.safetensors", work / "data.npz"
        arch = make_model(model, args.size_mb)
        make_dataset(data, args.size_mb)
        print(f"inputs ready in {time.monotonic() - t:.1f} s", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
        env |= {"SLIMLINE_HOME": str(work / "home"), "SLIMLINE_AUTH": "on",
                "SLIMLINE_BROKER_URL": "filesystem://", "SLIMLINE_INSPECT_TIMEOUT_S": "1200",
                "SLIMLINE_INSPECT_CPU_S": "1200",
                "SLIMLINE_MAX_UPLOAD_BYTES": str(int(args.size_mb * MB * 1.1) + 64 * MiB),
                "SLIMLINE_MAX_DATASET_BYTES": str(int(args.size_mb * MB * 1.1) + 64 * MiB),
                "PYTHONPATH": str(args.code)}
        if args.inspect_memory_mb:
            env["SLIMLINE_INSPECT_MEMORY_BYTES"] = str(args.inspect_memory_mb * MiB)
        key = subprocess.run([sys.executable, "-c", _SETUP], cwd=args.code, env=env,
                             capture_output=True, text=True, check=True).stdout.split()[-1]
        proc, url = start_api(args.code, env, work / "api.log")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                          timeout=1800) as http:
            small = work / "small.npz"
            np.savez(small, x_train=np.zeros((10, 4), np.float32), y_train=np.zeros(10, int))
            warm = http.post("/v1/datasets", files={"file": ("s.npz", small.read_bytes())})
            assert warm.status_code == 201, warm.text
            rows.append(upload(http, proc.pid, "/v1/models", model, "m.safetensors",
                               {"arch": json.dumps(arch), "name": "big"}) | {"kind": "model"})
            print(rows[-1], file=sys.stderr)
            rows.append(upload(http, proc.pid, "/v1/datasets", data, "d.npz",
                               {"name": "big"}) | {"kind": "dataset"})
            print(rows[-1], file=sys.stderr)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    head = ("| upload | file MB | status | wall s | API RSS before MB | API peak growth MB "
            "| API steady growth MB | inspector peak MB |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['file_mb']} | {r['status']} | {r['wall_s']} | "
              f"{r['api_rss_before_mb']} | {r['api_peak_growth_mb']} | "
              f"{r['api_steady_growth_mb']} | {r['inspector_peak_mb']} |" for r in rows]
    table = "\n".join(lines)
    name = "upload_rss" + (f"-{args.label}" if args.label else "") + ".json"
    meta = run_meta(args, complete=len(rows) == 2, runtime=time.monotonic() - started,
                    cpus=os.cpu_count())
    print(dump_results(ROOT / "benchmarks" / "out" / name, meta, rows, rows, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
