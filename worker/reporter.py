"""What a running attempt tells the database: progress, events, heartbeats and cancel checks, each
in a short transaction of its own (no transaction stays open during compute)."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Self

from service import states
from service.db import session_scope
from service.dbretry import is_unavailable
from service.events import record_event, set_progress
from service.orm import Job, utcnow
from service.settings import Settings
from service.states import LostOwnership
from worker.progress import WeightedProgress

if TYPE_CHECKING:
    from worker.checkpoint import Checkpointer

log = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0  # cancel_requested is read from the DB at most this often
HEARTBEAT_MAX_S = 10.0  # heartbeat period, shorter when the reaper's timeout is short
# progress within one stage (per-batch movement) is written at most this often; a new stage
# and a finished step are always written
PROGRESS_MIN_INTERVAL_S = 1.0


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


class JobReporter:
    """Progress, events, heartbeats and cancel checks of one attempt, in short transactions.

    While the database is unreachable the job keeps computing: progress writes are skipped,
    events are kept (in order) and written with the next write that succeeds, cancel checks
    answer what they last knew. `LostOwnership` (the row is no longer this attempt's) always
    propagates."""

    def __init__(self, job_id: str, attempt: int, settings: Settings) -> None:
        self.job_id, self.attempt, self.settings = job_id, attempt, settings
        self.weights = WeightedProgress(steps=1)
        self.step_index = 0
        self.min_interval_s = PROGRESS_MIN_INTERVAL_S
        self._last_progress: tuple[float, str] | None = None  # (monotonic time, stage)
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
                    states.heartbeat(session, self.job_id, self.attempt, utcnow())
            except LostOwnership:
                return
            except Exception:  # a missed heartbeat is retried next period
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def _write(self, fn: Any, *, tolerate: bool = True) -> bool:
        """Run `fn(session)` in a short transaction after writing pending events; False when
        the database is unreachable (nothing written; raised instead when not `tolerate`)."""
        try:
            with session_scope(self.settings) as session:
                states.owned(session, self.job_id, self.attempt)
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

    @property
    def step_count(self) -> int:
        return len(self.weights.costs)

    @step_count.setter
    def step_count(self, count: int) -> None:
        """Steps of equal weight (until `set_costs` gives each its expected cost)."""
        self.weights = WeightedProgress(steps=count)

    def set_costs(self, costs: list[float]) -> None:
        """Each step's expected cost (`worker.progress.step_costs`): progress is the done cost
        over the total, moving within a step by the fraction its handler reports."""
        last = self.weights.last
        self.weights = WeightedProgress(costs)
        self.weights.last = last

    def progress(self, fraction: float, stage: str) -> None:
        """`fraction` of the current step done; the job's progress weighs every step by its
        expected cost and never moves back. Within one stage, writes are throttled to one per
        `min_interval_s` (a train step reports after every batch)."""
        total = min(self.weights.at(self.step_index, fraction), 0.999)
        now = time.monotonic()
        if self._last_progress is not None and fraction < 1.0:
            at, last_stage = self._last_progress
            if last_stage == stage and now - at < self.min_interval_s:
                return
        self._last_progress = (now, stage)
        self._write(lambda session: set_progress(session, self.job_id, total, stage))

    def stage(self, stage: str) -> None:
        """A new stage without a change of progress (loading, measuring the input model)."""
        self._last_progress = (time.monotonic(), stage)
        self._write(lambda session: set_progress(session, self.job_id, None, stage))

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
