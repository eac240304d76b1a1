"""Trial storage guarantees, on SQLite and PostgreSQL: claims are exclusive, results are
recorded once, stale leases change nothing, numbers are never reused."""

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from service.trials import batch
from service.trials import service as trials
from service.trials.models import Trial, TrialMetric
from tests.service.trials.factories import make_study, make_trial


def test_trial_numbers_are_consecutive_and_never_reused(db):
    study = make_study(db)
    numbers = [make_trial(db, study).number for _ in range(3)]
    with db.write() as s:
        s.delete(s.get(Trial, make_trial(db, study).pk))
    assert numbers == [0, 1, 2]
    assert make_trial(db, study).number == 4


def test_claim_is_exclusive_under_concurrency(db):
    study = make_study(db)
    trial = make_trial(db, study)

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
    study = make_study(db)
    trial = make_trial(db, study)
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
    study = make_study(db)
    trial = make_trial(db, study)
    with db.write() as s:
        old = trials.claim(s, s.get(Trial, trial.pk))
    with db.write() as s:
        assert trials.release(s, trial.pk, old, "worker lost")
    with db.write() as s:
        new = trials.claim(s, s.get(Trial, trial.pk))
    with db.write() as s:
        assert not batch.record_report(s, trial.pk, old, epoch=1, attempt=1, metrics={"x": 1})
        assert not trials.finish(s, trial.pk, old, trials.Outcome("complete", 0.5, [0.5]))
        assert batch.record_report(s, trial.pk, new, epoch=1, attempt=2, metrics={"x": 2})
    with db.read() as s:
        row = s.get(Trial, trial.pk)
        assert (row.state, row.attempts, row.lease_token) == ("running", 2, new)
        metrics = s.execute(select(TrialMetric)).scalars().all()
        assert [(m.epoch, m.attempt, m.metrics) for m in metrics] == [(1, 2, {"x": 2})]


def test_release_all_running_hands_every_running_attempt_back(db):
    study = make_study(db)
    a, b = make_trial(db, study), make_trial(db, study)
    with db.write() as s:
        trials.claim(s, s.get(Trial, a.pk))
    with db.write() as s:
        assert trials.release_all_running(s) == 1
    with db.read() as s:
        assert s.get(Trial, a.pk).state == "waiting" and s.get(Trial, a.pk).lease_token is None
        assert s.get(Trial, a.pk).attempts == 1
        assert s.get(Trial, b.pk).state == "waiting"


def test_counts_by_state_groups_per_study(db):
    s1, s2 = make_study(db), make_study(db)
    make_trial(db, s1)
    t = make_trial(db, s1)
    with db.write() as s:
        trials.claim(s, s.get(Trial, t.pk))
    with db.read() as s:
        assert trials.counts_by_state(s, [s1.pk, s2.pk]) == {
            s1.pk: {"waiting": 1, "running": 1},
            s2.pk: {},
        }
