"""The end of an attempt: a successful run's model, report, curves and plots stored and the job
marked succeeded in one transaction (`store_outcome`), or the job marked failed or canceled
(`end_attempt`). The status changes themselves are `service.states.finish`, `fail` and
`cancel_attempt`; both ends are retried while the database is unreachable."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core import models as zoo
from core.prunability import prunability_report
from service import states
from service.artifacts import add_artifact, artifact_key, put_files
from service.db import session_scope
from service.dbretry import is_unavailable, retry_while_unavailable
from service.model_files import READ_ONLY_OPS
from service.model_registry import model_key, register_model
from service.orm import Artifact, Job, Model, new_id
from service.settings import Settings
from service.states import LostOwnership
from service.store import ObjectStore
from worker.reporter import JobReporter, json_safe

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a successful run hands to the final transaction."""

    result: dict[str, Any]
    model_name: str
    model: torch.nn.Module | None  # None: no model is kept (a search's screening trial)
    curves: dict[str, Any]
    plots: list[Path] = field(default_factory=list)  # PNG files, stored as "plot" artifacts
    # files the steps added (`StepContext.add_artifact`): (name, path, kind)
    files: list[tuple[str, Path, str]] = field(default_factory=list)


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


@dataclass(frozen=True)
class InputModel:
    """The stored model a job read, when its steps left it as it was (`unchanged_input`)."""

    id: str
    storage_key: str
    size_bytes: int
    sha256: str


def _preprocessing(arch: dict[str, Any]) -> dict[str, Any]:
    stored = arch.get("preprocessing") or {}
    return {"layout": stored.get("layout") or "NCHW", "mean": stored.get("mean"),
            "std": stored.get("std")}


