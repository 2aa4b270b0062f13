"""Checkpoint and dataset validation in a subprocess, so torch, numpy and the uploaded arrays stay
out of the API process.

Protocol: `python -m <settings.inspect_module> --kind model|dataset --input IN --format FMT
--arch JSON|'' --output OUT [--options JSON --graph-output G --report-output R]
--max-header-bytes N --max-dataset-bytes N --max-ratio R` prints one JSON line on stdout (the
last non-empty line is read):
* model: `{"ok": true, "arch": {...normalized...}, "params": {"total", "trainable", "nonzero"},
  "report": R|null, "graph": {"sha", "path": G}|null}` after writing the normalized safetensors
  checkpoint to OUT, its prunability report (JSON) to R and, for an imported graph (.pt2/.onnx,
  or a re-uploaded imported model), its canonical graph IR to G (big documents travel as files:
  only the tail of stdout is kept);
* dataset: `{"ok": true, "meta": {"input_shape", "counts", "num_classes"}}`;
* either: `{"ok": false, "status": 413|415|422, "error": "...", "detail": "..."}`, with
  `"limit": "memory"` when the inspector ran out of its address space.

The child's environment forces `torch.load(weights_only=True)` for every load
(`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`; a `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` of the API's
environment is dropped). Limits: the child runs with RLIMIT_AS = inspect_memory_bytes,
RLIMIT_CPU = inspect_cpu_s (set by a tiny bootstrap before the inspector module is imported, so
they hold whatever the module is), one BLAS/OpenMP thread and two malloc arenas, and is killed
after inspect_timeout_s of wall-clock time. At most inspect_concurrency inspectors run per API
process; a request waits up to inspect_queue_s for a slot, else 503 Overloaded with Retry-After."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service.errors import (
    InvalidCheckpoint,
    InvalidDataset,
    Overloaded,
    SlimlineError,
    Unavailable,
    UnsupportedFormat,
    UploadTooLarge,
)
from service.settings import Settings
from service.textcheck import plain_text

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_LIMIT = 64 * 1024  # bytes kept of the child's stdout and of its stderr (the tails)
RETRY_AFTER_S = 5.0

# Runs in the child: cap its address space and CPU time (never above a lower hard limit already
# set), no core files, then run the inspector module as __main__ with the remaining arguments.
_BOOTSTRAP = """\
import resource, runpy, sys
def cap(which, soft, hard):
    _, old = resource.getrlimit(which)
    if old != resource.RLIM_INFINITY:
        soft, hard = min(soft, old), min(hard, old)
    resource.setrlimit(which, (soft, hard))
