import math

import pytest
import torch

from tsam_core.tilt import tilted_loss, tilted_weights, weight_entropy


def test_zero_tilt_weights_are_uniform():
    w = tilted_weights(torch.tensor([0.1, 5.0, 2.0, 3.0]), 0.0)
    assert torch.equal(w, torch.full((4,), 0.25))


def test_infinite_tilt_is_one_hot_at_the_largest_loss():
    w = tilted_weights(torch.tensor([0.1, 5.0, 2.0]), math.inf)
    assert w.tolist() == [0.0, 1.0, 0.0]


def test_large_finite_tilt_approaches_the_argmax():
    w = tilted_weights(torch.tensor([1.0, 1.5, 0.2]), 200.0)
    assert w[1].item() == pytest.approx(1.0, abs=1e-30) and w[0].item() < 1e-40


def test_weights_are_stable_for_large_tilt_times_loss():
    w = tilted_weights(torch.tensor([50.0, 51.0]), 1000.0)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)


def test_weights_are_computed_in_float32_for_half_precision_losses():
    w = tilted_weights(torch.tensor([1.0, 1.01], dtype=torch.bfloat16), 100.0)
    assert w.dtype == torch.float32


def test_tilted_loss_limits_are_mean_and_max():
    losses = torch.tensor([0.5, 1.0, 3.0])
    assert tilted_loss(losses, 0.0).item() == pytest.approx(1.5)
    assert tilted_loss(losses, math.inf).item() == 3.0
    assert tilted_loss(losses, 1e-6).item() == pytest.approx(1.5, rel=1e-4)
    assert tilted_loss(losses, 1e4).item() == pytest.approx(3.0, rel=1e-3)


def test_tilted_loss_matches_definition_and_is_monotone_in_t():
    losses = torch.tensor([0.2, 0.7, 1.1, 0.4], dtype=torch.float64)
    t = 3.0
    expected = math.log(sum(math.exp(t * v) for v in losses.tolist()) / 4) / t
    assert tilted_loss(losses, t).item() == pytest.approx(expected, rel=1e-12)
    values = [tilted_loss(losses, t).item() for t in (0.0, 0.5, 1.0, 5.0, 50.0)]
    assert values == sorted(values)


def test_gradient_of_tilted_loss_is_tilted_weights():
    losses = torch.tensor([0.3, 0.9, 0.1], requires_grad=True)
    tilted_loss(losses, 2.0).backward()
    assert torch.allclose(losses.grad, tilted_weights(losses, 2.0))


def test_entropy_is_log_s_for_uniform_and_zero_for_one_hot():
    assert weight_entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))
    assert weight_entropy(torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(0.0)


def test_empty_losses_raise():
    with pytest.raises(ValueError, match="losses"):
        tilted_weights(torch.tensor([]), 1.0)
