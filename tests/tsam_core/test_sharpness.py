"""Flatness metrics: exact answers on quadratic models, and the model left untouched."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tsam_core.sharpness import (
    Batches,
    dataset_loss,
    empirical_tilted_loss,
    flatness_report,
    hessian_eigenvalues,
    loss_under_noise,
)

mse = nn.functional.mse_loss


def neg_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -mse(outputs, targets)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SCALES = tuple(3.0 * 0.75**i for i in range(12))  # well-separated top of the spectrum


def regression(
    scales: tuple[float, ...] = SCALES, bias: bool = True, fit: bool = False, n: int = 48
) -> tuple[nn.Linear, torch.Tensor, Batches]:
    """Float64 least squares in two unequal batches; returns the design matrix (with a column of
    ones for the bias), in which the mean-MSE Hessian is exactly ``2/N X^T X``."""
    g = seeded(0)
    x = torch.randn(n, len(scales), generator=g, dtype=torch.float64) * torch.tensor(scales)
    y = x @ torch.randn(len(scales), 1, generator=g, dtype=torch.float64)
    y = y + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(len(scales), 1, bias=bias).double()
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
    if fit:  # the exact least-squares minimum: any weight noise can only raise the loss
        solution = torch.linalg.lstsq(design, y).solution.squeeze(1)
        with torch.no_grad():
            model.weight.copy_(solution[: len(scales)])
            if bias:
                model.bias.copy_(solution[-1:])
    cut = n // 3
    return model, design, [(x[:cut], y[:cut]), (x[cut:], y[cut:])]


def top(matrix: torch.Tensor, k: int = 3) -> list[float]:
    return torch.linalg.eigvalsh(matrix).flip(0)[:k].tolist()


# Lanczos gets fewer steps than the 13 parameters, so it has to converge, not just span the space.
ITERS = {"power": 200, "lanczos": 10}


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_top_hessian_eigenvalues_match_closed_form_for_least_squares(method: str) -> None:
    model, design, batches = regression()
    expected = top(2 / 48 * design.T @ design)
    found = hessian_eigenvalues(
        model, mse, batches, k=3, iters=ITERS[method], method=method, generator=seeded(1)
    )
    assert found == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_eigenvalues_are_largest_algebraic_when_hessian_is_negative_definite(method: str) -> None:
    model, design, batches = regression(scales=(1.0, 0.87, 0.77, 0.5, 0.22), bias=False)
    expected = top(-2 / 48 * design.T @ design)
    found = hessian_eigenvalues(
        model, neg_mse, batches, k=3, iters=300, method=method, generator=seeded(1)
    )
    assert found == pytest.approx(expected, rel=1e-3)
    assert found == sorted(found, reverse=True)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_eigenvalues_past_the_rank_of_a_low_rank_hessian_are_zero(method: str) -> None:
    model, design, batches = regression(n=4)  # 4 examples, 13 parameters: rank 4
    expected = top(2 / 4 * design.T @ design, k=6)
    found = hessian_eigenvalues(
        model, mse, batches, k=6, iters=ITERS[method], method=method, generator=seeded(1)
    )
    assert found == pytest.approx(expected, abs=1e-6 * expected[0])


def test_zero_noise_gives_clean_loss_and_zero_variance() -> None:
    model, _, batches = regression(fit=True)
    clean = dataset_loss(model, mse, batches)
    assert loss_under_noise(model, mse, batches, sigmas=[0.0], generator=seeded(2)) == {
        0.0: (clean, 0.0)
    }


def test_dataset_loss_is_example_weighted_over_uneven_batches() -> None:
    model, _, batches = regression()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert dataset_loss(model, mse, batches) == pytest.approx(float(mse(model(x), y)))


def test_noise_loss_grows_with_sigma_at_a_minimum() -> None:
    model, _, batches = regression(fit=True)
    clean = dataset_loss(model, mse, batches)
    stats = loss_under_noise(model, mse, batches, sigmas=[0.01, 0.1], generator=seeded(3))
    assert clean < stats[0.01][0] < stats[0.1][0]
    assert stats[0.01][1] < stats[0.1][1]


def test_same_seed_gives_identical_noise_losses() -> None:
    model, _, batches = regression()
    first = loss_under_noise(model, mse, batches, generator=seeded(4))
    assert loss_under_noise(model, mse, batches, generator=seeded(4)) == first
    assert loss_under_noise(model, mse, batches, generator=seeded(5)) != first


def sphere_losses(model: nn.Module, batches: Batches, rho: float, seed: int) -> list[float]:
    """The perturbed losses ``empirical_tilted_loss`` should see, recomputed independently."""
    g, losses = seeded(seed), []
    for _ in range(8):
        clone = copy.deepcopy(model)
        z = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in clone.parameters()]
        norm = torch.cat([zi.flatten() for zi in z]).norm()
        with torch.no_grad():
            for p, zi in zip(clone.parameters(), z, strict=True):
                p.add_(rho * zi / norm)
        losses.append(dataset_loss(clone, mse, batches))
    return losses


def test_tilted_loss_spans_mean_to_max_of_sphere_perturbed_losses() -> None:
    model, _, batches = regression()
    losses = sphere_losses(model, batches, rho=0.5, seed=6)

    def tilted(t: float) -> float:
        return empirical_tilted_loss(model, mse, batches, t=t, rho=0.5, generator=seeded(6))

    assert tilted(0.0) == pytest.approx(sum(losses) / 8, rel=1e-12)
    assert tilted(math.inf) == pytest.approx(max(losses), rel=1e-12)
    assert max(losses) - math.log(8) / 1e3 - 1e-9 <= tilted(1e3) <= max(losses)
    assert sum(losses) / 8 < tilted(1.0) < tilted(10.0) < max(losses)


@pytest.mark.parametrize("t", [0.0, 1.0, 50.0, math.inf])
def test_zero_radius_tilted_loss_is_clean_loss(t: float) -> None:
    model, _, batches = regression()
    clean = dataset_loss(model, mse, batches)
    tilted = empirical_tilted_loss(model, mse, batches, t=t, rho=0.0, generator=seeded(7))
    assert tilted == pytest.approx(clean, rel=1e-12)


def batchnorm_net() -> tuple[nn.Module, Batches]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2))
    net.append(nn.Linear(8, 1))
    x, y = torch.randn(40, 4), torch.randn(40, 1)
    net(x)  # train-mode forward: running statistics are no longer the defaults
    net[3].eval()  # mixed modes must come back per module, not as one global flag
    return net, [(x[:24], y[:24]), (x[24:], y[24:])]


METRICS: dict[str, Callable[[nn.Module, Callable[..., torch.Tensor], Batches], object]] = {
    "dataset_loss": lambda m, f, b: dataset_loss(m, f, b),
    "noise": lambda m, f, b: loss_under_noise(m, f, b, generator=seeded(8)),
    "power": lambda m, f, b: hessian_eigenvalues(m, f, b, k=2, iters=2, method="power"),
    "lanczos": lambda m, f, b: hessian_eigenvalues(m, f, b, k=2, iters=3),
    "tilted": lambda m, f, b: empirical_tilted_loss(m, f, b, t=5.0, rho=0.1),
    "report": lambda m, f, b: flatness_report(m, f, b, hessian_k=1, hessian_iters=2, tilt_t=1.0),
}


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("failing", [False, True])
def test_model_state_and_modes_are_restored(name: str, failing: bool) -> None:
    net, batches = batchnorm_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    calls = 0

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if failing and calls == 2:
            raise RuntimeError("loss failed mid-metric")
        return mse(outputs, targets)

    if failing:
        with pytest.raises(RuntimeError, match="mid-metric"):
            METRICS[name](net, loss_fn, batches)
    else:
        METRICS[name](net, loss_fn, batches)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == modes


def test_flatness_report_keys_and_sharpness() -> None:
    model, _, batches = regression(fit=True)
    report = flatness_report(
        model, mse, batches, sigmas=(0.05, 0.01), hessian_k=2, tilt_t=1.0, generator=seeded(9)
    )
    assert set(report) == {
        "loss_clean",
        "noise_loss_mean@0.01",
        "noise_loss_var@0.01",
        "noise_loss_mean@0.05",
        "noise_loss_var@0.05",
        "sharpness",
        "hessian_top1",
        "hessian_top2",
        "tilted_loss_eval",
    }
    assert report["sharpness"] == report["noise_loss_mean@0.05"] - report["loss_clean"] > 0
    assert report["hessian_top1"] >= report["hessian_top2"] > 0


BAD_ARGUMENTS: dict[str, Callable[[nn.Module, Batches], object]] = {
    "sigmas": lambda m, b: loss_under_noise(m, mse, b, sigmas=[0.01, -0.1]),
    "n_draws": lambda m, b: loss_under_noise(m, mse, b, n_draws=0),
    "k": lambda m, b: hessian_eigenvalues(m, mse, b, k=0),
    "k must be <= iters": lambda m, b: hessian_eigenvalues(m, mse, b, k=4, iters=3),
    "method": lambda m, b: hessian_eigenvalues(m, mse, b, method="arnoldi"),
    "samples": lambda m, b: empirical_tilted_loss(m, mse, b, t=1.0, rho=0.1, samples=0),
    "rho": lambda m, b: empirical_tilted_loss(m, mse, b, t=1.0, rho=-0.1),
    "t": lambda m, b: empirical_tilted_loss(m, mse, b, t=-1.0, rho=0.1),
    "hessian_k": lambda m, b: flatness_report(m, mse, b, hessian_k=-1),
    "hessian_iters": lambda m, b: flatness_report(m, mse, b, hessian_k=1, hessian_iters=0),
    "tilt_t": lambda m, b: flatness_report(m, mse, b, tilt_t=-1.0),
    "batches": lambda m, b: dataset_loss(m, mse, []),
}


@pytest.mark.parametrize("argument", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(argument: str) -> None:
    model, _, batches = regression()
    with pytest.raises(ValueError, match=argument):
        BAD_ARGUMENTS[argument](model, batches)
