"""The `slimline` command line: run the stack (`up`, `api`, `worker`, `db upgrade`), manage keys,
and talk to a running API (`upload`, `upload-dataset`, `import`, `submit`, `status`, `list`,
`events`, `curves`, `trials`, `cancel`, `download`, `delete`); `demo` runs the whole flow
locally.

The HTTP helpers are in cli/client.py, what is printed (tables, event lines) in cli/render.py,
the process helpers in cli/processes.py, the demo in cli/demo.py. Heavy imports (torch, celery,
uvicorn, the API app) happen inside the commands that need them, so `slimline --help` and the
HTTP commands start fast.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.client import (
    DEFAULT_URL,
    DOWNLOAD_FORMATS,
    checked,
    client,
    fail,
    fetch_artifact,
    fetch_model,
    follow_events,
    job_events,
    print_outcome,
    report_summary,
    request,
    trials_table,
    upload_model,
    watch_job,
)
from cli.processes import (
    API_GRACEFUL_SHUTDOWN_S,
    API_KEEP_ALIVE_S,
    exit_cleanly,
    keep_tcp_nodelay,
    stop_process,
    worker_command,
)

if TYPE_CHECKING:
    from service.settings import Settings

app = typer.Typer(help="slimline: compress PyTorch models behind a REST API.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
list_app = typer.Typer(help="List jobs (the default), models or datasets.")
delete_app = typer.Typer(help="Delete a model, dataset or job with its stored files.",
                         no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(list_app, name="list")
app.add_typer(delete_app, name="delete")

Url = Annotated[str, typer.Option(envvar="SLIMLINE_URL", help="Base URL of the slimline API.")]
Key = Annotated[str | None, typer.Option(envvar="SLIMLINE_API_KEY",
                                         help="API key (Authorization: Bearer).")]
Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="Port to listen on.")]


# ---- running the stack ----

def _settings() -> Settings:
    from service.settings import get_settings

    get_settings.cache_clear()  # the environment may have changed in this process
    return get_settings()


@app.command()
def up(host: Host = "127.0.0.1", port: Port = 8000,
       home: Annotated[Path | None, typer.Option(help="State directory (SLIMLINE_HOME).")] = None,
       ) -> None:
    """Run the embedded stack (migrations, one Celery worker, the API) until Ctrl-C."""
    if home is not None:
        os.environ["SLIMLINE_HOME"] = str(home.expanduser().resolve())
    # The embedded stack is for one local user: auth is off unless explicitly configured.
    os.environ.setdefault("SLIMLINE_AUTH", "off")
    settings = _settings()
    os.environ["SLIMLINE_HOME"] = str(settings.home)
    settings.home.mkdir(parents=True, exist_ok=True)

    from service.db import upgrade_db

    upgrade_db(settings)
    typer.echo(f"slimline: home {settings.home}, database {settings.database_url}, "
               f"broker {settings.broker_url}, auth {settings.auth}")
    worker = subprocess.Popen(worker_command("cpu,gpu", pool="solo"), env=os.environ.copy(),
                              stdin=subprocess.DEVNULL)
    # uvicorn re-raises the SIGTERM it handled after its graceful shutdown; with the default
    # handler that would kill this process before `finally` stops the worker (an orphan). A
    # Python handler turns it into SystemExit, so SIGTERM stops both, like Ctrl-C.
    signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        import uvicorn

        from api.app import create_app

        typer.echo(f"slimline: API on http://{host}:{port} (Ctrl-C stops the API and the worker)")
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                    timeout_graceful_shutdown=API_GRACEFUL_SHUTDOWN_S,
                    timeout_keep_alive=API_KEEP_ALIVE_S)
    finally:
        stop_process(worker)
    if worker.returncode not in (0, -signal.SIGTERM, None):
        typer.echo(f"slimline: the worker exited with {worker.returncode}", err=True)


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000,
        workers: Annotated[int, typer.Option(
            min=1, help="API processes (each has its own DB pool and request slots).")] = 1,
        access_log: Annotated[bool, typer.Option(
            help="Log every request (uvicorn's access log).")] = True) -> None:
    """Run the API against the configured database, broker and store. SIGTERM stops it within
    about 10 s: no new connections, in-flight requests finish, open streams are closed."""
    import uvicorn

    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done; exit 0 then
    # (a stop that was asked for is a clean exit). With --workers, its supervisor exits 0.
    signal.signal(signal.SIGTERM, exit_cleanly)
    if workers > 1:
        keep_tcp_nodelay(uvicorn.Config)
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info", access_log=access_log, proxy_headers=True,
                timeout_graceful_shutdown=API_GRACEFUL_SHUTDOWN_S,
                timeout_keep_alive=API_KEEP_ALIVE_S)


@app.command()
def worker(queues: Annotated[str, typer.Option(help="Comma-separated queues: cpu, gpu.")] = "cpu",
           concurrency: Annotated[int, typer.Option(min=1, help="Jobs at a time.")] = 1,
           pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo.")] = "prefork",
           loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO") -> None:
    """Run a Celery worker for the job queues (one job per GPU: keep concurrency 1 there)."""
    bad = [q for q in queues.split(",") if q.strip() not in ("cpu", "gpu")]
    if bad:
        raise fail(f"unknown queue(s) {bad}; use cpu, gpu or cpu,gpu", 2)
    command = worker_command(queues, concurrency, pool, loglevel)
    os.execv(command[0], command)  # the worker replaces this process (signals go straight to it)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Run the Alembic migrations (PostgreSQL or SQLite)."""
    from service.db import upgrade_db

    settings = _settings()
    upgrade_db(settings, revision)
    typer.echo(f"database at {revision}: {_redact(settings.database_url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses; show nothing secret
        return url.split("@")[-1]


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="A label for the key.")],
                tenant: Annotated[str | None, typer.Option(
                    help="Tenant name (default: same as --name).")] = None) -> None:
    """Create an API key; the key is printed once, as the last line."""
    from service.auth import create_api_key
    from service.db import session_scope

    settings = _settings()
    with session_scope(settings) as session:
        key = create_api_key(session, name, tenant)
    typer.echo(f"created key {name!r} for tenant {tenant or name!r} (shown once; store it now):",
               err=False)
    typer.echo(key)


