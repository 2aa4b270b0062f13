"""The job runner, plain Python (the Celery task only calls `run_job`).

One run: claim the job row (a compare-and-set on status/attempts, so a repeated delivery never
runs a job twice concurrently nor re-runs a terminal one) → load inputs → measure `before` →
run the steps → render the plots → store the model, report, curves and plots → one transaction
that creates the new Model and Artifacts and marks the job succeeded. No transaction stays open
during compute: progress, events, heartbeats and cancel checks are short transactions of their
own.

Reliability (issue 11): the run checkpoints at step boundaries and after every epoch of a train
step (`worker.checkpoint`); a later attempt of a job whose worker died resumes from the latest
checkpoint. A database outage does not fail a running job: progress writes are skipped, events
are kept in memory and written once the database is back, the final transaction is retried for
up to `db_outage_tolerance_s`.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import torch
from sqlalchemy import update

from core import models as zoo
from core.data import split
from core.errors import Cancelled, CheckpointError, DatasetError, SpecError
from jobs import states
from jobs.artifacts import add_artifact, artifact_key, put_files
from jobs.db import session_scope
from jobs.dbretry import is_unavailable, retry_while_unavailable
from jobs.errors import SlimlineError
from jobs.events import record_event, set_progress
from jobs.model_registry import model_key, register_model
from jobs.orm import Artifact, Job, new_id, utcnow
from jobs.settings import Settings, get_settings
from jobs.spec import JobSpec
from jobs.store import ObjectStore, store_from_settings
from jobs.tmpfiles import temp_dir
from worker.checkpoint import Checkpointer, Snapshot, TrainProgress
from worker.context import StepContext, model_metrics
from worker.inputs import (
    check_compatible,
    fetch_model,
    load_dataset,
    load_input_model,
    model_origin,
)
from worker.plots import render_plots
from worker.steps import run_step

log = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0  # cancel_requested is read from the DB at most this often
HEARTBEAT_MAX_S = 10.0  # heartbeat period, shorter when the reaper's timeout is short


class LostOwnership(Exception):
    """The job row is no longer ours (reaped, re-claimed by another worker, or gone)."""


class DeviceUnavailable(RuntimeError):
    """The spec asks for a device this worker does not have."""


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None: a diverged loss must not make the JSON invalid
    (PostgreSQL's json type refuses NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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


# ---- the job row ----

def _owned(session: Any, job_id: str, attempt: int, *, lock: bool = False) -> Job:
    job = session.get(Job, job_id, with_for_update=lock, populate_existing=lock)
    if job is None or job.status != states.RUNNING or job.attempts != attempt:
        raise LostOwnership(f"job {job_id} is no longer run by this attempt ({attempt})")
    return job


def claim(job_id: str, settings: Settings) -> int | None:
    """Mark the job running and return its attempt number, or None when there is nothing to do
    (gone, terminal, or running elsewhere with a fresh heartbeat). A queued job whose cancel was
    requested is marked canceled here. Database errors propagate (the task waits for the
    database without consuming more of the queue)."""
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return None
        if job.terminal:
            log.info("job %s is already %s; nothing to do", job_id, job.status)
            return None
        if job.status == states.RUNNING:
            fresh = utcnow() - timedelta(seconds=settings.job_heartbeat_timeout_s)
            if job.heartbeat_at is not None and job.heartbeat_at > fresh:
                log.info("job %s is running elsewhere (heartbeat %s); not running it twice",
                         job_id, job.heartbeat_at.isoformat())
                return None
            log.warning("job %s was running with a stale heartbeat; taking it over", job_id)
        elif job.cancel_requested:
            states.mark_canceled(job)
            return None
        if (job.attempts or 0) >= settings.job_max_attempts:
            message = (f"the job was started {job.attempts} times and its worker was lost each "
                       f"time; the limit is SLIMLINE_JOB_MAX_ATTEMPTS={settings.job_max_attempts}")
            if job.status == states.QUEUED:
                states.mark_failed(job, "WorkerLost", message)
            return None
        seen_status, seen_attempts = job.status, job.attempts or 0
        # Compare-and-set on (status, attempts): of two workers claiming the same row at once,
        # exactly one updates it (this holds on SQLite too, where SELECT takes no row lock).
        now = utcnow()
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts)
            .values(status=states.RUNNING, attempts=seen_attempts + 1, heartbeat_at=now,
                    started_at=job.started_at or now, stage="starting")
            .execution_options(synchronize_session=False)).rowcount
        if claimed == 1:
            states.status_event(session, job_id, states.RUNNING, attempt=seen_attempts + 1)
    if claimed != 1:
        log.info("job %s was claimed by another worker", job_id)
        return None
    return seen_attempts + 1


class JobReporter:
    """Progress, events, heartbeats and cancel checks of one attempt, in short transactions.

    While the database is unreachable the job keeps computing: progress writes are skipped,
    events are kept (in order) and written with the next write that succeeds, cancel checks
    answer what they last knew. `LostOwnership` (the row is no longer this attempt's) always
    propagates."""

    def __init__(self, job_id: str, attempt: int, settings: Settings) -> None:
        self.job_id, self.attempt, self.settings = job_id, attempt, settings
        self.step_count = 1
        self.step_index = 0
        self._cancel = False
        self._last_cancel_check = 0.0
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._unavailable_since: float | None = None
        self.checkpointer: Checkpointer | None = None
        self._stop = threading.Event()
        self._period = min(HEARTBEAT_MAX_S, settings.job_heartbeat_timeout_s / 4)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}",
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _beat(self) -> None:
        while not self._stop.wait(self._period):
            try:
                with session_scope(self.settings) as session:
                    states.heartbeat(_owned(session, self.job_id, self.attempt))
            except LostOwnership:
                return
            except Exception:  # a missed heartbeat is retried next period
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def _write(self, fn: Any, *, tolerate: bool = True) -> bool:
        """Run `fn(session)` in a short transaction after writing pending events; False when
        the database is unreachable (nothing written; raised instead when not `tolerate`)."""
        try:
            with session_scope(self.settings) as session:
                _owned(session, self.job_id, self.attempt)
                for kind, data in self._pending:
                    record_event(session, self.job_id, kind, data)
                fn(session)
        except LostOwnership:
            raise
        except Exception as exc:
            if not is_unavailable(exc) or not tolerate:
                raise
            if self._unavailable_since is None:
                self._unavailable_since = time.monotonic()
                log.warning("job %s: database unavailable (%s); computing on, progress and "
                            "events are written when it is back", self.job_id,
                            type(exc).__name__)
            return False
        if self._unavailable_since is not None:
            log.info("job %s: database reachable again after %.1f s", self.job_id,
                     time.monotonic() - self._unavailable_since)
            self._unavailable_since = None
        self._pending.clear()
        return True

    def progress(self, fraction: float, stage: str) -> None:
        """`fraction` of the current step done; job progress spans all steps."""
        total = (self.step_index + min(1.0, max(0.0, fraction))) / self.step_count
        self._write(lambda session: set_progress(session, self.job_id, min(total, 0.999), stage))

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self._pending.append((kind, json_safe(data)))
        self._write(lambda session: None)

    def flush(self, *, tolerate: bool = True) -> bool:
        """Write pending events; True when nothing is pending any more."""
        return not self._pending or self._write(lambda session: None, tolerate=tolerate)

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= CANCEL_POLL_S:
            self._last_cancel_check = now

            def check(session: Any) -> None:
                self._cancel = bool(session.get(Job, self.job_id).cancel_requested)

            self._write(check)
        return self._cancel


# ---- the run ----

ERROR_CODES: dict[type[BaseException], str] = {
    SpecError: "SpecError",
    DatasetError: "DatasetError",
    CheckpointError: "CheckpointError",
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


@dataclass
class Outcome:
    """What a successful run hands to the final transaction."""

    result: dict[str, Any]
    model_name: str
    model: torch.nn.Module
    curves: dict[str, Any]
    plots: list[Path] = field(default_factory=list)  # PNG files, stored as "plot" artifacts


def _read_job(job_id: str, attempt: int, settings: Settings) -> tuple[str, dict, dict | None]:
    def read() -> tuple[str, dict, dict | None]:
        with session_scope(settings) as session:
            job = _owned(session, job_id, attempt)
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


def execute(job_id: str, attempt: int, settings: Settings, store: ObjectStore,
            reporter: JobReporter, workdir: Path) -> Outcome:
    """Everything between the claim and the final transaction."""
    tenant_id, raw_spec, pointer = _read_job(job_id, attempt, settings)
    try:
        spec = JobSpec.model_validate(raw_spec, context={"max_epochs": settings.max_epochs})
    except ValueError as exc:
        raise SpecError(f"the stored job spec is invalid: {exc}") from None
    reporter.step_count = len(spec.steps)
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    reporter.progress(0.0, "loading model")
    source = load_input_model(spec, tenant_id, settings, store, workdir)
    reporter.progress(0.0, f"loading dataset {spec.dataset}")
    train_set, test_set = load_dataset(spec, tenant_id, settings, store, workdir,
                                       int(source.model.slimline_arch["num_classes"]))
    input_shape = check_compatible(source.model, train_set, test_set)
    splits = split(train_set, test_set, spec.seed)
    ctx = StepContext(model=source.model.to(device), splits=splits, input_shape=input_shape,
                      device=device, generator=torch.Generator().manual_seed(spec.seed),
                      settings=settings, job_id=job_id, reporter=reporter,
                      step_count=len(spec.steps), steps=list(spec.steps),
                      masks=getattr(source.model, "slimline_masks", None),
                      input_origin=model_origin(spec, tenant_id, settings))

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
        reporter.progress(0.0, "resuming from checkpoint")
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
        reporter.progress(0.0, "measuring the input model")
        before = model_metrics(ctx.model, input_shape, splits.test, device)

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
        steps.append(run_step(ctx, step))
        reporter.progress(1.0, f"{step.op} done ({index + 1}/{len(spec.steps)})")
        if index + 1 < len(spec.steps):
            save_checkpoint(index + 1)
    ctx.check_cancel()
    after = {k: steps[-1][k] for k in ("params", "macs", "accuracy")}
    result = {"model_id": None, "before": before, "after": after, "steps": steps,
              "dataset": spec.dataset, "device": str(device), "attempts": attempt,
              "resumes": resumes, "checkpoints": checkpointer.saved}
    plots = render_plots(ctx.curves, workdir)
    model = ctx.model.cpu()
    model.slimline_masks = ctx.masks  # stored sparsely by core.models.save
    return Outcome(result, f"{source.name}-{job_id[-8:]}", model, ctx.curves, plots)


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


def _finish(job_id: str, attempt: int, settings: Settings, store: ObjectStore,
            outcome: Outcome, workdir: Path, reporter: JobReporter) -> str:
    """One transaction: the new Model, its Artifacts, the result, and `succeeded` — or
    `canceled` when a cancel was accepted first. It starts with a compare-and-set on the row
    (status, attempt, no cancel requested), which takes the row lock (PostgreSQL) or the write
    lock (SQLite) before anything else, so a concurrent cancel either lands before it (the job
    ends canceled) or after it (the cancel gets 409). Objects stored inside the transaction are
    deleted again by `session_scope` if it rolls back; it is retried while the database is
    unreachable."""
    model_path = workdir / "model.safetensors"
    zoo.save(outcome.model, model_path)
    result = json_safe(outcome.result)
    result["after"]["checkpoint_bytes"] = model_path.stat().st_size

    def commit() -> str:
        reporter.flush(tolerate=False)
        with session_scope(settings) as session:
            won = session.execute(
                update(Job).where(Job.id == job_id, Job.status == states.RUNNING,
                                  Job.attempts == attempt, Job.cancel_requested.is_(False))
                .values(stage="storing results")
                .execution_options(synchronize_session=False)).rowcount
            job = _owned(session, job_id, attempt, lock=True)
            if not won:  # ours, so a cancel was requested first
                states.mark_canceled(job)
                job.checkpoint = None
                return states.CANCELED
            tenant_id, model_id = job.tenant_id, new_id()
            report = {"job_id": job_id, "spec": job.spec, **result, "model_id": model_id}
            files = {"report.json": _write_json(workdir / "report.json", report),
                     "curves.json": _write_json(workdir / "curves.json",
                                                json_safe(outcome.curves)),
                     **{path.name: path for path in outcome.plots}}
            put_files(session, store, {model_key(tenant_id, model_id): model_path} | {
                artifact_key(tenant_id, job_id, name): path for name, path in files.items()})
            model = register_model(session, store, tenant_id=tenant_id,
                                   name=outcome.model_name[:200],
                                   arch=outcome.model.slimline_arch, fmt="safetensors",
                                   params=result["after"]["params"], path=model_path,
                                   source_job_id=job_id, model_id=model_id, stored=True)
            result["model_id"] = model.id
            # the model artifact is the Model's own object (one copy in the store)
            session.add(Artifact(job_id=job_id, name="model.safetensors", kind="model",
                                 size_bytes=model.size_bytes, sha256=model.sha256,
                                 storage_key=model.storage_key))
            for name, path in files.items():
                add_artifact(session, store, tenant_id=tenant_id, job_id=job_id, name=name,
                             path=path, stored=True,
                             kind="plot" if path.suffix == ".png" else name.split(".")[0])
            states.mark_succeeded(job, result)
            job.checkpoint = None
        return states.SUCCEEDED

    return retry_while_unavailable(commit, tolerance_s=settings.db_outage_tolerance_s,
                                   what=f"job {job_id}: storing the result")


def _end(job_id: str, attempt: int, settings: Settings, status: str,
         exc: BaseException | None) -> bool:
    """Mark the job canceled or failed, if it is still ours (retried while the database is
    unreachable; past that the reconciler re-queues the job once its heartbeat is stale).
    True when the job was marked."""
    def mark() -> None:
        with session_scope(settings) as session:
            job = _owned(session, job_id, attempt, lock=True)
            if status == states.CANCELED:
                states.mark_canceled(job)
            else:
                code, message = describe_error(exc) if exc else ("InternalError", "unknown")
                states.mark_failed(job, code, message)
            job.checkpoint = None

    try:
        retry_while_unavailable(mark, tolerance_s=settings.db_outage_tolerance_s,
                                what=f"job {job_id}: marking it {status}")
        return True
    except LostOwnership:
        log.warning("job %s: not marking it %s, another attempt owns it", job_id, status)
    except Exception as error:
        if not is_unavailable(error):
            raise
        log.error("job %s: could not mark it %s (database unreachable); the reconciler "
                  "re-queues it once its heartbeat is stale", job_id, status)
    return False


def run_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Run job `job_id` to a terminal state; returns that state, or None when there was nothing
    to do. Safe to call again for the same id (repeated deliveries are no-ops). Raises a
    database error when the job cannot even be claimed because the database is unreachable
    (after waiting up to `db_outage_tolerance_s`): the task then gives the message back."""
    settings = settings or get_settings()
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
                outcome = execute(job_id, attempt, settings, store, reporter, Path(tmp))
                status = _finish(job_id, attempt, settings, store, outcome, Path(tmp), reporter)
        except Cancelled:
            status = states.CANCELED
            ended = _end(job_id, attempt, settings, status, None)
        except LostOwnership as exc:
            log.warning("job %s: %s; abandoning this attempt", job_id, exc)
            return None
        except Exception as exc:
            log.exception("job %s failed", job_id)
            status = states.FAILED
            ended = _end(job_id, attempt, settings, status, exc)
    if ended and reporter.checkpointer is not None:
        reporter.checkpointer.discard()  # the job is over; its checkpoint is not needed
    log.info("job %s: %s", job_id, status)
    return status
