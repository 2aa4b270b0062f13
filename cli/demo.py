"""`slimline demo`: the embedded stack end to end, no servers needed.

Starts `slimline up` (SQLite, Celery filesystem broker, local store, auth off) on a free port,
trains LeNet-300-100 for one epoch on Fashion-MNIST locally meanwhile, uploads it over HTTP,
runs train → PCN → train → evaluate → export (ONNX) as a job and, from the same upload, the same
plan without the pcn step as a second job (the dense reference: trained for the same total
epochs, with the same schedule and seed), downloads the compressed result, re-evaluates it
locally and prints a table of the uploaded model, the dense reference and the compressed model,
with both exported ONNX files' bytes and onnxruntime latencies as the worker measured them.
Exits non-zero if anything fails; always stops the stack.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from cli.client import checked, fetch_model, watch_job
from cli.processes import stop_process
from core import models as zoo
from core.data import fashion_mnist, split
from core.metrics import count_macs, param_counts
from core.train import TrainConfig, evaluate, train
from service.settings import Settings
from worker.datasets import locate_fashion_mnist

MARKER = ".slimline-demo"
SEED = 0
ARCH = {"name": "lenet300"}
# PCN on every dense layer (seed 000, MNIST setting: keep eigenvalues > 0.1). fc1's input is the
# raw image: its 784 pixels have ~53 directions with variance > 0.1, which is where the
# parameters are.
PIPELINE: list[dict[str, Any]] = [
    {"op": "train", "epochs": 1, "optimizer": "adam", "lr": 0.001, "batch_size": 128},
    {"op": "pcn", "layers": ["fc1", "fc2", "fc3"], "select": {"threshold": 0.1},
     "samples": 5000},
    {"op": "train", "epochs": 2, "optimizer": "adam", "lr": 0.001, "batch_size": 128},
    {"op": "evaluate"},
    # ONNX through the torch.export-based exporter, verified against torch and timed with
    # onnxruntime (batch 1 and 256) by the worker; the job's last step
    {"op": "export", "formats": ["onnx"]},
]
# The dense reference: the same plan from the same upload, without the transform, so both
# models have seen the same epochs (1 local + 3 in the job) with the same optimiser resets.
REFERENCE = [step for step in PIPELINE if step["op"] != "pcn"]
LOCAL_EPOCHS = 1
JOB_EPOCHS = sum(step.get("epochs", 0) for step in PIPELINE if step["op"] == "train")
ORT_NOTE = "CPU execution provider, all graph optimisations"
# Settings the demo never takes from the caller's environment: it always runs embedded.
SERVER_VARS = ("SLIMLINE_DATABASE_URL", "SLIMLINE_BROKER_URL", "SLIMLINE_STORAGE_URL",
               "SLIMLINE_S3_ENDPOINT_URL", "SLIMLINE_AUTH", "SLIMLINE_HOME")


class DemoError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_home(home: Path) -> Path:
    """(Re)create the demo directory; refuse to wipe one the demo did not make."""
    home = home.expanduser().resolve()
    if home.exists():
        if any(home.iterdir()) and not (home / MARKER).exists():
            raise DemoError(f"{home} exists and is not a demo directory; pass --home elsewhere")
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / MARKER).write_text("created by `slimline demo`; deleted by the next run\n")
    return home


def start_stack(home: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(home / "stack.log", "wb")  # noqa: SIM115 - the child holds it; closed at exit
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--home", str(home), "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)


def wait_ready(http: Any, stack: subprocess.Popen[bytes], home: Path, timeout: float = 180.0
               ) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise DemoError(f"the stack exited with {stack.returncode}; see {home}/stack.log")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DemoError(f"the API was not ready after {timeout:g} s; see {home}/stack.log")


def train_locally(settings: Settings, path: Path, console: Console) -> dict[str, Any]:
    """LeNet-300-100 trained for one epoch, saved with core.models.save; returns its numbers."""
    directory = locate_fashion_mnist(settings)
    train_set, test_set = fashion_mnist(directory)
    splits = split(train_set, test_set, SEED)
    model = zoo.build(ARCH, generator=torch.Generator().manual_seed(SEED))
    console.print(f"training LeNet-300-100 for {LOCAL_EPOCHS} epoch on Fashion-MNIST "
                  f"({directory}) ...")
    start = time.perf_counter()
    train(model, splits, TrainConfig(epochs=LOCAL_EPOCHS, batch_size=128),
          generator=torch.Generator().manual_seed(SEED))
    wall_s = time.perf_counter() - start
    zoo.save(model, path)
    return {"params": param_counts(model), "macs": count_macs(model, [1, 28, 28]),
            "accuracy": evaluate(model, test_set)["accuracy"], "wall_s": wall_s,
            "size": path.stat().st_size, "test": test_set}


def plan_text(steps: list[dict[str, Any]]) -> str:
    def one(step: dict[str, Any]) -> str:
        if step["op"] == "train":
            return f"train {step['epochs']}"
        if step["op"] == "pcn":
            return f"pcn (threshold {step['select']['threshold']:g})"
        if step["op"] == "export":
            return f"export ({', '.join(step['formats'])})"
        return str(step["op"])

    return " → ".join(one(step) for step in steps)


def submit(http: Any, model_id: str, steps: list[dict[str, Any]], label: str,
           console: Console) -> str:
    spec = {"model": model_id, "dataset": "fashion-mnist", "steps": steps, "seed": SEED}
    job = checked(http.post("/v1/jobs", json=spec))
    console.print(f"submitted job {job['id']} ({label}): {plan_text(steps)}")
    return str(job["id"])


def finished(http: Any, job_id: str, console: Console) -> dict[str, Any]:
    start = time.perf_counter()
    job = watch_job(http, job_id, timeout=900)
    job["client_wall_s"] = time.perf_counter() - start
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        raise DemoError(f"job {job['id']} {job['status']}: {error.get('code')}: "
                        f"{error.get('message')}")
    return job


def compress_over_http(http: Any, checkpoint: Path, console: Console
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload, then the compression job and the dense-reference job (the worker runs them one
    after the other); returns both finished jobs (compressed, reference)."""
    with open(checkpoint, "rb") as f:
        model = checked(http.post("/v1/models", data={"name": "lenet300-demo"},
                                  files={"file": (checkpoint.name, f)}))
    console.print(f"uploaded model {model['id']} ({model['params']['total']:,} params)")
    compressed_id = submit(http, model["id"], PIPELINE, "compression", console)
    reference_id = submit(http, model["id"], REFERENCE, "dense reference, same epochs",
                          console)
    return finished(http, compressed_id, console), finished(http, reference_id, console)


