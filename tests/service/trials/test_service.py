"""Trial storage guarantees, on SQLite and PostgreSQL: claims are exclusive, results are
recorded once, stale leases change nothing, numbers are never reused."""

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from service.studies import service as studies
from service.studies.spec import StudySpec
from service.trials import service as trials
from service.trials.models import Trial, TrialMetric


def _study(db, key=None):
    study, _ = studies.create_study(db, owner="local", spec=StudySpec(), idempotency_key=key)
    return study


def _trial(db, study, params=None):
    with db.write() as s:
        return trials.create_trial(s, study=study, params=params or {"t": 1.0})


def test_trial_numbers_are_consecutive_and_never_reused(db):
    study = _study(db)
    numbers = [_trial(db, study).number for _ in range(3)]
    with db.write() as s:
        s.delete(s.get(Trial, _trial(db, study).pk))
    assert numbers == [0, 1, 2]
    assert _trial(db, study).number == 4


def test_claim_is_exclusive_under_concurrency(db):
    study = _study(db)
    trial = _trial(db, study)

    def claim(_):
        with db.write() as s:
            return trials.claim(s, s.get(Trial, trial.pk))

    with ThreadPoolExecutor(8) as pool:
        leases = list(pool.map(claim, range(8)))
    assert sum(lease is not None for lease in leases) == 1
    with db.read() as s:
        row = s.get(Trial, trial.pk)
        assert row.state == "running" and row.attempts == 1


def test_result_is_recorded_once_and_a_duplicate_is_a_no_op(db):
    study = _study(db)
    trial = _trial(db, study)
    with db.write() as s:
        lease = trials.claim(s, s.get(Trial, trial.pk))
    outcome = trials.Outcome("complete", 0.9, [0.9], {"val_accuracy": 0.9})
    with db.write() as s:
        assert trials.finish(s, trial.pk, lease, outcome)
    with db.write() as s:
        assert not trials.finish(s, trial.pk, lease, trials.Outcome("complete", 0.1, [0.1]))
    with db.read() as s:
        assert s.get(Trial, trial.pk).value == 0.9


def test_late_report_and_result_from_a_released_attempt_are_rejected(db):
    study = _study(db)
    trial = _trial(db, study)
    with db.write() as s:
        old = trials.claim(s, s.get(Trial, trial.pk))
    with db.write() as s:
        assert trials.release(s, trial.pk, old, "worker lost")
    with db.write() as s:
        new = trials.claim(s, s.get(Trial, trial.pk))
    with db.write() as s:
        assert not trials.record_report(s, trial.pk, old, epoch=1, attempt=1, metrics={"x": 1})
        assert not trials.finish(s, trial.pk, old, trials.Outcome("complete", 0.5, [0.5]))
        assert trials.record_report(s, trial.pk, new, epoch=1, attempt=2, metrics={"x": 2})
    with db.read() as s:
        row = s.get(Trial, trial.pk)
        assert (row.state, row.attempts, row.lease_token) == ("running", 2, new)
        metrics = s.execute(select(TrialMetric)).scalars().all()
        assert [(m.epoch, m.attempt, m.metrics) for m in metrics] == [(1, 2, {"x": 2})]


def test_a_resumed_attempt_replaces_the_epoch_it_reports_again(db):
    study = _study(db)
    trial = _trial(db, study)
    with db.write() as s:
        lease = trials.claim(s, s.get(Trial, trial.pk))
        trials.record_report(s, trial.pk, lease, epoch=1, attempt=1, metrics={"v": 0.1})
        trials.record_report(s, trial.pk, lease, epoch=1, attempt=1, metrics={"v": 0.2})
    with db.read() as s:
        assert trials.intermediate(s, [trial.pk]) == {trial.pk: [{"epoch": 1, "v": 0.2}]}


def test_record_reports_stores_a_burst_of_several_attempts_and_drops_only_stale_ones(db):
    study = _study(db)
    a, b, c = _trial(db, study), _trial(db, study), _trial(db, study)
    with db.write() as s:
        la, lb = trials.claim(s, s.get(Trial, a.pk)), trials.claim(s, s.get(Trial, b.pk))
        lc = trials.claim(s, s.get(Trial, c.pk))
    with db.write() as s:
        assert trials.release(s, c.pk, lc, "worker lost")
    burst = [
        trials.Report(a.pk, la, 1, 1, {"v": 0.1}),
        trials.Report(b.pk, lb, 1, 1, {"v": 0.5}),
        trials.Report(c.pk, lc, 1, 1, {"v": 0.9}),  # its attempt was released: stale
        trials.Report(a.pk, la, 2, 1, {"v": 0.2}),
        trials.Report(b.pk, "not-its-lease", 2, 1, {"v": 0.6}),
        trials.Report(a.pk, la, 2, 1, {"v": 0.3}),  # the same epoch again: the last one wins
    ]
    with db.write() as s:
        stored = trials.record_reports(s, burst)
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
    assert trials.record_reports(s, []) == []


