"""How the scheduler writes: a burst of trial events is one transaction, a study with no room
costs no write, a bad event is dropped alone, and events whose transaction failed are stored
on the next pass -- on SQLite and PostgreSQL, with an executor the test drives by hand."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine

from service import migrate
from service.db import Database
from service.scheduler import Scheduler
from service.studies import lifecycle
from service.studies import service as studies
from service.studies.models import Study
from service.studies.spec import StudySpec
from service.trials.models import Trial, TrialMetric
from workers.executor import Capacity, ExecutorEvent, Resources
from workers.trial import TrialSpec


class ManualExecutor:
    """Runs nothing: records submissions; the test queues the events ``drain`` returns."""

    def __init__(self, cpus: float = 8.0) -> None:
        self.cpus = cpus
        self.submitted: dict[str, TrialSpec] = {}
        self.cancelled: list[str] = []
        self.pending: list[ExecutorEvent] = []

    def start(self, notify: Callable[[], None]) -> None:
        pass

    def submit(self, spec: TrialSpec, resources: Resources) -> str:
        run_id = f"run-{spec.trial_number}-{spec.attempt}"
        self.submitted[run_id] = spec
        return run_id

    def cancel(self, run_id: str) -> None:
        self.cancelled.append(run_id)

    def drain(self) -> list[ExecutorEvent]:
        events, self.pending = self.pending, []
        return events

    def running(self) -> set[str]:
        return set(self.submitted)

    def capacity(self) -> Capacity:
        return Capacity(self.cpus, 0.0, self.cpus, 0.0)

    def shutdown(self) -> None:
        pass

    def finish(self, run_id: str, value: float, epochs: int = 2) -> None:
        """Queue a whole trial's events: started, ``epochs`` reports, result."""
        self.pending.append(ExecutorEvent(run_id, "started", {"env": {"host": "manual"}}))
        for epoch in range(1, epochs + 1):
            metrics = {"val_accuracy": value * epoch / epochs}
            self.pending.append(
                ExecutorEvent(run_id, "report", {"epoch": epoch, "metrics": metrics})
            )
        result = {"metrics": {"val_accuracy": value}, "stopped": False, "epochs": epochs}
        self.pending.append(ExecutorEvent(run_id, "result", result))


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the write transactions committed through any :class:`Database` -- the
    scheduler writes through its own (:meth:`Database.dedicated`) -- a connection in
    autocommit counting as one; reads are not counted."""
    seen: list[int] = []

    def counting(real: Callable[[Database], Any]) -> Callable[[Database], Any]:
        @contextmanager
        def counted(self: Database) -> Iterator[Any]:
            with real(self) as handle:
                yield handle
            seen.append(1)

        return counted

    monkeypatch.setattr(Database, "write", counting(Database.write))
    monkeypatch.setattr(Database, "autocommit", counting(Database.autocommit))
    return seen


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """The SQL statements any engine ran, as sent (one entry per executemany)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def make(db: Database, tmp_path: Any, n_trials: int = 6, parallel: int = 3) -> tuple:
    spec = StudySpec.model_validate(
        {
            "name": "batching",
            "task": {"epochs": 2},
            "search_space": {"lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}},
            "sampler": {"name": "random", "seed": 0},
            "budget": {"n_trials": n_trials, "max_parallel": parallel},
        }
    )
    executor = ManualExecutor()
    scheduler = Scheduler(db, executor, checkpoint_root=str(tmp_path / "runs"))
    study = studies.create_study(db, owner="local", spec=spec)[0]
    return scheduler, executor, study


def trials_of(db: Database, study: Study) -> list[Trial]:
    with db.read() as s:
        return list(
            s.execute(select(Trial).where(Trial.study_pk == study.pk).order_by(Trial.number))
            .scalars()
            .all()
        )


def test_the_first_pass_starts_max_parallel_trials_in_one_transaction(db, tmp_path, commits):
    scheduler, executor, study = make(db, tmp_path)
    commits.clear()
    scheduler.run_pass()
    assert len(executor.submitted) == 3
    assert len(commits) == 1
    rows = trials_of(db, study)
    assert [(t.number, t.state, t.attempts) for t in rows] == [(n, "running", 1) for n in range(3)]
    assert len({t.lease_token for t in rows}) == 3
    with db.read() as s:
        assert s.get(Study, study.pk).status == "running"


def test_a_full_study_costs_no_write_per_pass(db, tmp_path, commits):
    scheduler, _executor, _study = make(db, tmp_path)
    scheduler.run_pass()
    commits.clear()
    for _ in range(5):
        scheduler.run_pass()
    assert commits == []


def test_a_burst_of_events_of_several_trials_is_one_transaction(db, tmp_path, commits):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    for run_id in list(executor.submitted)[:2]:
        executor.finish(run_id, 0.5)
    commits.clear()
    scheduler.run_pass()
    # one to start the two trials that replace them, one for the eight events of two trials
    assert len(commits) == 2
    rows = trials_of(db, study)
    assert [t.state for t in rows] == ["complete", "complete", "running", "running", "running"]
    assert rows[0].env == {"host": "manual"} and rows[0].value == 0.5
    with db.read() as s:
        epochs = s.execute(select(TrialMetric.epoch).where(TrialMetric.trial_pk == rows[0].pk))
        assert sorted(epochs.scalars()) == [1, 2]
    # Optuna was told both results once they were stored
    runtime = scheduler._runtimes[study.pk]
    assert [t.value for t in runtime.optuna_study.get_trials() if t.value is not None] == [
        0.5,
        0.5,
    ]


def test_the_starts_reports_and_outcomes_of_a_burst_cost_a_statement_each_whatever_their_number(
    db, tmp_path, statements
):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    for run_id in executor.submitted:
        executor.finish(run_id, 0.5, epochs=4)  # three trials, twelve reports
    statements.clear()
    scheduler._handle_events(executor.drain())
    sent = [" ".join(s.split()).replace(" = ", "=") for s in statements]
    writes = [s for s in sent if s.startswith(("UPDATE", "INSERT", "WITH"))]
    if db.is_postgres:  # starts, reports and outcomes of all three: one statement
        assert len(writes) == 1 and writes[0].startswith("WITH v AS")
    else:  # SQLite: the update, then the metric upsert (it cannot be part of the update)
        assert len(writes) == 2 and "FROM json_each(" in writes[0]
        assert writes[1].startswith("INSERT INTO trial_metrics")
    rows = trials_of(db, study)[:3]
    assert [(t.state, t.value, t.env) for t in rows] == [("complete", 0.5, {"host": "manual"})] * 3
    assert all(t.lease_token is None and t.finished_at and t.heartbeat_at for t in rows)
    with db.read() as s:
        metrics = s.execute(select(TrialMetric.trial_pk, TrialMetric.epoch)).all()
    assert sorted(metrics) == [(t.pk, epoch) for t in rows for epoch in range(1, 5)]


def test_a_stale_attempts_events_change_nothing_and_do_not_reach_optuna(db, tmp_path):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    stale = scheduler._runs["run-0-1"]
    with db.write() as s:  # another server took the trial over: the lease moved on
        moved = text("UPDATE trials SET lease_token = 'other' WHERE pk = :pk")
        s.execute(moved, {"pk": stale.trial_pk})
    executor.finish("run-0-1", 0.9)
    executor.finish("run-1-1", 0.5)
    scheduler._handle_events(executor.drain())
    rows = trials_of(db, study)
    assert (rows[0].state, rows[0].env, rows[0].value) == ("running", None, None)
    assert (rows[1].state, rows[1].value) == ("complete", 0.5)
    with db.read() as s:
        stored = s.execute(select(TrialMetric.trial_pk)).scalars().all()
    assert set(stored) == {rows[1].pk}
    values = [t.value for t in scheduler._runtimes[study.pk].optuna_study.get_trials()]
    assert values[:2] == [None, 0.5]


def test_two_leases_of_one_trial_in_a_pass_are_told_apart(db, tmp_path):
    """An old attempt's late events and the new attempt's in the same pass: only the lease
    the trial runs under counts (on SQLite through the per-kind statements)."""
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    new_run = scheduler._runs["run-0-1"]
    old_run = type(new_run)(**{**vars(new_run), "run_id": "old", "lease": "old-lease"})
    scheduler._runs["old"] = old_run
    executor.pending += [
        ExecutorEvent("run-0-1", "report", {"epoch": 1, "metrics": {"val_accuracy": 0.2}}),
        ExecutorEvent("old", "report", {"epoch": 1, "metrics": {"val_accuracy": 0.9}}),
        ExecutorEvent("old", "result", {"metrics": {"val_accuracy": 0.9}}),
    ]
    scheduler._handle_events(executor.drain())
    row = trials_of(db, study)[0]
    assert (row.state, row.lease_token, row.value) == ("running", new_run.lease, None)
    with db.read() as s:
        stored = s.execute(select(TrialMetric.metrics)).scalars().all()
    assert stored == [{"val_accuracy": 0.2}]
    assert scheduler._runtimes[study.pk].optuna_study.get_trials()[0].value is None


def test_a_retried_attempts_reports_are_stored_before_it_is_released(db, tmp_path):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    executor.pending += [
        ExecutorEvent("run-0-1", "started", {"env": {"host": "manual"}}),
        ExecutorEvent("run-0-1", "report", {"epoch": 1, "metrics": {"val_accuracy": 0.3}}),
        ExecutorEvent("run-0-1", "failed", {"error": "worker died"}, retryable=True),
    ]
    scheduler._handle_events(executor.drain())
    row = trials_of(db, study)[0]
    assert (row.state, row.lease_token, row.env) == ("waiting", None, {"host": "manual"})
    assert row.error == "worker died"
    with db.read() as s:
        assert s.execute(select(TrialMetric.epoch)).scalars().all() == [1]


def test_a_bad_event_is_dropped_alone(db, tmp_path, caplog):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    first, second = list(executor.submitted)[:2]
    executor.pending.append(
        ExecutorEvent(first, "report", {"epoch": "not a number", "metrics": {}})
    )
    executor.finish(second, 0.25)
    scheduler.run_pass()
    rows = trials_of(db, study)
    assert rows[0].state == "running"  # its broken report changed nothing
    assert rows[1].state == "complete" and rows[1].value == 0.25
    assert "failed to store report of trial 0" in caplog.text


def test_events_whose_transaction_failed_are_stored_on_the_next_pass(
    db, tmp_path, monkeypatch, caplog
):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    run_id = next(iter(executor.submitted))
    executor.finish(run_id, 0.75)

    real_handle = scheduler._handle_events
    storing = {"calls": 0}

    def failing(real: Callable[[], Any]) -> Callable[[], Any]:
        def connect() -> Any:
            if storing["calls"] == 1:  # the first pass's store (not the refills around it)
                raise RuntimeError("database went away")
            return real()

        return connect

    def handle(events: list[ExecutorEvent]) -> Any:
        storing["calls"] += 1
        try:
            return real_handle(events)
        finally:
            storing["calls"] += 1

    # the store writes in a transaction, or (PostgreSQL, one statement) in autocommit
    monkeypatch.setattr(scheduler.db, "write", failing(scheduler.db.write))
    monkeypatch.setattr(scheduler.db, "autocommit", failing(scheduler.db.autocommit))
    monkeypatch.setattr(scheduler, "_handle_events", handle)
    scheduler.run_pass()
    assert "retrying next pass" in caplog.text
    assert trials_of(db, study)[0].state == "running"  # nothing stored, nothing acted on
    assert scheduler._runtimes[study.pk].optuna_study.get_trials()[0].value is None

    scheduler.run_pass()
    row = trials_of(db, study)[0]
    assert row.state == "complete" and row.value == 0.75 and row.attempts == 1
    assert scheduler._runtimes[study.pk].optuna_study.get_trials()[0].value == 0.75


@pytest.mark.postgres
def test_a_connection_the_server_dropped_costs_one_transaction_not_the_events(
    pg_schema_url, tmp_path
):
    """The scheduler's handle has no pre-use ping: a dropped connection fails the pass's first
    transaction, SQLAlchemy discards it, and the events are stored on a new connection."""
    migrate.upgrade(pg_schema_url)
    db = Database(pg_schema_url)
    try:
        scheduler, executor, study = make(db, tmp_path)
        scheduler.run_pass()
        with scheduler.db.read() as s:  # a pool of one: the scheduler's own connection
            pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with db.write() as s:
            assert s.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}).scalar()
        run_id = next(iter(executor.submitted))
        executor.finish(run_id, 0.75)
        scheduler.run_pass()
        row = trials_of(db, study)[0]
        assert row.state == "complete" and row.value == 0.75
        with scheduler.db.read() as s:
            assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        db.dispose()


