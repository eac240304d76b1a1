"""Sharpness-Aware Minimization (Foret et al., 2021), the t -> inf limit of TSAM.

The update, its ``first_step``/``second_step`` split and the ``adaptive`` (ASAM) variant follow
the widely used reference implementation, so numbers are comparable with published SAM runs.
One deliberate difference: ``step(closure)`` runs the *first* forward-backward too (the caller
does not call ``backward`` before ``step``), the same contract as :class:`tsam_core.TSAM`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tsam_core._wrapper import (
    Closure,
    LossFn,
    WrappedOptimizer,
    frozen_batchnorm_stats,
)
from tsam_core.perturb import EPS, global_norm


class SAM(WrappedOptimizer):
    """SAM around any base optimizer.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer: the optimizer class that takes the descent step, e.g. ``torch.optim.SGD``.
        rho: radius of the ascent step (per group, so it can be scheduled like a learning rate).
        adaptive: ASAM's scale-invariant ascent, ``rho * p^2 * g / ||p * g||``.
        **kwargs: forwarded to ``base_optimizer`` (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(rho, int | float) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": adaptive}, kwargs)
        self._perturbed: list[torch.Tensor] = []  # the parameters first_step moved
        self._theta: list[torch.Tensor] = []  # ... and where they were

    def _ascent_vector(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters that have a gradient, and their ascent steps ``e_w``.

        ``e_w = rho * g / ||g||`` (ASAM: ``rho * p^2 * g / ||p * g||``) with the norm taken over
        all groups together. Computed with ``torch._foreach_*`` ops, one call per group rather
        than one kernel per parameter: the same arithmetic as TSAM's ascent, so TSAM with one
        noiseless sample reproduces SAM bit for bit.
        """
        grads: list[torch.Tensor] = []
        for group in self.param_groups:
            g = self._grads(group["params"])
            if group["adaptive"]:
                g = list(torch._foreach_mul(torch._foreach_abs(group["params"]), g))
            grads += g
        norm = global_norm(grads)
        params: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            g = self._grads(with_grad)
            scale = group["rho"] / (norm + EPS)
            if group["adaptive"]:
                e_w = torch._foreach_mul(torch._foreach_pow(with_grad, 2), g)
                torch._foreach_mul_(e_w, scale)
            else:
                e_w = torch._foreach_mul(g, scale)
            params += with_grad
            steps += e_w
        return params, steps

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the worst point ``theta + e_w`` of the rho-ball (to first order).

        ``theta`` is kept in buffers reused from step to step (see ``_snapshot``), not in
        ``self.state``, so it never reaches the state dict.
        """
        params, e_w = self._ascent_vector()
        self._theta = self._snapshot(params)
        self._perturbed = params
        torch._foreach_add_(params, e_w)
        if zero_grad:
            self._set_grads_none()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``theta`` and step the base optimizer with the gradient taken at the
        perturbed point."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._theta)
            self._perturbed = []
        self.base_optimizer.step()
        if zero_grad:
            self._set_grads_none()

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One SAM step. ``closure`` runs forward *and* backward and returns the loss; it is
        called twice. Returns the loss at the unperturbed weights. BatchNorm running statistics
        are the caller's business here (use :meth:`step_on_batch` to have them handled)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward and backward")
        closure = torch.enable_grad()(closure)
        self._set_grads_none()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        self._opt_called = True  # a step, for LR schedulers' call-order check
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def step_on_batch(
        self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """One SAM step on a batch; returns the loss at the unperturbed weights.

        BatchNorm statistics are updated by the first pass only (at the unperturbed weights);
        the pass at the perturbed point uses batch statistics without touching the buffers.
        """
        self._set_grads_none()
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            loss.backward()
        self.first_step(zero_grad=True)
        with torch.enable_grad(), frozen_batchnorm_stats(model):
            loss_fn(model(inputs), targets).backward()
        self.second_step()
        self._opt_called = True  # a step, for LR schedulers' call-order check
        return loss.detach()