cap(resource.RLIMIT_AS, int(sys.argv[1]), int(sys.argv[1]))
cap(resource.RLIMIT_CPU, int(sys.argv[2]), int(sys.argv[2]) + 5)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = sys.argv[3:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS")
MAX_REPORT_BYTES = 32 * 1024 * 1024  # a prunability report read back from the child
_SHA = re.compile(r"[0-9a-f]{64}\Z")


@dataclass
class Inspection:
    arch: dict[str, Any]
    params: dict[str, int]
    report: dict[str, Any] | None = None  # the prunability report
    graph: tuple[str, Path] | None = None  # an imported graph: (sha256, canonical IR file)


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                return None
            return reply if isinstance(reply, dict) else None
    return None


async def _tail(stream: asyncio.StreamReader | None) -> bytes:
    """Read a pipe to its end, keeping only the last OUTPUT_LIMIT bytes."""
    kept = bytearray()
    if stream is None:
        return b""
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > 2 * OUTPUT_LIMIT:
            del kept[:-OUTPUT_LIMIT]
    return bytes(kept[-OUTPUT_LIMIT:])


@dataclass
class _Run:
    returncode: int
    stdout: str
    stderr: str


class Inspector:
    """The inspector subprocesses of one API process (one per app: its concurrency slots)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.inspect_concurrency)

    # ---- limits -------------------------------------------------------------------------
    def _memory_limit(self, what: str) -> SlimlineError:
        mib = self.settings.inspect_memory_bytes // (1024 * 1024)
        return UploadTooLarge(f"the {what} is too large to validate within {mib} MiB "
                              "(SLIMLINE_INSPECT_MEMORY_BYTES); upload a smaller one or ask the "
                              "operator to raise the limit")

    def _cpu_limit(self, what: str) -> SlimlineError:
        return UploadTooLarge(f"the {what} is too large to validate within "
                              f"{self.settings.inspect_cpu_s} s of CPU time "
                              "(SLIMLINE_INSPECT_CPU_S); upload a smaller one")

    def _wall_limit(self, what: str) -> SlimlineError:
        return UploadTooLarge(f"validating the {what} took longer than "
                              f"{self.settings.inspect_timeout_s:g} s (SLIMLINE_INSPECT_TIMEOUT_S);"
                              f" upload a smaller {what}")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of inspect_concurrency slots, waiting at most inspect_queue_s (503 otherwise)."""
        wait = self.settings.inspect_queue_s
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: taken at once
        elif wait <= 0:
            raise self._overloaded()
        else:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout=wait)
            except TimeoutError:
                raise self._overloaded() from None
        try:
            yield
        finally:
            self._slots.release()

    def _overloaded(self) -> Overloaded:
        s = self.settings
        return Overloaded(f"{s.inspect_concurrency} uploads or exports are running already "
                          f"(SLIMLINE_INSPECT_CONCURRENCY) and no slot freed within "
                          f"{s.inspect_queue_s:g} s (SLIMLINE_INSPECT_QUEUE_S); try again in a "
                          "few seconds", retry_after=RETRY_AFTER_S)

    # ---- running the child --------------------------------------------------------------
    def _command(self, args: list[str]) -> list[str]:
        s = self.settings
        return [sys.executable, "-c", _BOOTSTRAP, str(s.inspect_memory_bytes),
                str(s.inspect_cpu_s), s.inspect_module, *args,
                "--max-header-bytes", str(s.max_safetensors_header_bytes),
                "--max-dataset-bytes", str(s.max_dataset_bytes),
                "--max-ratio", repr(float(s.max_decompression_ratio))]

    async def _run(self, args: list[str], what: str) -> _Run:
        env = dict(os.environ) | dict.fromkeys(_ONE_THREAD, "1")
        # every torch.load in the child reads weights only (no pickle runs code), whatever the
        # call site asks for
        env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        # each malloc arena reserves 64 MiB of address space: keep RLIMIT_AS for real data
        env["MALLOC_ARENA_MAX"] = "2"
        async with self.slot():
            proc = await asyncio.create_subprocess_exec(
                *self._command(args), cwd=REPO_ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
            try:
                out, err, returncode = await asyncio.wait_for(
                    asyncio.gather(_tail(proc.stdout), _tail(proc.stderr), proc.wait()),
                    timeout=self.settings.inspect_timeout_s)
            except TimeoutError:
                raise self._wall_limit(what) from None
            finally:
                if proc.returncode is None:  # timed out, or the request was cancelled
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await asyncio.shield(proc.wait())
        return _Run(returncode, out.decode("utf-8", "replace"),
                    err.decode("utf-8", "replace"))

    def _verdict(self, run: _Run, what: str) -> dict[str, Any]:
        """The child's reply, or the error its exit stands for."""
        reply = _last_json_line(run.stdout)
        rc, stderr = run.returncode, run.stderr
        if reply is None:
            log.error("%s inspector exited %s without a reply; stderr:\n%s", what, rc,
                      stderr[-4000:])
            if rc == -signal.SIGXCPU:
                raise self._cpu_limit(what)
            if rc in (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS) or \
                    "MemoryError" in stderr[-2000:] or "can't allocate memory" in stderr[-2000:]:
                # an allocation past RLIMIT_AS (or the kernel's OOM killer) ends the child so
                raise self._memory_limit(what)
            raise Unavailable(f"the {what} inspector failed (exit {rc}) without a verdict; "
                              "the error is in the API log. Try again later")
        if reply.get("ok"):
            return reply
        detail = plain_text(str(reply.get("detail") or "")) or f"the {what} is not valid"
        if reply.get("limit") == "memory":
            raise self._memory_limit(what)
        status = reply.get("status")
        if status == 415:
            raise UnsupportedFormat(detail)
        if status == 413:
            raise UploadTooLarge(detail)
        raise InvalidDataset(detail) if what == "dataset" else InvalidCheckpoint(detail)

    # ---- the two checks -----------------------------------------------------------------
    async def checkpoint(self, source: Path, fmt: str, arch: dict[str, Any] | None,
                         output: Path, options: dict[str, Any] | None = None) -> Inspection:
        """Validate `source` and write the normalized checkpoint to `output` (the report and an
        imported graph go next to it); `options` are the upload's preprocessing fields
        (`service.model_registry.parse_import_options`)."""
        graph_out = output.with_name(output.stem + ".graph.json")
        report_out = output.with_name(output.stem + ".report.json")
        run = await self._run(["--kind", "model", "--input", str(source), "--format", fmt,
                               "--arch", json.dumps(arch) if arch else "",
                               "--output", str(output),
                               "--options", json.dumps(options or {}),
                               "--graph-output", str(graph_out),
                               "--report-output", str(report_out)], "model")
        reply = self._verdict(run, "model")
        if not output.is_file():
            raise Unavailable("the checkpoint inspector reported success but wrote no output file")
        try:
            inspection = Inspection(arch=dict(reply["arch"]),
                                    params={k: int(v) for k, v in reply["params"].items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            raise Unavailable("the checkpoint inspector gave a malformed reply") from None
        if reply.get("report"):
            inspection.report = _read_json(report_out, "prunability report")
        graph = reply.get("graph")
        if graph:
            sha = graph.get("sha") if isinstance(graph, dict) else None
            if not isinstance(sha, str) or not _SHA.match(sha) or not graph_out.is_file() \
                    or inspection.arch.get("graph") != sha:
                raise Unavailable("the checkpoint inspector gave a malformed graph reply")
            inspection.graph = (sha, graph_out)
        return inspection

    async def dataset(self, source: Path, fmt: str) -> dict[str, Any]:
        """Validate an uploaded dataset file; returns its meta (input_shape, counts,
        num_classes)."""
        run = await self._run(["--kind", "dataset", "--input", str(source), "--format", fmt,
                               "--arch", "", "--output", ""], "dataset")
        meta = self._verdict(run, "dataset").get("meta")
        if not isinstance(meta, dict):
            raise Unavailable("the dataset inspector gave a malformed reply")
        return meta


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object the child wrote (bounded), or 503: the child said it wrote it."""
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise Unavailable(f"the inspector's {what} is over {MAX_REPORT_BYTES} bytes")
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        raise Unavailable(f"the checkpoint inspector wrote no readable {what}") from None
    if not isinstance(value, dict):
        raise Unavailable(f"the checkpoint inspector's {what} is not a JSON object")
    return value


def inspector_for(app: FastAPI) -> Inspector:
    """The app's Inspector (made on first use, so its slots are per API process)."""
    inspector = getattr(app.state, "inspector", None)
    if inspector is None:
        inspector = app.state.inspector = Inspector(app.state.settings)
    return inspector
