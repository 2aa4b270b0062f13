"""What every benchmark records beside its numbers: the run's metadata and one JSON file."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
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


def stat(values: list[float]) -> dict[str, float]:
    """mean, median, min and max of one measurement over seeds."""
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def grouped_stats(rows: list[dict[str, Any]], by: tuple[str, ...], keys: tuple[str, ...]
                  ) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Rows grouped by the fields `by` (first-seen order): for each group a summary with those
    fields, `n`, `stat()` of every key in `keys` that all its rows have (not None), and
    `delta_vs_dense_pt` (mean test accuracy against the mean of the method-"dense" rows),
    paired with the group's rows so a caller can add its own fields."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    dense_acc = statistics.fmean(r["test_accuracy"] for r in rows if r["method"] == "dense")
    out = []
    for values, rs in groups.items():
        s: dict[str, Any] = dict(zip(by, values, strict=True)) | {"n": len(rs)}
        for key in keys:
            if all(r.get(key) is not None for r in rs):
                s[key] = stat([float(r[key]) for r in rs])
        s["delta_vs_dense_pt"] = 100 * (s["test_accuracy"]["mean"] - dense_acc)
        out.append((s, rs))
    return out


def save_figure(fig: Any, path: str | Path) -> None:
    """tight_layout, write `path` (parents created) at 120 dpi, close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def round_robin_ms(nets: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median ms per forward of each net, timed in turns (net 0, 1, ..., 0, 1, ...) so drift
    and neighbours' load hit every net alike; the first 3 turns are warm-up."""
    times: list[list[float]] = [[] for _ in nets]
    with torch.no_grad():
        for net in nets:
            net.eval()
        for turn in range(repeats + 3):
            for net, ts in zip(nets, times, strict=True):
                t = time.perf_counter()
                net(x)
                if turn >= 3:
                    ts.append(1000 * (time.perf_counter() - t))
    return [statistics.median(ts) for ts in times]
