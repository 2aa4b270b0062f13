"""What the `slimline` command line prints: the job summary table (`status`, `submit --wait`),
the job/model/dataset lists, and one line per job event (`events`)."""
from __future__ import annotations

import json
import sys
from typing import Any


def console(err: bool = False) -> Any:
    """A rich console; wide when the output is not a terminal (tables are not cut for pipes)."""
    from rich.console import Console

    stream = sys.stderr if err else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 160, highlight=False)


def duration(seconds: float | None) -> str:
    """`1 h 05 min`, `3 min 20 s`, `45 s`; `-` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, round(float(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def percent(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "-"


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def params_total(params: Any) -> Any:
    """A metrics block's params: `{"total", "trainable", "nonzero"}` or a plain count."""
    return params.get("total") if isinstance(params, dict) else params


def metrics_line(metrics: dict[str, Any] | None) -> str:
    """`params 1,234 (nonzero 1,000) · MACs 5,678 · accuracy 91.2%` for a before/after block."""
    if not metrics:
        return "-"
    params = metrics.get("params")
    parts = [f"params {count(params_total(params))}"]
    if isinstance(params, dict) and params.get("nonzero") not in (None, params.get("total")):
        parts[0] += f" (nonzero {count(params['nonzero'])})"
    parts.append(f"MACs {count(metrics.get('macs'))}")
    if metrics.get("accuracy") is not None:
        parts.append(f"accuracy {percent(metrics['accuracy'])}")
    if metrics.get("checkpoint_bytes"):
        parts.append(f"file {size(metrics['checkpoint_bytes'])}")
    return " · ".join(parts)


# the op-specific numbers worth a glance in the steps table (the rest: status --json)
KEY_METRICS = ("val_accuracy", "train_loss", "val_loss", "sparsity", "ratio", "kept",
               "latency_ms", "bytes", "cost", "budget")


def step_notes(step: dict[str, Any]) -> str:
    notes = []
    for key in KEY_METRICS:
        value = step.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            text = percent(value) if "accuracy" in key else f"{value:.4g}"
        elif isinstance(value, int):
            text = f"{value:,}"
        elif isinstance(value, dict) and key == "budget":
            text = ", ".join(f"{k} {v}" for k, v in value.items()
                             if isinstance(v, (int, float, str)))[:60]
        else:
            continue
        notes.append(f"{key} {text}")
    if isinstance(step.get("epochs"), int) and step.get("op") == "train":
        notes.insert(0, f"{step['epochs']} epoch(s)")
    return ", ".join(notes)


def job_summary(job: dict[str, Any]) -> list[Any]:
    """The renderables `status` prints: the job's overview and its steps table."""
    from rich.table import Table

    result = job.get("result") or {}
    overview = Table(title=f"job {job['id']}", show_header=False, title_justify="left")
    overview.add_column("field", style="bold")
    overview.add_column("value")
    status = job["status"] + (" (cancel requested)" if job.get("stage") == "canceling" else "")
    overview.add_row("status", status)
    overview.add_row("progress", percent(job.get("progress")))
    overview.add_row("stage", str(job.get("stage") or "-"))
    overview.add_row("ETA", duration(job.get("eta_s")))
    if job.get("kind") not in (None, "job"):
        overview.add_row("kind", str(job["kind"]))
    if result.get("model_id"):
        overview.add_row("model", result["model_id"])
    if result.get("before"):
        overview.add_row("before", metrics_line(result["before"]))
    if result.get("after"):
        overview.add_row("after", metrics_line(result["after"]))
    auto = result.get("auto") or {}
    if auto.get("reason"):
        overview.add_row("auto", str(auto["reason"]))
    error = job.get("error")
    if error:
        overview.add_row("error", f"[red]{error.get('code')}: {error.get('message')}[/red]")
    renderables: list[Any] = [overview]

    done = result.get("steps") or []
    specs = (job.get("spec") or {}).get("steps") or []
    if done or specs:
        steps = Table(title="steps", title_justify="left")
        for column in ("#", "op", "wall", "params", "MACs", "accuracy", "key metrics"):
            steps.add_column(column, justify="right" if column in (
                "#", "wall", "params", "MACs", "accuracy") else "left")
        for i in range(max(len(done), len(specs))):
            if i < len(done):
                s = done[i]
                steps.add_row(str(i + 1), str(s.get("op")),
                              duration(s.get("wall_s")) if s.get("wall_s") is not None else "-",
                              count(params_total(s.get("params"))), count(s.get("macs")),
                              percent(s.get("accuracy")), step_notes(s))
            else:
                op = str((specs[i] or {}).get("op", "?"))
                steps.add_row(str(i + 1), op, "-", "-", "-", "-",
                              "not run" if job["status"] in ("failed", "canceled")
                              else "pending")
        renderables.append(steps)
    return renderables


