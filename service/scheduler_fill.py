"""Filling free slots: the fill half of :class:`service.scheduler.Scheduler` (a mixin).

For each runnable study with room, a fill claims its waiting trials and asks Optuna for new
ones, stores them ``running`` under fresh leases, and submits them once that write has
committed. Three ways, cheapest first: the early refill of slots whose results have just
arrived (before the pass stores them, from the last view), the one-statement guarded fill on
PostgreSQL, and the locking fill that decides everything else (waiting trials, completion,
a study that changed). See the scheduler's module docstring for the pass around them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import search
from service.db import utcnow
from service.runtime import StudyRuntime, rebuild
from service.scheduler_events import ActiveStudy, EventStore, Run, View
from service.studies.models import ACTIVE_STATUSES, Study
from service.studies.spec import StudySpec
from service.trials import batch
from service.trials import service as trials
from service.trials.models import Trial
from workers.executor import ExecutorEvent, Resources
from workers.trial import TrialSpec

log = logging.getLogger("tsam.scheduler")
CAPACITY_REFRESH_S = 5.0


@dataclass
class _Start:
    """A trial claimed in a fill transaction, submitted once that transaction commits."""

    trial_pk: int
    number: int
    attempt: int
    lease: str
    params: dict[str, Any]
    otrial: optuna.trial.Trial


class SlotFiller(EventStore):
    """The fill half of the scheduler (a mixin: :class:`service.scheduler.Scheduler` sets the
    state declared here and in :class:`~service.scheduler_events.EventStore`)."""

    checkpoint_root: Path
    git_revision: str | None
    _stop: threading.Event
    _capacity: tuple[float, float, float] | None  # cpus, gpus, checked at
    _ending: set[str]  # runs with a drained, not yet stored result
    _last_view: View | None  # the last pass's view, kept current by its fills

    def _runtime(self, session: Session, study: ActiveStudy, spec: dict[str, Any]) -> StudyRuntime:
        """The study's Optuna side, rebuilt from stored trials on first use; ``spec`` is the
        stored spec as just read (budgets may have been edited)."""
        runtime = self._runtimes.get(study.pk)
        if runtime is not None and runtime.study_id == study.id:
            runtime.refresh(spec)
            return runtime
        runtime = rebuild(session, study.pk, study.id, spec)
        self._runtimes[study.pk] = runtime
        return runtime

    def _in_flight(self, study_pk: int) -> int:
        """Runs of the study not yet stored as ended: what keeps it from completing."""
        return sum(1 for r in self._runs.values() if r.study_pk == study_pk)

    def _occupied(self, study_pk: int) -> int:
        """Slots the study's runs hold: a run whose result is in hand holds none."""
        runs = self._runs.values()
        return sum(1 for r in runs if r.study_pk == study_pk and r.run_id not in self._ending)

    def _refill_first(self, events: list[ExecutorEvent]) -> None:
        """Refill the slots of trials whose results are in ``events`` before storing them.

        A finished trial's slot is free as soon as its result is in hand; storing the pass's
        events first put that transaction (and the wait for a busy scheduler) between every
        result and the next start -- half of a zero-work trial's cycle. This fill works from
        the previous pass's view (kept current by the fills since) and takes only the cheap
        way: on PostgreSQL the guarded one-statement fill, which writes nothing if the study
        row changed since; on SQLite the locking fill. Whatever it leaves, the pass's own
        fill does after the store. Completion still waits for the stored results
        (:meth:`_in_flight` counts them), and only results free slots early: a failure may
        be retried or fail the study, which the store decides.
        """
        freed = {e.run_id for e in events if e.kind == "result" and e.run_id in self._runs}
        if not freed:
            return
        self._ending |= freed
        view = self._last_view
        if view is None or self._stop.is_set():
            return
        studies = {self._runs[run_id].study_pk for run_id in freed}
        for study in list(view.studies):
            has_waiting = study.pk in view.waiting
            runtime = self._known_runtime(study)
            if (
                study.pk not in studies
                or runtime is None
                or not self._can_start(study, runtime, has_waiting)
            ):
                continue
            try:
                if not self.db.is_postgres:
                    self._fill_study(study, has_waiting)
                elif not has_waiting:
                    self._fill_fast(study)
            except Exception:  # the events must still be stored: leave it to the pass's fill
                log.exception("early refill of study %s failed", study.id)

    # ------------------------------------------------------------------ filling slots
    def _has_work(self, study: ActiveStudy, has_waiting: bool) -> bool:
        """Whether ``study`` may start a trial or complete now: False skips its write
        transaction. Decided from the last known spec; the transaction re-checks."""
        runtime = self._known_runtime(study)
        if runtime is None or self._in_flight(study.pk) == 0:
            return True  # not known as stored / it may be complete
        return self._can_start(study, runtime, has_waiting)

    def _known_runtime(self, study: ActiveStudy) -> StudyRuntime | None:
        """The study's runtime if it holds the spec ``study`` was read with, else None."""
        runtime = self._runtimes.get(study.pk)
        if runtime is None or runtime.study_id != study.id or study.spec != runtime.raw_spec:
            return None
        return runtime

    def _can_start(self, study: ActiveStudy, runtime: StudyRuntime, has_waiting: bool) -> bool:
        """Whether ``study`` has a free slot that fits and a trial to put in it."""
        budget = runtime.spec.budget
        if self._occupied(study.pk) >= budget.max_parallel:
            return False
        resources = Resources(runtime.spec.resources.cpus, runtime.spec.resources.gpus)
        if not self._fits(resources):
            return False
        exhausted = _timed_out(study, budget.timeout_s) or study.next_number >= budget.n_trials
        return has_waiting or not exhausted

    def _fill_study(self, study: ActiveStudy, has_waiting: bool = True) -> None:
        """Start what ``study`` has room for, in one transaction. ``has_waiting=False`` (the
        pass's view saw no waiting trial) skips reading the waiting trials unless a trial was
        enqueued since the view was read (the study's ``next_number`` moved): only enqueues
        and the scheduler's own releases, which the view sees, make trials wait."""
        if not has_waiting and self._fill_fast(study):
            return
        starts: list[_Start] = []
        asked: list[optuna.trial.Trial] = []  # Optuna trials this call created
        runtime: StudyRuntime | None = None
        try:
            with self.db.write() as session:
                # Locked (PostgreSQL; SQLite's BEGIN IMMEDIATE serializes writers): a pause,
                # cancel, enqueue or budget edit committing meanwhile is seen here, and the
                # status written below cannot overwrite it. Only what others change is read
                # (no ORM object: loading one cost more than the statement).
                locked = session.execute(
                    select(Study.status, Study.next_number, Study.spec)
                    .where(Study.pk == study.pk)
                    .with_for_update()
                ).first()
                if locked is None or locked.status not in ACTIVE_STATUSES:
                    return
                runtime = self._runtime(session, study, locked.spec)
                has_waiting |= locked.next_number != study.next_number
                outcome = self._claim_starts(
                    session, study, runtime, starts, asked, has_waiting, locked.next_number
                )
                completed = outcome == "completed"
                status, started_at = locked.status, study.started_at
                if completed:
                    _set_study(session, study.pk, status="completed", finished_at=utcnow())
                elif starts and locked.status == "queued":
                    status, started_at = "running", utcnow()
                    _set_study(session, study.pk, status=status, started_at=started_at)
        except Exception:
            if runtime is not None:
                runtime.abandon(asked)
            raise
        if completed or self.db.is_postgres:
            # PostgreSQL: the row's updated_at moved, so no guarded fill until it is re-read.
            self._drop_from_view(study.pk)
        else:  # SQLite: the next early refill knows the numbers this one used up
            new = sum(1 for start in starts if start.number >= locked.next_number)
            number = locked.next_number + new
            self._replace_in_view(
                ActiveStudy(
                    study.pk, study.id, locked.spec, status, number, started_at, study.updated_at
                )
            )
        if completed:
            self._emit(study.id, {"type": "study", "status": "completed"})
        for start in starts:
            self._submit(study, runtime, start)

    def _fill_fast(self, study: ActiveStudy) -> bool:
        """The commonest fill -- new sampler trials for a study whose stored spec the runtime
        already holds -- as one autocommitted statement on PostgreSQL, conditional on the study
        row being as the pass's view read it (:func:`batch.create_running_if_unchanged`).
        Returns False, having written nothing, whenever the locking path must decide: another
        backend, a study not yet or no longer as the runtime knows it, one that may complete or
        time out, or a row that changed since the view (a pause, an edit, an enqueue)."""
        runtime = self._runtimes.get(study.pk)
        if (
            not self.db.is_postgres
            or runtime is None
            or runtime.study_id != study.id
            or runtime.raw_spec != study.spec
        ):
            return False
        budget = runtime.spec.budget
        if _timed_out(study, budget.timeout_s):
            return False
        room = min(
            budget.max_parallel - self._occupied(study.pk), budget.n_trials - study.next_number
        )
        resources = Resources(runtime.spec.resources.cpus, runtime.spec.resources.gpus)
        planned: list[Resources] = []
        while len(planned) < room and self._fits(resources, planned):
            planned.append(resources)
        if not planned:
            return False
        asked: list[optuna.trial.Trial] = []
        params: list[dict[str, Any]] = []
        created = None
        now = utcnow()
        try:
            for _ in planned:
                otrial, trial_params = runtime.ask()
                asked.append(otrial)
                params.append(trial_params)
            with self.db.autocommit() as conn:
                created = batch.create_running_if_unchanged(
                    conn, study_pk=study.pk, seen=study.updated_at, params=params, now=now
                )
        finally:
            if created is None:
                runtime.abandon(asked)
        if created is None:
            self._drop_from_view(study.pk)
            return False
        # What the statement wrote to the study row, so the next early refill's guard holds.
        self._replace_in_view(
            ActiveStudy(
                study.pk,
                study.id,
                study.spec,
                "running",
                study.next_number + len(created),
                study.started_at or now,
                now,
            )
        )
        for otrial, trial_params, (pk, number, lease) in zip(asked, params, created, strict=True):
            self._submit(study, runtime, _Start(pk, number, 1, lease, trial_params, otrial))
        return True

    def _replace_in_view(self, study: ActiveStudy) -> None:
        view = self._last_view
        if view is not None:
            view.studies = [study if s.pk == study.pk else s for s in view.studies]

    def _drop_from_view(self, study_pk: int) -> None:
        view = self._last_view
        if view is not None:
            view.studies = [s for s in view.studies if s.pk != study_pk]

    def _claim_starts(
        self,
        session: Session,
        study: ActiveStudy,
        runtime: StudyRuntime,
        starts: list[_Start],
        asked: list[optuna.trial.Trial],
        has_waiting: bool,
        next_number: int,
    ) -> str | None:
        """Claim or create the trials ``study`` can start now into ``starts`` (every Optuna
        trial created on the way goes into ``asked`` at once, so a failed transaction can fail
        them); returns ``"completed"`` when the study has nothing left to run. The waiting
        trials are read if ``has_waiting`` or before completing the study (under its lock);
        ``next_number`` is the study's, read under that lock."""
        budget = runtime.spec.budget
        in_flight = self._in_flight(study.pk)
        timed_out = _timed_out(study, budget.timeout_s)
        exhausted = timed_out or next_number >= budget.n_trials
        waiting: list[Trial] = []
        if has_waiting or (in_flight == 0 and exhausted):
            waiting = list(
                session.execute(
                    select(Trial)
                    .where(Trial.study_pk == study.pk, Trial.state == "waiting")
                    .order_by(Trial.number)
                ).scalars()
            )
        if not waiting and in_flight == 0 and exhausted:
            return "completed"
        resources = Resources(runtime.spec.resources.cpus, runtime.spec.resources.gpus)
        room = budget.max_parallel - self._occupied(study.pk)
        new_params: list[tuple[optuna.trial.Trial, dict[str, Any]]] = []
        planned: list[Resources] = []
        while room > 0 and self._fits(resources, planned):
            if waiting:
                trial = waiting.pop(0)
                lease = trials.claim(session, trial)
                if lease is not None:
                    otrial = runtime.live.get(trial.number)
                    if otrial is None:
                        otrial = runtime.ask_fixed(trial.params)
                        asked.append(otrial)
                    starts.append(
                        _Start(trial.pk, trial.number, trial.attempts, lease, trial.params, otrial)
                    )
            elif not timed_out and next_number + len(new_params) < budget.n_trials:
                otrial, trial_params = runtime.ask()
                asked.append(otrial)
                new_params.append((otrial, trial_params))
            else:
                break
            room -= 1
            planned.append(resources)
        created = batch.create_running(
            session, study_pk=study.pk, params=[p for _, p in new_params]
        )
        for (otrial, params), (pk, number, lease) in zip(new_params, created, strict=True):
            starts.append(_Start(pk, number, 1, lease, params, otrial))
        return None

    def _submit(self, study: ActiveStudy, runtime: StudyRuntime, start: _Start) -> None:
        spec = runtime.spec
        runtime.live[start.number] = start.otrial
        task = TrialSpec(
            study_id=study.id,
            trial_number=start.number,
            attempt=start.attempt,
            lease_token=start.lease,
            config=_runner_config(spec, start.params),
            checkpoint_dir=str(self.checkpoint_root / study.id / str(start.number)),
            runner=spec.runner.name,
            git_revision=self.git_revision,
            prompt_reports=spec.pruner.name != "none",  # only a pruner acts on a report at once
        )
        resources = Resources(spec.resources.cpus, spec.resources.gpus)
        try:
            run_id = self.executor.submit(task, resources)
        except Exception as exc:
            log.exception("could not submit trial %s of study %s", start.number, study.id)
            with self.db.write() as session:
                trials.release(session, start.trial_pk, start.lease, f"submit failed: {exc}")
            return
        self._runs[run_id] = Run(
            run_id,
            study.pk,
            study.id,
            start.trial_pk,
            start.number,
            start.attempt,
            start.lease,
            resources,
            time.monotonic(),
        )
        self._emit(
            study.id, {"type": "trial_started", "number": start.number, "attempt": start.attempt}
        )

    def _fits(self, resources: Resources, planned: Sequence[Resources] = ()) -> bool:
        """Whether ``resources`` fit next to the runs in flight and those ``planned`` in this
        pass (the executor's capacity is re-read every few seconds, not per call)."""
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[2] > CAPACITY_REFRESH_S:
            cap = self.executor.capacity()
            self._capacity = (cap.total_cpus, cap.total_gpus, now)
        held = [r.resources for r in self._runs.values() if r.run_id not in self._ending]
        taken = held + list(planned) + [resources]
        cpus = sum(r.cpus for r in taken)
        gpus = sum(r.gpus for r in taken)
        return cpus <= self._capacity[0] + 1e-9 and gpus <= self._capacity[1] + 1e-9


def _set_study(session: Session, pk: int, **values: Any) -> None:
    session.execute(update(Study).where(Study.pk == pk).values(**values))


def _timed_out(study: ActiveStudy, timeout_s: float | None) -> bool:
    if timeout_s is None or study.started_at is None:
        return False
    started = study.started_at
    if started.tzinfo is None:  # SQLite returns naive datetimes
        started = started.replace(tzinfo=utcnow().tzinfo)
    return (utcnow() - started).total_seconds() > timeout_s


def _runner_config(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    config = search.trial_config(spec, params)
    if spec.runner.name == "sleep":
        config["sleep_s"] = spec.runner.sleep_s
    return config
