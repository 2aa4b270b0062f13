"""The coordinator of an auto-compress search (`{"op": "auto"}`; the service side is
`service.search`). It never waits: `tick(job_id)` takes the search's row lock, looks at its
trials (child jobs), records the finished ones, starts what comes next, and returns — run when
the search is submitted, whenever one of its trials ends (the runner runs it in place), when it
is canceled, and by the reconciler when it has been idle for `search_tick_s`. So the search
holds no worker slot, its trials run on any worker (cpu or gpu queue, as its own queue says), a
trial whose worker dies is re-queued and resumed like any job, and a lost or failed tick is
simply run again.

Phases (`job.search["phase"]`):

1. `baseline` — one trial measures the starting model (every cost kind, validation accuracy,
   latency or file size where the budget needs them, which methods apply).
2. `screen` — `trials` candidates drawn by a multi-objective Optuna study (validation accuracy
   up, cost down, cost above the budget infeasible; TPE; every method that applies is enqueued
   first), each cut to its target and measured WITHOUT retraining. Up to `in_flight` run at once;
   each finished one is told to the study before the next is drawn.
3. `finetune` — the `finetune_trials` most accurate screened candidates within the budget (the
   best of each method first, then the rest by accuracy) cut again and fine-tuned
   `finetune_epochs`.
4. `final` — the fine-tuned candidate with the highest validation accuracy within the budget is
   fine-tuned `final_epochs` more (and exported as int8 ONNX when it quantizes).

The study lives in the service's database: PostgreSQL schema `optuna_search`, or for the
embedded SQLite default a file beside the service's (`<name>-search.sqlite3`), because Optuna
keeps its own Alembic version table.
"""
from __future__ import annotations

import copy
import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from pydantic import ValidationError
from sqlalchemy import create_engine, make_url, select, text, update
from sqlalchemy.orm import Session

from core.errors import BelowMinimum
from service import states
from service.artifacts import add_artifact, artifact_key, put_files
from service.curves import fold as fold_curves
from service.db import rows_changed, session_scope
from service.dbretry import is_unavailable
from service.events import eta_seconds, list_events, record_event
from service.methods.auto import AutoStep, pareto
from service.orm import Artifact, Job, Model, utcnow
from service.search import AUTO, BASELINE, FINAL, FINETUNE, SCREEN, add_trial, cancel_trials
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.store import store_from_settings
from service.submission import spec_document
from service.tmpfiles import temp_dir
from worker.auto_space import (
    PROXY,
    Floors,
    Space,
    calibrate,
    cut_steps,
    defaults,
    describe,
    floor_key,
    in_budget_units,
    measure_step,
    method_choices,
    steps_for,
    suggest,
    train_step,
    unreachable,
)

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

SCHEMA = "optuna_search"
_storages: dict[str, optuna.storages.RDBStorage] = {}
_storage_lock = threading.Lock()


def study_storage(settings: Settings) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the service's database (see the module doc), one per process."""
    url = make_url(settings.database_url)
    key = url.render_as_string(hide_password=False)
    with _storage_lock:
        if key in _storages:
            return _storages[key]
        if url.get_backend_name() == "sqlite":
            path = Path(url.database or "slimline.db")
            target = f"sqlite:///{path.with_name(path.stem + '-search.sqlite3')}"
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
        else:
            engine = create_engine(url)
            try:
                for _ in range(2):  # two workers creating it at once: one wins, retry sees it
                    try:
                        with engine.begin() as conn:
                            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
                        break
                    except Exception as exc:
                        if is_unavailable(exc):
                            raise
                        time.sleep(0.2)
            finally:
                engine.dispose()
            target = key
            kwargs = {"connect_args": {"options": f"-csearch_path={SCHEMA}"},
                      "pool_pre_ping": True, "pool_size": 2}
        storage = optuna.storages.RDBStorage(target, engine_kwargs=kwargs)
        _storages[key] = storage
        return storage


def study_name(job_id: str) -> str:
    return f"auto-{job_id}"


def open_study(settings: Settings, job_id: str, seed: int) -> optuna.Study:
    """The search's study: two objectives (validation accuracy up, cost down) and a constraint
    per told trial (`over_budget`, cost minus budget, <= 0 feasible; see `tell`), TPE."""
    sampler = optuna.samplers.TPESampler(seed=seed % (2**31))
    return optuna.create_study(study_name=study_name(job_id), storage=study_storage(settings),
                               directions=["maximize", "minimize"], sampler=sampler,
                               load_if_exists=True)


# ---- the tick ---------------------------------------------------------------------------------