def test_a_study_completes_once_its_last_trials_are_stored(db, tmp_path):
    scheduler, executor, study = make(db, tmp_path, n_trials=2, parallel=2)
    scheduler.run_pass()
    for run_id in list(executor.submitted):
        executor.finish(run_id, 0.5)
    scheduler.run_pass()
    with db.read() as s:
        assert s.get(Study, study.pk).status == "completed"
    assert [t.state for t in trials_of(db, study)] == ["complete", "complete"]


class Bursty(ManualExecutor):
    """``drain`` hands out one queued batch per call, like events still arriving."""

    def __init__(self, batches: list[list[ExecutorEvent]]) -> None:
        super().__init__()
        self.batches = batches
        self.drains = 0

    def drain(self) -> list[ExecutorEvent]:
        self.drains += 1
        return self.batches.pop(0) if self.batches else []


def test_a_pass_waits_for_the_rest_of_a_burst_unless_a_trial_just_ended(db, tmp_path):
    report = ExecutorEvent("r", "report", {"epoch": 1, "metrics": {}})
    result = ExecutorEvent("r", "result", {"metrics": {}})
    executor = Bursty([[report], [result]])
    scheduler = Scheduler(db, executor, checkpoint_root=str(tmp_path), batch_s=0.001)
    assert scheduler._gather() == [report, result]  # waited, drained the burst's rest

    executor = Bursty([[result], [report]])
    scheduler = Scheduler(db, executor, checkpoint_root=str(tmp_path), batch_s=0.001)
    assert scheduler._gather() == [result]  # a slot is free: no waiting
    assert executor.drains == 1


