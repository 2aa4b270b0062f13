"""Deleting a model, a dataset or a job with every stored object it owns (`DELETE /v1/models/
{id}`, `/v1/datasets/{id}`, `/v1/jobs/{id}`), and the re-check at submission that keeps a queued
job from naming a model or dataset deleted at the same moment.

Rows first, objects after: each delete removes its rows in the caller's transaction and
registers the removal of their objects with `after_commit`, so a crash (or a failed commit)
never leaves a row that points at a missing object. What a crash right after the commit can
leave is objects no row names: nothing serves or reads them (every read starts from a row), so
they are harmless and only take space; each object a removal could not delete is logged.

What stays and what goes:

* a model: its checkpoint, its on-demand exports (`service.model_files.export_key`), the
  tenant's content-addressed graph object when no other model of the tenant is built on that
  graph, and every job artifact row that is the model's own object (`model.safetensors`). Jobs
  whose `result.model_id` named it stay, with `result.model_id` null and `result.
  deleted_model_id` the id; jobs that read it keep their spec as it was.
* a dataset: its file. Built-in datasets cannot be deleted.
* a job: its events, artifacts (reports, curves, plots, exports) and their objects, a
  checkpoint it still points at, and for an auto-compress search its trials with theirs and
  the trials' models, except the one the search chose (its `result.model_id`) and any a queued
  or running job reads. A model the job produced stays (it is the user's asset), with
  `source_job_id` null. The search's Optuna study rows stay (a few rows per trial, in its own
  schema or file).

409 while a queued or running job uses the model or dataset (naming the jobs), and for a
queued or running job itself (cancel it first). The check cannot race a submission: the delete
takes the row's write lock before it looks for jobs that use it (an UPDATE: a row lock on
PostgreSQL, the database write lock on SQLite), and a submission re-reads the models and the
dataset it names after inserting its job (`lock_job_inputs`: FOR SHARE on PostgreSQL; on SQLite
its insert holds the write lock), so one of the two waits for the other and then sees it: the
delete answers 409, or the submission 404.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

import service.spec  # noqa: F401 - registers every method (their referenced_models)
from service.datasets import BUILTINS, get_dataset
from service.db import after_commit, rows_changed
from service.errors import Conflict, NotFound
from service.model_files import EXPORTED, export_key
from service.model_registry import get_model, graph_key
from service.orm import Artifact, Dataset, Job, JobEvent, Model
from service.registry import spec_for
from service.spec import JobSpec
from service.states import QUEUED, RUNNING, TERMINAL
from service.store import ObjectStore

log = logging.getLogger(__name__)

ACTIVE = (QUEUED, RUNNING)
MAX_NAMED = 5  # jobs named in a 409's detail
# the objects of one checkpoint under its prefix (worker.checkpoint.OBJECTS): a job failed after
# losing its worker in every attempt can still point at its last one
CHECKPOINT_OBJECTS = ("model.safetensors", "state.pt", "state.json")


class InUse(Conflict):
    """A queued or running job uses the model or dataset being deleted."""


class JobNotFinished(Conflict):
    """A queued or running job (or one whose trials still run) cannot be deleted."""


class JobIsTrial(Conflict):
    """A trial is deleted with its auto-compress search, not on its own."""


class BuiltinDataset(Conflict):
    """Built-in datasets are part of the service."""


# ---- what a job's spec reads ----------------------------------------------------------------

def spec_models(spec: dict[str, Any] | None) -> set[str]:
    """The ids of the models a stored spec reads: its `model` and every step's
    `referenced_models()` (analyze's `other_model`)."""
    spec = spec or {}
    found = {spec["model"]} if isinstance(spec.get("model"), str) else set()
    for step in spec.get("steps") or []:
        if not isinstance(step, dict):
            continue
        method = spec_for(str(step.get("op")))
        try:
            found.update(method.model_validate(step).referenced_models() if method else [])
        except ValueError:  # a spec stored by another version: read the known field
            if isinstance(step.get("other_model"), str):
                found.add(step["other_model"])
    return found


def spec_graph(spec: dict[str, Any] | None) -> str | None:
    """The graph a fresh `{"arch": {"name": "graph", "graph": sha}}` model is built from."""
    model = (spec or {}).get("model")
    arch = model.get("arch") if isinstance(model, dict) else None
    if isinstance(arch, dict) and arch.get("name") == "graph":
        return str(arch.get("graph"))
    return None


def _active_jobs(session: Session, tenant_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.tenant_id == tenant_id,
                                                  Job.status.in_(ACTIVE))
                                .order_by(Job.created_at, Job.id)))


