"""The scheduler on SQLite and PostgreSQL, with trials in threads (InProcessExecutor) whose
behaviour each test scripts: completion, parallelism, failures, retries, pruning, timeouts and
a restart on the same database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from service.scheduler import Scheduler
from service.studies import service as studies
from service.studies.models import Study
from service.studies.spec import StudySpec
from service.trials.models import Trial, TrialMetric
from workers.executor import ExecutorEvent, InProcessExecutor
from workers.trial import TrialSpec

Runner = Callable[[TrialSpec], Iterator[dict[str, Any]]]


def scripted(
    value: Callable[[dict[str, Any], int], float],
    *,
    epochs: int = 3,
    sleep_s: float = 0.0,
    fail: Callable[[TrialSpec], bool] = lambda s: False,
) -> Runner:
    """A trial that reports ``value(params, epoch)`` as val_accuracy each epoch."""

    def run(spec: TrialSpec) -> Iterator[dict[str, Any]]:
        yield {"kind": "started", "env": {"host": "test", "attempt": spec.attempt}}
        for epoch in range(1, epochs + 1):
            time.sleep(sleep_s)
            if fail(spec):
                raise RuntimeError(f"boom in trial {spec.trial_number}")
            v = value(spec.config, epoch)
            yield {"kind": "report", "epoch": epoch, "metrics": {"val_accuracy": v}}
        yield {
            "kind": "result",
            "metrics": {"val_accuracy": v, "test_accuracy": v},
            "stopped": False,
            "epochs": epochs,
        }

    return run


class Flaky(InProcessExecutor):
    """Marks failures whose message says 'worker lost' as retryable, like a crashed Ray worker."""

    def drain(self) -> list[ExecutorEvent]:
        return [
            replace(e, retryable=True)
            if e.kind == "failed" and "worker lost" in str(e.payload.get("error"))
            else e
            for e in super().drain()
        ]


def spec(**budget: Any) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "sched",
            "task": {"epochs": 3},
            "search_space": {
                "lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True},
                "t": {"type": "float", "low": 0.0, "high": 50.0},
            },
            "sampler": {"name": "random", "seed": 0},
            "budget": {"n_trials": 6, "max_parallel": 2, **budget},
        }
    )


@pytest.fixture
def run_scheduler(db, tmp_path):
    started: list[Scheduler] = []

    def start(executor) -> Scheduler:
        scheduler = Scheduler(db, executor, checkpoint_root=str(tmp_path / "runs"), tick_s=0.2)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield start
    for s in started:
        s.stop(timeout=10)


def submit(db, study_spec: StudySpec) -> Study:
    return studies.create_study(db, owner="local", spec=study_spec)[0]


def wait_status(db, study: Study, statuses=("completed", "failed"), timeout=60.0) -> Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.read() as s:
            row = s.get(Study, study.pk)
            if row.status in statuses:
                return row
        time.sleep(0.05)
    raise AssertionError(f"study still {row.status} after {timeout}s")


def all_trials(db, study: Study) -> list[Trial]:
    with db.read() as s:
        return list(
            s.execute(
                select(Trial).where(Trial.study_pk == study.pk).order_by(Trial.number)
            ).scalars()
        )


def test_study_runs_to_completion_with_params_in_bounds(db, run_scheduler):
    run_scheduler(InProcessExecutor(slots=2, runner=scripted(lambda c, e: min(1.0, c["lr"] * e))))
    study = submit(db, spec())
    assert wait_status(db, study).status == "completed"
    rows = all_trials(db, study)
    assert [t.number for t in rows] == list(range(6))
    for t in rows:
        assert t.state == "complete" and t.attempts == 1 and t.source == "sampler"
        assert 0.001 <= t.params["lr"] <= 0.5 and 0.0 <= t.params["t"] <= 50.0
        assert t.value == pytest.approx(min(1.0, t.params["lr"] * 3))
        assert t.env["host"] == "test" and t.metrics["test_accuracy"] == t.value
    with db.read() as s:
        epochs = (
            s.execute(select(TrialMetric.epoch).where(TrialMetric.trial_pk == rows[0].pk))
            .scalars()
            .all()
        )
        assert sorted(epochs) == [1, 2, 3]
        best, _ = studies.best_trials(s, s.get(Study, study.pk))
    assert best.value == max(t.value for t in rows)


def test_max_parallel_is_respected_even_with_more_slots(db, run_scheduler):
    live, peak, lock = [0], [0], threading.Lock()
    inner = scripted(lambda c, e: 0.5, epochs=2, sleep_s=0.3)

    def counting(spec: TrialSpec) -> Iterator[dict[str, Any]]:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            yield from inner(spec)
        finally:
            with lock:
                live[0] -= 1

    run_scheduler(InProcessExecutor(slots=4, runner=counting))
    study = submit(db, spec(max_parallel=2))
    wait_status(db, study)
    assert peak[0] == 2


def test_a_raising_trial_fails_with_its_traceback_and_max_failures_fails_the_study(
    db, run_scheduler
):
    run_scheduler(
        InProcessExecutor(slots=2, runner=scripted(lambda c, e: 0.5, fail=lambda s: True))
    )
    study = submit(db, spec(max_failures=2, n_trials=10))
    row = wait_status(db, study)
    assert row.status == "failed" and "max_failures=2" in row.error
    failed = [t for t in all_trials(db, study) if t.state == "failed"]
    assert len(failed) >= 2
    assert all("RuntimeError: boom" in t.error and "Traceback" in t.error for t in failed)
    assert all(t.attempts == 1 for t in failed)  # the trial's own error is not retried


def test_a_lost_worker_reruns_the_same_trial_as_its_next_attempt(db, run_scheduler):
    def lost_on_first(spec: TrialSpec) -> bool:
        if spec.trial_number == 0 and spec.attempt == 1:
            raise RuntimeError("worker lost")
        return False

    run_scheduler(Flaky(slots=2, runner=scripted(lambda c, e: c["lr"], fail=lost_on_first)))
    study = submit(db, spec(n_trials=3))
    assert wait_status(db, study).status == "completed"
    first = all_trials(db, study)[0]
    assert (first.number, first.state, first.attempts) == (0, "complete", 2)
    assert first.value == first.params["lr"]


def test_retries_stop_at_max_attempts(db, run_scheduler):
    def always_lost(spec: TrialSpec) -> bool:
        raise RuntimeError("worker lost")

    run_scheduler(Flaky(slots=2, runner=scripted(lambda c, e: 0.5, fail=always_lost)))
    study = submit(db, spec(n_trials=1, max_attempts=3, max_failures=1))
    wait_status(db, study)
    (trial,) = all_trials(db, study)
    assert (trial.state, trial.attempts) == ("failed", 3) and "worker lost" in trial.error


def test_a_clearly_worse_trial_is_pruned_with_its_last_value(db, run_scheduler):
    study_spec = StudySpec.model_validate(
        {
            "task": {"epochs": 5},
            "search_space": {"lr": {"type": "categorical", "choices": [0.1, 0.0001]}},
            # Seed 6 draws lr 0.1, 0.1, then 0.0001: a good trial completes first.
            "sampler": {"name": "random", "seed": 6},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
            "budget": {"n_trials": 6, "max_parallel": 1},
        }
    )
    run_scheduler(
        InProcessExecutor(
            slots=1,
            runner=scripted(lambda c, e: 0.9 if c["lr"] > 0.01 else 0.1, epochs=5, sleep_s=0.2),
        )
    )
    study = submit(db, study_spec)
    wait_status(db, study)
    rows = all_trials(db, study)
    pruned = [t for t in rows if t.state == "pruned"]
    assert pruned, [(t.params, t.state) for t in rows]
    assert all(t.params["lr"] == 0.0001 and t.value == 0.1 for t in pruned)
    assert any(t.state == "complete" and t.params["lr"] == 0.1 for t in rows)


def test_a_trial_past_its_timeout_is_cancelled_and_failed(db, run_scheduler):
    run_scheduler(
        InProcessExecutor(slots=1, runner=scripted(lambda c, e: 0.5, epochs=50, sleep_s=0.1))
    )
    study = submit(db, spec(n_trials=1, trial_timeout_s=0.5, max_failures=1))
    wait_status(db, study)
    (trial,) = all_trials(db, study)
    assert trial.state == "failed" and "trial_timeout_s" in trial.error


def test_a_restart_continues_the_study_without_losing_or_reusing_anything(db, tmp_path):
    slow = scripted(lambda c, e: c["lr"], epochs=3, sleep_s=0.4)
    first = Scheduler(
        db, InProcessExecutor(slots=2, runner=slow), checkpoint_root=str(tmp_path), tick_s=0.2
    )
    first.start()
    study = submit(db, spec(n_trials=6, max_parallel=2))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [t.state for t in all_trials(db, study)]
        if states.count("complete") >= 1 and states.count("running") >= 1:
            break
        time.sleep(0.02)
    # A crash: the loop stops, nothing is drained or released.
    first._stop.set()
    first._wake.set()
    first._thread.join()
    before = {t.number: t for t in all_trials(db, study)}
    interrupted = {n for n, t in before.items() if t.state == "running"}
    assert interrupted

    second = Scheduler(
        db, InProcessExecutor(slots=2, runner=slow), checkpoint_root=str(tmp_path), tick_s=0.2
    )
    second.start()
    try:
        assert wait_status(db, study).status == "completed"
    finally:
        second.stop()
        first.executor.shutdown()
    after = {t.number: t for t in all_trials(db, study)}
    assert sorted(after) == list(range(6))
    for n, t in before.items():
        assert after[n].params == t.params
        if t.state == "complete":
            assert (after[n].value, after[n].finished_at, after[n].attempts) == (
                t.value,
                t.finished_at,
                1,
            )
    for n in interrupted:
        assert after[n].state == "complete" and after[n].attempts == 2