def test_release_all_running_hands_every_running_attempt_back(db):
    study = _study(db)
    a, b = _trial(db, study), _trial(db, study)
    with db.write() as s:
        trials.claim(s, s.get(Trial, a.pk))
    with db.write() as s:
        assert trials.release_all_running(s) == 1
    with db.read() as s:
        assert s.get(Trial, a.pk).state == "waiting" and s.get(Trial, a.pk).lease_token is None
        assert s.get(Trial, a.pk).attempts == 1
        assert s.get(Trial, b.pk).state == "waiting"


def test_counts_by_state_groups_per_study(db):
    s1, s2 = _study(db), _study(db)
    _trial(db, s1)
    t = _trial(db, s1)
    with db.write() as s:
        trials.claim(s, s.get(Trial, t.pk))
    with db.read() as s:
        assert trials.counts_by_state(s, [s1.pk, s2.pk]) == {
            s1.pk: {"waiting": 1, "running": 1},
            s2.pk: {},
        }


def test_create_running_reserves_consecutive_numbers_after_existing_trials(db):
    study = _study(db)
    _trial(db, study)
    with db.write() as s:
        made = trials.create_running(s, study_pk=study.pk, params=[{"t": 1.0}, {"t": 2.0}])
    assert [number for _, number, _ in made] == [1, 2]
    with db.read() as s:
        rows = [s.get(Trial, pk) for pk, _, _ in made]
    assert [(r.state, r.attempts, r.params) for r in rows] == [
        ("running", 1, {"t": 1.0}),
        ("running", 1, {"t": 2.0}),
    ]
    assert [r.lease_token for r in rows] == [lease for _, _, lease in made]
    assert len({r.lease_token for r in rows}) == 2
    assert _trial(db, study).number == 3
    with db.write() as s:
        assert trials.create_running(s, study_pk=study.pk, params=[]) == []


def test_a_created_running_trial_takes_reports_and_its_result_under_its_lease(db):
    study = _study(db)
    with db.write() as s:
        [(pk, _, lease)] = trials.create_running(s, study_pk=study.pk, params=[{"t": 1.0}])
    with db.write() as s:
        assert trials.record_report(s, pk, lease, epoch=1, attempt=1, metrics={"v": 0.5})
        assert not trials.record_report(s, pk, "stale", epoch=2, attempt=1, metrics={"v": 0.6})
        assert trials.finish(s, pk, lease, trials.Outcome("complete", 0.5, [0.5], {"v": 0.5}))
    with db.read() as s:
        row = s.get(Trial, pk)
        assert row.state == "complete" and row.lease_token is None and row.value == 0.5
        assert [m.epoch for m in s.execute(select(TrialMetric)).scalars()] == [1]


def test_finish_many_records_each_outcome_once_and_drops_stale_leases(db):
    study = _study(db)
    with db.write() as s:
        made = trials.create_running(
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
        assert trials.finish_many(s, ends) == {(a, lease_a), (b, lease_b)}
    with db.write() as s:
        assert trials.finish_many(s, ends) == set()  # a duplicate is a no-op
        assert trials.finish_many(s, []) == set()
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
    study = _study(db)
    with db.write() as s:
        (a, _, lease_a), (b, _, lease_b) = trials.create_running(
            s, study_pk=study.pk, params=[{"t": 1.0}, {"t": 2.0}]
        )
    env = {"node": "10.0.0.7", "device": "cuda:0", "versions": {"torch": "2.13.0"}}
    with db.write() as s:
        trials.record_started(s, [(a, lease_a, env), (b, "stale", {"node": "elsewhere"})])
        trials.record_started(s, [])
    with db.read() as s:
        assert s.get(Trial, a).env == env
        assert s.get(Trial, b).env is None and s.get(Trial, b).lease_token == lease_b


def test_record_events_applies_a_passs_starts_reports_and_outcomes_in_order(db):
    study = _study(db)
    with db.write() as s:
        made = trials.create_running(s, study_pk=study.pk, params=[{"t": 1.0}, {"t": 2.0}] * 2)
    (a, _, lease_a), (b, _, lease_b), (c, _, lease_c), (d, _, lease_d) = made
    with db.write() as s:
        before = s.get(Trial, d).heartbeat_at
        assert trials.release(s, c, lease_c)  # its lease is gone: its events change nothing
    report = trials.Report
    with db.write() as s:
        stored, recorded = trials.record_events(
            s,
            started=[(a, lease_a, {"node": "n1"}), (c, lease_c, {"node": "stale"})],
            reports=[
                report(a, lease_a, 1, 1, {"acc": 0.1}),
                report(a, lease_a, 1, 1, {"acc": 0.2}),  # the epoch's last report wins
                report(b, lease_b, 1, 1, {"acc": 0.3}),
                report(c, lease_c, 1, 1, {"acc": 0.9}),
            ],
            ends=[
                (a, lease_a, trials.Outcome("complete", 0.2, [0.2], {"acc": 0.2})),
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
    assert rows[a].finished_at is not None and rows[a].heartbeat_at is not None
    assert (rows[b].state, rows[b].lease_token, rows[b].env) == ("running", lease_b, None)
    assert (rows[c].state, rows[c].env) == ("waiting", None)
    assert (rows[d].state, rows[d].error, rows[d].values) == ("failed", "boom", None)
    assert rows[d].heartbeat_at == before  # an outcome alone is no heartbeat
    with db.write() as s:
        assert trials.record_events(s, [], [], []) == ([], set())