def _named(jobs: list[Job]) -> str:
    ids = [f"{j.id} ({j.status})" for j in jobs[:MAX_NAMED]]
    more = f" and {len(jobs) - MAX_NAMED} more" if len(jobs) > MAX_NAMED else ""
    return ", ".join(ids) + more


def _in_use(noun: str, row_id: str, users: list[Job]) -> InUse:
    return InUse(f"{noun} {row_id} is used by queued or running job(s) {_named(users)}; cancel "
                 "them (POST /v1/jobs/{id}/cancel) or wait until they finish, then delete the "
                 f"{noun} again")


def _lock(session: Session, table: Any, row_id: str, tenant_id: str) -> bool:
    """Take the row's write lock (a no-op UPDATE): PostgreSQL locks the row, SQLite takes the
    database write lock, both until the commit. False when the tenant has no such row."""
    return rows_changed(session, update(table).where(table.id == row_id,
                                                     table.tenant_id == tenant_id)
                        .values(name=table.name)) == 1


# ---- models ---------------------------------------------------------------------------------

def delete_model(session: Session, store: ObjectStore, tenant_id: str, model_id: str) -> None:
    """Delete one of the tenant's models (404 for another tenant's, 409 while a queued or
    running job uses it); its objects are removed after the commit."""
    get_model(session, tenant_id, model_id)
    if not _lock(session, Model, model_id, tenant_id):
        raise NotFound(f"model {model_id!r} not found")
    model = session.get(Model, model_id, populate_existing=True)
    assert model is not None
    active = _active_jobs(session, tenant_id)
    users = [j for j in active if model_id in spec_models(j.spec)]
    if model.source_job_id is not None:  # a trial's model, while its search still runs
        source = session.get(Job, model.source_job_id)
        if source is not None and source.parent_id is not None:
            users += [j for j in active if j.id == source.parent_id and j not in users]
    graph = (model.arch or {}).get("graph") if (model.arch or {}).get("name") == "graph" \
        else None
    if graph is not None and not _others_on_graph(session, tenant_id, str(graph), model_id):
        # a fresh model of the graph needs the graph object, which goes with its last model
        users += [j for j in active if spec_graph(j.spec) == graph and j not in users]
    if users:
        raise _in_use("model", model_id, users)
    _remove_after_commit(session, store, _delete_model_rows(session, model))


def _others_on_graph(session: Session, tenant_id: str, graph: str, but: Iterable[str] | str
                     ) -> bool:
    excluded = [but] if isinstance(but, str) else list(but)
    return session.scalars(select(Model.id).where(
        Model.tenant_id == tenant_id, Model.arch["name"].as_string() == "graph",
        Model.arch["graph"].as_string() == graph, Model.id.not_in(excluded)).limit(1)
    ).first() is not None


