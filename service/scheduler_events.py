"""How the scheduler stores what its executor reports, and what it reads in the same
transaction: the events half of :class:`service.scheduler.Scheduler`.

A pass stores every pending executor event (reports, results, failures) in **one** write
transaction -- a start, reports and outcomes of a burst each in one or two statements,
whatever their number -- and reads the active studies in it too (:meth:`EventStore._view`).
What follows in memory (telling Optuna, asking the pruner, events for the live dashboard)
runs only after that commit, so Optuna never learns of a result the tables do not hold. If a
handler raises, the batch goes round again with a savepoint per event and only the bad one
is dropped; if the commit fails, the events wait for the next pass.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from service import search
from service.db import Database, utcnow
from service.runtime import StudyRuntime
from service.studies.models import ACTIVE_STATUSES, Study
from service.trials import batch
from service.trials import service as trials
from service.trials.models import Trial
from workers.executor import Executor, ExecutorEvent, Resources

log = logging.getLogger("tsam.scheduler")
EventHook = Callable[[str, dict[str, Any]], None]
Action = Callable[[], None]


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
    ended: bool = False  # its terminal event was stored in the current pass


@dataclass(frozen=True)
class ActiveStudy:
    """What a pass reads of an active study: plain columns, not an ORM object (loading those
    on every pass cost a quarter of the scheduler's time)."""

    pk: int
    id: str
    spec: dict[str, Any]
    status: str
    next_number: int
    started_at: datetime | None
    updated_at: datetime


@dataclass
class View:
    """What a pass knows of the studies: see :meth:`EventStore._view`."""

    studies: list[ActiveStudy]
    waiting: set[int]  # pks of the studies with a waiting trial
    statuses: dict[int, str]  # study pk -> status, for every study with a run in flight


class EventStore:
    """The events half of the scheduler (a mixin: :class:`service.scheduler.Scheduler` sets
    the state declared here)."""

    db: Database
    executor: Executor
    hooks: list[EventHook]
    _wake: threading.Event
    _runtimes: dict[int, StudyRuntime]
    _runs: dict[str, Run]
    _unstored: list[ExecutorEvent]  # drained, not yet stored: for the next pass
    _ending: set[str]  # runs with a drained, not yet stored result

    def _emit(self, study_id: str, event: dict[str, Any]) -> None:
        for hook in self.hooks:
            try:
                hook(study_id, event)
            except Exception:
                log.exception("event hook failed")

    def _view(self, session: Session, rows: Sequence[Any] | None = None) -> View:
        """The active studies (priority, then oldest first), which of them have a waiting
        trial, and the status of every study with a run in flight -- in two statements, the
        second only if a study with a run in flight is not active. ``rows``: the active
        studies as already read with :func:`_active_studies_sql` (with the pass's writes)."""
        if rows is None:
            rows = session.execute(_ACTIVE_STUDIES).all()
        else:  # that read's order is not kept: its rows carry their priority to sort by
            rows = sorted(rows, key=lambda row: (-row[-1], row[0]))
        n = len(fields(ActiveStudy))
        studies = [ActiveStudy(*row[:n]) for row in rows]
        waiting = {row[0] for row in rows if row[n]}
        return View(studies, waiting, self._run_statuses(session, studies))

    def _run_statuses(self, session: Session, studies: list[ActiveStudy]) -> dict[int, str]:
        """Status of every study with a run in flight (active ones are already loaded)."""
        statuses = {s.pk: s.status for s in studies}
        others = {r.study_pk for r in self._runs.values()} - statuses.keys()
        if others:
            statuses.update(
                session.execute(select(Study.pk, Study.status).where(Study.pk.in_(others))).all()
            )
        return statuses

    def _handle_events(self, events: list[ExecutorEvent]) -> View | None:
        """Store ``events`` in one transaction, then act on them in memory; returns the
        :meth:`_view` read in that same transaction (None when nothing was stored).

        Each handler writes through the session and returns the in-memory follow-ups
        (Optuna, pruning, dashboard events) to run after the commit, so Optuna never learns of
        a result the database does not hold. If a handler raises, the batch is stored again
        with a savepoint per event, and only the bad event is dropped (and logged). If the
        commit itself fails, nothing was acted on and the events wait for the next pass.
        """
        events, self._unstored = self._unstored + events, []
        todo = [(self._runs[e.run_id], e) for e in events if e.run_id in self._runs]
        if not todo:
            return None
        try:
            try:
                after, view = self._store(todo, isolate=False)
            except _HandlerError:
                after, view = self._store(todo, isolate=True)
        except Exception:
            log.exception("could not store %d trial event(s); retrying next pass", len(todo))
            self._unstored = [e for _, e in todo]
            return None
        for action in after:
            try:
                action()
            except Exception:
                log.exception("acting on a stored trial event failed")
        return view

    def _store(
        self, todo: list[tuple[Run, ExecutorEvent]], *, isolate: bool
    ) -> tuple[list[Action], View | None]:
        """One write transaction for all of ``todo``, which also reads the pass's
        :meth:`_view` (one transaction fewer per pass); ``isolate`` puts each event in a
        savepoint (a few statements more per event, so only after a failure).

        On PostgreSQL, a batch whose writes are the one statement of
        :func:`batch.record_events` and nothing else -- no attempt to release, no failure
        to count against ``max_failures`` -- needs no transaction around it: that statement
        commits on its own, which saves the BEGIN and COMMIT round trips of most passes.
        Its effects are then acted on even if the view read after it fails (None is
        returned for the view): they are stored, and a retry would find the leases spent.
        """
        decided = {} if isolate else self._decide_terminal(todo)
        if not isolate and self.db.is_postgres and not _needs_transaction(decided.values()):
            return self._store_autocommitted(todo, decided)
        after: list[Action] = []
        try:
            with self.db.write() as session:
                if not isolate:
                    try:
                        after, _ = self._store_batch(session, todo, decided)
                    except Exception as exc:
                        raise _HandlerError from exc
                else:
                    for run, event in todo:
                        handler = getattr(self, f"_on_{event.kind}")
                        try:
                            with session.begin_nested():
                                after.extend(handler(session, run, event))
                        except Exception:
                            log.exception("failed to store %s of trial %s", event.kind, run.number)
                view = self._view(session)
        except BaseException:
            for run, _ in todo:
                run.ended = False
            raise
        return after, view

    def _decide_terminal(self, todo: list[tuple[Run, ExecutorEvent]]) -> dict[str, _Decision]:
        """What each terminal event of ``todo`` comes to, by run (a run's terminal event is its
        last: the executor drops anything after it)."""
        return {run.run_id: self._decide(run, e) for run, e in todo if e.terminal}

    def _store_autocommitted(
        self, todo: list[tuple[Run, ExecutorEvent]], decided: dict[str, _Decision]
    ) -> tuple[list[Action], View | None]:
        """:meth:`_store` for a batch that is one statement (see there)."""
        with self.db.autocommit_session() as session:
            try:
                read = _active_studies_sql(session.get_bind().dialect)
                after, rows = self._store_batch(session, todo, decided, read=read)
            except Exception as exc:  # nothing was written: the statement rolled back
                for run, _ in todo:
                    run.ended = False
                raise _HandlerError from exc
            try:
                view: View | None = self._view(session, rows)
            except Exception:
                log.exception("reading the active studies failed after storing events")
                view = None
        return after, view

    def _store_batch(
        self,
        session: Session,
        todo: list[tuple[Run, ExecutorEvent]],
        decided: dict[str, _Decision],
        read: str | None = None,
    ) -> tuple[list[Action], list[Any] | None]:
        """Store ``todo`` (its terminal events ``decided`` by run) in as few statements as the
        backend allows (:func:`batch.record_events`: one on PostgreSQL, two on SQLite), then
        hand back the runs to retry. Per run, the order of its events is kept: a run's
        terminal event is its last, so its outcome is written with its start and reports, and
        a run handed back to ``waiting`` is released after they are stored. ``read``
        (PostgreSQL) is a SELECT run in the same statement; its rows are returned (else
        None)."""
        started: list[tuple[int, str, dict[str, Any]]] = []
        reports: list[tuple[Run, ExecutorEvent]] = []
        outcomes: list[tuple[Run, trials.Outcome]] = []
        releases: list[tuple[Run, _Release]] = []
        for run, event in todo:
            if event.kind == "started":
                started.append(_started(run, event))
            elif event.kind == "report":
                reports.append((run, event))
            else:
                decision = decided[run.run_id]
                if isinstance(decision, _Release):
                    releases.append((run, decision))
                else:
                    outcomes.append((run, decision))
        runs = {(run.trial_pk, run.lease): run for run, _ in reports}
        written = (
            session,
            started,
            [_report(run, e) for run, e in reports],
            [(run.trial_pk, run.lease, outcome) for run, outcome in outcomes],
        )
        rows = None
        if read is None:
            stored, recorded = batch.record_events(*written)
        else:
            stored, recorded, rows = batch.record_events_and_read(*written, read)
        after = [self._reported(runs[(r.pk, r.lease)], r.epoch, r.metrics) for r in stored]
        for run, release in releases:
            after.extend(self._end_one(session, run, release))
        for run, outcome in outcomes:
            after.extend(self._ended(session, run, outcome, (run.trial_pk, run.lease) in recorded))
        return after, rows

    def _on_started(self, session: Session, run: Run, event: ExecutorEvent) -> list[Action]:
        batch.record_started(session, [_started(run, event)])
        return []

    def _on_report(self, session: Session, run: Run, event: ExecutorEvent) -> list[Action]:
        report = _report(run, event)
        if not batch.record_reports(session, [report]):
            return []
        return [self._reported(run, report.epoch, report.metrics)]

    def _reported(self, run: Run, epoch: int, metrics: dict[str, Any]) -> Action:
        """What follows a stored report, after the commit: the dashboard event and the
        pruner's say."""

        def follow_up() -> None:
            run.last_metrics = metrics
            self._emit(run.study_id, {"type": "trial_report", "number": run.number, "epoch": epoch})
            self._maybe_prune(run, epoch, metrics)

        return follow_up

    def _maybe_prune(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        runtime = self._runtimes[run.study_pk]
        values = search.objective_values(runtime.spec, metrics)
        if values is None or len(values) != 1:
            return
        run.last_value = values[0]
        otrial = runtime.live.get(run.number)
        if otrial is None or run.stop_reason is not None or run.ended:
            return
        otrial.report(values[0], epoch)
        if otrial.should_prune():
            run.stop_reason = "pruned"
            self.executor.cancel(run.run_id)

    # A terminal event is decided first -- the outcome to record, or a release of the run
    # back to ``waiting`` -- without writing anything, then recorded: one event alone
    # (``_on_<kind>``, the savepoint path) or with the rest of its pass (:meth:`_store_batch`).
    def _on_result(self, session: Session, run: Run, event: ExecutorEvent) -> list[Action]:
        return self._end_one(session, run, self._decide(run, event))

    _on_failed = _on_cancelled = _on_result

    def _decide(self, run: Run, event: ExecutorEvent) -> _Decision:
        return cast(_Decision, getattr(self, f"_decide_{event.kind}")(run, event))

    def _decide_result(self, run: Run, event: ExecutorEvent) -> _Decision:
        runtime = self._runtimes[run.study_pk]
        metrics = dict(event.payload.get("metrics", {}))
        values = search.objective_values(runtime.spec, metrics)
        if values is None:
            names = [o.metric for o in runtime.spec.objectives]
            error = f"objective {names} missing"
            return trials.Outcome("failed", metrics=metrics, error=error, finished_at=event.at)
        return trials.Outcome("complete", values[0], values, metrics, finished_at=event.at)

    def _decide_failed(self, run: Run, event: ExecutorEvent) -> _Decision:
        error = event.payload.get("traceback") or event.payload.get("error") or "unknown error"
        runtime = self._runtimes[run.study_pk]
        if event.retryable and run.attempt < runtime.spec.budget.max_attempts:

            def retry() -> None:
                self._forget(run)
                self._emit(run.study_id, {"type": "trial_retry", "number": run.number})

            return _Release(str(error), [retry])
        metrics = run.last_metrics or None
        return trials.Outcome("failed", metrics=metrics, error=str(error), finished_at=event.at)

    def _decide_cancelled(self, run: Run, event: ExecutorEvent) -> _Decision:
        ended, metrics = event.at, run.last_metrics or None
        if run.stop_reason == "pruned":
            return trials.Outcome(
                "pruned",
                run.last_value,
                [run.last_value] if run.last_value is not None else None,
                run.last_metrics,
                finished_at=ended,
            )
        if run.stop_reason == "timeout":
            error = "trial_timeout_s exceeded"
            return trials.Outcome("failed", metrics=metrics, error=error, finished_at=ended)
        if run.stop_reason == "drain":
            return _Release("interrupted: the server stopped", [lambda: self._forget(run)])
        return trials.Outcome("cancelled", metrics=metrics, finished_at=ended)

    def _end_one(self, session: Session, run: Run, decided: _Decision) -> list[Action]:
        if isinstance(decided, _Release):
            trials.release(session, run.trial_pk, run.lease, decided.error)
            run.ended = True
            return decided.actions
        recorded = trials.finish(session, run.trial_pk, run.lease, decided)
        return self._ended(session, run, decided, recorded)

    def _ended(
        self, session: Session, run: Run, outcome: trials.Outcome, recorded: bool
    ) -> list[Action]:
        """After an outcome's compare-and-set (``recorded``: it took; once only, on the
        lease): the study's failure count, then, after the commit, Optuna and the dashboard."""
        study_failed = (
            recorded and outcome.state == "failed" and self._too_many_failures(session, run)
        )
        run.ended = True

        def follow_up() -> None:
            self._forget(run)
            if not recorded:
                return
            runtime = self._runtimes.get(run.study_pk)
            if runtime is not None:
                runtime.tell(run.number, outcome.state, outcome.values)
            self._emit(
                run.study_id,
                {
                    "type": "trial_finished",
                    "number": run.number,
                    "state": outcome.state,
                    "value": outcome.value,
                },
            )
            if study_failed:
                self._emit(run.study_id, {"type": "study", "status": "failed"})

        return [follow_up]

    def _too_many_failures(self, session: Session, run: Run) -> bool:
        """Fail the study once ``max_failures`` trials failed; True if this call did."""
        study = session.get(Study, run.study_pk, with_for_update=True)
        limit = self._runtimes[run.study_pk].spec.budget.max_failures
        failed = session.execute(
            select(func.count()).where(Trial.study_pk == run.study_pk, Trial.state == "failed")
        ).scalar_one()
        if study is None or failed < limit or study.status not in (*ACTIVE_STATUSES, "paused"):
            return False
        study.status, study.finished_at = "failed", utcnow()
        study.error = f"{failed} trials failed (max_failures={limit})"
        return True

    def _forget(self, run: Run) -> None:
        self._runs.pop(run.run_id, None)
        self._ending.discard(run.run_id)
        self._wake.set()


@dataclass(frozen=True)
class _Release:
    """A terminal event that ends the attempt but not the trial: it goes back to ``waiting``
    (``error`` says why) and runs again as its next attempt; ``actions`` follow the commit."""

    error: str
    actions: list[Action]


_Decision = trials.Outcome | _Release  # what a terminal event comes to: see _store_batch


def _needs_transaction(decisions: Iterable[_Decision]) -> bool:
    """Whether a batch writes more than :func:`batch.record_events`: a release (a run to
    retry or drain) or a failed outcome (the ``max_failures`` count)."""
    return any(isinstance(d, _Release) or d.state == "failed" for d in decisions)


class _HandlerError(Exception):
    """A handler raised while storing a batch of events without savepoints."""


_S = cast(Table, Study.__table__)
_T = cast(Table, Trial.__table__)


# What a pass's view reads: the columns of ActiveStudy for every active study (priority, then
# oldest first) and whether it has a waiting trial -- built once, as it runs on every pass.
_HAS_WAITING = (
    select(_T.c.pk)
    .where(_T.c.study_pk == _S.c.pk, _T.c.state == "waiting")
    .exists()
    .label("has_waiting")
)
_ACTIVE_STUDIES = (
    select(*[_S.c[f.name] for f in fields(ActiveStudy)], _HAS_WAITING)
    .where(_S.c.status.in_(ACTIVE_STATUSES))
    .order_by(_S.c.priority.desc(), _S.c.pk)
)


@functools.cache
def _active_studies_sql(dialect: Dialect) -> str:
    """:data:`_ACTIVE_STUDIES` as text, with the priority to sort by: read in the statement
    that stores a pass's events (:func:`batch.record_events_and_read`), one round trip for
    both."""
    statement = _ACTIVE_STUDIES.add_columns(_S.c.priority)
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _started(run: Run, event: ExecutorEvent) -> tuple[int, str, dict[str, Any]]:
    return run.trial_pk, run.lease, dict(event.payload.get("env", {}))


def _report(run: Run, event: ExecutorEvent) -> batch.Report:
    payload = event.payload
    return batch.Report(
        run.trial_pk, run.lease, int(payload["epoch"]), run.attempt, dict(payload["metrics"])
    )
