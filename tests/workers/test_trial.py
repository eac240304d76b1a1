"""run_trial: the event stream of one trial, for the train runner and the sleep runner."""

import json
import math

import pytest

from tsam_core import checkpoint
from workers.trial import (
    SLEEP_CHECKPOINT_NAME,
    TrialSpec,
    run_trial,
    sleep_objective,
)

DIGITS = {
    "dataset": "digits",
    "model": "mlp",
    "method": "tsam",
    "epochs": 2,
    "samples": 2,
    "sharpness_draws": 1,
    "sharpness_examples": 64,
    "num_threads": 1,
}


def _spec(config, runner="sleep", attempt=1, checkpoint_dir=None, **kw):
    return TrialSpec(
        study_id="s1",
        trial_number=3,
        attempt=attempt,
        lease_token="lease",
        config=config,
        checkpoint_dir=checkpoint_dir,
        runner=runner,
        **kw,
    )


def test_spec_round_trips_through_json():
    spec = _spec(
        {"t": 2.0, "epochs": 3},
        checkpoint_dir="/tmp/x",
        git_revision="abc123",
        prompt_reports=False,
    )
    again = TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.prompt_reports is False


@pytest.mark.parametrize(
    "bad",
    [
        {"study_id": ""},
        {"trial_number": -1},
        {"attempt": True},
        {"runner": "bogus"},
        {"config": [1, 2]},
        {"prompt_reports": "yes"},
    ],
)
def test_spec_rejects_bad_fields(bad):
    fields = {
        "study_id": "s",
        "trial_number": 0,
        "attempt": 0,
        "lease_token": "x",
        "config": {},
    } | bad
    with pytest.raises(ValueError):
        TrialSpec(**fields)


def test_spec_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown"):
        TrialSpec.from_dict({**_spec({}).to_dict(), "surprise": 1})
    with pytest.raises(ValueError, match="missing"):
        TrialSpec.from_dict({"study_id": "s"})


def test_train_runner_streams_started_reports_and_result(tmp_path):
    events = list(run_trial(_spec(DIGITS, runner="train", checkpoint_dir=str(tmp_path))))
    assert [e["kind"] for e in events] == ["started", "report", "report", "result"]
    env = events[0]["env"]
    assert env["pid"] > 0 and env["device"] == "cpu" and env["num_threads"] == 1
    assert env["torch"] and env["python"]
    assert [e["epoch"] for e in events[1:3]] == [1, 2]
    assert 0.0 <= events[2]["metrics"]["val_accuracy"] <= 1.0
    result = events[-1]
    assert result["epochs"] == 2 and result["stopped"] is False
    assert 0.0 <= result["metrics"]["test_accuracy"] <= 1.0
    json.dumps(events, allow_nan=False)  # strictly JSON-safe
    assert (tmp_path / checkpoint.CHECKPOINT_NAME).exists()


def test_train_runner_rejects_a_bad_config_before_starting():
    with pytest.raises(ValueError, match="unknown training setting"):
        next(run_trial(_spec({**DIGITS, "epoch": 3}, runner="train")))


def test_sleep_runner_is_deterministic_and_rises_with_the_epoch():
    config = {"epochs": 3, "t": 2.0, "rho": 0.1, "lr": 0.02}
    first = list(run_trial(_spec(config)))
    second = list(run_trial(_spec(config)))
    assert [e["kind"] for e in first] == ["started", "report", "report", "report", "result"]
    accs = [e["metrics"]["val_accuracy"] for e in first if e["kind"] == "report"]
    assert accs == [e["metrics"]["val_accuracy"] for e in second if e["kind"] == "report"]
    assert accs[0] < accs[1] < accs[2] <= 0.95
    assert first[-1]["metrics"]["val_accuracy"] == accs[-1]
    assert first[-1]["epochs"] == 3 and first[-1]["stopped"] is False
    json.dumps(first, allow_nan=False)


def test_sleep_objective_peaks_at_the_documented_optimum():
    best = {"t": 5.0, "rho": 0.05, "lr": 0.05, "samples": 4, "weight_decay": 5e-4}
    assert sleep_objective(best) == pytest.approx(1.0)
    assert sleep_objective({**best, "t": 50.0}) < sleep_objective({**best, "t": 10.0}) < 1.0
    assert sleep_objective({**best, "t": "inf"}) < 1e-3
    assert sleep_objective({"t": 0.0}) < 1e-6
    assert sleep_objective({}) == 1.0 and math.isfinite(sleep_objective({"t": math.inf}))


def test_sleep_runner_fail_at_epoch_raises_after_earlier_reports():
    stream = run_trial(_spec({"epochs": 3, "fail_at_epoch": 2}))
    assert next(stream)["kind"] == "started"
    assert next(stream)["epoch"] == 1
    with pytest.raises(RuntimeError, match="injected failure at epoch 2"):
        next(stream)


def test_sleep_runner_crash_only_applies_to_listed_attempts():
    # Attempt 2 is not listed: the crash setting is ignored and the trial completes.
    events = list(
        run_trial(_spec({"epochs": 2, "crash_at_epoch": 1, "crash_attempts": [1]}, attempt=2))
    )
    assert events[-1]["kind"] == "result"


def test_sleep_runner_resumes_after_its_last_checkpoint(tmp_path):
    config = {"epochs": 4, "t": 3.0}
    stream = run_trial(_spec(config, checkpoint_dir=str(tmp_path)))
    seen = [next(stream), next(stream), next(stream)]  # started, epoch 1, epoch 2
    stream.close()  # the attempt dies after epoch 2's checkpoint
    assert [e.get("epoch") for e in seen] == [None, 1, 2]
    saved = json.loads((tmp_path / SLEEP_CHECKPOINT_NAME).read_text())
    assert saved["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [SLEEP_CHECKPOINT_NAME]  # no temp files

    resumed = list(run_trial(_spec(config, attempt=2, checkpoint_dir=str(tmp_path))))
    assert [e["kind"] for e in resumed] == ["started", "report", "report", "result"]
    assert [e["epoch"] for e in resumed if e["kind"] == "report"] == [3, 4]
    full = list(run_trial(_spec(config)))
    assert resumed[-1]["metrics"]["val_accuracy"] == full[-1]["metrics"]["val_accuracy"]
    assert resumed[-1]["epochs"] == 4


def test_sleep_runner_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        next(run_trial(_spec({"epochs": 0})))
    with pytest.raises(ValueError, match="sleep_s"):
        next(run_trial(_spec({"sleep_s": -1})))
    with pytest.raises(ValueError, match="crash_attempts"):
        next(run_trial(_spec({"crash_attempts": "1"})))


def test_sleep_runner_ignores_settings_that_are_not_numbers():
    # A study's full settings (dataset, method, ...) can be handed to the sleep runner.
    events = list(run_trial(_spec({"epochs": 1, "dataset": "digits", "method": "tsam"})))
    assert events[-1]["kind"] == "result"