def tick(job_id: str, settings: Settings | None = None) -> str | None:
    """Advance search `job_id` (see the module doc); returns its status, None when there was
    nothing to do. An unexpected error fails the search with the reason (and cancels its
    trials) rather than retrying it forever; an unreachable database propagates (the task gives
    its message back)."""
    settings = settings or get_settings()
    try:
        with session_scope(settings) as session:
            # the write lock (SQLite) / row lock (PostgreSQL) first: ticks run one at a time
            if not rows_changed(session, update(Job).where(
                    Job.id == job_id, Job.kind == AUTO,
                    Job.status.in_((states.QUEUED, states.RUNNING)))
                    .values(heartbeat_at=utcnow())):
                return None
            job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
            assert job is not None
            return Coordinator(session, job, settings).advance()
    except Exception as exc:
        if is_unavailable(exc):
            raise
        log.exception("search %s: the coordinator failed", job_id)
        _fail_search(job_id, settings, "InternalError",
                     f"the search coordinator hit an unexpected {type(exc).__name__}: "
                     f"{(str(exc).splitlines() or [''])[0][:300]}; the worker log has the "
                     "details")
        return states.FAILED


def _fail_search(job_id: str, settings: Settings, code: str, message: str) -> None:
    with session_scope(settings) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.terminal:
            return
        cancel_trials(session, job_id)
        if job.status == states.QUEUED:
            states.mark_running(job)
        states.mark_failed(job, code, message)


# Progress: each phase's share of the search is its expected cost, in screening trials (a cut and
# one validation pass): a fine-tuning epoch costs about EPOCH_COST of them (an epoch is ~3 passes
# over a training set several times the validation split).
EPOCH_COST = 8.0


def phase_spans(auto: AutoStep) -> dict[str, tuple[float, float]]:
    """`{phase: (start, width)}` of the search's progress: the baseline, `trials` screening
    trials, `promoted` x (1 + finetune_epochs x EPOCH_COST), 1 + final_epochs x EPOCH_COST."""
    costs = {BASELINE: 1.0, SCREEN: float(auto.trials),
             FINETUNE: auto.promoted * (1.0 + auto.finetune_epochs * EPOCH_COST),
             FINAL: 1.0 + auto.final_epochs * EPOCH_COST}
    total = sum(costs.values())
    spans, start = {}, 0.0
    for phase, cost in costs.items():
        spans[phase] = (start / total, cost / total)
        start += cost
    return spans


def trials_done(children: list[Job]) -> float:
    """Finished trials plus the running ones' own progress."""
    return sum(1.0 if c.terminal else min(1.0, c.progress or 0.0) for c in children)


def info(child: Job) -> dict[str, Any]:
    """A trial's candidate and, once recorded, its outcome (`jobs.search`)."""
    return child.search or {}