def results_table(before: dict[str, Any], reference: dict[str, Any], after: dict[str, Any],
                  jobs: tuple[dict[str, Any], dict[str, Any]]) -> Table:
    """Uploaded model, dense reference (same total epochs as the compressed model) and the
    compressed model; the last column compares the compressed model with the reference."""
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x smaller" if b else ""

    epochs = LOCAL_EPOCHS + JOB_EPOCHS
    table = Table(title=f"slimline demo: LeNet-300-100 on Fashion-MNIST, PCN vs dense, both "
                        f"trained {epochs} epochs in all",
                  caption=f"dense reference = the same job without the pcn step "
                          f"({plan_text(REFERENCE)}), from the same upload and seed")
    for column, justify in (("", "left"), (f"uploaded\n{LOCAL_EPOCHS} epoch", "right"),
                            (f"dense reference\n{epochs} epochs", "right"),
                            (f"PCN, downloaded\n{epochs} epochs", "right"),
                            ("PCN vs\nreference", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    bp, rp, ap = before["params"], reference["params"], after["params"]
    for label, key in (("params", "total"), ("trainable", "trainable")):
        table.add_row(label, f"{bp[key]:,}", f"{rp[key]:,}", f"{ap[key]:,}",
                      ratio(rp[key], ap[key]))
    table.add_row("test acc", f"{before['accuracy']:.4f}", f"{reference['accuracy']:.4f}",
                  f"{after['accuracy']:.4f}",
                  f"{100 * (after['accuracy'] - reference['accuracy']):+.2f} pt")
    table.add_row("MACs/sample", f"{before['macs']:,}", f"{reference['macs']:,}",
                  f"{after['macs']:,}", ratio(reference["macs"], after["macs"]))
    table.add_row("size on disk", f"{before['size'] / 1024:,.0f} KiB",
                  f"{reference['size'] / 1024:,.0f} KiB", f"{after['size'] / 1024:,.0f} KiB",
                  ratio(reference["size"], after["size"]))
    compressed_job, reference_job = jobs
    onnx = (onnx_record(reference_job), onnx_record(compressed_job))
    table.add_row("ONNX file", "", f"{onnx[0]['bytes'] / 1024:,.0f} KiB",
                  f"{onnx[1]['bytes'] / 1024:,.0f} KiB", ratio(onnx[0]["bytes"], onnx[1]["bytes"]))
    for batch in (1, 256):
        key = f"batch_{batch}"
        ref_ms, ms = onnx[0]["latency_ms"][key], onnx[1]["latency_ms"][key]
        table.add_row(f"ORT b{batch}", "", f"{ref_ms:.3f} ms", f"{ms:.3f} ms",
                      f"{ref_ms / ms:.1f}x faster" if ms else "")
    table.add_row("wall time", f"{before['wall_s']:.1f} s local",
                  f"{job_steps_s(reference_job):.1f} s job",
                  f"{job_steps_s(compressed_job):.1f} s job", "")
    return table


def onnx_record(job: dict[str, Any]) -> dict[str, Any]:
    """The export step's record of `model.onnx` (bytes, latency_ms, verification)."""
    step = next(s for s in job["result"]["steps"] if s["op"] == "export")
    return dict(step["onnx"]) | {"threads": step.get("threads")}


def job_steps_s(job: dict[str, Any]) -> float:
    return float(sum(s["wall_s"] for s in job["result"]["steps"]))


def steps_table(job: dict[str, Any], label: str) -> Table:
    table = Table(title=f"{label} job {job['id']} steps (server-side)")
    for column in ("step", "op", "wall s", "trainable", "total", "test acc", "details"):
        table.add_column(column, justify="left" if column in ("op", "details") else "right")
    for i, step in enumerate(job["result"]["steps"], 1):
        details = ""
        if step["op"] == "pcn":
            details = ", ".join(f"{n}: {v['in_dim']}→{v['dims']}"
                                for n, v in step["layers"].items())
        elif step["op"] == "train":
            details = f"val acc {step['val_accuracy']:.4f}"
        elif step["op"] == "export":
            onnx = step["onnx"]
            details = (f"onnx {onnx['bytes'] / 1024:,.0f} KiB, "
                       f"{'verified' if onnx['verified'] else 'NOT VERIFIED'} "
                       f"(Δ {onnx['relative_diff']:.0e}), ORT acc {onnx['accuracy']:.4f}")
        table.add_row(str(i), step["op"], f"{step['wall_s']:.1f}",
                      f"{step['params']['trainable']:,}", f"{step['params']['total']:,}",
                      f"{step['accuracy']:.4f}", details)
    return table


def run_demo(home: Path, *, keep: bool = True) -> int:
    import httpx

    console = Console()
    stack = None
    started = time.perf_counter()
    try:
        home = fresh_home(home)
        env = {k: v for k, v in os.environ.items() if k not in SERVER_VARS}
        env.update({"SLIMLINE_HOME": str(home), "SLIMLINE_AUTH": "off",
                    "PYTHONUNBUFFERED": "1"})
        port = free_port()
        console.print(f"starting the embedded stack in {home} on port {port} "
                      f"(log: {home / 'stack.log'})")
        stack = start_stack(home, port, env)
        data_dir = env.get("SLIMLINE_DATA_DIR")
        settings = Settings(home=home, data_dir=Path(data_dir) if data_dir else None)
        before = train_locally(settings, home / "lenet300.safetensors", console)
        test_set = before.pop("test")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            wait_ready(http, stack, home)
            job, reference_job = compress_over_http(http, home / "lenet300.safetensors",
                                                    console)
            path = home / "compressed.safetensors"
            fetch_model(http, job["result"]["model_id"], path)
        model = zoo.load(path)
        after = {"params": param_counts(model), "macs": count_macs(model, [1, 28, 28]),
                 "accuracy": evaluate(model, test_set)["accuracy"], "size": path.stat().st_size}
        server = job["result"]["after"]
        if (after["params"] != server["params"]
                or abs(after["accuracy"] - server["accuracy"]) > 1e-3):
            raise DemoError(f"the downloaded model does not match the job's report: local "
                            f"{after['params']} acc {after['accuracy']:.4f}, server "
                            f"{server['params']} acc {server['accuracy']:.4f}")
        ref = reference_job["result"]["after"]
        reference = {"params": ref["params"], "macs": ref["macs"], "accuracy": ref["accuracy"],
                     "size": ref["checkpoint_bytes"]}
        console.print(steps_table(job, "compression"))
        console.print(steps_table(reference_job, "dense reference"))
        console.print(results_table(before, reference, after, (job, reference_job)))
        threads = onnx_record(job)["threads"]
        console.print(f"ORT b1 / b256: onnxruntime latency at batch 1 / 256 ({ORT_NOTE}, "
                      f"{threads} thread(s), median of repeated runs after warm-up), measured "
                      "by each job's export step")
        console.print(f"compressed model: {path}  (core.models.load() rebuilds it)")
        console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
        return 0
    except (DemoError, OSError, httpx.HTTPError, ValueError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    except typer.Exit as exc:  # from the shared HTTP helpers, which printed the error
        return exc.exit_code or 1
    finally:
        if stack is not None:
            stop_process(stack, group=True)
        if not keep and home.exists() and (home / MARKER).exists():
            shutil.rmtree(home, ignore_errors=True)