def _delete_model_rows(session: Session, model: Model, also_going: Iterable[str] = ()
                       ) -> list[str]:
    """Delete the model's row and the artifact rows that are its object; jobs whose result
    names it keep a mark. Returns the object keys to remove once committed (`also_going`:
    other models deleted in the same transaction, for the graph check)."""
    tenant_id, model_id = model.tenant_id, model.id
    for job in session.scalars(select(Job).where(
            Job.tenant_id == tenant_id, Job.result["model_id"].as_string() == model_id)):
        job.result = {**(job.result or {}), "model_id": None, "deleted_model_id": model_id}
    artifact_jobs = select(Job.id).where(Job.tenant_id == tenant_id).scalar_subquery()
    session.execute(delete(Artifact).where(Artifact.storage_key == model.storage_key,
                                           Artifact.job_id.in_(artifact_jobs))
                    .execution_options(synchronize_session=False))
    keys = [model.storage_key, *(export_key(tenant_id, model_id, fmt) for fmt in EXPORTED)]
    arch = model.arch or {}
    session.delete(model)
    session.flush()
    if arch.get("name") == "graph" and arch.get("graph") and not _others_on_graph(
            session, tenant_id, str(arch["graph"]), [model_id, *also_going]):
        keys.append(graph_key(tenant_id, str(arch["graph"])))
    return keys


# ---- datasets -------------------------------------------------------------------------------

def delete_dataset(session: Session, store: ObjectStore, tenant_id: str, dataset_id: str
                   ) -> None:
    """Delete one of the tenant's uploaded datasets (409 for a built-in one, or while a queued
    or running job trains or evaluates on it); its file is removed after the commit."""
    if dataset_id in BUILTINS:
        raise BuiltinDataset(f"dataset {dataset_id!r} is built in and cannot be deleted; "
                             "DELETE removes datasets you uploaded (GET /v1/datasets lists "
                             "them with their ids)")
    get_dataset(session, tenant_id, dataset_id)
    if not _lock(session, Dataset, dataset_id, tenant_id):
        raise NotFound(f"dataset {dataset_id!r} not found")
    dataset = session.get(Dataset, dataset_id, populate_existing=True)
    assert dataset is not None
    users = [j for j in _active_jobs(session, tenant_id)
             if (j.spec or {}).get("dataset") == dataset_id]
    if users:
        raise _in_use("dataset", dataset_id, users)
    key = dataset.storage_key
    session.delete(dataset)
    session.flush()
    _remove_after_commit(session, store, [key])


# ---- jobs -----------------------------------------------------------------------------------