class SearchFailed(Exception):
    def __init__(self, code: str, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.message, self.summary = code, message, summary


def choose_promoted(screened: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The `n` screened candidates (within the budget) to fine-tune: the most accurate of each
    method first, then the rest by validation accuracy (ties: the cheaper first). A candidate
    that repeats one already chosen — the same method and knobs landing on the same measured
    cost and accuracy, i.e. the same cut — is skipped, so no slot is spent twice on one model."""
    ranked = sorted(screened, key=lambda s: (-(s.get("val_accuracy") or 0.0),
                                             s.get("cost") or 0.0))

    def same_cut(s: dict[str, Any]) -> tuple[Any, ...]:
        return (s.get("method"), s.get("cost"), s.get("val_accuracy"))

    chosen: list[dict[str, Any]] = []
    cuts: set[tuple[Any, ...]] = set()
    seen: set[str] = set()
    for s in ranked:  # the best of each method first ...
        key = str(s["params"].get("method")) + ("+int8" if s["params"].get("int8") else "")
        if key not in seen and len(chosen) < n:
            seen.add(key)
            cuts.add(same_cut(s))
            chosen.append(s)
    for s in ranked:  # ... then the rest by accuracy
        if len(chosen) >= n:
            break
        if s not in chosen and same_cut(s) not in cuts:
            cuts.add(same_cut(s))
            chosen.append(s)
    return chosen


class Coordinator:
    """One tick's view of a search: its row (locked), its spec, its state and its trials."""

    def __init__(self, session: Session, job: Job, settings: Settings) -> None:
        self.session, self.job, self.settings = session, job, settings
        self.spec = JobSpec.model_validate(job.spec, context={"max_epochs": settings.max_epochs})
        step = self.spec.steps[0]
        assert isinstance(step, AutoStep)
        self.auto: AutoStep = step
        # a deep copy: a list appended in place would leave the row's value equal to the new
        # one at save time, and the ORM writes nothing (the search would forget it)
        self.state: dict[str, Any] = copy.deepcopy(job.search or {})
        self.children: list[Job] = []
        self._study: optuna.Study | None = None

    # -- helpers --
    @property
    def budget(self) -> float:
        return self.auto.budget.value

    @property
    def kind(self) -> str:
        return self.auto.budget.kind

    def space(self) -> Space:
        """The search space, with the proxy calibration the trials so far give (`calibrate`)."""
        space = dict(self.state["space"])
        if space["kind"] in PROXY:  # the measured kinds
            space["calibration"] = calibrate([tuple(p) for p in self.state.get("points", [])])
        return Space.from_dict(space)

    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.settings, self.job.id,
                                     self.spec.seed + len(self.state.get("told", [])))
        return self._study

    def base_spec(self) -> dict[str, Any]:
        base = {k: v for k, v in self.job.spec.items() if k != "steps"}
        return base

    def of(self, kind: str) -> list[Job]:
        return [c for c in self.children if c.kind == kind]

    def trial_spec(self, steps: list[dict[str, Any]], model: Any = None) -> dict[str, Any]:
        spec = self.base_spec() | {"steps": steps}
        if model is not None:
            spec["model"] = model
            spec.pop("normalize", None)  # the model's arch carries its preprocessing
        checked = JobSpec.model_validate(spec, context={"max_epochs": self.settings.max_epochs})
        return spec_document(checked)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        record_event(self.session, self.job.id, kind, data)

    def progress(self, value: float, stage: str) -> None:
        """The search's progress (never moving back) and stage, with a `progress` event."""
        self.job.progress = min(1.0, max(self.job.progress or 0.0, value))
        self.job.stage = stage[:200]
        self.event("progress", {"progress": self.job.progress, "stage": self.job.stage,
                                "eta_s": eta_seconds(self.job)})

    def at(self, phase: str, fraction: float) -> float:
        """The search's progress at `fraction` of `phase` (`phase_spans`)."""
        start, width = phase_spans(self.auto)[phase]
        return start + width * min(1.0, max(0.0, fraction))

    # -- the state machine --
    def advance(self) -> str:
        job = self.job
        if job.status == states.QUEUED:
            if job.cancel_requested:
                states.mark_canceled(job)
                return states.CANCELED
            states.mark_running(job)
            self.state = {"phase": BASELINE, "budget": self.auto.budget.model_dump(
                exclude_none=True), "asked": 0, "told": []}
            self.add_baseline()
            self.save()
            return job.status
        self.children = list(self.session.scalars(
            select(Job).where(Job.parent_id == job.id).order_by(Job.created_at, Job.id)
            .execution_options(populate_existing=True)))
        for child in self.children:
            if child.terminal and not info(child).get("recorded"):
                self.record(child)
        if job.cancel_requested:
            return self.cancel()
        try:
            phase = self.state["phase"]
            if phase == BASELINE:
                self.after_baseline()
            if self.state["phase"] == SCREEN:
                self.screen()
            if self.state["phase"] == FINETUNE:
                self.after_finetune()
            if self.state["phase"] == FINAL:
                self.after_final()
        except SearchFailed as failed:
            cancel_trials(self.session, job.id)
            self.close_study()
            if failed.summary is not None:
                job.result = {"auto": failed.summary}
                self.event("auto_result", failed.summary)
            states.mark_failed(job, failed.code, failed.message)
        self.save()
        return job.status

    def save(self) -> None:
        self.job.search = json.loads(json.dumps(self.state, default=str))
        self.session.flush()

    def cancel(self) -> str:
        cancel_trials(self.session, self.job.id)
        running = [c for c in self.children if not c.terminal and c.status == states.RUNNING]
        if running:
            self.job.stage = f"canceling: waiting for {len(running)} running trial(s) to stop"
            self.save()
            return self.job.status
        self.close_study()
        states.mark_canceled(self.job)
        self.save()
        return states.CANCELED

    def close_study(self) -> None:
        """Trials the study still has running (a tick that rolled back after asking) fail."""
        if "space" not in self.state:
            return
        try:
            study = self.study()
            for trial in study.get_trials(deepcopy=False,
                                          states=(optuna.trial.TrialState.RUNNING,)):
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except Exception:  # the study is a record; the jobs are the truth
            log.warning("search %s: could not close its study", self.job.id, exc_info=True)

    # -- recording a finished trial --
    def record(self, child: Job) -> None:
        search = dict(info(child))
        result = child.result or {}
        measured: dict[str, Any] = next((s for s in reversed(result.get("steps") or [])
                                         if s.get("op") == "measure"), {})
        costs = measured.get("cost") or {}
        raw = costs.get(self.kind)
        ok = child.status == states.SUCCEEDED and isinstance(raw, (int, float))
        cost = float(raw) if ok and raw is not None else 0.0
        wall = None
        if isinstance(child.started_at, datetime) and isinstance(child.finished_at, datetime):
            wall = (child.finished_at - child.started_at).total_seconds()
        machine = measured.get("machine") or {}
        search.update(recorded=True, status=child.status, cost=cost if ok else None,
                      val_accuracy=measured.get("val_accuracy") if ok else None,
                      accuracy=(result.get("after") or {}).get("accuracy") if ok else None,
                      within_budget=bool(ok and cost <= self.budget), wall_s=wall,
                      model_id=result.get("model_id"))
        if child.error_code:
            search["error"] = {"code": child.error_code,
                               "message": (child.error_message or "")[:500]}
        child.search = search
        proxy = PROXY.get(self.kind)
        if ok and proxy and costs.get(proxy) and not (search.get("params") or {}).get("int8"):
            # (proxy, measured) for the calibration of later goals
            self.state.setdefault("points", []).append([float(costs[proxy]), cost])
        if child.kind == BASELINE:
            return
        if not ok:
            self.learn_floor(search, child.error_message)
        if child.kind == SCREEN and search.get("optuna") is not None:
            number = int(search["optuna"])
            try:
                study = self.study()
                if not ok:  # a candidate that cannot be cut (e.g. a target out of the method's
                    # reach) is told as the worst feasible-less point, so the sampler learns to
                    # avoid it (a failed study trial would teach it nothing)
                    start = float((self.state.get("space") or {}).get("start", {}).get(
                        self.kind) or self.budget * 2)
                    values = [0.0, max(start, self.budget * 1.01)]
                else:
                    values = [float(search["val_accuracy"] or 0.0), cost]
                over = values[1] - self.budget
                # the storage's public lookup; the study's id has no public accessor
                trial_id = study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, number)
                optuna.trial.Trial(study, trial_id).set_constraint("over_budget", over)
                study.tell(number, values)
            except (RuntimeError, ValueError) as exc:  # told by an earlier, rolled-back tick
                log.info("search %s: trial %d already told (%s)", self.job.id, number, exc)
            self.state.setdefault("told", []).append(number)
        self.event("auto_trial", {
            "trial": search.get("trial"), "phase": child.kind, "job_id": child.id,
            "status": child.status, "method": search.get("method"),
            "params": search.get("params"), "targets": search.get("targets"),
            "cost": search["cost"], "costs": costs or None,
            "val_accuracy": search["val_accuracy"], "accuracy": search["accuracy"],
            "within_budget": search["within_budget"], "wall_s": wall,
            "machine": {k: machine.get(k) for k in ("hostname", "cpu", "threads", "device")
                        if k in machine} or None,
            "error": search.get("error")})

    def floors(self) -> Floors:
        return Floors(self.state.get("floors"))

    def learn_floor(self, search: dict[str, Any], message: str | None) -> None:
        """A step that refused its target as below its method's smallest model: that floor,
        for the candidates drawn after it (`worker.auto_space.Floors`)."""
        refused = BelowMinimum.parse(message)
        targets = search.get("targets") or []
        if refused is None or not targets:
            return
        kind, goal, minimum = refused
        position = next((i for i, t in enumerate(targets)
                         if t.get("kind") == kind and int(t["goal"]) == goal), None)
        if position is None:
            return
        families = [t["method"] for t in targets]
        start = float(((self.state.get("space") or {}).get("start") or {}).get(kind) or 0.0)
        before = start if position == 0 else float(targets[position - 1]["goal"])
        floors = self.floors()
        floors.add(floor_key(families, search.get("params") or {}, position), before, minimum)
        self.state["floors"] = floors.to_dict()

    # -- phases --
    def add_baseline(self) -> None:
        space_kind = self.kind
        steps = [{"op": "measure", "report": True}]
        if space_kind == "latency_ms":
            steps[0]["latency_batch_size"] = self.auto.budget.latency_batch
        if space_kind == "bytes":
            steps[0]["bytes"] = True
        add_trial(self.session, self.job, BASELINE, self.trial_spec(steps),
                  {"trial": None, "phase": BASELINE, "method": "starting model",
                   "budget_kind": self.kind}, self.settings)
        self.progress(self.at(BASELINE, 0.5), "measuring the starting model")

    def after_baseline(self) -> None:
        baseline = next(iter(self.of(BASELINE)), None)
        if baseline is None:
            self.add_baseline()
            return
        if not baseline.terminal:
            return
        if baseline.status != states.SUCCEEDED:
            raise SearchFailed(baseline.error_code or "BaselineFailed",
                               "the starting model could not be measured: "
                               f"{baseline.error_message or baseline.status}")
        result = baseline.result or {}
        measured = next(s for s in result["steps"] if s.get("op") == "measure")
        start = dict(measured["cost"])
        start_val = measured.get("val_accuracy")
        if start.get(self.kind) is not None and start[self.kind] <= self.budget:
            raise SearchFailed(
                "BudgetAlreadyMet",
                f"the model already meets the budget: its {self.kind} is {start[self.kind]:g} "
                f"<= {self.budget:g}; nothing to compress (lower the budget)")
        choices, left_out = method_choices(self.kind, list(self.auto.methods)
                                           if isinstance(self.auto.methods, list) else "all",
                                           measured.get("applies"), self.auto.chains)
        if not choices:
            raise SearchFailed("NoMethodApplies",
                               f"no method can reduce {self.kind} on this model: " + "; ".join(
                                   f"{m}: {why}" for m, why in left_out.items()))
        allow_int8 = self.auto.methods == "all" or "int8" in self.auto.methods
        if allow_int8 and self.kind not in ("latency_ms", "bytes"):
            left_out["int8"] = (f"int8 weights change neither parameter counts nor MACs; it is "
                                f"searched for bytes and latency_ms budgets, not {self.kind}")
        space = Space(kind=self.kind, value=self.budget, start=start, choices=tuple(choices),
                      int8=allow_int8 and self.kind in ("latency_ms", "bytes"),
                      latency_batch=self.auto.budget.latency_batch)
        floors = Floors()
        for family, by_kind in (measured.get("floors") or {}).items():
            if by_kind.get(space.proxy) is not None:  # e.g. pcn without output pruning
                floors.add(floor_key([family], {}, 0), float(start[space.proxy]),
                           float(by_kind[space.proxy]))
        self.state.update(space=space.to_dict(), left_out=left_out, phase=SCREEN,
                          floors=floors.to_dict(), skipped=[],
                          start={"costs": start, "val_accuracy": start_val,
                                 "accuracy": (result.get("before") or {}).get("accuracy"),
                                 "machine": measured.get("machine"),
                                 "before": result.get("before")})
        study = self.study()
        if not study.trials:
            for params in defaults(space)[:self.auto.trials]:
                study.enqueue_trial(params, skip_if_exists=True)
        self.event("auto_budget", {
            "budget": {"kind": self.kind, "value": self.budget,
                       "batch_size": self.auto.budget.latency_batch
                       if self.kind == "latency_ms" else None,
                       "max_accuracy_drop": self.auto.max_accuracy_drop},
            "baseline": {"cost": start.get(self.kind), "costs": start,
                         "val_accuracy": start_val,
                         "accuracy": (result.get("before") or {}).get("accuracy")},
            "choices": choices, "left_out": left_out})

    def in_flight(self) -> int:
        return max(2, min(8, self.auto.trials // 4))

    def screen(self) -> None:
        space = self.space()
        screens = self.of(SCREEN)
        running = [c for c in screens if not c.terminal]
        while self.state["asked"] < self.auto.trials and len(running) < self.in_flight():
            child, skipped = self.ask(space)
            if skipped and len(self.state.get("skipped", [])) <= self.skip_limit():
                continue  # told without running: the draw does not use up a trial
            self.state["asked"] += 1
            if child is not None:
                running.append(child)
                self.children.append(child)
        done = [c for c in self.of(SCREEN) if c.terminal]
        if self.state["asked"] >= self.auto.trials and not running:
            self.promote()
            return
        self.progress(self.at(SCREEN, trials_done(self.of(SCREEN)) / self.auto.trials),
                      f"screening: {len(done)}/{self.auto.trials} candidates scored without "
                      f"retraining, {self.busy(running)}" + self.skipped_note()
                      + self.eta(done, self.auto.trials - len(done)))

    def skipped_note(self) -> str:
        n = len(self.state.get("skipped") or [])
        return f"; {n} draw(s) below a method's floor told without running" if n else ""

    @staticmethod
    def busy(active: list[Job]) -> str:
        running = sum(1 for c in active if c.status == states.RUNNING)
        return f"{running} running, {len(active) - running} queued"

    def eta(self, done: list[Job], left: int) -> str:
        """The phase's time left: the mean wall time of its finished trials times the trials
        left, over the trials running at once now (the workers taking them)."""
        walls = [float(info(c)["wall_s"]) for c in done if info(c).get("wall_s")]
        if not walls or left <= 0:
            return ""
        at_once = sum(1 for c in self.children if c.status == states.RUNNING)
        seconds = sum(walls) / len(walls) * left / max(1, min(left, at_once))
        return f"; this phase ~{seconds / 60:.1f} min left" if seconds >= 60 else \
            f"; this phase ~{seconds:.0f} s left"

    def skip_limit(self) -> int:
        """Draws told infeasible without running, at most, before they count as trials (so a
        space that is all below the floors still ends)."""
        return 4 * self.auto.trials + 8

    def ask(self, space: Space) -> tuple[Job | None, bool]:
        """Draw a candidate and start its trial: (the trial, False); (None, True) when a known
        floor says it cannot be built (told to the study as infeasible at that floor, recorded
        in `skipped` and an event, not run); (None, False) when its spec is invalid."""
        study = self.study()
        trial = study.ask()
        params = suggest(trial, space)
        steps, targets = cut_steps(space, params, self.floors())
        search = {"trial": trial.number, "optuna": trial.number, "phase": SCREEN,
                  "method": describe(params), "params": params, "targets": targets,
                  "budget_kind": self.kind}
        blocked = unreachable(targets)
        if blocked is not None:
            self.skip(study, trial, search, blocked)
            return None, True
        try:
            spec = self.trial_spec(steps + [measure_step(space, bool(params.get("int8")))])
        except ValidationError as exc:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            self.state.setdefault("told", []).append(trial.number)
            self.event("auto_trial", {"trial": trial.number, "phase": SCREEN,
                                      "status": "failed", "method": search["method"],
                                      "params": params, "error": {
                                          "code": "SpecError",
                                          "message": str(exc).splitlines()[0][:300]}})
            return None, False
        return add_trial(self.session, self.job, SCREEN, spec, search, self.settings), False

    def skip(self, study: optuna.Study, trial: optuna.trial.Trial, search: dict[str, Any],
             blocked: dict[str, Any]) -> None:
        """Tell a candidate below a known floor as infeasible: zero accuracy at the cost of the
        smallest model its method can build there (over the budget: the sampler learns where
        the method's reach ends)."""
        floor = float(blocked["floor"])
        reason = (f"{blocked['method']} cannot build a model below {floor:,.0f} "
                  f"{blocked['kind']} here (learned from an earlier refusal or measured on the "
                  f"starting model); its target was {int(blocked['goal']):,}")
        cost = in_budget_units(self.space(), floor, bool(search["params"].get("int8")))
        trial.set_constraint("over_budget", cost - self.budget)
        study.tell(trial.number, [0.0, cost])
        self.state.setdefault("told", []).append(trial.number)
        self.state.setdefault("skipped", []).append(
            {"trial": trial.number, "method": search["method"], "params": search["params"],
             "targets": search["targets"], "reason": reason})
        self.event("auto_trial", {"trial": trial.number, "phase": SCREEN, "status": "skipped",
                                  "method": search["method"], "params": search["params"],
                                  "targets": search["targets"], "reason": reason})

    def promote(self) -> None:
        screened = [info(c) for c in self.of(SCREEN) if info(c).get("within_budget")]
        if not screened:
            raise self.nothing_within_budget(SCREEN)
        chosen = choose_promoted(screened, self.auto.promoted)
        space = self.space()
        for s in chosen:
            params = s["params"]
            targets = s.get("targets") or cut_steps(space, params, self.floors())[1]
            steps = steps_for(space.proxy, targets, params)
            if self.auto.finetune_epochs:
                steps.append(train_step(self.auto.finetune_epochs, self.auto.model_dump()))
            steps.append(measure_step(space, bool(params.get("int8"))))
            child = add_trial(self.session, self.job, FINETUNE, self.trial_spec(steps),
                              {"trial": s["trial"], "phase": FINETUNE, "method": s["method"],
                               "params": params, "targets": targets, "budget_kind": self.kind,
                               "screen_val_accuracy": s.get("val_accuracy")}, self.settings)
            self.children.append(child)
        self.state["phase"] = FINETUNE
        self.state["promoted"] = [s["trial"] for s in chosen]
        self.close_study()
        self.progress(self.at(FINETUNE, 0.0), f"fine-tuning the {len(chosen)} most promising "
                      f"candidates ({self.auto.finetune_epochs} epoch(s) each)")

    def after_finetune(self) -> None:
        tuned = self.of(FINETUNE)
        running = [c for c in tuned if not c.terminal]
        done = [c for c in tuned if c.terminal]
        if running:
            self.progress(self.at(FINETUNE, trials_done(tuned) / max(1, len(tuned))),
                          f"fine-tuning: {len(done)}/{len(tuned)} candidates done, "
                          f"{self.busy(running)}" + self.eta(done, len(running)))
            return
        within = [info(c) for c in tuned if info(c).get("within_budget")
                  and info(c).get("model_id") and info(c).get("val_accuracy") is not None]
        if not within:
            raise self.nothing_within_budget(FINETUNE)
        winner = max(within, key=lambda s: (s["val_accuracy"], -s["cost"]))
        steps: list[dict[str, Any]] = []
        if self.auto.final_epochs:
            steps.append(train_step(self.auto.final_epochs, self.auto.model_dump()))
        int8 = bool(winner["params"].get("int8"))
        steps.append(measure_step(self.space(), int8))
        if int8:
            steps.append({"op": "export", "formats": ["onnx"], "quantize": "int8_dynamic"})
        child = add_trial(self.session, self.job, FINAL,
                          self.trial_spec(steps, model=winner["model_id"]),
                          {"trial": winner["trial"], "phase": FINAL, "method": winner["method"],
                           "params": winner["params"], "targets": winner.get("targets"),
                           "budget_kind": self.kind, "from_model": winner["model_id"]},
                          self.settings)
        self.children.append(child)
        self.state.update(phase=FINAL, winner=winner["trial"])
        self.progress(self.at(FINAL, 0.0), f"fine-tuning the winner ({winner['method']}) "
                      f"{self.auto.final_epochs} more epoch(s)")

    def after_final(self) -> None:
        final = next(iter(self.of(FINAL)), None)
        if final is None or not final.terminal:
            if final is not None:
                self.progress(self.at(FINAL, (final.progress or 0.0) * 0.95),
                              f"fine-tuning the winner: {final.stage}")
            return
        if final.status != states.SUCCEEDED:
            raise SearchFailed(final.error_code or "FinalFailed",
                               f"the winner's final fine-tuning failed: "
                               f"{final.error_message or final.status}")
        self.finish(final)

    # -- the outcome --
    def tuned(self) -> list[dict[str, Any]]:
        return [info(c) for c in self.of(FINETUNE)
                if info(c).get("status") == states.SUCCEEDED]

    def nothing_within_budget(self, phase: str) -> SearchFailed:
        trials = [info(c) for c in self.of(phase) if info(c).get("cost") is not None]
        errors = [info(c).get("error", {}).get("message") for c in self.of(phase)
                  if info(c).get("error")]
        floors = self.first_floors()
        if not trials:
            detail = f"; first error: {errors[0]}" if errors else ""
            skipped = len(self.state.get("skipped") or [])
            relax = None
            if floors:
                lowest = min(floors.values())
                detail += (f"; {skipped} more draw(s) were below their method's smallest model"
                           f" and not run. The smallest models the methods can build: "
                           + ", ".join(f"{k} {v:,.0f} {self.space().proxy}"
                                       for k, v in sorted(floors.items(), key=lambda i: i[1])))
                relax = (f"raise the budget so that at least {lowest:,.0f} "
                         f"{self.space().proxy} fits, or allow more methods")
                detail += f". To get a model: {relax}"
            return SearchFailed("NoTrialSucceeded",
                                f"none of the {len(self.of(phase))} {phase} trials produced a "
                                f"model{detail}", self.summary(None, "no trial succeeded",
                                                                relax=relax))
        closest = sorted(trials, key=lambda s: s["cost"])[:3]
        relax = (f"raise the budget to at least {closest[0]['cost']:g} {self.kind} (the cheapest "
                 "candidate), or try other methods")
        message = (f"no candidate met the budget of {self.budget:g} {self.kind}; the closest: "
                   + "; ".join(f"{s['method']} at {s['cost']:g} (val accuracy "
                               f"{(s.get('val_accuracy') or 0) * 100:.1f} %)" for s in closest)
                   + f". To get a model: {relax}")
        return SearchFailed("BudgetNotMet", message, self.summary(None, message, relax=relax))

    def calibration_summary(self) -> dict[str, Any] | None:
        """How goals in the proxy kind were aimed at the measured budget at the end."""
        if "space" not in self.state or self.kind not in PROXY:
            return None
        fit = self.space().calibration
        points = len(self.state.get("points") or [])
        proxy = PROXY[self.kind]
        if fit is None:
            return {"proxy": proxy, "points": points, "fit": None,
                    "rule": f"{proxy} scaled by budget / the starting model's {self.kind}"}
        return {"proxy": proxy, "points": points, "fit": {"a": fit[0], "b": fit[1]},
                "rule": f"{self.kind} = a + b * {proxy}, least squares over the starting model "
                        "and the float trials measured"}

    def first_floors(self) -> dict[str, float]:
        """{method (with its floor knobs): the smallest model it can build from the starting
        model} for the methods whose floor the search knows (`Floors`)."""
        return {key: max(f for _, f in seen) for key, seen in
                (self.state.get("floors") or {}).items() if ">" not in key and seen}

    def summary(self, winner: dict[str, Any] | None, reason: str, *,
                relax: str | None = None, verdict: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        start = self.state.get("start") or {}
        tuned = self.tuned()
        front = [tuned[i] for i in pareto(tuned)]
        counts = {phase: len(self.of(phase)) for phase in (SCREEN, FINETUNE, FINAL)}
        compute = sum(info(c).get("wall_s") or 0.0 for c in self.children)
        return {
            "budget": {"kind": self.kind, "value": self.budget, "meaning": BUDGET_MEANING[
                self.kind], **({"batch_size": self.auto.budget.latency_batch}
                               if self.kind == "latency_ms" else {})},
            "max_accuracy_drop": self.auto.max_accuracy_drop,
            "start": {"cost": (start.get("costs") or {}).get(self.kind),
                      "val_accuracy": start.get("val_accuracy"),
                      "accuracy": start.get("accuracy")},
            "winner": winner, "reason": reason, "relax": relax, "verdict": verdict,
            "trials": counts, "methods": (self.state.get("space") or {}).get("choices"),
            "left_out": self.state.get("left_out"),
            "pareto": [{"trial": s["trial"], "method": s["method"], "cost": s["cost"],
                        "val_accuracy": s["val_accuracy"]} for s in front],
            "skipped": self.state.get("skipped") or [],
            "calibration": self.calibration_summary(),
            "floors": self.state.get("floors") or {},
            "compute_s": compute,
            "wall_s": (utcnow() - self.job.started_at).total_seconds()
            if self.job.started_at else None}

    def finish(self, final: Job) -> None:
        result = final.result or {}
        search = final.search or {}
        measured: dict[str, Any] = next((s for s in reversed(result.get("steps") or [])
                                         if s.get("op") == "measure"), {})
        start = self.state.get("start") or {}
        tuned = {s["trial"]: s for s in self.tuned()}
        won = tuned.get(search.get("trial")) or {}
        cost = (measured.get("cost") or {}).get(self.kind)
        others = sorted((s for s in tuned.values() if s is not won and s.get("within_budget")),
                        key=lambda s: -(s.get("val_accuracy") or 0))
        winner = {"trial": search.get("trial"), "method": search.get("method"),
                  "params": search.get("params"), "targets": search.get("targets"),
                  "cost": cost, "costs": measured.get("cost"),
                  "val_accuracy": measured.get("val_accuracy"),
                  "accuracy": (result.get("after") or {}).get("accuracy"),
                  "finetune_val_accuracy": won.get("val_accuracy"),
                  "machine": measured.get("machine"), "model_id": result.get("model_id"),
                  "job_id": final.id}
        start_val = start.get("val_accuracy")
        verdict: dict[str, Any] = {"budget": cost is not None and cost <= self.budget}
        relax = None
        words = [f"{winner['method']} at {cost:g} {self.kind} "
                 f"({cost / self.budget * 100:.1f} % of the budget {self.budget:g})"
                 if cost is not None else str(winner["method"]),
                 f"had the highest validation accuracy after {self.auto.finetune_epochs} "
                 f"fine-tuning epoch(s) ({(won.get('val_accuracy') or 0) * 100:.2f} %) of the "
                 f"{len(tuned)} fine-tuned candidates within the budget"]
        if others:
            words.append(f"(next: {others[0]['method']}, "
                         f"{(others[0].get('val_accuracy') or 0) * 100:.2f} %)")
        words.append(f"; after {self.auto.final_epochs} more epoch(s) its test accuracy is "
                     f"{(winner['accuracy'] or 0) * 100:.2f} %")
        if start.get("accuracy") is not None:
            words.append(f"(the starting model: {start['accuracy'] * 100:.2f} %)")
        if self.auto.max_accuracy_drop is not None and start_val is not None:
            drop = start_val - (winner["val_accuracy"] or 0.0)
            verdict["accuracy"] = drop <= self.auto.max_accuracy_drop + 1e-12
            verdict["val_accuracy_drop"] = drop
            if not verdict["accuracy"]:
                cheaper = [s for s in self.tuned() if start_val - (s.get("val_accuracy") or 0)
                           <= self.auto.max_accuracy_drop]
                relax = (f"allow max_accuracy_drop >= {drop:.4f}" + (
                    f", or raise the budget to about {min(s['cost'] for s in cheaper):g} "
                    f"{self.kind} (the cheapest candidate within the accuracy bound)"
                    if cheaper else ", or raise the budget"))
                words.append(f". It does NOT meet max_accuracy_drop {self.auto.max_accuracy_drop}"
                             f": it loses {drop * 100:.2f} points of validation accuracy; "
                             f"{relax}")
        if not verdict["budget"]:
            words.append(f". Measured again after the final fine-tuning its {self.kind} is "
                         f"{cost}, above the budget (a latency measurement varies)")
        reason = " ".join(words).replace(" ;", ";").replace(" .", ".")
        summary = self.summary(winner, reason, relax=relax, verdict=verdict)
        self.event("auto_result", summary)
        before = (self.state.get("start") or {}).get("before") or {}
        after = result.get("after") or {}
        job_result = {
            "model_id": result.get("model_id"), "before": before, "after": after,
            "steps": [{"op": "auto", "wall_s": summary["wall_s"],
                       **{k: after.get(k) for k in ("params", "macs", "accuracy")},
                       "winner": winner, "reason": reason}],
            "auto": summary, "dataset": self.spec.dataset, "device": result.get("device"),
            "attempts": 1}
        self.store_artifacts(job_result, result.get("model_id"))
        states.mark_succeeded(self.job, job_result)

    def store_artifacts(self, job_result: dict[str, Any], model_id: str | None) -> None:
        """report.json, curves.json, frontier.png, and the chosen model's checkpoint (the
        Model's own object) as the search's artifacts."""
        from worker.step_auto import frontier_plot

        session, job = self.session, self.job
        store = store_from_settings(self.settings)
        curves = fold_curves((e.kind, e.data or {})
                             for e in list_events(session, job.id, 0, 100_000))
        with temp_dir(self.settings.home / "work", f"search-{job.id}") as tmp:
            folder = Path(tmp)
            files = {"report.json": folder / "report.json", "curves.json": folder / "curves.json"}
            files["report.json"].write_text(json.dumps(
                {"job_id": job.id, "spec": job.spec, **job_result}, indent=2, default=str))
            files["curves.json"].write_text(json.dumps(curves, indent=2, default=str))
            plot = folder / "frontier.png"
            try:
                if frontier_plot(curves, plot):
                    files["frontier.png"] = plot
            except Exception:  # a plot must not fail a search whose model is fine
                log.warning("search %s: could not draw frontier.png", job.id, exc_info=True)
            put_files(session, store, {artifact_key(job.tenant_id, job.id, name): path
                                       for name, path in files.items()})
            for name, path in files.items():
                add_artifact(session, store, tenant_id=job.tenant_id, job_id=job.id, name=name,
                             path=path, stored=True,
                             kind="plot" if name.endswith(".png") else name.split(".")[0])
        model = session.get(Model, model_id) if model_id else None
        if model is not None:
            session.add(Artifact(job_id=job.id, name="model.safetensors", kind="model",
                                 size_bytes=model.size_bytes, sha256=model.sha256,
                                 storage_key=model.storage_key))


BUDGET_MEANING = {
    "total_params": "every value the dense-format model stores (parameters, frozen buffers, "
                    "BatchNorm statistics; DCTpS layers as dense weights): what a deployed ONNX "
                    "holds; masks do not reduce it",
    "nonzero_params": "the non-zero stored values: what a sparse file stores",
    "trainable_params": "the parameters a training step updates",
    "macs": "multiply-accumulates of one sample, what a dense runtime executes; masks do not "
            "reduce it",
    "latency_ms": "onnxruntime latency of one batch, measured on the worker that ran the trial",
    "bytes": "the size of the exported ONNX file (the int8 one when the model quantizes)",
}
