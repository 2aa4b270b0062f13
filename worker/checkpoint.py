"""Job checkpoints: a running job's state at step boundaries and after every epoch of a train
step, in the object store, so a job whose worker died resumes on any worker.

A checkpoint is three objects under `checkpoints/<tenant>/<job>/<seq>/`:
* `model.safetensors` — `core.models.save` of the model (arch with its edits, pruning masks);
* `state.pt` — tensors only (`torch.load(weights_only=True)`): the job generator's and torch's
  RNG states, and for a train step in progress the optimizer and LR-schedule state;
* `state.json` — the rest: results of the steps done, `before`, curves, `global_epoch`,
  `applied` (plateau transforms), the train step's epochs done, history, plateau watch and
  tracked layers.

The job row's `checkpoint` column points at the latest complete one (`{"seq", "prefix",
"step", "epoch", "events_through", "at"}`); it is written only after all three objects are
stored, in a transaction that also checks the attempt still owns the job, so a checkpoint is
never half-written. The previous one's objects are then deleted; all are deleted when the job
ends. `events_through` is the job's last event id when the checkpoint was taken: a resumed run
deletes the later events (except status events), because it computes that work again — so no
epoch is ever counted twice.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete, func, select

from core import models as zoo
from service import states
from service.db import rows_changed, session_scope
from service.dbretry import is_unavailable
from service.orm import JobEvent, utcnow
from service.settings import Settings
from service.store import ObjectStore
from worker.reporter import json_safe

log = logging.getLogger(__name__)
OBJECTS = ("model.safetensors", "state.pt", "state.json")
KEEP_EVENT_KINDS = ("status", "cancel_requested")


@dataclass
class TrainProgress:
    """A train step in progress: what `worker.step_train.run_train` needs to continue it."""

    epochs_done: int  # epochs of this step done
    offset: int  # epochs before the running core.train.train call (plateau transform)
    history: list[dict[str, Any]]
    watch: dict[str, Any] | None  # PlateauWatch fields
    tracking_layers: list[str] | None
    train_state: dict[str, Any] = field(default_factory=dict)  # core.train on_state (tensors)


@dataclass
class Snapshot:
    """Everything a resumed run restores (besides the model)."""

    step_index: int  # the step to run (or to continue, when `train` is set)
    steps: list[dict[str, Any]]  # results of steps 0..step_index-1
    before: dict[str, Any]
    global_epoch: int
    curves: dict[str, Any]
    applied: dict[int, dict[str, Any]]
    resumes: list[dict[str, Any]]
    train: TrainProgress | None = None


class Checkpointer:
    """Saves and loads one job's checkpoints (one instance per attempt)."""

    def __init__(self, job_id: str, tenant_id: str, attempt: int, settings: Settings,
                 store: ObjectStore, workdir: Path, pointer: dict[str, Any] | None) -> None:
        self.job_id, self.tenant_id, self.attempt = job_id, tenant_id, attempt
        self.settings, self.store, self.workdir = settings, store, workdir
        self.pointer = pointer  # the latest committed checkpoint (None: none yet)
        self.saved = 0

    def _prefix(self, seq: int) -> str:
        return f"checkpoints/{self.tenant_id}/{self.job_id}/{seq:06d}"

    def save(self, model: torch.nn.Module, masks: Any, generator: torch.Generator,
             snapshot: Snapshot) -> bool:
        """Store a checkpoint and point the job at it. Returns False (and leaves the previous
        checkpoint in place) when the database is unreachable; LostOwnership propagates."""
        seq = (self.pointer or {}).get("seq", 0) + 1
        prefix = self._prefix(seq)
        folder = self.workdir / "checkpoint"
        folder.mkdir(exist_ok=True)
        model_path = folder / "model.safetensors"
        model.slimline_masks = masks
        zoo.save(model, model_path)
        train = snapshot.train
        tensors = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                   "train_state": train.train_state if train else {}}
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        (folder / "state.pt").write_bytes(buffer.getvalue())
        document = asdict(snapshot)
        if train is not None:
            document["train"].pop("train_state")
        document["applied"] = {str(k): v for k, v in snapshot.applied.items()}
        (folder / "state.json").write_text(json.dumps(json_safe(document)))
        keys = [f"{prefix}/{name}" for name in OBJECTS]
        for key, name in zip(keys, OBJECTS, strict=True):
            self.store.put_file(key, folder / name)
        pointer = {"seq": seq, "prefix": prefix, "step": snapshot.step_index,
                   "epoch": train.epochs_done if train else 0, "at": utcnow().isoformat()}
        try:
            with session_scope(self.settings) as session:
                job = states.owned(session, self.job_id, self.attempt)
                pointer["events_through"] = session.scalar(
                    select(func.max(JobEvent.id)).where(JobEvent.job_id == self.job_id)) or 0
                job.checkpoint = pointer
        except Exception as exc:
            self._delete(keys)
            if is_unavailable(exc):
                log.warning("job %s: checkpoint %d not recorded (database unavailable); "
                            "keeping checkpoint %s", self.job_id, seq,
                            (self.pointer or {}).get("seq"))
                return False
            raise
        if self.pointer:
            self._delete(f"{self.pointer['prefix']}/{name}" for name in OBJECTS)
        self.pointer = pointer
        self.saved += 1
        return True

    def load(self, device: torch.device) -> tuple[torch.nn.Module, torch.Generator, Snapshot]:
        """The model (on `device`, masks in `slimline_masks`), the job generator and the
        snapshot of the latest checkpoint; torch's global RNG state is restored too."""
        assert self.pointer is not None
        folder = self.workdir / "resume"
        folder.mkdir(exist_ok=True)
        for name in OBJECTS:
            self.store.get_to_file(f"{self.pointer['prefix']}/{name}", folder / name)
        model = zoo.load(folder / "model.safetensors").to(device)
        tensors = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        generator = torch.Generator()
        generator.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_rng"])
        document = json.loads((folder / "state.json").read_text())
        train = document.pop("train")
        document["applied"] = {int(k): v for k, v in document["applied"].items()}
        snapshot = Snapshot(**document)
        if train is not None:
            snapshot.train = TrainProgress(**train, train_state=tensors["train_state"])
        return model, generator, snapshot

    def forget_later_events(self) -> int:
        """Delete the job's events after the checkpoint (work the resumed run does again),
        except status events; returns how many."""
        through = int((self.pointer or {}).get("events_through") or 0)
        with session_scope(self.settings) as session:
            return rows_changed(session, delete(JobEvent).where(
                JobEvent.job_id == self.job_id, JobEvent.id > through,
                JobEvent.kind.not_in(KEEP_EVENT_KINDS)))

    def _delete(self, keys: Any) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except Exception:
                log.warning("could not delete checkpoint object %s", key, exc_info=True)

    def discard(self) -> None:
        """Delete the latest checkpoint's objects (the job ended; the row keeps no pointer)."""
        if self.pointer:
            self._delete(f"{self.pointer['prefix']}/{name}" for name in OBJECTS)
