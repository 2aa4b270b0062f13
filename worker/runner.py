"""The job runner, plain Python (the Celery task only calls `run_job`).

One run: claim the job row (a compare-and-set on status/attempts, so a repeated delivery never
runs a job twice concurrently nor re-runs a terminal one) → load inputs → measure `before` →
run the steps → render the plots → store the model, report, curves and plots → one transaction
that creates the new Model and Artifacts and marks the job succeeded. No transaction stays open
during compute: progress, events, heartbeats and cancel checks are short transactions of their
own.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
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
from jobs.artifacts import add_artifact
from jobs.db import session_scope
from jobs.errors import SlimlineError
from jobs.events import record_event, set_progress
from jobs.model_registry import register_model
from jobs.orm import Artifact, Job, utcnow
from jobs.settings import Settings, get_settings
from jobs.spec import JobSpec
from jobs.store import ObjectStore, store_from_settings
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


# ---- the job row ----

def _owned(session: Any, job_id: str, attempt: int) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.status != states.RUNNING or job.attempts != attempt:
        raise LostOwnership(f"job {job_id} is no longer run by this attempt ({attempt})")
    return job


def claim(job_id: str, settings: Settings) -> int | None:
    """Mark the job running and return its attempt number, or None when there is nothing to do
    (gone, terminal, or running elsewhere with a fresh heartbeat). A queued job whose cancel was
    requested is marked canceled here."""
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
    if claimed != 1:
        log.info("job %s was claimed by another worker", job_id)
        return None
    return seen_attempts + 1


class JobReporter:
    """Progress, events, heartbeats and cancel checks of one attempt, in short transactions."""

    def __init__(self, job_id: str, attempt: int, settings: Settings) -> None:
        self.job_id, self.attempt, self.settings = job_id, attempt, settings
        self.step_count = 1
        self.step_index = 0
        self._cancel = False
        self._last_cancel_check = 0.0
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

    def progress(self, fraction: float, stage: str) -> None:
        """`fraction` of the current step done; job progress spans all steps."""
        total = (self.step_index + min(1.0, max(0.0, fraction))) / self.step_count
        with session_scope(self.settings) as session:
            _owned(session, self.job_id, self.attempt)
            set_progress(session, self.job_id, min(total, 0.999), stage)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        with session_scope(self.settings) as session:
            _owned(session, self.job_id, self.attempt)
            record_event(session, self.job_id, kind, json_safe(data))

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= CANCEL_POLL_S:
            self._last_cancel_check = now
            with session_scope(self.settings) as session:
                self._cancel = bool(_owned(session, self.job_id, self.attempt).cancel_requested)
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


def execute(job_id: str, attempt: int, settings: Settings, store: ObjectStore,
            reporter: JobReporter, workdir: Path) -> Outcome:
    """Everything between the claim and the final transaction."""
    with session_scope(settings) as session:
        job = _owned(session, job_id, attempt)
        tenant_id, raw_spec = job.tenant_id, job.spec
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
    reporter.progress(0.0, "measuring the input model")
    before = model_metrics(ctx.model, input_shape, splits.test, device)
    steps = []
    for index, step in enumerate(spec.steps):
        ctx.step_index = reporter.step_index = index
        steps.append(run_step(ctx, step))
        reporter.progress(1.0, f"{step.op} done ({index + 1}/{len(spec.steps)})")
    ctx.check_cancel()
    after = {k: steps[-1][k] for k in ("params", "macs", "accuracy")}
    result = {"model_id": None, "before": before, "after": after, "steps": steps,
              "dataset": spec.dataset, "device": str(device)}
    plots = render_plots(ctx.curves, workdir)
    model = ctx.model.cpu()
    model.slimline_masks = ctx.masks  # stored sparsely by core.models.save
    return Outcome(result, f"{source.name}-{job_id[-8:]}", model, ctx.curves, plots)


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


def _finish(job_id: str, attempt: int, settings: Settings, store: ObjectStore,
            outcome: Outcome, workdir: Path) -> str:
    """One transaction: the new Model, its Artifacts, the result, and `succeeded`. Objects are
    stored inside it and deleted again by `session_scope` if it rolls back."""
    model_path = workdir / "model.safetensors"
    zoo.save(outcome.model, model_path)
    result = json_safe(outcome.result)
    result["after"]["checkpoint_bytes"] = model_path.stat().st_size
    with session_scope(settings) as session:
        job = _owned(session, job_id, attempt)
        if job.cancel_requested:
            states.mark_canceled(job)
            return states.CANCELED
        model = register_model(session, store, tenant_id=job.tenant_id,
                               name=outcome.model_name[:200], arch=outcome.model.slimline_arch,
                               fmt="safetensors", params=result["after"]["params"],
                               path=model_path, source_job_id=job_id)
        result["model_id"] = model.id
        # the model artifact is the Model's own object (one copy in the store)
        session.add(Artifact(job_id=job_id, name="model.safetensors", kind="model",
                             size_bytes=model.size_bytes, sha256=model.sha256,
                             storage_key=model.storage_key))
        report = {"job_id": job_id, "spec": job.spec, **result}
        for name, kind, value in (("report.json", "report", report),
                                  ("curves.json", "curves", json_safe(outcome.curves))):
            add_artifact(session, store, tenant_id=job.tenant_id, job_id=job_id, name=name,
                         path=_write_json(workdir / name, value), kind=kind)
        for path in outcome.plots:
            add_artifact(session, store, tenant_id=job.tenant_id, job_id=job_id, name=path.name,
                         path=path, kind="plot")
        states.mark_succeeded(job, result)
    return states.SUCCEEDED


def _end(job_id: str, attempt: int, settings: Settings, status: str,
         exc: BaseException | None) -> None:
    """Mark the job canceled or failed, if it is still ours."""
    try:
        with session_scope(settings) as session:
            job = _owned(session, job_id, attempt)
            if status == states.CANCELED:
                states.mark_canceled(job)
            else:
                code, message = describe_error(exc) if exc else ("InternalError", "unknown")
                states.mark_failed(job, code, message)
    except LostOwnership:
        log.warning("job %s: not marking it %s, another attempt owns it", job_id, status)


def run_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Run job `job_id` to a terminal state; returns that state, or None when there was nothing
    to do. Safe to call again for the same id (repeated deliveries are no-ops)."""
    settings = settings or get_settings()
    attempt = claim(job_id, settings)
    if attempt is None:
        return None
    log.info("job %s: attempt %d started", job_id, attempt)
    store = store_from_settings(settings)
    with tempfile.TemporaryDirectory(prefix=f"slimline-{job_id}-") as tmp:
        try:
            with JobReporter(job_id, attempt, settings) as reporter:
                outcome = execute(job_id, attempt, settings, store, reporter, Path(tmp))
                status = _finish(job_id, attempt, settings, store, outcome, Path(tmp))
        except Cancelled:
            status = states.CANCELED
            _end(job_id, attempt, settings, status, None)
        except LostOwnership as exc:
            log.warning("job %s: %s; abandoning this attempt", job_id, exc)
            return None
        except Exception as exc:
            log.exception("job %s failed", job_id)
            status = states.FAILED
            _end(job_id, attempt, settings, status, exc)
    log.info("job %s: %s", job_id, status)
    return status
