"""The job runner, plain Python (the Celery task only calls `run_job`).

One run: claim the job row (`service.states.claim`, a compare-and-set on status/attempts, so a
repeated delivery never runs a job twice concurrently nor re-runs a terminal one) → load inputs →
measure `before` → run the steps → render the plots → `worker.finish.store_outcome`: one
transaction that stores the new Model and Artifacts and marks the job succeeded. No transaction
stays open during compute: progress, events, heartbeats and cancel checks are short transactions
of their own (`worker.reporter.JobReporter`).

Reliability (issue 11): the run checkpoints at step boundaries and after every epoch of a train
step (`worker.checkpoint`); a later attempt of a job whose worker died resumes from the latest
checkpoint. A database outage does not fail a running job: progress writes are skipped, events
are kept in memory and written once the database is back, the final transaction is retried for
up to `db_outage_tolerance_s`.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from core.errors import Cancelled, CheckpointError, DatasetError, ExportError, SpecError
from core.graph import register_graph
from core.models import model_arch, set_masks
from service import states
from service.db import session_scope
from service.dbretry import is_unavailable, retry_while_unavailable
from service.errors import NotFound, SlimlineError
from service.model_registry import graph_key
from service.orm import Job, utcnow
from service.search import AUTO, LEAN_KINDS, MODELLESS_KINDS, send_tick
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.states import LostOwnership
from service.store import ObjectStore, store_from_settings
from service.tmpfiles import temp_dir
from worker.checkpoint import Checkpointer, Snapshot, TrainProgress
from worker.context import StepContext, model_metrics
from worker.finish import Outcome, end_attempt, store_outcome
from worker.inputs import (
    fetch_model,
    load_dataset,
    load_input_model,
    model_origin,
    prepare_data,
)
from worker.plots import render_plots
from worker.progress import DataSizes, step_costs
from worker.reporter import JobReporter
from worker.steps import run_step

log = logging.getLogger(__name__)

class DeviceUnavailable(RuntimeError):
    """The spec asks for a device this worker does not have."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("the job asks for device 'cuda' but this worker has no CUDA "
                                "device; run a worker on the gpu queue or use device 'auto'")
    return torch.device(requested)


_stores: dict[tuple[str, str | None], ObjectStore] = {}


def _store(settings: Settings) -> ObjectStore:
    """One object store client per process and URL (an S3 client takes ~20 ms to create; it is
    thread-safe)."""
    key = (settings.storage_url, settings.s3_endpoint_url)
    if key not in _stores:
        _stores[key] = store_from_settings(settings)
    return _stores[key]


def work_root(settings: Settings) -> Path:
    """Where jobs keep their temporary files (one directory per running job)."""
    return settings.home / "work"


def claim(job_id: str, settings: Settings) -> int | None:
    """`service.states.claim` in a transaction of its own: the attempt number, or None when there
    is nothing to run. Database errors propagate (the task waits for the database without
    consuming more of the queue)."""
    with session_scope(settings) as session:
        return states.claim(session, job_id, now=utcnow(),
                            heartbeat_timeout_s=settings.job_heartbeat_timeout_s,
                            max_attempts=settings.job_max_attempts)