def test_a_trial_that_ends_during_the_batch_window_cuts_it_short(db, tmp_path):
    report = ExecutorEvent("r", "report", {"epoch": 1, "metrics": {}})
    result = ExecutorEvent("r", "result", {"metrics": {}})
    executor = Bursty([[report], [result]])
    scheduler = Scheduler(db, executor, checkpoint_root=str(tmp_path), batch_s=30.0)
    timer = threading.Timer(0.05, scheduler.wake)  # the executor's notify, as the result lands
    timer.start()
    tick = time.monotonic()
    assert scheduler._gather() == [report, result]
    assert time.monotonic() - tick < 10  # not the 30-s window
    timer.join()


def _stored_after(scheduler: Scheduler, executor: ManualExecutor) -> list[int]:
    """Records how many trials had been submitted each time the pass stored its events."""
    seen: list[int] = []
    real = scheduler._handle_events

    def recording(events: list[ExecutorEvent]) -> Any:
        seen.append(len(executor.submitted))
        return real(events)

    scheduler._handle_events = recording  # type: ignore[method-assign]
    return seen


def test_a_finished_trials_slot_is_refilled_before_its_events_are_stored(db, tmp_path):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    seen = _stored_after(scheduler, executor)
    # (On PostgreSQL the first refill after a study's first fill reads the study anew: that
    # fill took the locking way, which moved the row's updated_at.)
    for cycle in range(3):
        done = min(executor.submitted, key=lambda r: executor.submitted[r].trial_number)
        executor.finish(done, 0.5)
        executor.submitted.pop(done)  # keep the counting simple: the finished run is gone
        scheduler.run_pass()
        if cycle or not db.is_postgres:
            assert seen[-1] == 3  # the freed slot was refilled before the store
        assert sum(1 for t in trials_of(db, study) if t.state == "running") == 3
    rows = trials_of(db, study)
    assert [t.state for t in rows] == ["complete"] * 3 + ["running"] * 3
    assert [t.number for t in rows] == list(range(6))
    runtime = scheduler._runtimes[study.pk]
    assert [t.value for t in runtime.optuna_study.get_trials() if t.value is not None] == [0.5] * 3


