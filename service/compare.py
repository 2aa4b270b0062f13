"""One comparison across jobs (`GET /v1/reports/compare`): a row per job with the numbers its
stored result holds, the Pareto set (max accuracy, min cost), and its JSON, Markdown and PNG
renderings. Everything but `load_jobs` is pure (job documents in, rows out).

Where each number comes from (a row's `sources` names it; a number the result does not hold is
null, never estimated):

* `params`, `macs`, `accuracy` — `result.after` (the model the job produced; `accuracy` is the
  test accuracy in [0, 1]).
* `bytes` and `latency_ms` — measured on an exported ONNX file, so only where a step measured
  one: the last `measure` step's `cost.bytes` / `cost.latency_ms` (at its `latency.batch_size`),
  else the last `export` step's `onnx.bytes` / `onnx.latency_ms.batch_256` (fp32 file); an auto
  job's winner's measured `costs`. A measurement counts only when no later step changed the
  model's structure (see `FILE_KEEPING_OPS`): a file measured before a `pcn` step says nothing
  about the model after it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import NotFound, Unprocessable
from service.orm import Job

COST_KINDS = ("total_params", "nonzero_params", "trainable_params", "macs", "bytes",
              "latency_ms")
FORMATS = ("json", "png", "md")
MAX_JOBS = 50
SUCCEEDED = "succeeded"
EXPORT_LATENCY_BATCH = 256  # the export step times batches 1 and 256; 256 is auto's default
# ops after which an ONNX file measured earlier still describes the model: they change weights
# or masks (pruning masks export as dense zeros: same bytes, same latency) but not the layers
FILE_KEEPING_OPS = frozenset({"train", "evaluate", "measure", "export", "analyze", "snip",
                              "random", "magnitude", "synflow"})
_PARAM_KEYS = ("total", "trainable", "nonzero")
_PARAM_COST = {"total_params": "total", "nonzero_params": "nonzero",
               "trainable_params": "trainable"}


# ---- the request ---------------------------------------------------------------------------

def parse_job_ids(raw: str | None) -> list[str]:
    """The ids of `?jobs=a,b,c` in order: 1 to MAX_JOBS distinct, non-empty ids (a 422 saying
    how to fix it otherwise). Spaces around an id are ignored."""
    example = "e.g. ?jobs=ID1,ID2 with ids from GET /v1/jobs"
    if raw is None or not raw.strip():
        raise Unprocessable(f"jobs: give 1 to {MAX_JOBS} job ids separated by commas, {example}")
    ids = [part.strip() for part in raw.split(",")]
    empty = [i + 1 for i, job_id in enumerate(ids) if not job_id]
    if empty:
        raise Unprocessable(f"jobs: entry {empty[0]} of {len(ids)} is empty; separate job ids "
                            f"by single commas, with none at the start or end ({example})")
    if len(ids) > MAX_JOBS:
        raise Unprocessable(f"jobs: at most {MAX_JOBS} jobs per comparison, got {len(ids)}; "
                            "compare fewer at a time")
    twice = next((job_id for i, job_id in enumerate(ids) if job_id in ids[:i]), None)
    if twice is not None:
        raise Unprocessable(f"jobs: {twice!r} is listed more than once; give each job once")
    return ids


def check_cost_kind(cost: str) -> str:
    if cost not in COST_KINDS:
        raise Unprocessable(f"cost: must be one of {', '.join(COST_KINDS)}, got {cost!r}")
    return cost


def load_jobs(session: Session, tenant_id: str, ids: Sequence[str]) -> list[Job]:
    """The tenant's jobs `ids`, in that order; a 404 naming every id that is not one of them
    (another tenant's job is not found either)."""
    found = {job.id: job for job in session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.id.in_(list(ids))))}
    missing = [job_id for job_id in ids if job_id not in found]
    if missing:
        shown = ", ".join(repr(m if len(m) <= 40 else m[:37] + "...") for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        noun = "job" if len(missing) == 1 else "jobs"
        raise NotFound(f"{noun} {shown}{more} not found; compare ids of your own jobs "
                       "(GET /v1/jobs lists them)")
    return [found[job_id] for job_id in ids]


def job_fields(job: Job) -> dict[str, Any]:
    """What a comparison reads of a job: a subset of its document (GET /v1/jobs/{id})."""
    return {"id": job.id, "status": job.status, "spec": job.spec, "result": job.result,
            "kind": job.kind or "job"}


# ---- rows ------------------------------------------------------------------------------------

def number(value: Any) -> int | float | None:
    """`value` when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def job_label(job: dict[str, Any]) -> str:
    """A short label: the job's step ops joined by " → " ("train → pcn → train"); an auto job
    names its winning method ("auto (lowrank)")."""
    steps = (job.get("spec") or {}).get("steps") or []
    ops = [str(s.get("op")) for s in steps if isinstance(s, dict) and s.get("op")]
    label = " → ".join(ops)
    if ops == ["auto"]:
        winner = _auto_winner(job.get("result") or {})
        if winner.get("method"):
            label = f"auto ({winner['method']})"
    return label


def short_id(job_id: str) -> str:
    """The last 6 characters: an id's random part (its first ones are its creation time)."""
    return job_id[-6:]


def _auto_winner(result: dict[str, Any]) -> dict[str, Any]:
    for step in result.get("steps") or []:
        if isinstance(step, dict) and step.get("op") == "auto":
            return step.get("winner") or {}
    return {}


def file_measurements(result: dict[str, Any]) -> dict[str, Any]:
    """`{bytes, latency_ms, latency_batch_size, sources}` from the steps that measured an ONNX
    file of the job's final model (see the module doc); None where none did."""
    out: dict[str, Any] = {"bytes": None, "latency_ms": None, "latency_batch_size": None,
                           "sources": {}}
    steps = [s for s in result.get("steps") or [] if isinstance(s, dict)]
    winner = _auto_winner(result)
    if winner:
        costs = winner.get("costs") or {}
        out["bytes"] = number(costs.get("bytes"))
        out["latency_ms"] = number(costs.get("latency_ms"))
        if out["latency_ms"] is not None:
            budget = (result.get("auto") or {}).get("budget") or {}
            out["latency_batch_size"] = number(budget.get("batch_size"))
        for key in ("bytes", "latency_ms"):
            if out[key] is not None:
                out["sources"][key] = f"result.steps[0].winner.costs.{key}"
        return out
    # walk back from the last step while the model's layers stay as they are at the end
    for index in range(len(steps) - 1, -1, -1):
        step = steps[index]
        op = step.get("op")
        where = f"result.steps[{index}]"
        if op == "measure":
            cost = step.get("cost") or {}
            if out["bytes"] is None and number(cost.get("bytes")) is not None:
                out["bytes"] = number(cost["bytes"])
                out["sources"]["bytes"] = f"{where}.cost.bytes (measure)"
            if out["latency_ms"] is None and number(cost.get("latency_ms")) is not None:
                out["latency_ms"] = number(cost["latency_ms"])
                out["latency_batch_size"] = number((step.get("latency") or {}).get("batch_size"))
                out["sources"]["latency_ms"] = f"{where}.cost.latency_ms (measure)"
        elif op == "export":
            onnx = step.get("onnx") or {}
            if out["bytes"] is None and number(onnx.get("bytes")) is not None:
                out["bytes"] = number(onnx["bytes"])
                out["sources"]["bytes"] = f"{where}.onnx.bytes (export, fp32)"
            latency = number((onnx.get("latency_ms") or {}).get(f"batch_{EXPORT_LATENCY_BATCH}"))
            if out["latency_ms"] is None and latency is not None:
                out["latency_ms"] = latency
                out["latency_batch_size"] = EXPORT_LATENCY_BATCH
                out["sources"]["latency_ms"] = \
                    f"{where}.onnx.latency_ms.batch_{EXPORT_LATENCY_BATCH} (export, fp32)"
        if op not in FILE_KEEPING_OPS:
            break  # this step changed the layers: earlier files describe another model
    return out


def cost_of(row: dict[str, Any], kind: str) -> int | float | None:
    if kind in _PARAM_COST:
        return row["params"][_PARAM_COST[kind]]
    return row[kind]


def job_row(job: dict[str, Any], kind: str) -> dict[str, Any]:
    """A job document (`service.submission.job_document`) as one comparison row. A job that has
    not succeeded has its status and null numbers."""
    result = job.get("result") or {}
    succeeded = job.get("status") == SUCCEEDED and isinstance(result, dict) and bool(result)
    row: dict[str, Any] = {
        "job_id": job["id"], "status": job.get("status"), "name": job_label(job),
        "model_id": None, "params": dict.fromkeys(_PARAM_KEYS), "macs": None, "bytes": None,
        "accuracy": None, "latency_ms": None, "latency_batch_size": None, "cost": None,
        "pareto": False, "sources": {}}
    if not succeeded:
        return row
    after = result.get("after") or {}
    params = after.get("params") or {}
    row["model_id"] = result.get("model_id")
    row["params"] = {key: number(params.get(key)) for key in _PARAM_KEYS}
    row["macs"] = number(after.get("macs"))
    accuracy = number(after.get("accuracy"))
    row["accuracy"] = accuracy if accuracy is None or 0 <= accuracy <= 1 else None
    if any(value is not None for value in row["params"].values()):
        row["sources"]["params"] = "result.after.params"
    for key in ("macs", "accuracy"):
        if row[key] is not None:
            row["sources"][key] = f"result.after.{key}"
    files = file_measurements(result)
    row["bytes"], row["latency_ms"] = files["bytes"], files["latency_ms"]
    row["latency_batch_size"] = files["latency_batch_size"]
    row["sources"].update(files["sources"])
    row["cost"] = cost_of(row, kind)
    return row


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates (cost <= and accuracy >=,
    one of them strictly), cheapest first; points with an unknown value take no part. Equal
    points do not dominate each other: both are on the front."""
    known = [(i, c, a) for i, (c, a) in enumerate(points) if c is not None and a is not None]
    front = [i for i, c, a in known
             if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for _, c2, a2 in known)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))  # type: ignore[operator]


def baseline_of(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The first job's `result.before` numbers (the model it started from), or None when its
    result has none. `cost` is known for the parameter and MAC kinds, for latency where its
    export step timed the start model, and for an auto job's own budget kind."""
    result = job.get("result") or {}
    before = result.get("before") if isinstance(result, dict) else None
    if not isinstance(before, dict) or not before:
        return None
    params = before.get("params") or {}
    base: dict[str, Any] = {"job_id": job["id"],
                            "params": {key: number(params.get(key)) for key in _PARAM_KEYS},
                            "macs": number(before.get("macs")),
                            "accuracy": number(before.get("accuracy")),
                            "bytes": None, "latency_ms": None}
    for step in result.get("steps") or []:
        if isinstance(step, dict) and step.get("op") == "export":
            start = (step.get("onnx") or {}).get("start_latency_ms") or {}
            base["latency_ms"] = number(start.get(f"batch_{EXPORT_LATENCY_BATCH}"))
            break
    auto = result.get("auto") or {}
    if auto and (auto.get("budget") or {}).get("kind") in ("bytes", "latency_ms"):
        base[auto["budget"]["kind"]] = number((auto.get("start") or {}).get("cost"))
    base["cost"] = cost_of(base, kind)
    return base


def compare(jobs: Iterable[dict[str, Any]], kind: str = "total_params") -> dict[str, Any]:
    """The comparison of job documents (in the order given) by cost `kind`: rows, the Pareto set
    (job ids, cheapest first), the first job's baseline, and notes on what is not comparable."""
    check_cost_kind(kind)
    docs = list(jobs)
    rows = [job_row(job, kind) for job in docs]
    front = pareto_front([(row["cost"], row["accuracy"]) for row in rows])
    for i in front:
        rows[i]["pareto"] = True
    notes = []
    unknown = [row["job_id"] for row in rows
               if row["status"] == SUCCEEDED and (row["cost"] is None or row["accuracy"] is None)]
    if unknown:
        how = (" (add a measure step with bytes/latency_batch_size, or an export step)"
               if kind in ("bytes", "latency_ms") else "")
        notes.append(f"{len(unknown)} succeeded job(s) have no {kind} or accuracy and are not "
                     f"on the plot or the Pareto set: {', '.join(unknown)}{how}")
    batches = {row["latency_batch_size"] for row in rows if row["latency_ms"] is not None}
    if len(batches) > 1:
        notes.append("latency_ms was measured at different batch sizes "
                     f"({', '.join(str(b) for b in sorted(batches, key=str))}): compare them "
                     "with care")
    return {"cost": kind, "rows": rows, "pareto": [rows[i]["job_id"] for i in front],
            "baseline": baseline_of(docs[0], kind) if docs else None, "notes": notes}


# ---- renderings ----------------------------------------------------------------------------

def _count(value: int | float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def to_markdown(report: dict[str, Any]) -> str:
    """A Markdown table, one line per job, then a line on the cost and the Pareto set."""
    lines = ["| job | ops | params total | params nonzero | MACs | bytes | accuracy | "
             "latency ms | Pareto |",
             "|---|---|--:|--:|--:|--:|--:|--:|:-:|"]
    for row in report["rows"]:
        accuracy = "—" if row["accuracy"] is None else f"{row['accuracy'] * 100:.2f} %"
        latency = "—" if row["latency_ms"] is None else f"{row['latency_ms']:.3f}"
        name = row["name"] or "—"
        if row["status"] != SUCCEEDED:
            name += f" ({row['status']})"
        lines.append(f"| `{row['job_id']}` | {name} | {_count(row['params']['total'])} | "
                     f"{_count(row['params']['nonzero'])} | {_count(row['macs'])} | "
                     f"{_count(row['bytes'])} | {accuracy} | {latency} | "
                     f"{'✓' if row['pareto'] else ''} |")
    lines += ["", f"Pareto set: highest accuracy for the lowest {report['cost']}."]
    lines += [f"Note: {note}" for note in report.get("notes") or []]
    return "\n".join(lines) + "\n"


def to_png(report: dict[str, Any]) -> bytes:
    """An accuracy-vs-cost scatter: every job with both numbers, labeled with its short id; the
    Pareto set marked and connected, the baseline as a star when its cost is known."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: a slow import
    from matplotlib.figure import Figure

    kind = report["cost"]
    fig = Figure(figsize=(7.0, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [r for r in report["rows"] if r["cost"] is not None and r["accuracy"] is not None]
    front = [r for r in points if r["pareto"]]
    front.sort(key=lambda r: (r["cost"], -r["accuracy"]))
    others = [r for r in points if not r["pareto"]]
    if others:
        ax.scatter([r["cost"] for r in others], [r["accuracy"] * 100 for r in others],
                   color="tab:gray", label="dominated", zorder=2)
    if front:
        ax.plot([r["cost"] for r in front], [r["accuracy"] * 100 for r in front], "-o",
                color="tab:red", label="Pareto set", zorder=3)
    base = report.get("baseline") or {}
    if base.get("cost") is not None and base.get("accuracy") is not None:
        ax.scatter([base["cost"]], [base["accuracy"] * 100], marker="*", s=160,
                   color="tab:blue", label=f"start ({short_id(base['job_id'])})", zorder=4)
    labels: dict[tuple[float, float], list[str]] = {}  # equal points share one label
    for r in points:
        labels.setdefault((r["cost"], r["accuracy"] * 100), []).append(short_id(r["job_id"]))
    for xy, names in labels.items():
        ax.annotate(", ".join(names), xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
    costs = [r["cost"] for r in points] + ([base["cost"]] if base.get("cost") else [])
    if costs and min(costs) > 0 and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    if not points:
        ax.text(0.5, 0.5, f"no job has both {kind} and accuracy", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(kind.replace("_", " "))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs {kind} ({len(report['rows'])} jobs)")
    ax.grid(True, alpha=0.3)
    if points or base.get("cost") is not None:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