ERROR_CODES: dict[type[BaseException], str] = {
    SpecError: "SpecError",
    DatasetError: "DatasetError",
    CheckpointError: "CheckpointError",
    ExportError: "ExportError",
    DeviceUnavailable: "DeviceUnavailable",
    torch.cuda.OutOfMemoryError: "OutOfMemory",
}


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(code, short message) for a failed job; never a traceback."""
    if isinstance(exc, SlimlineError):
        return exc.code, exc.detail[:1000]
    for kind, code in ERROR_CODES.items():
        if isinstance(exc, kind):
            return code, (str(exc).strip().splitlines() or [kind.__name__])[0][:1000]
    if is_unavailable(exc):
        return "DatabaseUnavailable", ("the database was unreachable for longer than "
                                       "SLIMLINE_DB_OUTAGE_TOLERANCE_S; submit the job again")
    return "InternalError", (f"the worker hit an unexpected {type(exc).__name__}; "
                             "the worker log has the details")


def _read_job(job_id: str, attempt: int, settings: Settings) -> tuple[str, dict, dict | None]:
    def read() -> tuple[str, dict, dict | None]:
        with session_scope(settings) as session:
            job = states.owned(session, job_id, attempt)
            return job.tenant_id, job.spec, job.checkpoint

    return retry_while_unavailable(read, tolerance_s=settings.db_outage_tolerance_s,
                                   what=f"job {job_id}: reading the job")


def _resume(ctx: StepContext, checkpointer: Checkpointer, attempt: int
            ) -> tuple[Snapshot, dict[str, Any]]:
    """Restore ctx from the latest checkpoint; returns the snapshot and the `resumes` entry."""
    model, generator, snapshot = checkpointer.load(ctx.device)
    ctx.model, ctx.generator = model, generator
    ctx.masks = getattr(model, "slimline_masks", None)
    ctx.global_epoch, ctx.curves, ctx.applied = (snapshot.global_epoch, snapshot.curves,
                                                 snapshot.applied)
    ctx.resume_train = snapshot.train
    pointer = checkpointer.pointer or {}
    dropped = checkpointer.forget_later_events()
    entry = {"attempt": attempt, "step": pointer.get("step", 0),
             "epoch": pointer.get("epoch", 0), "checkpoint_at": pointer.get("at"),
             "events_dropped": dropped}
    return snapshot, entry


def register_arch_graph(spec: JobSpec, tenant_id: str, store: ObjectStore, workdir: Path
                        ) -> None:
    """A fresh model of an imported graph's arch (`{"arch": {"name": "graph", "graph": sha,
    ...}}`): fetch the tenant's stored graph (`service.model_registry.graph_key`) and register
    it, so `core.models.build` finds it. SpecError when the tenant has no such graph."""
    arch = None if spec.model_id is not None else spec.model.arch  # type: ignore[union-attr]
    if not isinstance(arch, dict) or arch.get("name") != "graph":
        return
    sha = str(arch.get("graph"))
    path = workdir / "graph.json"
    try:
        store.get_to_file(graph_key(tenant_id, sha), path)
        ir = json.loads(path.read_text(encoding="utf-8"))
    except (NotFound, ValueError, OSError) as exc:
        raise SpecError(f"graph {sha} is not stored for you ({type(exc).__name__}); upload the "
                        "model (.pt2 or .onnx) again and use its id") from None
    if register_graph(ir) != sha:
        raise SpecError(f"the stored graph {sha} does not hash to its id; upload the model "
                        "again")


def execute(job_id: str, attempt: int, settings: Settings, store: ObjectStore,
            reporter: JobReporter, workdir: Path, lean: bool = False) -> Outcome:
    """Everything between the claim and the final transaction. `lean` (a search's trial): the
    test accuracy is measured only after the last step (the search measured the starting model
    once; a trial's candidate is judged by its last, measure, step)."""
    tenant_id, raw_spec, pointer = _read_job(job_id, attempt, settings)
    try:
        spec = JobSpec.model_validate(raw_spec, context={"max_epochs": settings.max_epochs})
    except ValueError as exc:
        raise SpecError(f"the stored job spec is invalid: {exc}") from None
    reporter.step_count = len(spec.steps)
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    reporter.stage("loading model")
    register_arch_graph(spec, tenant_id, store, workdir)
    source = load_input_model(spec, tenant_id, settings, store, workdir)
    reporter.stage(f"loading dataset {spec.dataset}")
    train_set, test_set = load_dataset(spec, tenant_id, settings, store, workdir,
                                       int(model_arch(source.model)["num_classes"]))
    # shapes, normalization and layout, once: every step reads ctx.splits (worker.inputs)
    data = prepare_data(source.model, train_set, test_set, normalize=spec.normalize,
                        seed=spec.seed, can_adapt=source.model_id is not None)
    del train_set, test_set
    splits, input_shape = data.splits, data.input_shape
    # progress weighs every step by its expected cost (worker.progress)
    reporter.set_costs(step_costs(spec.steps, DataSizes(
        len(splits.train), len(splits.val), len(splits.test)), lean=lean))
    ctx = StepContext(model=source.model.to(device), splits=splits, input_shape=input_shape,
                      device=device, generator=torch.Generator().manual_seed(spec.seed),
                      settings=settings, job_id=job_id, reporter=reporter,
                      step_count=len(spec.steps), steps=list(spec.steps),
                      masks=getattr(source.model, "slimline_masks", None),
                      input_origin=model_origin(spec, tenant_id, settings),
                      workdir=workdir, start_arch=copy.deepcopy(model_arch(source.model)),
                      layout=data.layout)

    def fetch_other(model_id: str) -> torch.nn.Module:
        path = workdir / f"other-{len(list(workdir.glob('other-*')))}.safetensors"
        return fetch_model(model_id, tenant_id, settings, store, path)[0].to(device)

    ctx.fetch_model = fetch_other
    checkpointer = Checkpointer(job_id, tenant_id, attempt, settings, store, workdir, pointer)
    reporter.checkpointer = checkpointer  # run_job deletes its objects once the job has ended
    resumes: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    first = 0
    snapshot, unreadable = None, None
    if pointer is not None:
        reporter.stage("resuming from checkpoint")
        try:
            snapshot, entry = _resume(ctx, checkpointer, attempt)
        except (LostOwnership, Cancelled):
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise
            # objects lost or damaged: starting over beats failing an accepted job
            unreadable = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            log.warning("job %s: checkpoint %s is unreadable (%s); starting over", job_id,
                        pointer.get("seq"), unreadable)
            checkpointer.discard()
            checkpointer.pointer = None
    if snapshot is not None:
        before, steps, first = snapshot.before, snapshot.steps, snapshot.step_index
        resumes = [*snapshot.resumes, entry]
        reporter.event("status", {"status": "resumed", **entry})
        log.info("job %s: attempt %d resumes at step %d, epoch %d", job_id, attempt,
                 entry["step"], entry["epoch"])
    else:
        if attempt > 1:  # the earlier attempt died before its first (readable) checkpoint
            resumes = [{"attempt": attempt, "step": 0, "epoch": 0, "checkpoint_at": None,
                        "events_dropped": checkpointer.forget_later_events()}]
            if unreadable:
                resumes[0]["checkpoint_unreadable"] = unreadable
            reporter.event("status", {"status": "resumed", **resumes[0]})
        for kind, payload in data.events:  # a resumed run has them from its first attempt
            reporter.event(kind, payload)
        reporter.stage("measuring the input model")
        before = model_metrics(ctx.model, input_shape, splits.test, device, accuracy=not lean)

    def save_checkpoint(step_index: int, train: TrainProgress | None = None) -> None:
        if not reporter.flush():
            return  # the database is unreachable; the previous checkpoint stays the latest
        checkpointer.save(ctx.model, ctx.masks, ctx.generator, Snapshot(
            step_index=step_index, steps=steps, before=before, global_epoch=ctx.global_epoch,
            curves=ctx.curves, applied=ctx.applied, resumes=resumes, train=train))

    ctx.save_checkpoint = lambda train: save_checkpoint(ctx.step_index, train)
    for index in range(first, len(spec.steps)):
        step = spec.steps[index]
        ctx.step_index = reporter.step_index = index
        steps.append(run_step(ctx, step, accuracy=not lean or index == len(spec.steps) - 1))
        reporter.progress(1.0, f"{step.op} done ({index + 1}/{len(spec.steps)})")
        if index + 1 < len(spec.steps):
            save_checkpoint(index + 1)
    ctx.check_cancel()
    after = {k: steps[-1][k] for k in ("params", "macs", "accuracy")}
    result = {"model_id": None, "before": before, "after": after, "steps": steps,
              "dataset": spec.dataset, "device": str(device), "attempts": attempt,
              "resumes": resumes, "checkpoints": checkpointer.saved}
    if data.summary is not None:
        result["preprocessing"] = data.summary
    plots = render_plots(ctx.curves, workdir)
    model = ctx.model.cpu()
    if data.preprocessing is not None:  # a chained job applies it again
        model_arch(model)["preprocessing"] = data.preprocessing
    set_masks(model, ctx.masks)  # stored sparsely by core.models.save
    return Outcome(result, f"{source.name}-{job_id[-8:]}", model, ctx.curves, plots,
                   files=ctx.artifacts)


def run_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Run job `job_id` to a terminal state; returns that state, or None when there was nothing
    to do. Safe to call again for the same id (repeated deliveries are no-ops). Raises a
    database error when the job cannot even be claimed because the database is unreachable
    (after waiting up to `db_outage_tolerance_s`): the task then gives the message back."""
    settings = settings or get_settings()
    role = retry_while_unavailable(lambda: job_role(job_id, settings),
                                   tolerance_s=settings.db_outage_tolerance_s,
                                   what=f"job {job_id}: reading it")
    if role is None:
        log.warning("job %s does not exist; dropping the message", job_id)
        return None
    if role.kind == AUTO:  # a search: its coordinator runs for a moment and returns
        from worker.auto_search import tick

        return tick(job_id, settings)
    try:
        return _run_attempt(job_id, settings, role)
    finally:
        if role.parent_id is not None:  # a trial ended (or was dropped): advance its search
            advance_search(role.parent_id, role.queue, settings)


def advance_search(search_id: str, queue: str, settings: Settings) -> None:
    """Run the search's coordinator right here, now that one of its trials ended (a moment's
    bookkeeping; a message would wait behind the queued trials). If that fails, send it as a
    message; the reconciler runs an idle search anyway."""
    from worker.auto_search import tick

    try:
        tick(search_id, settings)
    except Exception as exc:  # noqa: BLE001 - the database may be unreachable right now
        log.warning("search %s: could not advance it after its trial (%s); sending it",
                    search_id, type(exc).__name__)
        send_tick(search_id, queue, settings)


@dataclass(frozen=True)
class Role:
    kind: str
    parent_id: str | None
    queue: str


def job_role(job_id: str, settings: Settings) -> Role | None:
    """What the job is: an ordinary job, a search (`auto`) or a trial of one."""
    with session_scope(settings) as session:
        row = session.execute(select(Job.kind, Job.parent_id, Job.queue)
                              .where(Job.id == job_id)).first()
    return None if row is None else Role(row[0] or "job", row[1], row[2])


def _run_attempt(job_id: str, settings: Settings, role: Role) -> str | None:
    attempt = retry_while_unavailable(lambda: claim(job_id, settings),
                                      tolerance_s=settings.db_outage_tolerance_s,
                                      what=f"job {job_id}: claiming")
    if attempt is None:
        return None
    log.info("job %s: attempt %d started", job_id, attempt)
    store = _store(settings)
    ended = True
    # under SLIMLINE_HOME/work, named by pid: what a killed worker leaves is swept by the next
    # worker that starts (and periodically by the reconciler thread)
    with temp_dir(work_root(settings), f"job-{job_id}") as tmp:
        reporter = JobReporter(job_id, attempt, settings)
        try:
            with reporter:
                outcome = execute(job_id, attempt, settings, store, reporter, Path(tmp),
                                  lean=role.kind in LEAN_KINDS)
                if role.kind in MODELLESS_KINDS:  # a search keeps only the result of these
                    outcome.model = None
                status = store_outcome(job_id, attempt, settings, store, outcome, Path(tmp),
                                       reporter)
        except Cancelled:
            status = states.CANCELED
            ended = end_attempt(job_id, attempt, settings, status)
        except LostOwnership as exc:
            log.warning("job %s: %s; abandoning this attempt", job_id, exc)
            return None
        except Exception as exc:
            log.exception("job %s failed", job_id)
            status = states.FAILED
            ended = end_attempt(job_id, attempt, settings, status, describe_error(exc))
    if ended and reporter.checkpointer is not None:
        reporter.checkpointer.discard()  # the job is over; its checkpoint is not needed
    log.info("job %s: %s", job_id, status)
    return status