def test_a_refilled_slot_never_shows_two_trials_at_once(db, tmp_path):
    """A trial's ``finished_at`` is when its result arrived, so the trial started in its slot
    before the result was stored still starts after it ended, as stored."""
    scheduler, executor, study = make(db, tmp_path, parallel=1)
    scheduler.run_pass()
    for number in range(3):
        executor.finish(f"run-{number}-1", 0.5)
        time.sleep(0.01)  # the result waits a little before the pass stores it
        scheduler.run_pass()
    rows = trials_of(db, study)
    assert [t.state for t in rows] == ["complete"] * 3 + ["running"]
    for done, started in itertools.pairwise(rows):
        assert done.finished_at <= started.started_at


def test_a_result_arriving_during_a_pass_is_refilled_in_that_pass_and_stored_by_the_next(
    db, tmp_path
):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    executor.finish("run-0-1", 0.5)
    scheduler.run_pass()  # a refill first: on PostgreSQL the next one can then be early
    real = scheduler._handle_events

    def storing(events: list[ExecutorEvent]) -> Any:
        view = real(events)
        executor.finish("run-1-1", 0.7)  # arrives while the pass is busy storing
        return view

    scheduler._handle_events = storing  # type: ignore[method-assign]
    scheduler.run_pass()
    assert len(executor.submitted) == 5  # refilled in the pass it arrived in
    assert trials_of(db, study)[1].state == "running"  # not stored yet: the next pass does
    scheduler._handle_events = real  # type: ignore[method-assign]
    scheduler.run_pass()
    rows = trials_of(db, study)
    assert [(t.state, t.value) for t in rows[:2]] == [("complete", 0.5), ("complete", 0.7)]
    assert [t.state for t in rows[2:]] == ["running"] * 3
    with db.read() as s:
        epochs = s.execute(select(TrialMetric.epoch).where(TrialMetric.trial_pk == rows[1].pk))
        assert sorted(epochs.scalars()) == [1, 2]


