"""What every benchmark records beside its numbers: the run's metadata and one JSON file."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path
from typing import Any

import torch


def run_meta(args: argparse.Namespace, *, complete: bool, runtime: float,
             **extra: Any) -> dict[str, Any]:
    """Arguments, completeness, torch/threads, platform, UTC date and runtime (+ `extra`)."""
    return {"args": vars(args), "complete": complete, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor(),
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "runtime_s": runtime, **extra}


def dump_results(out: Path, meta: dict[str, Any], summary: Any, rows: list[dict[str, Any]],
                 table: str, **more: Any) -> str:
    """Write `{meta, summary, runs, table_md, ...more}` to `out` (parents created); returns
    the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows,
                               "table_md": table, **more}, indent=1, default=_jsonable))
    return table


def _jsonable(value: Any) -> Any:
    """Sets and tuples as lists; anything else JSON does not know as its str()."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
