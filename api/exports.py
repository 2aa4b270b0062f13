"""On-demand exports of a model to ONNX or a torch.export program, for `GET
/v1/models/{id}/file?format=onnx|pt2` when the job that produced the model stored none.

The export runs in `python -m worker.export_file` (torch stays out of the API process) through
the inspector's machinery (api/inspect_client.py): the same RLIMIT_AS / RLIMIT_CPU, one thread,
the same wall-clock limit, and the same concurrency slots — uploads being validated and models
being exported share SLIMLINE_INSPECT_CONCURRENCY per API process, so a full house is 503
Overloaded with Retry-After. The file is exported into a private temp directory and only a
complete file is put in the store (an atomic put), at `service.model_files.export_key`: the next
download streams it. Requests of this process for the same model and format wait for the one
export under way instead of starting another; two API processes may both export once, and the
second put replaces the first with an equal file."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.inspect_client import _BOOTSTRAP, Inspector, _last_json_line, inspector_for
from service.errors import Unprocessable
from service.model_files import FORMATS, ModelFile
from service.store import ObjectStore
from service.tmpfiles import temp_dir

log = logging.getLogger(__name__)

HINT = ('or add an export step to a job (`{"op": "export", "formats": ["onnx", "pt2"]}`), '
        "whose worker has no such limit")


class ExportFailed(Unprocessable):
    """The model cannot be exported in that format (the exporter names the layer or op)."""


class Exporter(Inspector):
    """Runs `worker.export_file` under the limits, and in the slots, of the app's Inspector."""

    module = "worker.export_file"

    def __init__(self, inspector: Inspector) -> None:
        super().__init__(inspector.settings)
        self._slots = inspector._slots  # one cap for every checking or exporting child
        self._busy: dict[str, tuple[asyncio.Lock, int]] = {}  # object key -> (lock, users)

    # ---- the inspector's hooks, worded for an export --------------------------------------
    def _command(self, args: list[str]) -> list[str]:
        s = self.settings
        return [sys.executable, "-c", _BOOTSTRAP, str(s.inspect_memory_bytes),
                str(s.inspect_cpu_s), self.module, *args]

    def _memory_limit(self, what: str) -> ExportFailed:
        mib = self.settings.inspect_memory_bytes // (1024 * 1024)
        return ExportFailed(f"exporting the model needs more than {mib} MiB "
                            f"(SLIMLINE_INSPECT_MEMORY_BYTES); ask the operator to raise it, "
                            + HINT)

    def _cpu_limit(self, what: str) -> ExportFailed:
        return ExportFailed(f"exporting the model needs more than {self.settings.inspect_cpu_s} s "
                            "of CPU time (SLIMLINE_INSPECT_CPU_S); " + HINT)

    def _wall_limit(self, what: str) -> ExportFailed:
        return ExportFailed("exporting the model took longer than "
                            f"{self.settings.inspect_timeout_s:g} s (SLIMLINE_INSPECT_TIMEOUT_S); "
                            + HINT)

    # ---- exporting ---------------------------------------------------------------------
    async def export(self, checkpoint: Path, fmt: str, output: Path) -> dict[str, Any]:
        """Export the checkpoint at `checkpoint` to `output` in `fmt` (422 ExportFailed with the
        exporter's message, 503 Overloaded when every slot is taken)."""
        run = await self._run(["--input", str(checkpoint), "--format", fmt,
                               "--output", str(output)], "export")
        reply = _last_json_line(run.stdout)
        if reply is None:
            self._verdict(run, "export")  # raises: a limit, or a crash without a reply
            raise AssertionError("unreachable")  # pragma: no cover
        if not reply.get("ok"):
            if reply.get("limit") == "memory":
                raise self._memory_limit("export")
            raise ExportFailed(str(reply.get("detail") or f"the model cannot be exported to "
                                                          f"{fmt}"))
        if not output.is_file():
            raise ExportFailed(f"the exporter reported success but wrote no {fmt} file")
        return reply

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        """One export of `key` at a time in this process (the others wait for it)."""
        lock, users = self._busy.get(key, (asyncio.Lock(), 0))
        self._busy[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._busy[key]
            if users <= 1:
                del self._busy[key]
            else:
                self._busy[key] = (lock, users - 1)

    async def ensure_stored(self, file: ModelFile, store: ObjectStore, tmp_root: Path
                            ) -> ModelFile:
        """`file` in the store: exported from its checkpoint and put at `file.key` unless a
        concurrent request did so first. Nothing is stored when the export fails."""
        if file.stored:
            return file
        async with self._exclusive(file.key):
            if await run_in_threadpool(store.exists, file.key):
                return dataclasses.replace(file, stored=True)
            with temp_dir(tmp_root, "export") as tmp:
                checkpoint = tmp / "model.safetensors"
                output = tmp / f"model{FORMATS[file.fmt]}"
                await run_in_threadpool(store.get_to_file, file.checkpoint_key, checkpoint)
                reply = await self.export(checkpoint, file.fmt, output)
                size = output.stat().st_size
                await run_in_threadpool(store.put_file, file.key, output)
            log.info("model %s exported to %s on demand (%d bytes, %s)", file.model_id,
                     file.fmt, size, reply.get("exporter", "torch.export"))
            return dataclasses.replace(file, stored=True, size_bytes=size)


def exporter_for(app: FastAPI) -> Exporter:
    """The app's Exporter (made on first use, sharing the Inspector's slots)."""
    exporter = getattr(app.state, "exporter", None)
    if exporter is None:
        exporter = app.state.exporter = Exporter(inspector_for(app))
    return exporter
