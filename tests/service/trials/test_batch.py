"""The scheduler's batched trial writes, on SQLite and PostgreSQL: every row of a batch is the
same lease compare-and-set as a single write, whatever the statement that carries it."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from service import migrate
from service.db import Database
from service.trials import batch
from service.trials import service as trials
from service.trials.models import Trial, TrialMetric
from tests.service.trials.factories import make_study, make_trial


def test_a_resumed_attempt_replaces_the_epoch_it_reports_again(db):
    study = make_study(db)
    trial = make_trial(db, study)
    with db.write() as s:
        lease = trials.claim(s, s.get(Trial, trial.pk))
        batch.record_report(s, trial.pk, lease, epoch=1, attempt=1, metrics={"v": 0.1})
        batch.record_report(s, trial.pk, lease, epoch=1, attempt=1, metrics={"v": 0.2})
    with db.read() as s:
        assert trials.intermediate(s, [trial.pk]) == {trial.pk: [{"epoch": 1, "v": 0.2}]}


def test_record_reports_stores_a_burst_of_several_attempts_and_drops_only_stale_ones(db):
    study = make_study(db)
    a, b, c = make_trial(db, study), make_trial(db, study), make_trial(db, study)
    with db.write() as s:
        la, lb = trials.claim(s, s.get(Trial, a.pk)), trials.claim(s, s.get(Trial, b.pk))
        lc = trials.claim(s, s.get(Trial, c.pk))
    with db.write() as s:
        assert trials.release(s, c.pk, lc, "worker lost")
    burst = [
        batch.Report(a.pk, la, 1, 1, {"v": 0.1}),
        batch.Report(b.pk, lb, 1, 1, {"v": 0.5}),
        batch.Report(c.pk, lc, 1, 1, {"v": 0.9}),  # its attempt was released: stale
        batch.Report(a.pk, la, 2, 1, {"v": 0.2}),
        batch.Report(b.pk, "not-its-lease", 2, 1, {"v": 0.6}),
        batch.Report(a.pk, la, 2, 1, {"v": 0.3}),  # the same epoch again: the last one wins
    ]
    with db.write() as s:
        stored = batch.record_reports(s, burst)
    assert stored == [burst[0], burst[1], burst[3], burst[5]]
    with db.read() as s:
        assert trials.intermediate(s, [a.pk, b.pk, c.pk]) == {
            a.pk: [{"epoch": 1, "v": 0.1}, {"epoch": 2, "v": 0.3}],
            b.pk: [{"epoch": 1, "v": 0.5}],
            c.pk: [],
        }
        beats = {t.pk: t.heartbeat_at for t in s.execute(select(Trial)).scalars()}
        started = {t.pk: t.started_at for t in s.execute(select(Trial)).scalars()}
    assert beats[a.pk] > started[a.pk] and beats[b.pk] > started[b.pk]
    assert batch.record_reports(s, []) == []


def test_create_running_reserves_consecutive_numbers_after_existing_trials(db):
    study = make_study(db)
    make_trial(db, study)
    with db.write() as s:
        made = batch.create_running(s, study_pk=study.pk, params=[{"t": 1.0}, {"t": 2.0}])
    assert [number for _, number, _ in made] == [1, 2]
    with db.read() as s:
        rows = [s.get(Trial, pk) for pk, _, _ in made]
    assert [(r.state, r.attempts, r.params) for r in rows] == [
        ("running", 1, {"t": 1.0}),
        ("running", 1, {"t": 2.0}),
    ]
    assert [r.lease_token for r in rows] == [lease for _, _, lease in made]
    assert len({r.lease_token for r in rows}) == 2
    assert make_trial(db, study).number == 3
    with db.write() as s:
        assert batch.create_running(s, study_pk=study.pk, params=[]) == []


def test_a_created_running_trial_takes_reports_and_its_result_under_its_lease(db):
    study = make_study(db)
    with db.write() as s:
        [(pk, _, lease)] = batch.create_running(s, study_pk=study.pk, params=[{"t": 1.0}])
    with db.write() as s:
        assert batch.record_report(s, pk, lease, epoch=1, attempt=1, metrics={"v": 0.5})
        assert not batch.record_report(s, pk, "stale", epoch=2, attempt=1, metrics={"v": 0.6})
        assert trials.finish(s, pk, lease, trials.Outcome("complete", 0.5, [0.5], {"v": 0.5}))
    with db.read() as s:
        row = s.get(Trial, pk)
        assert row.state == "complete" and row.lease_token is None and row.value == 0.5
        assert [m.epoch for m in s.execute(select(TrialMetric)).scalars()] == [1]


def test_finish_many_records_each_outcome_once_and_drops_stale_leases(db):
    study = make_study(db)
    with db.write() as s:
        made = batch.create_running(
            s, study_pk=study.pk, params=[{"t": float(i)} for i in range(4)]
        )
    (a, _, lease_a), (b, _, lease_b), (c, _, lease_c), (d, _, _) = made
    with db.write() as s:
        assert trials.finish(s, c, lease_c, trials.Outcome("cancelled"))  # ended before
        assert trials.release(s, d, made[3][2])  # handed back: its lease is gone
    ends = [
        (a, lease_a, trials.Outcome("complete", 0.5, [0.5], {"val_accuracy": 0.5, "tag": "x"})),
        (b, lease_b, trials.Outcome("failed", metrics=None, error="Traceback: boom")),
        (c, lease_c, trials.Outcome("complete", 0.9, [0.9], {"val_accuracy": 0.9})),
        (d, made[3][2], trials.Outcome("complete", 0.1, [0.1], {})),
    ]
    with db.write() as s:
        assert batch.finish_many(s, ends) == {(a, lease_a), (b, lease_b)}
    with db.write() as s:
        assert batch.finish_many(s, ends) == set()  # a duplicate is a no-op
        assert batch.finish_many(s, []) == set()
    with db.read() as s:
        rows = {pk: s.get(Trial, pk) for pk in (a, b, c, d)}
    assert (rows[a].state, rows[a].value, rows[a].values) == ("complete", 0.5, [0.5])
    assert rows[a].metrics == {"val_accuracy": 0.5, "tag": "x"} and rows[a].lease_token is None
    assert rows[a].finished_at is not None and rows[a].error is None
    assert (rows[b].state, rows[b].value, rows[b].error) == ("failed", None, "Traceback: boom")
    assert rows[b].values is None and rows[b].metrics is None
    assert (rows[c].state, rows[c].value) == ("cancelled", None)
    assert (rows[d].state, rows[d].value) == ("waiting", None)


def test_record_started_stores_where_each_attempt_runs_and_ignores_stale_leases(db):
    study = make_study(db)
    with db.write() as s:
        (a, _, lease_a), (b, _, lease_b) = batch.create_running(
            s, study_pk=study.pk, params=[{"t": 1.0}, {"t": 2.0}]
        )
    env = {"node": "10.0.0.7", "device": "cuda:0", "versions": {"torch": "2.13.0"}}
    with db.write() as s:
        batch.record_started(s, [(a, lease_a, env), (b, "stale", {"node": "elsewhere"})])
        batch.record_started(s, [])
    with db.read() as s:
        assert s.get(Trial, a).env == env
        assert s.get(Trial, b).env is None and s.get(Trial, b).lease_token == lease_b


def test_record_events_applies_a_passs_starts_reports_and_outcomes_in_order(db):
    study = make_study(db)
    with db.write() as s:
        made = batch.create_running(s, study_pk=study.pk, params=[{"t": 1.0}, {"t": 2.0}] * 2)
    (a, _, lease_a), (b, _, lease_b), (c, _, lease_c), (d, _, lease_d) = made
    with db.write() as s:
        before = s.get(Trial, d).heartbeat_at
        assert trials.release(s, c, lease_c)  # its lease is gone: its events change nothing
    report = batch.Report
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)  # when the attempt ended
    with db.write() as s:
        stored, recorded = batch.record_events(
            s,
            started=[(a, lease_a, {"node": "n1"}), (c, lease_c, {"node": "stale"})],
            reports=[
                report(a, lease_a, 1, 1, {"acc": 0.1}),
                report(a, lease_a, 1, 1, {"acc": 0.2}),  # the epoch's last report wins
                report(b, lease_b, 1, 1, {"acc": 0.3}),
                report(c, lease_c, 1, 1, {"acc": 0.9}),
            ],
            ends=[
                (a, lease_a, trials.Outcome("complete", 0.2, [0.2], {"acc": 0.2}, finished_at=at)),
                (d, lease_d, trials.Outcome("failed", error="boom")),
            ],
        )
    assert [(r.pk, r.metrics) for r in stored] == [
        (a, {"acc": 0.1}),
        (a, {"acc": 0.2}),
        (b, {"acc": 0.3}),
    ]
    assert recorded == {(a, lease_a), (d, lease_d)}
    with db.read() as s:
        rows = {pk: s.get(Trial, pk) for pk in (a, b, c, d)}
        metrics = s.execute(select(TrialMetric.trial_pk, TrialMetric.metrics)).all()
    assert sorted(metrics) == sorted([(a, {"acc": 0.2}), (b, {"acc": 0.3})])
    assert (rows[a].state, rows[a].env, rows[a].value, rows[a].lease_token) == (
        "complete",
        {"node": "n1"},
        0.2,
        None,
    )
    assert _utc(rows[a].finished_at) == at and rows[a].heartbeat_at is not None
    assert _utc(rows[d].finished_at) > at  # no end time given: when it was recorded
    assert (rows[b].state, rows[b].lease_token, rows[b].env) == ("running", lease_b, None)
    assert (rows[c].state, rows[c].env) == ("waiting", None)
    assert (rows[d].state, rows[d].error, rows[d].values) == ("failed", "boom", None)
    assert rows[d].heartbeat_at == before  # an outcome alone is no heartbeat
    with db.write() as s:
        assert batch.record_events(s, [], [], []) == ([], set())


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite: naive, in UTC


@pytest.mark.postgres
def test_record_events_and_read_writes_and_reads_in_one_statement(pg_db):
    study = make_study(pg_db)
    with pg_db.write() as s:
        [(a, _, lease_a)] = batch.create_running(s, study_pk=study.pk, params=[{"t": 1.0}])
    seen: list[str] = []
    sa.event.listen(pg_db.engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    outcome = trials.Outcome("complete", 0.5, [0.5], {"acc": 0.5})
    with pg_db.write() as s:
        stored, ended, rows = batch.record_events_and_read(
            s,
            [],
            [batch.Report(a, lease_a, 1, 1, {"acc": 0.5})],
            [(a, lease_a, outcome)],
            "SELECT pk, state FROM trials",
        )
        none = batch.record_events_and_read(s, [], [], [], "SELECT pk FROM trials WHERE false")
    assert len(seen) == 2  # one statement each
    assert [r.pk for r in stored] == [a] and ended == {(a, lease_a)}
    assert [tuple(r) for r in rows] == [(a, "running")]  # the read saw the rows before the write
    assert none == ([], set(), [])
    with pg_db.read() as s:
        assert s.get(Trial, a).state == "complete"


def test_record_events_and_read_is_postgresql_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'tsam.db'}"
    migrate.upgrade(url)
    db = Database(url)
    try:
        with db.write() as s, pytest.raises(ValueError, match="PostgreSQL-only"):
            batch.record_events_and_read(s, [], [], [], "SELECT 1")
    finally:
        db.dispose()