# ---- talking to the API ----

InputShape = Annotated[str | None, typer.Option(
    "--input-shape", help="The input's shape without the batch dimension, e.g. 3,32,32.")]
Layout = Annotated[str | None, typer.Option(help="Input layout: NCHW, NHWC or flat.")]
Mean = Annotated[str | None, typer.Option(help="Per-channel mean, e.g. 0.5,0.5,0.5.")]
Std = Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.25,0.25,0.25.")]
NumClasses = Annotated[int | None, typer.Option(
    "--num-classes", min=1, help="Number of classes (must match the model's output).")]
Name = Annotated[str | None, typer.Option(help="A name for the model (default: the file's).")]


def _preprocessing_fields(input_shape: str | None, layout: str | None, mean: str | None,
                          std: str | None, num_classes: int | None) -> dict[str, str]:
    return {"input_shape": input_shape or "", "layout": layout or "", "mean": mean or "",
            "std": std or "", "num_classes": "" if num_classes is None else str(num_classes)}


def _print_uploaded(model: dict) -> None:
    params = model.get("params") or {}
    typer.echo(f"uploaded model {model['id']} ({model['name']}, {model['format']}, arch "
               f"{model['arch'].get('name')}, {params.get('total', 0):,} params)", err=True)
    for line in report_summary(model.get("report")):
        typer.echo(line, err=True)
    typer.echo(model["id"])