def print_job_summary(job: dict[str, Any], err: bool = False) -> None:
    out = console(err)
    for renderable in job_summary(job):
        out.print(renderable)


def jobs_table(items: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"jobs ({len(items)})", title_justify="left")
    for column in ("id", "status", "progress", "ETA", "stage", "ops", "model", "created"):
        table.add_column(column, justify="right" if column in ("progress", "ETA") else "left",
                         no_wrap=column in ("id", "model"))
    for job in items:
        ops = [str(s.get("op")) for s in (job.get("spec") or {}).get("steps") or []]
        table.add_row(job["id"], job["status"], percent(job.get("progress")),
                      duration(job.get("eta_s")), str(job.get("stage") or "")[:40],
                      ",".join(ops)[:40], str((job.get("result") or {}).get("model_id") or ""),
                      _when(job.get("created_at")))
    return table


def models_table(items: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"models ({len(items)})", title_justify="left")
    for column in ("id", "name", "format", "arch", "params", "size", "from job", "created"):
        table.add_column(column, justify="right" if column in ("params", "size") else "left",
                         no_wrap=column in ("id", "from job"))
    for m in items:
        table.add_row(m["id"], str(m.get("name") or ""), str(m.get("format") or ""),
                      str((m.get("arch") or {}).get("name") or ""),
                      count(params_total(m.get("params"))), size(m.get("size_bytes")),
                      str(m.get("source_job_id") or ""), _when(m.get("created_at")))
    return table


def datasets_table(items: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"datasets ({len(items)})", title_justify="left")
    for column in ("id", "name", "kind", "input", "classes", "train", "test", "size",
                   "created"):
        table.add_column(column, justify="right" if column in (
            "classes", "train", "test", "size") else "left", no_wrap=column == "id")
    for d in items:
        builtin = bool(d.get("builtin"))
        counts = d.get("counts") or {}
        shape = d.get("input_shape")
        name = str(d.get("description") or d.get("name") or "") if builtin else \
            str(d.get("name") or "")
        table.add_row(d["id"], name[:60],
                      "built-in" if builtin else str(d.get("format") or "uploaded"),
                      "x".join(map(str, shape)) if isinstance(shape, list) else "",
                      str(d.get("num_classes") or ""),
                      count(counts.get("train")) if "train" in counts else "",
                      count(counts.get("test")) if "test" in counts else "",
                      "" if builtin else size(d.get("size_bytes")),
                      "" if builtin else _when(d.get("created_at")))
    return table


def _when(iso: Any) -> str:
    """`2026-11-30 23:47:25` from an ISO timestamp."""
    return str(iso or "")[:19].replace("T", " ")


def event_line(event: dict[str, Any]) -> str:
    """One line for a job event: `<time> <kind> <what it says>`."""
    kind, data = event.get("kind") or event.get("event") or "?", event.get("data") or {}
    when = _when(event.get("created_at"))[11:] or "--:--:--"
    if kind == "progress":
        text = f"{percent(data.get('progress'))} {data.get('stage') or ''}".rstrip()
        if data.get("eta_s") is not None:
            text += f" (ETA {duration(data['eta_s'])})"
    elif kind == "status":
        text = str(data.get("status"))
        extra = {k: v for k, v in data.items() if k != "status"}
        if extra:
            text += " " + _compact(extra)
    elif kind == "epoch":
        text = (f"step {data.get('step')} epoch {data.get('epoch')}: "
                f"loss {_num(data.get('loss'))}, accuracy {percent(data.get('accuracy'))}, "
                f"val_loss {_num(data.get('val_loss'))}, "
                f"val_accuracy {percent(data.get('val_accuracy'))}")
    elif kind == "end":
        text = str(data.get("status"))
    else:
        text = _compact(data)
    return f"{when} {kind:<12} {text}"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _compact(data: Any, limit: int = 200) -> str:
    text = json.dumps(data, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."