def test_a_failed_trials_slot_is_refilled_only_after_its_failure_is_stored(db, tmp_path):
    scheduler, executor, _study = make(db, tmp_path)
    scheduler.run_pass()
    seen = _stored_after(scheduler, executor)
    executor.pending.append(ExecutorEvent("run-0-1", "failed", {"error": "boom"}))
    scheduler.run_pass()
    # a failure may be retried or fail the study: the store decides before any refill
    assert seen == [3] and len(executor.submitted) == 4


def test_an_early_refill_that_fails_loses_no_event(db, tmp_path, monkeypatch, caplog):
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    executor.finish("run-0-1", 0.5)
    scheduler.run_pass()  # a refill first: on PostgreSQL the next one can then be early
    executor.finish("run-1-1", 0.5)
    real_fast, real_fill = scheduler._fill_fast, scheduler._fill_study
    seen = _stored_after(scheduler, executor)

    def broken(*args: Any, **kwargs: Any) -> Any:
        if not seen:  # only before the store: the early refill
            raise RuntimeError("database went away")
        return (real_fast if len(args) == 1 else real_fill)(*args, **kwargs)

    monkeypatch.setattr(scheduler, "_fill_fast", lambda study: broken(study))
    monkeypatch.setattr(scheduler, "_fill_study", lambda study, w=True: broken(study, w))
    scheduler.run_pass()
    assert "early refill of study" in caplog.text
    rows = trials_of(db, study)
    assert [(t.state, t.value) for t in rows[:2]] == [("complete", 0.5)] * 2
    assert [t.state for t in rows[2:]] == ["running"] * 3  # the pass's own fill refilled it