@app.command()
def upload(file: Annotated[Path, typer.Argument(
               help=".safetensors, .pt/.pth state dict, .pt2 (torch.export.save) or .onnx.")],
           name: Name = None,
           arch: Annotated[str | None, typer.Option(
               help='Architecture JSON for a state dict without one, e.g. {"name": "lenet300"}.'
           )] = None,
           input_shape: InputShape = None, layout: Layout = None, mean: Mean = None,
           std: Std = None, num_classes: NumClasses = None,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Upload a model; prints a short prunability summary, then its id as the last line."""
    if not file.is_file():
        raise fail(f"{file} does not exist", 2)
    fields = {"name": name or "", "arch": arch or "",
              **_preprocessing_fields(input_shape, layout, mean, std, num_classes)}
    with client(url, key) as http:
        model = upload_model(http, file, fields)
    _print_uploaded(model)


@app.command("upload-dataset")
def upload_dataset(file: Annotated[Path, typer.Argument(
                       help=".npz or .safetensors with arrays x_train, y_train (and optionally "
                            "x_test, y_test).")],
                   name: Annotated[str | None, typer.Option(
                       help="A name for the dataset (default: the file's).")] = None,
                   allow_label_gaps: Annotated[bool, typer.Option(
                       help="Accept labels that leave a class index unused (e.g. 1..10); "
                            "without it such an upload is refused: labels are "
                            "0..num_classes-1.")] = False,
                   url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Upload a dataset; prints its shape and counts, then its id as the last line (use the id
    as a job's `dataset`)."""
    if not file.is_file():
        raise fail(f"{file} does not exist", 2)
    with client(url, key) as http:
        fields = {"name": name or "", **({"allow_label_gaps": "true"} if allow_label_gaps else {})}
        dataset = upload_model(http, file, fields, endpoint="/v1/datasets")
    counts = dataset.get("counts") or {}
    typer.echo(f"uploaded dataset {dataset['id']} ({dataset.get('name')}, {dataset.get('format')}"
               f", input {dataset.get('input_shape')}, {dataset.get('num_classes')} classes, "
               + ", ".join(f"{n:,} {split}" for split, n in counts.items()) + ")", err=True)
    typer.echo(dataset["id"])


@app.command("import")
def import_model(
        target: Annotated[str, typer.Argument(
            metavar="MODULE:FACTORY",
            help="Your model's factory, e.g. mypkg.models:build_net (a function returning an "
                 "nn.Module, or the nn.Module class); imported here, on your machine.")],
        input_shape: Annotated[str, typer.Option(
            "--input-shape", help="The input's shape without the batch dimension, e.g. "
                                  "3,32,32.")],
        weights: Annotated[Path | None, typer.Option(
            help="A state dict to load (.pt/.pth read with weights_only=True, or "
                 ".safetensors).")] = None,
        factory_args: Annotated[str | None, typer.Option(
            "--factory-args", help='JSON: keyword arguments ({"num_classes": 10}) or a list of '
                                   "positional ones.")] = None,
        layout: Layout = None, mean: Mean = None, std: Std = None,
        num_classes: NumClasses = None, name: Name = None,
        save: Annotated[Path | None, typer.Option(
            help="Also keep the exported .pt2 at this path.")] = None,
        url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Build your model from your own code, export it with torch.export (dynamic batch) and
    upload the .pt2; prints a short prunability summary, then the model id as the last line.
    Your code runs only here: the service receives the exported graph and weights."""
    import tempfile

    from cli.local_export import (
        ImportFailure,
        build_model,
        export_program,
        load_weights,
        resolve_factory,
        save_program,
    )

    try:
        shape = [int(d) for d in input_shape.split(",")]
        if not shape or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise fail(f"--input-shape {input_shape!r} is not comma-separated positive integers, "
                   "e.g. 3,32,32", 2) from None
    try:
        model = build_model(resolve_factory(target), factory_args)
        if weights is not None:
            load_weights(model, weights)
        program, dynamic = export_program(model, shape)
    except ImportFailure as exc:
        raise fail(str(exc)) from None
    if not dynamic:
        typer.echo("torch.export could not keep the batch dimension dynamic; exported with a "
                   "static batch (the service rewrites it where it can prove it)", err=True)
    fields = {"name": name or target.split(":")[-1].split(".")[-1],
              **_preprocessing_fields(input_shape, layout, mean, std, num_classes)}
    with tempfile.TemporaryDirectory(prefix="slimline-import-") as tmp:
        path = save_program(program, Path(tmp) / "model.pt2")
        if save is not None:
            save.write_bytes(path.read_bytes())
            typer.echo(f"wrote {save}", err=True)
        with client(url, key) as http:
            uploaded = upload_model(http, path, fields)
    _print_uploaded(uploaded)


@app.command()
def submit(spec: Annotated[str, typer.Argument(help="JobSpec JSON file, or - for stdin.")],
           wait: Annotated[bool, typer.Option(
               help="Watch the job until it finishes, then print its summary table.")] = False,
           idempotency_key: Annotated[str | None, typer.Option(
               help="Idempotency-Key header: resubmitting returns the same job.")] = None,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Submit a job; prints its id as the last line (with --wait: watches it, prints the summary
    table on stderr, exits 1 unless it succeeded)."""
    text = sys.stdin.read() if spec == "-" else _read(Path(spec))
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"the spec is not valid JSON: {exc}", 2) from None
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with client(url, key) as http:
        job = checked(request(http.post, "/v1/jobs", json=body, headers=headers))
        typer.echo(f"submitted job {job['id']} ({job['status']})", err=True)
        if wait:
            job = watch_job(http, job["id"])
            print_outcome(job, err=True)
            typer.echo(job["id"])
            if job["status"] != "succeeded":
                raise typer.Exit(1)
            return
        typer.echo(job["id"])


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc}", 2) from None


JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the JSON document.")]


@app.command()
def status(job_id: JobId,
           wait: Annotated[bool, typer.Option(
               "--wait", "--watch", help="Poll with a progress bar until done, then print the "
                                         "summary (exit 1 unless it succeeded).")] = False,
           as_json: AsJson = False,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """A job's summary: status, progress, stage, ETA, its steps with their key metrics, the
    model it produced, its error (--json: the whole document)."""
    from cli.render import print_job_summary

    with client(url, key) as http:
        job = watch_job(http, job_id) if wait else checked(
            request(http.get, f"/v1/jobs/{job_id}"))
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    elif wait:
        print_outcome(job)
    else:
        print_job_summary(job)
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def cancel(job_id: JobId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Cancel a job: a queued one at once, a running one at its next batch (409 when it has
    already finished)."""
    with client(url, key) as http:
        job = checked(request(http.post, f"/v1/jobs/{job_id}/cancel"))
    if job["status"] == "canceled":
        typer.echo(f"job {job_id} canceled")
    else:
        typer.echo(f"job {job_id}: cancel requested; it is {job['status']} and stops at its "
                   "next batch (`slimline status --wait` to see it end)")


@app.command()
def events(job_id: JobId,
           follow: Annotated[bool, typer.Option(
               "--follow", "-f", help="Keep reading the live stream until the job ends.")]
           = False,
           after: Annotated[int, typer.Option(min=0, help="Only events after this id.")] = 0,
           as_json: Annotated[bool, typer.Option(
               "--json", help="One JSON document per line.")] = False,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """A job's events, one line each (progress with ETA, epochs, status changes, ...); with
    --follow, the live stream (server-sent events) until the job ends."""
    from cli.render import event_line

    def show(event: dict) -> None:
        typer.echo(json.dumps(event) if as_json else event_line(event))

    with client(url, key) as http:
        if not follow:
            for event in job_events(http, job_id, after):
                show(event)
            return
        final = follow_events(http, job_id, show, after)
    typer.echo(f"job {job_id} {final}", err=True)
    if final != "succeeded":
        raise typer.Exit(1)


@app.command()
def curves(job_id: JobId,
           out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write to.")]
           = Path("."),
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Save a job's plots (the PNG artifacts) and its curves (curves.json) into --out; prints
    each file written."""
    with client(url, key) as http:
        artifacts = checked(request(http.get, f"/v1/jobs/{job_id}/artifacts"))["items"]
        wanted = [a["name"] for a in artifacts
                  if a.get("kind") == "plot" or a["name"].endswith(".png")
                  or a["name"] == "curves.json"]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fail(f"cannot create {out}: {exc}", 2) from None
        written = []
        for name in wanted:
            fetch_artifact(http, job_id, name, out / name)
            written.append(out / name)
        if "curves.json" not in wanted:  # not finished (or failed): the curves so far
            doc = checked(request(http.get, f"/v1/jobs/{job_id}/curves"))
            (out / "curves.json").write_text(json.dumps(doc, indent=2))
            written.append(out / "curves.json")
    plots = sum(1 for path in written if path.suffix == ".png")
    for path in written:
        typer.echo(str(path))
    typer.echo(f"wrote {plots} plot(s) and curves.json to {out}"
               + ("" if plots else " (the job has no plots yet: they are stored when it "
                  "succeeds)"), err=True)


@app.command()
def trials(job_id: str,
           as_json: Annotated[bool, typer.Option("--json", help="Print the JSON document.")]
           = False,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """The trials of an auto-compress job: phase, method, cost, accuracy (live)."""
    from rich.console import Console

    with client(url, key) as http:
        doc = checked(request(http.get, f"/v1/jobs/{job_id}/trials"))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    Console().print(trials_table(doc["items"], doc.get("budget")))


# ---- listing and deleting ----

Status = Annotated[str | None, typer.Option(
    help="Only jobs with this status: queued, running, succeeded, failed, canceled.")]
Limit = Annotated[int, typer.Option(min=1, max=10_000, help="At most this many jobs.")]


def _list_jobs(status: str | None, limit: int, as_json: bool, url: str, key: str | None
               ) -> None:
    from cli.render import console, jobs_table

    items: list[dict] = []
    cursor = None
    with client(url, key) as http:
        while len(items) < limit:
            params: dict[str, str | int] = {"limit": min(100, limit - len(items))}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = checked(request(http.get, "/v1/jobs", params=params))
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    if as_json:
        typer.echo(json.dumps({"items": items}, indent=2))
    else:
        console().print(jobs_table(items))


@list_app.callback(invoke_without_command=True)
def list_default(ctx: typer.Context, status: Status = None, limit: Limit = 20,
                 as_json: AsJson = False, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Without a subcommand: the newest jobs (like `slimline list jobs`)."""
    if ctx.invoked_subcommand is None:
        _list_jobs(status, limit, as_json, url, key)


@list_app.command("jobs")
def list_jobs(status: Status = None, limit: Limit = 20, as_json: AsJson = False,
              url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Your jobs, newest first: id, status, progress, ETA, stage, ops, model, created."""
    _list_jobs(status, limit, as_json, url, key)


@list_app.command("models")
def list_models(as_json: AsJson = False, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Your models (uploaded and produced by jobs), newest first."""
    from cli.render import console, models_table

    with client(url, key) as http:
        doc = checked(request(http.get, "/v1/models"))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        console().print(models_table(doc["items"]))


@list_app.command("datasets")
def list_datasets(as_json: AsJson = False, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """The built-in datasets, then yours (newest first)."""
    from cli.render import console, datasets_table

    with client(url, key) as http:
        doc = checked(request(http.get, "/v1/datasets"))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        console().print(datasets_table(doc["items"]))


def _delete(kind: str, ident: str, url: str, key: str | None) -> None:
    with client(url, key) as http:
        checked(request(http.delete, f"/v1/{kind}s/{ident}"))
    typer.echo(f"deleted {kind} {ident}")


@delete_app.command("model")
def delete_model(model_id: Annotated[str, typer.Argument(metavar="MODEL_ID")],
                 url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a model and its stored files (refused while a queued or running job uses it)."""
    _delete("model", model_id, url, key)


@delete_app.command("dataset")
def delete_dataset(dataset_id: Annotated[str, typer.Argument(metavar="DATASET_ID")],
                   url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete an uploaded dataset (refused for a built-in one, or while a job uses it)."""
    _delete("dataset", dataset_id, url, key)


@delete_app.command("job")
def delete_job(job_id: JobId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a finished job with its events and artifacts (the model it made stays); cancel a
    queued or running job first."""
    _delete("job", job_id, url, key)


class DownloadFormat(StrEnum):
    safetensors = "safetensors"
    onnx = "onnx"
    pt2 = "pt2"


@app.command()
def download(ident: Annotated[str, typer.Argument(
                 metavar="JOB_ID|MODEL_ID", help="A succeeded job, or a model.")],
             output: Annotated[Path | None, typer.Option("-o", "--output",
                                                         help="Where to write it.")] = None,
             fmt: Annotated[DownloadFormat, typer.Option(
                 "--format", "-f", help="safetensors (the checkpoint), onnx (runs with "
                 "onnxruntime alone) or pt2 (torch.export.load).")] = DownloadFormat.safetensors,
             url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Download a job's compressed model (or any model) as safetensors, ONNX or a torch.export
    program. Jobs and models share one id format: the id is looked up as a job first."""
    with client(url, key) as http:
        model_id = ident
        job = request(http.get, f"/v1/jobs/{ident}")
        if job.status_code == 200:
            job = job.json()
            if job["status"] != "succeeded":
                raise fail(f"job {ident} is {job['status']}; only a succeeded job has a model")
            result = job.get("result") or {}
            if not result.get("model_id"):
                gone = result.get("deleted_model_id")
                raise fail(f"job {ident} has no model to download: its model {gone} was deleted"
                           if gone else f"job {ident} produced no model")
            model_id = str(result["model_id"])
        elif job.status_code != 404:
            checked(job)
        target = output or Path(f"{model_id}{DOWNLOAD_FORMATS[fmt.value]}")
        size = fetch_model(http, model_id, target, fmt.value)
    typer.echo(f"wrote {target} ({size} bytes, model {model_id}, {fmt.value})", err=True)
    typer.echo(str(target))


@app.command()
def demo(home: Annotated[Path, typer.Option(help="Demo state directory (recreated).")] = Path(
             ".slimline-demo"),
         keep: Annotated[bool, typer.Option(help="Keep the demo directory afterwards.")] = True,
         ) -> None:
    """Start the embedded stack, compress a briefly trained LeNet-300-100 on Fashion-MNIST over
    HTTP, and print a before/after table (what `make demo` runs)."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(home, keep=keep))


if __name__ == "__main__":
    app()
