"""The scheduler: turns studies into running trials and trial events into stored results.

One thread in the server process owns it. It sleeps on an event that is set when something
happens -- a study arrives, an executor has reports -- so a freed slot is refilled within
milliseconds (at once when a trial ended, else after up to ``batch_s`` to gather the rest of a
burst of events; a trial ending meanwhile cuts that wait short); ``tick`` is only a safety
net. Each pass:

1. refills the slots of trials whose results it has just drained, before storing them, from
   the previous pass's view (:meth:`SlotFiller._refill_first`): the store no longer stands
   between a result and the next start. Results that arrive later in the pass (during its
   store or fills) are refilled the same way between those steps and stored by the next pass;
2. stores every pending executor event (starts, reports, results, failures) in **one**
   write -- on PostgreSQL one statement, autocommitted unless an attempt is released or a
   failure counted; on SQLite two statements in a transaction -- and reads the active
   studies with it (on PostgreSQL in that same statement). If a handler raises, the batch
   goes round again with a savepoint per event, so only the bad one is dropped; what follows
   from the events in memory (telling Optuna, asking the pruner, events for the live
   dashboard) happens only once they are stored (:mod:`service.scheduler_events`);
3. cancels trials past ``trial_timeout_s`` and trials of studies that were cancelled;
4. fills free slots: for each runnable study (priority, then oldest first) that has room,
   one write claims waiting trials (retries, enqueued or interrupted ones) and creates new
   ones asked from Optuna, all as ``running`` under fresh leases; they are submitted to the
   executor after the commit (:mod:`service.scheduler_fill`). A study with no room costs no
   write; on PostgreSQL the commonest fill is one guarded autocommitted statement.

Batching is what makes the scheduler cheap: each transaction costs its BEGIN/COMMIT (the WAL
flush on PostgreSQL, the write lock on SQLite), each statement a round trip and SQLAlchemy's
Python, which together outweighed the work an event needs, and a study with ``max_parallel``
trials produces its events in bursts. Optuna's side of a study lives in :mod:`service.runtime`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from service.db import Database
from service.runtime import StudyRuntime
from service.scheduler_events import ActiveStudy, EventHook, Run, View
from service.scheduler_fill import SlotFiller
from service.trials import service as trials
from workers.executor import Executor, ExecutorEvent

log = logging.getLogger("tsam.scheduler")


class Scheduler(SlotFiller):
    """Owns the executor and the in-memory Optuna studies; see the module docstring."""

    def __init__(
        self,
        db: Database,
        executor: Executor,
        *,
        checkpoint_root: str,
        tick_s: float = 1.0,
        batch_s: float = 0.0,
        git_revision: str | None = None,
    ) -> None:
        self.db = db.dedicated()  # its own connections, no ping per transaction; see stop()
        self.executor = executor
        self.checkpoint_root = Path(checkpoint_root)
        self.tick_s = tick_s
        self.batch_s = batch_s
        self.git_revision = git_revision
        self.hooks: list[EventHook] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runtimes: dict[int, StudyRuntime] = {}
        self._runs: dict[str, Run] = {}
        self._unstored: list[ExecutorEvent] = []  # drained, not yet stored: for the next pass
        self._ending: set[str] = set()  # runs with a drained, not yet stored result
        self._last_view: View | None = None  # the last pass's view, kept current by its fills
        self._capacity: tuple[float, float, float] | None = None  # cpus, gpus, checked at
        self.passes = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Reap attempts a previous process left running, then start the loop."""
        with self.db.write() as session:
            released = trials.release_all_running(session)
        if released:
            log.warning("released %d trial attempt(s) left running by a previous server", released)
        self.executor.start(self.wake)
        self._thread = threading.Thread(target=self._loop, name="tsam-scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask for a pass soon; safe from any thread."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain: start nothing new, cancel what runs, store every event that arrives within
        ``timeout`` and hand unfinished attempts back to ``waiting`` for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for run in list(self._runs.values()):
            run.stop_reason = "drain"
            self.executor.cancel(run.run_id)
        deadline = time.monotonic() + timeout
        while self._runs and time.monotonic() < deadline:
            self._handle_events(self.executor.drain())
            time.sleep(0.02)
        with self.db.write() as session:
            for run in self._runs.values():
                trials.release(session, run.trial_pk, run.lease, "interrupted: the server stopped")
        self._runs.clear()
        self._ending.clear()
        self.executor.shutdown()
        self.db.dispose()

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    def _loop(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_pass(self._gather() if woken else None)
            except Exception:
                log.exception("scheduler pass failed; retrying on the next wake-up")

    def _gather(self) -> list[ExecutorEvent]:
        """The events to store in this pass. A trial's events come in bursts (its reports and
        result within a few ms; several trials ending together), so unless a trial has just
        ended -- a freed slot to refill at once -- wait up to ``batch_s`` for the rest of the
        burst: one transaction stores it instead of one each. A trial that ends meanwhile cuts
        the wait short, so the window never delays a refill."""
        events = self.executor.drain()
        if not self.batch_s or any(e.terminal for e in events):
            return events
        deadline = time.monotonic() + self.batch_s
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            woken = left > 0 and self._wake.wait(left)
            if woken:
                self._wake.clear()
            more = self.executor.drain()
            events += more
            if not woken or any(e.terminal for e in more):
                break
        return events

    def run_pass(self, events: list[ExecutorEvent] | None = None) -> None:
        """One pass over ``events`` (default: whatever the executor has); public so tests can
        drive the scheduler without its thread."""
        self.passes += 1
        events = self.executor.drain() if events is None else events
        self._refill_first(events)
        view = self._handle_events(events)
        if view is None:  # nothing was stored: read the active studies on their own
            with self.db.read() as session:
                view = self._view(session)
        self._last_view = view
        latest = self._refill_arrived()
        self._enforce_limits(view.statuses)
        if not self._stop.is_set():
            for read in view.studies:
                study = latest.get(read.pk, read)  # a refill since the read may have moved it
                if self._has_work(study, study.pk in view.waiting):
                    self._fill_study(study, study.pk in view.waiting)
                latest = self._refill_arrived() or latest

    def _refill_arrived(self) -> dict[int, ActiveStudy]:
        """Refill the slots of results that arrived while this pass stored or filled, now
        rather than after the pass: a result waited a median 2-4 ms for a busy scheduler,
        added to every zero-work trial's cycle. Their events are stored by the next pass,
        which starts at once (the executor's notify has set the wake-up). Returns the studies
        as the view now holds them (empty if nothing arrived): a study the refill left out of
        it is decided by the pass's own (locking) fill, from the row as read."""
        arrived = self.executor.drain()
        if not arrived:
            return {}
        self._unstored.extend(arrived)
        self._refill_first(arrived)
        view = self._last_view
        return {} if view is None else {s.pk: s for s in view.studies}

    # ------------------------------------------------------------------ limits

    def _enforce_limits(self, statuses: dict[int, str]) -> None:
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.stop_reason is not None or run.run_id in self._ending:
                continue
            runtime = self._runtimes.get(run.study_pk)
            limit = runtime.spec.budget.trial_timeout_s if runtime else None
            if statuses.get(run.study_pk) in ("cancelled", "failed"):
                run.stop_reason = "cancelled"
            elif limit is not None and now - run.started > limit:
                run.stop_reason = "timeout"
            else:
                continue
            self.executor.cancel(run.run_id)