def delete_job(session: Session, store: ObjectStore, tenant_id: str, job_id: str) -> None:
    """Delete one of the tenant's finished jobs with its events, artifacts and (a search) its
    trials; 409 for a queued or running job and for a trial. The models it produced stay."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id!r} not found")
    if job.parent_id is not None:
        raise JobIsTrial(f"job {job_id} is a trial of the auto-compress job {job.parent_id}; "
                         f"trials are deleted with their search (DELETE /v1/jobs/"
                         f"{job.parent_id})")
    # a terminal status is final, so locking the row while it is terminal settles it
    locked = rows_changed(session, update(Job).where(Job.id == job_id,
                                                     Job.status.in_(TERMINAL))
                          .values(stage=Job.stage))
    session.refresh(job)
    if not locked and job.cancel_requested:
        raise JobNotFinished(f"job {job_id} is {job.status} and a cancel was requested; delete "
                             "it once it is canceled (it stops at its next batch)")
    if not locked:
        raise JobNotFinished(f"job {job_id} is {job.status}; cancel it first (POST /v1/jobs/"
                             f"{job_id}/cancel) and delete it once it is canceled")
    trials = list(session.scalars(select(Job).where(Job.parent_id == job_id)))
    running = [t for t in trials if t.status in ACTIVE]
    if running:
        raise JobNotFinished(f"job {job_id} is {job.status} but its trial(s) {_named(running)} "
                             "still run; delete it once they have stopped")
    ids = [job_id, *(t.id for t in trials)]
    keys = list(session.scalars(select(Artifact.storage_key).where(Artifact.job_id.in_(ids))))
    for pointer in (j.checkpoint for j in (job, *trials)):
        if isinstance(pointer, dict) and isinstance(pointer.get("prefix"), str):
            keys += [f"{pointer['prefix']}/{name}" for name in CHECKPOINT_OBJECTS]
    keys += _delete_trial_models(session, store, job, [t.id for t in trials])
    # an artifact that is a kept model's own object (model.safetensors) stays with the model
    kept = set(session.scalars(select(Model.storage_key).where(Model.tenant_id == tenant_id,
                                                               Model.storage_key.in_(keys))))
    session.execute(update(Model).where(Model.source_job_id.in_(ids))
                    .values(source_job_id=None).execution_options(synchronize_session=False))
    for table in (JobEvent, Artifact):
        session.execute(delete(table).where(table.job_id.in_(ids))
                        .execution_options(synchronize_session=False))
    session.execute(delete(Job).where(Job.parent_id == job_id)
                    .execution_options(synchronize_session=False))
    session.delete(job)
    session.flush()
    _remove_after_commit(session, store, [k for k in dict.fromkeys(keys) if k not in kept])


def _delete_trial_models(session: Session, store: ObjectStore, search: Job,
                         trial_ids: list[str]) -> list[str]:
    """Delete the models a search's trials produced, except the one the search chose and any a
    queued or running job reads; returns their object keys."""
    if not trial_ids:
        return []
    chosen = (search.result or {}).get("model_id")
    read = set().union(*(spec_models(j.spec) for j in _active_jobs(session, search.tenant_id)))
    models = [m for m in session.scalars(select(Model).where(
        Model.tenant_id == search.tenant_id, Model.source_job_id.in_(trial_ids)))
        if m.id != chosen and m.id not in read]
    going = [m.id for m in models]
    keys: list[str] = []
    for model in models:
        keys += _delete_model_rows(session, model, also_going=going)
    return keys


# ---- the objects, after the commit ----------------------------------------------------------

def _remove_after_commit(session: Session, store: ObjectStore, keys: list[str]) -> None:
    keys = list(dict.fromkeys(k for k in keys if k))
    after_commit(session, lambda: remove_objects(store, keys))


def remove_objects(store: ObjectStore, keys: list[str], workers: int = 8) -> list[str]:
    """Delete every object in `keys` (absent ones are fine), concurrently; returns the keys
    that could not be deleted (logged: no row names them any more, so they are only space)."""
    def remove(key: str) -> str | None:
        try:
            store.delete(key)
            return None
        except Exception:
            log.warning("could not delete object %s (its row is gone; the object is unused)",
                        key, exc_info=True)
            return key

    if not keys:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys)))) as pool:
        return [key for key in pool.map(remove, keys) if key is not None]


# ---- the submission's side ------------------------------------------------------------------

def lock_job_inputs(session: Session, tenant_id: str, spec: JobSpec) -> None:
    """Called by `create_job` after it inserted the job: re-read the models, the dataset and the
    graph the job names, holding them (FOR SHARE on PostgreSQL; on SQLite the insert holds the
    database write lock) until the commit, so a concurrent delete either finished first (404
    here) or waits and then sees this job (409 there)."""
    for model_id in dict.fromkeys([m for m in (spec.model_id, *spec.other_model_ids) if m]):
        found = session.scalar(select(Model.id).where(Model.id == model_id,
                                                      Model.tenant_id == tenant_id)
                               .with_for_update(read=True))
        if found is None:
            raise NotFound(f"model {model_id!r} not found (it was deleted while the job was "
                           "submitted)")
    if spec.dataset not in BUILTINS:
        found = session.scalar(select(Dataset.id).where(Dataset.id == spec.dataset,
                                                        Dataset.tenant_id == tenant_id)
                               .with_for_update(read=True))
        if found is None:
            raise NotFound(f"dataset {spec.dataset!r} not found (it was deleted while the job "
                           "was submitted)")
    graph = None if isinstance(spec.model, str) else spec_graph(
        {"model": spec.model.model_dump()})
    if graph is not None:
        found = session.scalars(select(Model.id).where(
            Model.tenant_id == tenant_id, Model.arch["name"].as_string() == "graph",
            Model.arch["graph"].as_string() == graph).limit(1).with_for_update(read=True)
        ).first()
        if found is None:
            raise NotFound(f"model.arch.graph: none of your models is built on graph {graph} "
                           "any more (it was deleted while the job was submitted)")
