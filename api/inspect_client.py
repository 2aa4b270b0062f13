"""Checkpoint validation in a subprocess, so torch stays out of the API process.

Protocol: `python -m <settings.inspect_module> --input IN --format safetensors|pt --arch JSON|''
--output OUT` prints one JSON line on stdout (the last non-empty line is read):
`{"ok": true, "arch": {...normalized...}, "params": {"total", "trainable", "nonzero"}}` after
writing the normalized safetensors checkpoint to OUT, or
`{"ok": false, "status": 422|415, "error": "InvalidCheckpoint", "detail": "..."}`."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import InvalidCheckpoint, Unavailable, UnsupportedFormat
from jobs.settings import Settings

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inspection:
    arch: dict[str, Any]
    params: dict[str, int]


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def inspect_checkpoint(settings: Settings, source: Path, fmt: str, arch: dict[str, Any] | None,
                       output: Path) -> Inspection:
    """Validate `source` and write the normalized checkpoint to `output` (blocking)."""
    cmd = [sys.executable, "-m", settings.inspect_module, "--input", str(source),
           "--format", fmt, "--arch", json.dumps(arch) if arch else "", "--output", str(output)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=settings.inspect_timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise InvalidCheckpoint(f"validating the checkpoint took longer than "
                                f"{settings.inspect_timeout_s:g} s; upload a smaller model") \
            from exc
    reply = _last_json_line(proc.stdout)
    if reply is None:
        log.error("checkpoint inspector exited %s without a reply; stderr:\n%s",
                  proc.returncode, (proc.stderr or "")[-4000:])
        raise Unavailable(f"the checkpoint inspector failed (exit {proc.returncode}) without a "
                          "verdict; the error is in the API log. Try again later")
    if not reply.get("ok"):
        detail = str(reply.get("detail") or "the checkpoint is not valid")
        if reply.get("status") == 415:
            raise UnsupportedFormat(detail)
        raise InvalidCheckpoint(detail)
    if not output.is_file():
        raise Unavailable("the checkpoint inspector reported success but wrote no output file")
    return Inspection(arch=dict(reply["arch"]), params={k: int(v) for k, v in
                                                         reply["params"].items()})
