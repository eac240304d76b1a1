"""The scheduler: turns studies into running trials and trial events into stored results.

One thread in the server process owns it. It sleeps on an event that is set when something
happens -- a study arrives, an executor has reports -- so a freed slot is refilled within
milliseconds; ``tick`` is only a safety net. Each pass:

1. drains executor events: stores reports (and asks the pruner), results and failures;
2. cancels trials past ``trial_timeout_s`` and trials of studies that were cancelled;
3. fills free slots: for each runnable study (priority, then oldest first), while it has
   budget and fewer than ``max_parallel`` trials in flight and the executor has room, it
   starts a waiting trial (a retry, an enqueued or interrupted one) or asks Optuna for a new
   one, stores it as ``running`` with a fresh lease, and submits it.

Optuna runs in memory per study (ask/tell) and is rebuilt from our tables the first time a
study is touched after start-up; the tables are the truth.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import select

from service import search
from service.db import Database, utcnow
from service.studies.models import ACTIVE_STATUSES, Study
from service.studies.spec import StudySpec
from service.trials import service as trials
from service.trials.models import Trial
from workers.executor import Executor, ExecutorEvent, Resources
from workers.trial import TrialSpec

log = logging.getLogger("tsam.scheduler")
EventHook = Callable[[str, dict[str, Any]], None]
CAPACITY_REFRESH_S = 5.0


@dataclass
class StudyRuntime:
    """The in-memory side of one study: its Optuna study and live Optuna trials."""

    spec: StudySpec
    optuna_study: optuna.Study
    study_id: str = ""
    live: dict[int, optuna.trial.Trial] = field(default_factory=dict)


@dataclass
class Run:
    """One attempt in flight."""

    run_id: str
    study_pk: int
    study_id: str
    trial_pk: int
    number: int
    attempt: int
    lease: str
    resources: Resources
    started: float
    last_metrics: dict[str, Any] = field(default_factory=dict)
    last_value: float | None = None
    stop_reason: str | None = None  # pruned | timeout | cancelled | drain


class Scheduler:
    """Owns the executor and the in-memory Optuna studies; see the module docstring."""

    def __init__(
        self,
        db: Database,
        executor: Executor,
        *,
        checkpoint_root: str,
        tick_s: float = 1.0,
        git_revision: str | None = None,
    ) -> None:
        self.db = db
        self.executor = executor
        self.checkpoint_root = Path(checkpoint_root)
        self.tick_s = tick_s
        self.git_revision = git_revision
        self.hooks: list[EventHook] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runtimes: dict[int, StudyRuntime] = {}
        self._runs: dict[str, Run] = {}
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
        self.executor.shutdown()

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_pass()
            except Exception:
                log.exception("scheduler pass failed; retrying on the next wake-up")

    def run_pass(self) -> None:
        """One pass (public so tests can drive the scheduler without its thread)."""
        self.passes += 1
        self._handle_events(self.executor.drain())
        self._enforce_limits()
        self._fill_slots()

    def _emit(self, study_id: str, event: dict[str, Any]) -> None:
        for hook in self.hooks:
            try:
                hook(study_id, event)
            except Exception:
                log.exception("event hook failed")

    # ------------------------------------------------------------------ runtimes
    def _runtime(self, session: Any, study: Study) -> StudyRuntime:
        """The study's Optuna side, rebuilt from stored trials on first use."""
        runtime = self._runtimes.get(study.pk)
        spec = StudySpec.model_validate(study.spec)
        if runtime is not None and runtime.study_id == study.id:
            runtime.spec = spec  # budgets may have been edited
            return runtime
        ostudy = search.create_optuna_study(spec)
        dists = search.distributions(spec)
        rows = session.execute(
            select(Trial).where(Trial.study_pk == study.pk).order_by(Trial.number)
        ).scalars()
        frozen = []
        for trial in rows:
            state = _OPTUNA_STATE.get(trial.state)
            if state is None:
                continue
            params = search.optuna_params(spec, trial.params)
            values = (trial.values or None) if state == optuna.trial.TrialState.COMPLETE else None
            if state == optuna.trial.TrialState.PRUNED:
                values = None
            frozen.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    values=values,
                    state=state,
                    intermediate_values=_intermediate_values(session, trial, spec),
                    user_attrs={"number": trial.number},
                )
            )
        ostudy.add_trials(frozen)
        runtime = StudyRuntime(spec, ostudy, study.id)
        self._runtimes[study.pk] = runtime
        return runtime

    # ------------------------------------------------------------------ filling slots
    def _fill_slots(self) -> None:
        if self._stop.is_set():
            return
        with self.db.read() as session:
            studies = list(
                session.execute(
                    select(Study)
                    .where(Study.status.in_(ACTIVE_STATUSES))
                    .order_by(Study.priority.desc(), Study.pk)
                ).scalars()
            )
        for study in studies:
            self._fill_study(study)

    def _fill_study(self, study: Study) -> None:
        with self.db.write() as session:
            # Re-read inside the write transaction: a pause, cancel or budget edit may have
            # landed since the list was read (a stale n_trials must not complete the study).
            fresh = session.get(Study, study.pk, with_for_update=True)
            if fresh is None or fresh.status not in ACTIVE_STATUSES:
                return
            study = fresh
            runtime = self._runtime(session, study)
            budget = runtime.spec.budget
            in_flight = sum(1 for r in self._runs.values() if r.study_pk == study.pk)
            timed_out = _timed_out(study, budget.timeout_s)
            waiting = list(
                session.execute(
                    select(Trial)
                    .where(Trial.study_pk == study.pk, Trial.state == "waiting")
                    .order_by(Trial.number)
                ).scalars()
            )
            exhausted = timed_out or study.next_number >= budget.n_trials
            if not waiting and in_flight == 0 and exhausted:
                row = session.get(Study, study.pk)
                if row is not None and row.status in ACTIVE_STATUSES:
                    row.status, row.finished_at = "completed", utcnow()
                self._emit(study.id, {"type": "study", "status": "completed"})
                return
        resources = Resources(cpus=runtime.spec.resources.cpus, gpus=runtime.spec.resources.gpus)
        created = study.next_number
        while in_flight < budget.max_parallel and self._fits(resources):
            if waiting:
                trial: Trial | None = waiting.pop(0)
            elif not timed_out and created < budget.n_trials:
                trial = None
            else:
                break
            if not self._start_trial(study, runtime, trial, resources):
                break
            in_flight += 1
            created += 1 if trial is None else 0

    def _fits(self, resources: Resources) -> bool:
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[2] > CAPACITY_REFRESH_S:
            cap = self.executor.capacity()
            self._capacity = (cap.total_cpus, cap.total_gpus, now)
        cpus = sum(r.resources.cpus for r in self._runs.values()) + resources.cpus
        gpus = sum(r.resources.gpus for r in self._runs.values()) + resources.gpus
        return cpus <= self._capacity[0] + 1e-9 and gpus <= self._capacity[1] + 1e-9

    def _start_trial(
        self, study: Study, runtime: StudyRuntime, waiting: Trial | None, resources: Resources
    ) -> bool:
        """Store the trial as running under a new lease and submit it."""
        spec = runtime.spec
        if waiting is None:
            otrial = runtime.optuna_study.ask()
            params = search.suggest_params(otrial, spec)
        else:
            otrial = runtime.live.get(waiting.number) or self._ask_fixed(runtime, waiting.params)
            params = waiting.params
        with self.db.write() as session:
            # Locked (PostgreSQL): a pause or cancel committing meanwhile is seen here, and
            # the status written below cannot overwrite it.
            row = session.get(Study, study.pk, with_for_update=True)
            lease = None
            if row is not None and row.status in ACTIVE_STATUSES:
                trial = waiting or trials.create_trial(session, study=row, params=params)
                if waiting is not None:
                    trial = session.get(Trial, waiting.pk) or waiting
                lease = trials.claim(session, trial)
            if row is None or lease is None:
                if waiting is None or runtime.live.get(waiting.number) is not otrial:
                    # Nothing started: the Optuna trial asked for it must not stay running.
                    runtime.optuna_study.tell(otrial, state=optuna.trial.TrialState.FAIL)
                return False
            if row.status == "queued":
                row.status, row.started_at = "running", utcnow()
            number, attempt, trial_pk = trial.number, trial.attempts, trial.pk
        runtime.live[number] = otrial
        task = TrialSpec(
            study_id=study.id,
            trial_number=number,
            attempt=attempt,
            lease_token=lease,
            config=_runner_config(spec, params),
            checkpoint_dir=str(self.checkpoint_root / study.id / str(number)),
            runner=spec.runner.name,
            git_revision=self.git_revision,
        )
        run_id = self.executor.submit(task, resources)
        self._runs[run_id] = Run(
            run_id,
            study.pk,
            study.id,
            trial_pk,
            number,
            attempt,
            lease,
            resources,
            time.monotonic(),
        )
        self._emit(study.id, {"type": "trial_started", "number": number, "attempt": attempt})
        return True

    @staticmethod
    def _ask_fixed(runtime: StudyRuntime, params: dict[str, Any]) -> optuna.trial.Trial:
        """An Optuna trial fixed to ``params`` (the part of them Optuna can be told:
        :func:`search.optuna_params`), so the sampler learns from an enqueued trial without
        being told values of keys the trial does not use."""
        fixed = search.optuna_params(runtime.spec, params)
        runtime.optuna_study.enqueue_trial(fixed, skip_if_exists=False)
        otrial = runtime.optuna_study.ask()
        search.suggest_fixed(otrial, runtime.spec, params)
        return otrial

    # ------------------------------------------------------------------ limits
    def _enforce_limits(self) -> None:
        if not self._runs:
            return
        with self.db.read() as session:
            statuses = dict(
                session.execute(
                    select(Study.pk, Study.status).where(
                        Study.pk.in_({r.study_pk for r in self._runs.values()})
                    )
                ).all()
            )
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.stop_reason is not None:
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

    # ------------------------------------------------------------------ events
    def _handle_events(self, events: list[ExecutorEvent]) -> None:
        for event in events:
            run = self._runs.get(event.run_id)
            if run is None:
                continue
            try:
                handler = getattr(self, f"_on_{event.kind}")
                handler(run, event.payload, event)
            except Exception:
                log.exception("failed to handle %s of trial %s", event.kind, run.number)

    def _on_started(self, run: Run, payload: dict[str, Any], _e: ExecutorEvent) -> None:
        with self.db.write() as session:
            trials.record_started(session, run.trial_pk, run.lease, payload.get("env", {}))

    def _on_report(self, run: Run, payload: dict[str, Any], _e: ExecutorEvent) -> None:
        epoch, metrics = int(payload["epoch"]), dict(payload["metrics"])
        with self.db.write() as session:
            if not trials.record_report(
                session, run.trial_pk, run.lease, epoch=epoch, attempt=run.attempt, metrics=metrics
            ):
                return
        run.last_metrics = metrics
        self._emit(run.study_id, {"type": "trial_report", "number": run.number, "epoch": epoch})
        runtime = self._runtimes[run.study_pk]
        values = search.objective_values(runtime.spec, metrics)
        if values is None or len(values) != 1:
            return
        run.last_value = values[0]
        otrial = runtime.live.get(run.number)
        if otrial is None or run.stop_reason is not None:
            return
        otrial.report(values[0], epoch)
        if otrial.should_prune():
            run.stop_reason = "pruned"
            self.executor.cancel(run.run_id)

    def _on_result(self, run: Run, payload: dict[str, Any], _e: ExecutorEvent) -> None:
        runtime = self._runtimes[run.study_pk]
        metrics = dict(payload.get("metrics", {}))
        values = search.objective_values(runtime.spec, metrics)
        if values is None:
            names = [o.metric for o in runtime.spec.objectives]
            outcome = trials.Outcome("failed", metrics=metrics, error=f"objective {names} missing")
        else:
            outcome = trials.Outcome("complete", values[0], values, metrics)
        self._end(run, outcome)

    def _on_failed(self, run: Run, payload: dict[str, Any], event: ExecutorEvent) -> None:
        error = payload.get("traceback") or payload.get("error") or "unknown error"
        runtime = self._runtimes[run.study_pk]
        if event.retryable and run.attempt < runtime.spec.budget.max_attempts:
            with self.db.write() as session:
                trials.release(session, run.trial_pk, run.lease, str(error))
            self._forget(run)
            self._emit(run.study_id, {"type": "trial_retry", "number": run.number})
            return
        self._end(run, trials.Outcome("failed", metrics=run.last_metrics or None, error=str(error)))

    def _on_cancelled(self, run: Run, payload: dict[str, Any], _e: ExecutorEvent) -> None:
        if run.stop_reason == "pruned":
            outcome = trials.Outcome(
                "pruned",
                run.last_value,
                [run.last_value] if run.last_value is not None else None,
                run.last_metrics,
            )
        elif run.stop_reason == "timeout":
            outcome = trials.Outcome(
                "failed", metrics=run.last_metrics or None, error="trial_timeout_s exceeded"
            )
        elif run.stop_reason == "drain":
            with self.db.write() as session:
                trials.release(session, run.trial_pk, run.lease, "interrupted: the server stopped")
            self._forget(run)
            return
        else:
            outcome = trials.Outcome("cancelled", metrics=run.last_metrics or None)
        self._end(run, outcome)

    def _end(self, run: Run, outcome: trials.Outcome) -> None:
        """Record the outcome (once: compare-and-set on the lease), then tell Optuna."""
        with self.db.write() as session:
            recorded = trials.finish(session, run.trial_pk, run.lease, outcome)
            if recorded and outcome.state == "failed":
                self._check_failures(session, run)
        self._forget(run)
        if not recorded:
            return
        runtime = self._runtimes.get(run.study_pk)
        otrial = runtime.live.pop(run.number, None) if runtime else None
        if runtime is not None and otrial is not None:
            state = _OPTUNA_STATE[outcome.state]
            values = outcome.values if state == optuna.trial.TrialState.COMPLETE else None
            runtime.optuna_study.tell(otrial, values, state=state, skip_if_finished=True)
        self._emit(
            run.study_id,
            {
                "type": "trial_finished",
                "number": run.number,
                "state": outcome.state,
                "value": outcome.value,
            },
        )

    def _check_failures(self, session: Any, run: Run) -> None:
        study = session.get(Study, run.study_pk, with_for_update=True)
        runtime = self._runtimes[run.study_pk]
        failed = session.execute(
            select(Trial.pk).where(Trial.study_pk == run.study_pk, Trial.state == "failed")
        ).all()
        if study is not None and len(failed) >= runtime.spec.budget.max_failures:
            study.status, study.finished_at = "failed", utcnow()
            study.error = (
                f"{len(failed)} trials failed (max_failures={runtime.spec.budget.max_failures})"
            )
            self._emit(study.id, {"type": "study", "status": "failed"})

    def _forget(self, run: Run) -> None:
        self._runs.pop(run.run_id, None)
        self._wake.set()


_OPTUNA_STATE = {
    "complete": optuna.trial.TrialState.COMPLETE,
    "pruned": optuna.trial.TrialState.PRUNED,
    "failed": optuna.trial.TrialState.FAIL,
    "cancelled": optuna.trial.TrialState.FAIL,
}


def _timed_out(study: Study, timeout_s: float | None) -> bool:
    if timeout_s is None or study.started_at is None:
        return False
    started = study.started_at
    if started.tzinfo is None:  # SQLite returns naive datetimes
        started = started.replace(tzinfo=utcnow().tzinfo)
    return (utcnow() - started).total_seconds() > timeout_s


def _intermediate_values(session: Any, trial: Trial, spec: StudySpec) -> dict[int, float]:
    if len(spec.objectives) != 1:
        return {}
    out = {}
    for row in trials.intermediate(session, [trial.pk])[trial.pk]:
        value = row.get(spec.objectives[0].metric)
        if isinstance(value, int | float) and math.isfinite(value):
            out[int(row["epoch"])] = float(value)
    return out


def _runner_config(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    config = search.trial_config(spec, params)
    if spec.runner.name == "sleep":
        config["sleep_s"] = spec.runner.sleep_s
    return config
