"""The training loop: it learns, it is deterministic, it resumes exactly, it can be stopped."""

import math

import pytest
import torch

from tsam_core import checkpoint
from tsam_core.config import TrainConfig
from tsam_core.train import lr_factor, train


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(**overrides):
    base = dict(
        dataset="digits",
        model="mlp",
        method="tsam",
        epochs=3,
        batch_size=64,
        samples=2,
        t=5.0,
        rho=0.05,
        lr=0.05,
        label_noise=0.2,
        sharpness_draws=2,
        sharpness_examples=128,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["erm", "sam", "tsam"])
def test_short_digits_run_lowers_the_loss(method):
    result = train(_config(method=method, epochs=4, label_noise=0.0))
    losses = [h["val_loss"] for h in result.history]
    assert losses[-1] < losses[0] < math.log(10) + 0.1
    assert result.metrics["val_accuracy"] > 0.8
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert result.epochs_completed == 4 and not result.stopped


def test_tsam_run_reports_tilt_and_flatness_metrics():
    result = train(_config(hessian_topk=1))
    m = result.metrics
    for key in (
        "tilted_loss",
        "weight_entropy",
        "train_accuracy",
        "noisy_memorized",
        "sharpness",
        "noise_loss_mean@0.05",
        "hessian_top1",
        "tilted_loss_eval",
        "wall_time",
        "epoch_time",
        "best_val_accuracy",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert 0.0 <= m["weight_entropy"] <= math.log(2) + 1e-6
    assert m["best_val_accuracy"] == max(h["val_accuracy"] for h in result.history)


def test_same_seed_gives_the_same_result():
    a, b = train(_config()), train(_config())
    assert _without_times(a.history) == _without_times(b.history)
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
    assert a.metrics["sharpness"] == b.metrics["sharpness"]


def _without_times(history):
    return [{k: v for k, v in h.items() if k != "epoch_time"} for h in history]


class _Crash(Exception):
    pass


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    config = _config(epochs=4, lr_schedule="cosine", t_schedule="ramp_up")
    whole = train(config)

    crashing = _config(
        epochs=4, lr_schedule="cosine", t_schedule="ramp_up", checkpoint_dir=str(tmp_path)
    )

    def crash_after_two(epoch, metrics):
        if epoch == 2:
            raise _Crash

    with pytest.raises(_Crash):
        train(crashing, crash_after_two)
    saved = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert saved is not None and saved["epoch"] == 2
    seen = []
    resumed = train(crashing, lambda epoch, metrics: seen.append(epoch))
    assert seen == [3, 4]
    assert _without_times(resumed.history) == _without_times(whole.history)
    assert resumed.metrics["test_accuracy"] == whole.metrics["test_accuracy"]
    assert resumed.metrics["test_loss"] == whole.metrics["test_loss"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resuming_with_a_different_config_is_refused(tmp_path):
    train(_config(epochs=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"different config.*\['rho'\]"):
        train(_config(epochs=2, rho=0.2, checkpoint_dir=str(tmp_path)))


def test_report_can_stop_the_run_early():
    calls = []

    def prune_at_two(epoch, metrics):
        calls.append((epoch, metrics["val_accuracy"]))
        return "stop" if epoch == 2 else None

    result = train(_config(epochs=5), prune_at_two)
    assert result.stopped and result.epochs_completed == 2 and len(calls) == 2
    assert "test_accuracy" not in result.metrics


def test_lr_factor_cosine_goes_from_one_to_zero():
    assert lr_factor(0, 10, "cosine") == 1.0
    assert lr_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 10, "constant") == 1.0


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"method": "sgd"}, "method"),
        ({"base": "lion"}, "base"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"t": -1.0}, "t"),
        ({"samples": 0}, "samples"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"noise": "uniform"}, "noise"),
        ({"delta": 1.0}, "delta"),
        ({"sharpness_sigmas": ()}, "sharpness_sigmas"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        _config(**overrides)


def test_from_dict_accepts_study_sections_and_rejects_unknown_keys():
    config = TrainConfig.from_dict(
        {
            "task": {"dataset": "digits", "epochs": 2},
            "optimizer": {"method": "sam", "rho": 0.1},
            "t": "inf",
        }
    )
    assert (config.epochs, config.method, config.rho, config.t) == (2, "sam", 0.1, math.inf)
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"task": {"datset": "digits"}})
