"""The HTTP side of the `slimline` command line: a client for a running API, error handling that
turns API errors into one clean line, watching a job with a progress bar, following its event
stream (server-sent events), downloading a model or a job's artifacts, uploading files.

Shared by the commands in cli/app.py and by the demo (cli/demo.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "canceled")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` in red on stderr; returns the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def client(url: str, key: str | None) -> httpx.Client:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60)


def checked(response: Any) -> Any:
    """The JSON body of a 2xx response (None for 204 No Content); otherwise the API's error as
    a clean exit: `error: <Code>: <detail>`."""
    if response.is_success:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise fail(f"the API answered {response.status_code} with something that is not "
                       "JSON; is --url the slimline API?") from None
    try:
        body = response.json()
        if not isinstance(body, dict):
            raise ValueError
        detail = body.get("detail", "")
        if not isinstance(detail, str):  # e.g. a validation error list from a proxy
            detail = str(detail)
        message = f"{body.get('error', response.status_code)}: {detail}"
    except ValueError:
        message = f"HTTP {response.status_code}: {response.text[:300]}"
    raise fail(message)


def request(call: Any, *args: Any, **kwargs: Any) -> Any:
    import httpx

    try:
        return call(*args, **kwargs)
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach the API ({exc}); is `slimline up` or `slimline api` "
                   "running, and is --url right?") from None


def watch_job(http: Any, job_id: str, poll_s: float = 0.5, timeout: float | None = None
              ) -> dict[str, Any]:
    """Poll a job with a progress bar until it is terminal; returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    from cli.render import console, duration

    columns = (TextColumn("[bold]{task.fields[status]:<9}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(),
               TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[stage]}"))
    with Progress(*columns, transient=False, console=console(err=True)) as bar:
        task = bar.add_task("job", total=1.0, status="queued", stage="", eta="-")
        while True:
            job: dict[str, Any] = checked(request(http.get, f"/v1/jobs/{job_id}"))
            bar.update(task, completed=job.get("progress", 0.0), status=job["status"],
                       stage=job.get("stage") or "", eta=duration(job.get("eta_s")))
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise fail(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll_s)


def print_outcome(job: dict[str, Any], err: bool = False) -> None:
    """The job's summary table (`slimline status`), then one line saying how it ended."""
    from cli.render import print_job_summary

    print_job_summary(job, err=err)
    if job["status"] == "failed":
        error = job.get("error") or {}
        typer.secho(f"job {job['id']} failed: {error.get('code')}: {error.get('message')}",
                    fg=typer.colors.RED, err=True)
    elif job["status"] != "succeeded":
        typer.echo(f"job {job['id']} {job['status']}", err=True)


# ---- events (slimline events) ----

def job_events(http: Any, job_id: str, after: int = 0) -> list[dict[str, Any]]:
    """The job's events so far (`GET /v1/jobs/{id}/events?format=json`)."""
    doc = checked(request(http.get, f"/v1/jobs/{job_id}/events",
                          params={"format": "json", "after": after}))
    items: list[dict[str, Any]] = doc["items"]
    return items


def sse_messages(lines: Any) -> Any:
    """Server-sent events from an iterator of lines: `{"id", "event", "data"}` per message
    (comments and `retry:` skipped; `data` is the joined data lines)."""
    message: dict[str, Any] = {}
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data or message.get("event"):
                yield {"id": message.get("id"), "event": message.get("event", "message"),
                       "data": "\n".join(data)}
            message, data = {}, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field in ("id", "event"):
            message[field] = value


SSE_RECONNECTS = 100  # a stream ends after the server's maximum duration; follow it again


def follow_events(http: Any, job_id: str, on_event: Any, after: int = 0) -> str | None:
    """Read `GET /v1/jobs/{id}/events` (server-sent events) and call `on_event(event)` for each
    event, reconnecting after the last id when a stream ends early, until the stream says the job
    ended; returns the job's final status."""
    import json

    import httpx

    timeout = httpx.Timeout(60.0, read=120.0)  # the server sends a keep-alive every 15 s
    for _ in range(SSE_RECONNECTS):
        with request(http.stream, "GET", f"/v1/jobs/{job_id}/events", params={"after": after},
                     headers={"Accept": "text/event-stream"}, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                checked(response)
            try:
                for message in sse_messages(response.iter_lines()):
                    try:
                        data = json.loads(message["data"]) if message["data"] else {}
                    except ValueError:
                        data = {"text": message["data"]}
                    if message["event"] == "end":
                        return str(data.get("status"))
                    if message["id"] and str(message["id"]).isdigit():
                        after = int(message["id"])
                    on_event(data if "kind" in data else {"kind": message["event"],
                                                           "data": data})
            except httpx.HTTPError as exc:
                typer.echo(f"the event stream broke ({type(exc).__name__}); reconnecting",
                           err=True)
                time.sleep(1.0)
    raise fail(f"the event stream of job {job_id} kept ending early; try again")


# ---- a job's artifacts (slimline curves) ----

def fetch_artifact(http: Any, job_id: str, name: str, target: Path) -> int:
    """Stream `GET /v1/jobs/{id}/artifacts/{name}` into `target`; returns its size."""
    partial = target.with_name(target.name + ".part")
    with request(http.stream, "GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
        if not response.is_success:
            response.read()
            checked(response)
        with open(partial, "wb") as out:
            out.writelines(response.iter_bytes(1 << 20))
    partial.replace(target)
    return target.stat().st_size


# download format -> file name suffix (GET /v1/models/{id}/file?format=...)
DOWNLOAD_FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "pt2": ".pt2"}
# a model not exported yet is exported before its first byte is sent (server-side limits apply)
DOWNLOAD_READ_TIMEOUT_S = 600.0
OVERLOADED_RETRIES = 3
MAX_RETRY_WAIT_S = 30.0


def fetch_model(http: Any, model_id: str, target: Path, fmt: str = "safetensors") -> int:
    """Stream `GET /v1/models/{id}/file` in `fmt` into `target` (written atomically); returns its
    size. An answer 503 with Retry-After (every export slot busy) is retried a few times."""
    import httpx

    params = {} if fmt == "safetensors" else {"format": fmt}
    timeout = httpx.Timeout(60.0, read=DOWNLOAD_READ_TIMEOUT_S)
    partial = target.with_name(target.name + ".part")
    for attempt in range(OVERLOADED_RETRIES + 1):
        with request(http.stream, "GET", f"/v1/models/{model_id}/file", params=params,
                     timeout=timeout) as response:
            wait = _retry_after(response)
            if wait is not None and attempt < OVERLOADED_RETRIES:
                response.read()
                typer.echo(f"the API is busy; retrying in {wait:g} s", err=True)
                time.sleep(wait)
                continue
            if not response.is_success:
                response.read()
                checked(response)
            disposition = response.headers.get("content-disposition", "")
            if not disposition.rstrip('"').endswith(DOWNLOAD_FORMATS[fmt]):
                raise fail(f"the API answered with {disposition or 'a file'} instead of a {fmt} "
                           "file; it may predate ?format= (upgrade the server)")
            with open(partial, "wb") as out:
                out.writelines(response.iter_bytes(1 << 20))
            break
    partial.replace(target)
    return target.stat().st_size


def _retry_after(response: Any) -> float | None:
    """Seconds to wait before retrying a 503 that says when (None: do not retry)."""
    if response.status_code != 503:
        return None
    try:
        return min(MAX_RETRY_WAIT_S, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return None


# ---- uploads (slimline upload / slimline import) ----

# the API validates an upload in a subprocess (and may wait for a slot): allow for both
UPLOAD_READ_TIMEOUT_S = 600.0


def upload_model(http: Any, path: Path, fields: dict[str, str],
                 endpoint: str = "/v1/models") -> dict[str, Any]:
    """POST /v1/models (or `endpoint`, e.g. /v1/datasets) with `path` as the file and the
    non-empty `fields`; returns the Model (Dataset). An answer 503 with Retry-After (every
    inspector slot busy) is retried a few times."""
    import httpx

    data = {k: v for k, v in fields.items() if v}
    timeout = httpx.Timeout(60.0, read=UPLOAD_READ_TIMEOUT_S)
    for attempt in range(OVERLOADED_RETRIES + 1):
        with open(path, "rb") as f:
            response = request(http.post, endpoint, data=data,
                               files={"file": (path.name, f)}, timeout=timeout)
        wait = _retry_after(response)
        if wait is None or attempt == OVERLOADED_RETRIES:
            break
        typer.echo(f"the API is busy; retrying in {wait:g} s", err=True)
        time.sleep(wait)
    model: dict[str, Any] = checked(response)
    return model


def report_summary(report: dict[str, Any] | None, limit: int = 6) -> list[str]:
    """A few lines about a model's prunability report: sizes, coupled groups, how many layers
    each method can touch, and the first things left untouched (with the reason)."""
    if not report:
        return ["prunability: no report for this model"]
    totals = report.get("totals") or {}
    layers = report.get("layers") or []
    lines = [f"prunability: {len(layers)} layers, {totals.get('params', 0):,} params, "
             f"{totals.get('macs', 0):,} MACs; {len(report.get('groups') or [])} coupled "
             f"channel groups, {len(report.get('untouched_groups') or [])} left untouched"]
    counts: dict[str, int] = {}
    for layer in layers:
        for method in layer.get("methods") or []:
            counts[method] = counts.get(method, 0) + 1
    if counts:
        lines.append("  methods (layers they apply to): " + ", ".join(
            f"{method} {n}/{len(layers)}" for method, n in counts.items()))
    untouched = [f"{layer['name']} ({method}): {reason}" for layer in layers
                 for method, reason in (layer.get("untouched") or {}).items()]
    untouched += [f"group {group.get('name')}: {group.get('reason')}"
                  for group in report.get("untouched_groups") or []]
    for line in untouched[:limit]:
        lines.append(f"  untouched: {line}")
    if len(untouched) > limit:
        lines.append(f"  ... {len(untouched) - limit} more untouched (GET /v1/models/<id> has "
                     "the full report)")
    return lines


def trials_table(items: list[dict[str, Any]], budget: dict[str, Any] | None) -> Any:
    """A rich table of an auto-compress search's trials (`GET /v1/jobs/{id}/trials`)."""
    from rich.table import Table

    kind = next(iter(budget or {}), "cost")
    table = Table(title=f"trials (budget: {budget})" if budget else "trials")
    for column in ("phase", "trial", "status", "method", kind, "val acc", "test acc", "s"):
        table.add_column(column, justify="right" if column in (kind, "val acc", "test acc", "s",
                                                              "trial") else "left")

    def pct(value: Any) -> str:
        return f"{value * 100:.2f}" if isinstance(value, (int, float)) else ""

    for t in items:
        cost = t.get("cost")
        status = t["status"] + (f" ({t['error']['code']})" if t.get("error") else "")
        table.add_row(t["phase"], "" if t.get("trial") is None else str(t["trial"]), status,
                      str(t.get("method") or ""),
                      f"{cost:g}" + ("" if t.get("within_budget") in (None, True) else " (over)")
                      if isinstance(cost, (int, float)) else "",
                      pct(t.get("val_accuracy")), pct(t.get("accuracy")),
                      f"{t['wall_s']:.1f}" if t.get("wall_s") else "")
    return table
