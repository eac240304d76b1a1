"""The vectorized TSAM step: all ``s`` perturbations in one ``vmap`` call.

Instead of ``s`` copies of the module we stack ``theta + eps_j`` into tensors with a leading
sample dimension and evaluate them with ``torch.func.functional_call`` under ``torch.vmap``.
The descent gradient ``sum_j w_j g_j`` comes from one backward of ``sum_j w_j L_j`` (weights
detached) through ``P_j = stop_grad(P_j) + (theta - stop_grad(theta))``: that term is exactly
zero in value but routes every sample's gradient back to the single ``theta``, so no per-sample
gradient copy is materialised for the descent pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tsam_core.perturb import EPS
from tsam_core.tilt import tilted_weights

if TYPE_CHECKING:
    from tsam_core._wrapper import LossFn
    from tsam_core.tsam import TSAM, SampleStart, StartBlock

Params = dict[str, torch.Tensor]


def _param_names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for p in params:
        if id(p) not in by_id:
            raise ValueError("the optimizer holds a parameter that is not in the model")
        names.append(by_id[id(p)])
    return names


def _per_sample_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of each sample (leading dim) across all parameters: shape ``(s,)``."""
    per_param = torch.stack([t.flatten(1).norm(dim=1) for t in tensors])
    out: torch.Tensor = torch.linalg.vector_norm(per_param, dim=0)
    return out


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(s,)`` vector to broadcast against a ``(s, *shape)`` tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def tilted_backward(
    opt: TSAM,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: list[torch.Tensor],
    block: StartBlock,
) -> torch.Tensor:
    """Set ``p.grad = sum_j w_j g_j`` for ``params``; return the ``s`` losses (detached).

    ``block`` holds the samples' draws; its flat ``(s, numel)`` rows split into one
    ``(s, *shape)`` view per parameter, so no per-parameter stacking copy is needed.
    """
    names = _param_names(model, params)
    starts = block.stacked()
    s = opt.samples

    def loss_at(flat: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, flat, (x,)), y)

    def as_dict(tensors: Sequence[torch.Tensor]) -> Params:
        return dict(zip(names, tensors, strict=True))

    grads_at: Callable[..., Params] = vmap(
        grad(loss_at), in_dims=(0, None, None), randomness="different"
    )
    theta = [p.detach() for p in params]

    with torch.no_grad():
        if opt.sampler == "hmc":
            points = _hmc_points(
                opt, theta, starts, s, lambda pts: grads_at(as_dict(pts), inputs, targets), names
            )
        else:
            if starts.noise is not None:
                points = [th.unsqueeze(0) + n for th, n in zip(theta, starts.noise, strict=True)]
            else:
                points = [th.expand(s, *th.shape) for th in theta]
            if opt.sampler == "ascent":
                g0 = grads_at(as_dict(points), inputs, targets)
                g0_list = [g0[n] for n in names]
                scale = opt.rho / (_per_sample_norm(g0_list) + EPS)
                points = [pt + g * _bcast(scale, g) for pt, g in zip(points, g0_list, strict=True)]

    # Descent pass: value P_j, gradient routed to theta.
    routed = [pt + (p - p.detach()).unsqueeze(0) for pt, p in zip(points, params, strict=True)]
    losses_at = vmap(loss_at, in_dims=(0, None, None), randomness="different")
    with torch.enable_grad():
        losses = losses_at(as_dict(routed), inputs, targets)
        weights = tilted_weights(losses.detach(), opt.weight_exponent)
        opt._set_grads_none()
        (weights.to(losses.dtype) * losses).sum().backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return losses.detach().float()


def _hmc_points(
    opt: TSAM,
    theta: list[torch.Tensor],
    starts: SampleStart,
    s: int,
    grads_at: Callable[[list[torch.Tensor]], Params],
    names: list[str],
) -> list[torch.Tensor]:
    """Euler steps of Hamiltonian dynamics for all samples at once, kept in the rho-ball.

    Works on copies of the drawn noise and momentum: if ``vmap`` fails part-way, the loop
    fallback evaluates the same, untouched draws.
    """
    if starts.noise is not None:
        eps = [n.clone() for n in starts.noise]
    else:
        eps = [th.new_zeros((s, *th.shape)) for th in theta]
    assert starts.momentum is not None
    momentum = [m.clone() for m in starts.momentum]

    def project() -> None:
        factor = torch.clamp(opt.rho / (_per_sample_norm(eps) + EPS), max=1.0)
        for e in eps:
            e.mul_(_bcast(factor, e))

    project()
    for _ in range(opt.hmc_steps):
        g = grads_at([th.unsqueeze(0) + e for th, e in zip(theta, eps, strict=True)])
        for i, name in enumerate(names):
            momentum[i].add_(g[name], alpha=opt.hmc_step_size * opt.delta)
            eps[i].add_(momentum[i], alpha=opt.hmc_step_size)
        project()
    return [th.unsqueeze(0) + e for th, e in zip(theta, eps, strict=True)]