def test_early_refills_never_start_more_than_the_budget(db, tmp_path):
    scheduler, executor, study = make(db, tmp_path, n_trials=4, parallel=2)
    scheduler.run_pass()
    while len(executor.submitted) < 8:  # more results than the budget has trials
        for run_id in [r for r in executor.submitted if r not in executor.cancelled]:
            executor.finish(run_id, 0.5)
            executor.cancelled.append(run_id)  # marks it finished for this loop
        scheduler.run_pass()
        if len(trials_of(db, study)) == 4 and scheduler.in_flight == 0:
            break
    rows = trials_of(db, study)
    assert [t.state for t in rows] == ["complete"] * 4
    with db.read() as s:
        assert s.get(Study, study.pk).status == "completed"


@pytest.mark.postgres
def test_on_postgresql_early_refills_take_the_one_statement_path(pg_db, tmp_path):
    db = pg_db
    seen: list[str] = []
    scheduler, executor, study = make(db, tmp_path, n_trials=8)
    scheduler.run_pass()
    event.listen(scheduler.db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    stored = _stored_after(scheduler, executor)
    for number in range(3):
        executor.finish(f"run-{number}-1", 0.5)
        scheduler.run_pass()
    # every refill is one guarded statement, none locked; the first follows the store (the
    # study's first fill took the locking way, so the pass reads the row anew), the
    # others come before it, from the view their predecessors kept current
    assert stored == [3, 5, 6]
    assert sum("WITH s AS (" in s for s in seen) == 3
    assert not [s for s in seen if "FOR UPDATE" in s]
    assert [t.state for t in trials_of(db, study)] == ["complete"] * 3 + ["running"] * 3


def test_a_failed_fill_stores_nothing_and_leaves_no_optuna_trial_running(db, tmp_path, monkeypatch):
    import optuna

    from service.trials import batch as trial_batch

    scheduler, executor, study = make(db, tmp_path)
    real = trial_batch.create_running

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("insert failed")

    monkeypatch.setattr(trial_batch, "create_running", broken)
    with pytest.raises(RuntimeError, match="insert failed"):
        scheduler.run_pass()
    assert executor.submitted == {} and trials_of(db, study) == []
    states = [t.state for t in scheduler._runtimes[study.pk].optuna_study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL] * 3

    monkeypatch.setattr(trial_batch, "create_running", real)
    scheduler.run_pass()
    assert [t.number for t in trials_of(db, study)] == [0, 1, 2]  # numbers were not used up
    assert len(executor.submitted) == 3


def test_a_pass_reads_waiting_trials_only_when_a_study_may_have_some(db, tmp_path, statements):
    scheduler, executor, _ = make(db, tmp_path)
    scheduler.run_pass()
    run_id = next(iter(executor.submitted))
    executor.finish(run_id, 0.5)
    statements.clear()
    scheduler.run_pass()  # one trial ended: its slot is refilled with a new sampler trial
    assert len(executor.submitted) == 4
    assert not [s for s in statements if s.startswith("SELECT trials.")]


def test_a_trial_enqueued_after_the_pass_read_its_view_still_starts_first(db, tmp_path):
    scheduler, executor, study = make(db, tmp_path)
    with db.read() as s:
        as_the_view_saw_it = s.get(Study, study.pk)
    trial = lifecycle.enqueue(db, owner="local", study_id=study.id, params={"lr": 0.01})
    scheduler._fill_study(as_the_view_saw_it, has_waiting=False)
    first = min(executor.submitted.values(), key=lambda spec: spec.trial_number)
    assert first.trial_number == trial.number == 0
    assert [t.state for t in trials_of(db, study)] == ["running"] * 3


def _one_trial_done_and_viewed(db: Database, tmp_path: Any) -> tuple:
    """A study whose runtime the scheduler holds, one of its three trials finished and
    stored, and the study row as the next pass's view reads it: a slot to refill."""
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    executor.finish(next(iter(executor.submitted)), 0.5)
    scheduler._handle_events(executor.drain())
    with db.read() as s:
        as_the_view_saw_it = s.get(Study, study.pk)
    return scheduler, executor, study, as_the_view_saw_it


@pytest.mark.postgres
def test_on_postgresql_a_refill_is_one_statement_without_a_lock(pg_db, tmp_path):
    db = pg_db
    seen: list[str] = []
    scheduler, executor, study, viewed = _one_trial_done_and_viewed(db, tmp_path)
    event.listen(scheduler.db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    scheduler._fill_study(viewed, has_waiting=False)
    assert len(seen) == 1 and "WITH s AS (" in seen[0] and "FOR UPDATE" not in seen[0]
    assert len(executor.submitted) == 4
    rows = trials_of(db, study)
    assert [(t.number, t.state, t.attempts) for t in rows][3] == (3, "running", 1)
    assert rows[3].lease_token == executor.submitted["run-3-1"].lease_token
    with db.read() as s:
        assert s.get(Study, study.pk).next_number == 4


def test_a_trial_enqueued_after_the_view_starts_before_new_ones_on_a_refill(db, tmp_path):
    scheduler, executor, study, viewed = _one_trial_done_and_viewed(db, tmp_path)
    trial = lifecycle.enqueue(db, owner="local", study_id=study.id, params={"lr": 0.01})
    scheduler._fill_study(viewed, has_waiting=False)
    assert executor.submitted[f"run-{trial.number}-1"].config["lr"] == 0.01
    assert len(executor.submitted) == 4
    assert [t.state for t in trials_of(db, study)] == ["complete"] + ["running"] * 3


def test_a_pause_committed_after_the_view_starts_nothing(db, tmp_path):
    scheduler, executor, study, viewed = _one_trial_done_and_viewed(db, tmp_path)
    lifecycle.pause(db, owner="local", study_id=study.id)
    scheduler._fill_study(viewed, has_waiting=False)
    assert len(executor.submitted) == 3
    with db.read() as s:
        row = s.get(Study, study.pk)
        assert row.status == "paused" and row.next_number == 3
    runtime = scheduler._runtimes[study.pk]
    running = [t for t in runtime.optuna_study.get_trials() if t.state.name == "RUNNING"]
    assert len(running) == 2  # the trials in flight; nothing asked for the refill dangles


def test_a_budget_cut_committed_after_the_view_starts_nothing_beyond_it(db, tmp_path):
    scheduler, executor, study, viewed = _one_trial_done_and_viewed(db, tmp_path)
    cut = lifecycle.StudyPatch.model_validate({"budget": {"n_trials": 3}})
    lifecycle.patch(db, owner="local", study_id=study.id, changes=cut)
    scheduler._fill_study(viewed, has_waiting=False)
    assert len(executor.submitted) == 3
    assert len(trials_of(db, study)) == 3


def _store_handles(monkeypatch: pytest.MonkeyPatch, db: Database) -> list[str]:
    """Records which kind of connection each store of ``db`` opened."""
    opened: list[str] = []
    for name in ("write", "autocommit_session"):
        real = getattr(db, name)

        def opening(real: Callable[[], Any] = real, name: str = name) -> Any:
            opened.append(name)
            return real()

        monkeypatch.setattr(db, name, opening)
    return opened


@pytest.mark.postgres
def test_on_postgresql_a_pass_of_results_is_stored_without_a_transaction(
    pg_db, tmp_path, monkeypatch
):
    db = pg_db
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    for run_id in executor.submitted:
        executor.finish(run_id, 0.5)
    opened = _store_handles(monkeypatch, scheduler.db)
    view = scheduler._handle_events(executor.drain())
    assert opened == ["autocommit_session"]
    assert view is not None and [s.pk for s in view.studies] == [study.pk]
    assert [t.state for t in trials_of(db, study)] == ["complete"] * 3


@pytest.mark.postgres
def test_on_postgresql_a_failure_is_stored_in_a_transaction_with_its_count(
    pg_db, tmp_path, monkeypatch
):
    db = pg_db
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    executor.finish("run-1-1", 0.5)
    executor.pending.append(ExecutorEvent("run-0-1", "failed", {"error": "bug"}))
    opened = _store_handles(monkeypatch, scheduler.db)
    scheduler._handle_events(executor.drain())
    assert opened == ["write"]
    assert [t.state for t in trials_of(db, study)] == ["failed", "complete", "running"]


@pytest.mark.postgres
def test_on_postgresql_stored_events_are_acted_on_even_if_the_view_read_after_fails(
    pg_db, tmp_path, monkeypatch, caplog
):
    db = pg_db
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    executor.finish("run-0-1", 0.75)

    def broken(session: Any) -> Any:
        raise RuntimeError("connection lost after the write")

    monkeypatch.setattr(scheduler, "_view", broken)
    assert scheduler._handle_events(executor.drain()) is None
    assert "reading the active studies failed" in caplog.text
    assert trials_of(db, study)[0].state == "complete"
    assert scheduler._unstored == []  # stored once: not queued to be stored again
    assert scheduler._runtimes[study.pk].optuna_study.get_trials()[0].value == 0.75
    assert "run-0-1" not in scheduler._runs


@pytest.mark.postgres
def test_on_postgresql_the_view_read_with_a_passs_writes_is_the_view(pg_db, tmp_path):
    """The active studies read in the statement that stores the pass's events -- one round
    trip for both -- are what a read of their own returns: order, columns, waiting trials."""
    db = pg_db
    scheduler, executor, study = make(db, tmp_path)
    scheduler.run_pass()
    spec = StudySpec.model_validate({"name": "other", "sampler": {"name": "random"}})
    other = studies.create_study(db, owner="local", spec=spec)[0]
    lifecycle.enqueue(db, owner="local", study_id=other.id, params={"lr": 0.01})
    with db.write() as s:  # the other study first: priority, then oldest
        s.execute(text("UPDATE studies SET priority = 5 WHERE pk = :pk"), {"pk": other.pk})
    executor.finish("run-0-1", 0.5)
    statements: list[str] = []
    event.listen(scheduler.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    view = scheduler._handle_events(executor.drain())
    assert len(statements) == 1  # the writes and the read: one statement
    with db.read() as s:
        alone = scheduler._view(s)
    assert view is not None
    assert [s.pk for s in view.studies] == [other.pk, study.pk]
    assert view.studies == alone.studies and view.waiting == alone.waiting == {other.pk}
    assert view.statuses == alone.statuses
    assert isinstance(view.studies[0].spec, dict) and view.studies[0].updated_at.tzinfo


@pytest.mark.parametrize("pruner, prompt", [("none", False), ("median", True)])
def test_trials_ask_for_prompt_reports_only_when_a_pruner_acts_on_them(
    db, tmp_path, pruner, prompt
):
    spec = StudySpec.model_validate(
        {
            "name": "prompt-reports",
            "search_space": {"lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}},
            "pruner": {"name": pruner},
            "budget": {"n_trials": 2, "max_parallel": 2},
        }
    )
    executor = ManualExecutor()
    scheduler = Scheduler(db, executor, checkpoint_root=str(tmp_path / "runs"))
    studies.create_study(db, owner="local", spec=spec)
    scheduler.run_pass()
    assert len(executor.submitted) == 2
    assert {s.prompt_reports for s in executor.submitted.values()} == {prompt}