def same_arch(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two archs describe the same model (JSON-equal; a preprocessing record counts by its
    layout, mean and std, with NCHW and no statistics as the defaults)."""
    def plain(arch: dict[str, Any]) -> str:
        return json.dumps(json_safe({k: v for k, v in arch.items() if k != "preprocessing"}),
                          sort_keys=True)

    return plain(a) == plain(b) and \
        json.dumps(json_safe(_preprocessing(a))) == json.dumps(json_safe(_preprocessing(b)))


def unchanged_input(session: Any, job: Job, model: torch.nn.Module) -> InputModel | None:
    """The job's input model when the job left it as it was: the spec names a stored model, every
    step is read-only (`service.model_files.READ_ONLY_OPS`: export, evaluate, analyze,
    measure) and the output's arch is the stored one (a job that set preprocessing changed
    it). Such a job stores no copy: its `result.model_id` is the input model."""
    spec = job.spec or {}
    ops = [step.get("op") for step in spec.get("steps") or [] if isinstance(step, dict)]
    if not isinstance(spec.get("model"), str) or not ops or \
            not all(op in READ_ONLY_OPS for op in ops):
        return None
    row = session.get(Model, spec["model"])
    if row is None or row.tenant_id != job.tenant_id or \
            not same_arch(zoo.model_arch(model), row.arch or {}):
        return None
    return InputModel(row.id, row.storage_key, row.size_bytes, row.sha256)


def store_outcome(job_id: str, attempt: int, settings: Settings, store: ObjectStore,
                  outcome: Outcome, workdir: Path, reporter: JobReporter) -> str:
    """One transaction: the new Model, its Artifacts, the result, and `succeeded` — or
    `canceled` when a cancel was accepted first (`service.states.finish` orders the two). Objects
    stored inside the transaction are deleted again by `session_scope` if it rolls back; it is
    retried while the database is unreachable. Returns the job's final status.

    A job that left its stored input model unchanged (`unchanged_input`) stores no copy: its
    `result.model_id` is the input model, `result.model_unchanged` is true, and its
    `model.safetensors` artifact is the input model's object (exports and every other file of
    the job are its own artifacts as usual)."""
    model_path = workdir / "model.safetensors"
    prunability: dict[str, Any] | None = None
    saved = False

    def save_model() -> None:
        nonlocal prunability, saved
        if not saved and outcome.model is not None:
            zoo.save(outcome.model, model_path)
            prunability = output_report(outcome.model)
            saved = True

    def input_kept() -> bool:
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            return job is not None and outcome.model is not None and \
                unchanged_input(session, job, outcome.model) is not None

    # the checkpoint and its report are made before the final transaction (it holds the job's
    # row lock), unless the job keeps its input model (checked again inside)
    if outcome.model is not None and not retry_while_unavailable(
            input_kept, tolerance_s=settings.db_outage_tolerance_s,
            what=f"job {job_id}: reading its input model"):
        save_model()

    def produce(session: Any, job: Job) -> dict[str, Any]:
        tenant_id, model_id = job.tenant_id, new_id()
        result = json_safe(outcome.result)
        same = unchanged_input(session, job, outcome.model) if outcome.model is not None \
            else None
        if outcome.model is not None:
            result["model_unchanged"] = same is not None
            if same is None:
                save_model()
                result["after"]["checkpoint_bytes"] = model_path.stat().st_size
            else:
                model_id = same.id
                result["after"]["checkpoint_bytes"] = same.size_bytes
        report = {"job_id": job_id, "spec": job.spec, **result,
                  "model_id": model_id if outcome.model is not None else None}
        files = {"report.json": _write_json(workdir / "report.json", report),
                 "curves.json": _write_json(workdir / "curves.json", json_safe(outcome.curves)),
                 **{path.name: path for path in outcome.plots},
                 **{name: path for name, path, _ in outcome.files}}
        kinds = {name: kind for name, _, kind in outcome.files}
        if outcome.model is None:  # a search's screening trial: its result is all it keeps
            files = {"report.json": files["report.json"]}
            put_files(session, store, {artifact_key(tenant_id, job_id, "report.json"):
                                       files["report.json"]})
            add_artifact(session, store, tenant_id=tenant_id, job_id=job_id,
                         name="report.json", path=files["report.json"], stored=True,
                         kind="report")
            return result
        objects = {artifact_key(tenant_id, job_id, name): path for name, path in files.items()}
        if same is None:
            put_files(session, store, {model_key(tenant_id, model_id): model_path} | objects)
            model = register_model(session, store, tenant_id=tenant_id,
                                   name=outcome.model_name[:200],
                                   arch=zoo.model_arch(outcome.model), fmt="safetensors",
                                   params=result["after"]["params"], path=model_path,
                                   source_job_id=job_id, model_id=model_id, stored=True,
                                   report=prunability)
            kept = (model.id, model.size_bytes, model.sha256, model.storage_key)
        else:
            put_files(session, store, objects)
            kept = (same.id, same.size_bytes, same.sha256, same.storage_key)
        result["model_id"] = kept[0]
        # the model artifact is the Model's own object (one copy in the store)
        session.add(Artifact(job_id=job_id, name="model.safetensors", kind="model",
                             size_bytes=kept[1], sha256=kept[2], storage_key=kept[3]))
        for name, path in files.items():
            add_artifact(session, store, tenant_id=tenant_id, job_id=job_id, name=name,
                         path=path, stored=True,
                         kind=kinds.get(name) or ("plot" if path.suffix == ".png"
                                                  else name.split(".")[0]))
        return result

    def commit() -> str:
        reporter.flush(tolerate=False)
        with session_scope(settings) as session:
            return states.finish(session, job_id, attempt, lambda job: produce(session, job))

    return retry_while_unavailable(commit, tolerance_s=settings.db_outage_tolerance_s,
                                   what=f"job {job_id}: storing the result")


def output_report(model: torch.nn.Module) -> dict[str, Any] | None:
    """The output model's prunability report (what each method can still do to it), computed
    before the final transaction; a failure leaves the model without one (never fails the
    job)."""
    try:
        return json_safe(prunability_report(model))
    except Exception:  # the report is informative only
        log.warning("no prunability report for the output model", exc_info=True)
        return None


def end_attempt(job_id: str, attempt: int, settings: Settings, status: str,
                error: tuple[str, str] | None = None) -> bool:
    """Mark the job canceled, or failed with `error` (code, message), if it is still this
    attempt's (retried while the database is unreachable; past that the reconciler re-queues
    the job once its heartbeat is stale). True when the job was marked."""
    def mark() -> None:
        with session_scope(settings) as session:
            if status == states.CANCELED:
                states.cancel_attempt(session, job_id, attempt)
            else:
                states.fail(session, job_id, attempt, *(error or ("InternalError", "unknown")))

    try:
        retry_while_unavailable(mark, tolerance_s=settings.db_outage_tolerance_s,
                                what=f"job {job_id}: marking it {status}")
        return True
    except LostOwnership:
        log.warning("job %s: not marking it %s, another attempt owns it", job_id, status)
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        log.error("job %s: could not mark it %s (database unreachable); the reconciler "
                  "re-queues it once its heartbeat is stale", job_id, status)
    return False
