"""Tilted averages: the weights and the loss of TSAM's objective.

TSAM minimises ``L_t(theta) = (1/t) log E_eps[exp(t L(theta + eps))]``. Over ``s`` sampled
perturbations the expectation becomes a mean, its gradient a weighted sum of the per-sample
gradients with weights ``softmax(t * L)``. Both quantities are computed here with the max
subtracted first (log-sum-exp), so a tilt of 100 on losses of 5 does not overflow, and the two
limits are exact rather than approximated: ``t = 0`` is the plain mean, ``t = inf`` the max.
"""

from __future__ import annotations

import math

import torch


def tilted_weights(losses: torch.Tensor, t: float) -> torch.Tensor:
    """Normalised weights ``softmax(t * losses)`` over the last dimension.

    ``t = 0`` gives uniform weights; ``t = +inf`` is one-hot at the (first) largest loss and
    ``t = -inf`` at the smallest. Computed in float32 or wider whatever the losses' dtype,
    because bf16 softmax with a large tilt rounds most weights to zero.
    """
    if losses.numel() == 0:
        raise ValueError("losses must hold at least one value")
    work = losses.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    if t == 0:
        return torch.full_like(work, 1.0 / work.shape[-1])
    if math.isinf(t):
        index = work.argmax(dim=-1) if t > 0 else work.argmin(dim=-1)
        return torch.nn.functional.one_hot(index, work.shape[-1]).to(work.dtype)
    return torch.softmax(t * work, dim=-1)


def tilted_loss(losses: torch.Tensor, t: float) -> torch.Tensor:
    """Empirical tilted loss ``(1/t) log mean exp(t * losses)`` over the last dimension.

    It lies between the mean (``t -> 0``) and the max (``t -> inf``) of the losses and is
    differentiable in the losses, with gradient ``tilted_weights(losses, t)``.
    """
    if losses.numel() == 0:
        raise ValueError("losses must hold at least one value")
    if t == 0:
        return losses.mean(dim=-1)
    if math.isinf(t):
        return losses.amax(dim=-1) if t > 0 else losses.amin(dim=-1)
    n = losses.shape[-1]
    spread = t * (losses.amax(dim=-1) - losses.amin(dim=-1))
    # log-sum-exp around the max is exact for a wide spread, but for t * spread << 1 the result
    # is log(n) + O(t) divided by t: catastrophic cancellation. There, expand around the mean
    # with expm1/log1p instead (clamped so the branch not taken stays finite for autograd).
    wide = (torch.logsumexp(t * losses, dim=-1) - math.log(n)) / t
    center = losses.mean(dim=-1, keepdim=True)
    x = (t * (losses - center)).clamp(max=20.0)
    narrow = torch.log1p(torch.expm1(x).mean(dim=-1)) / t + center.squeeze(-1)
    return torch.where(spread < 1.0, narrow, wide)


def weight_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of normalised weights: ``log s`` when uniform, 0 when one-hot.

    A cheap diagnostic of how much the tilt concentrates on the worst perturbations.
    """
    positive = weights.clamp_min(torch.finfo(weights.dtype).tiny)
    return -(weights * positive.log()).sum(dim=-1)
