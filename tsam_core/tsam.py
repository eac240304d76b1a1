"""Tilted Sharpness-Aware Minimization (Li, Zhou, Bilmes, ICML 2025).

TSAM minimises ``L_t(theta) = (1/t) log E_eps[exp(t L(theta + eps))]``: ``t = 0`` is the mean
loss over perturbations, ``t -> inf`` is SAM's worst case. One step on a minibatch:

1. for ``j = 1..s`` draw ``eps_j0`` from the initial-noise law and move it with the sampler
   (``ascent``: one normalised SAM ascent step of length ``rho`` from the noisy point, as the
   authors' released code does; ``hmc``: Euler steps of Hamiltonian dynamics on ``delta * L``
   inside the rho-ball, the paper's Algorithm 3; ``none``: the noise alone), then evaluate the
   loss ``L_j`` and gradient ``g_j`` at ``theta + eps_j``;
2. weight the gradients by ``softmax((t - delta) * L)``;
3. hand ``sum_j w_j g_j`` to the base optimizer.

Two paths compute the same update. ``step(closure)`` works for any model and streams the
weighted sum (online softmax), holding one gradient accumulator instead of ``s`` copies.
``step_on_batch`` has the model, so it evaluates the ``s`` perturbations in one vectorized call
(``torch.func.functional_call`` + ``vmap``) and updates BatchNorm statistics once per step.
Given the same ``generator`` both draw the noise in the same order and agree to float tolerance.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tsam_core import _vectorized
from tsam_core._wrapper import (
    Closure,
    LossFn,
    WrappedOptimizer,
    frozen_batchnorm_stats,
    update_batchnorm_stats,
)
from tsam_core.perturb import EPS, NOISE_LAWS, draw_noise, global_norm, project_to_ball
from tsam_core.perturb import randn_like_params as _randn
from tsam_core.tilt import tilted_loss, tilted_weights, weight_entropy

SAMPLERS = ("ascent", "hmc", "none")
T_SCHEDULES = ("constant", "ramp_up", "ramp_down")


@dataclass
class SampleStart:
    """The random part of one sample: initial noise and (for ``hmc``) momentum."""

    noise: list[torch.Tensor] | None
    momentum: list[torch.Tensor] | None


def _check_number(name: str, value: object, *, low: float, allow_inf: bool = False) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
        if not math.isnan(v) and (allow_inf or math.isfinite(v)) and v >= low:
            return v
    bound = f">= {low}" + (" (inf allowed)" if allow_inf else ", finite")
    raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def _check_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return value
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class TSAM(WrappedOptimizer):
    """TSAM around any base optimizer (defaults follow the authors' released code).

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class for the descent step, e.g. ``torch.optim.SGD``.
        t: tilt, ``>= 0``; ``math.inf`` puts all weight on the worst sample (SAM's limit).
        rho: length of the ascent step (``ascent``) or radius of the ball (``hmc``).
        samples: number ``s`` of perturbations per step.
        noise: initial-noise law, ``none`` | ``sphere`` | ``ball`` | ``gaussian``.
        noise_scale: norm (``sphere``), radius (``ball``) or per-coordinate std (``gaussian``).
        noise_radius: global-norm clip of the ``gaussian`` noise.
        sampler: ``ascent`` | ``hmc`` | ``none``.
        delta: sampling tilt of ``hmc``; weights then use the exponent ``t - delta``.
        hmc_steps, hmc_step_size, momentum_std: the Euler integrator of ``hmc``.
        t_schedule: ``constant`` | ``ramp_up`` (0 -> t) | ``ramp_down`` (t -> 0) over
            ``total_steps`` optimizer steps.
        generator: a ``torch.Generator`` that makes the perturbations reproducible.
        vectorize: let :meth:`step_on_batch` batch the ``s`` samples with ``vmap``.
        **kwargs: forwarded to ``base_optimizer``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        t: float = 1.0,
        rho: float = 0.05,
        samples: int = 3,
        noise: str = "gaussian",
        noise_scale: float = 1.0,
        noise_radius: float = 1.0,
        sampler: str = "ascent",
        delta: float = 0.0,
        hmc_steps: int = 1,
        hmc_step_size: float = 0.01,
        momentum_std: float = 1.0,
        t_schedule: str = "constant",
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
        vectorize: bool = True,
        **kwargs: Any,
    ) -> None:
        self.t = _check_number("t", t, low=0.0, allow_inf=True)
        self.rho = _check_number("rho", rho, low=0.0)
        self.samples = _check_int("samples", samples, low=1)
        self.noise = _check_choice("noise", noise, NOISE_LAWS)
        self.noise_scale = _check_number("noise_scale", noise_scale, low=0.0)
        self.noise_radius = _check_number("noise_radius", noise_radius, low=0.0)
        self.sampler = _check_choice("sampler", sampler, SAMPLERS)
        self.delta = _check_number("delta", delta, low=0.0)
        self.hmc_steps = _check_int("hmc_steps", hmc_steps, low=1)
        self.hmc_step_size = _check_number("hmc_step_size", hmc_step_size, low=0.0)
        self.momentum_std = _check_number("momentum_std", momentum_std, low=0.0)
        self.t_schedule = _check_choice("t_schedule", t_schedule, T_SCHEDULES)
        if self.delta and self.sampler != "hmc":
            raise ValueError("delta (the sampling tilt) only applies to sampler='hmc'")
        if self.t_schedule != "constant":
            if total_steps is None:
                raise ValueError(f"total_steps is required with t_schedule={t_schedule!r}")
            if math.isinf(self.t):
                raise ValueError("t_schedule cannot ramp an infinite t; use a finite t")
        self.total_steps = (
            None if total_steps is None else _check_int("total_steps", total_steps, low=1)
        )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {generator!r}")
        if not isinstance(vectorize, bool):
            raise ValueError(f"vectorize must be a bool, got {vectorize!r}")
        self.generator = generator
        self.vectorize = vectorize
        self.steps_taken = 0
        self.last_tilted_loss: torch.Tensor | None = None
        self.last_losses: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_entropy: torch.Tensor | None = None
        self._vmap_failed = False
        super().__init__(params, base_optimizer, {}, kwargs)

    # ----------------------------------------------------------------- schedule and state
    @property
    def current_t(self) -> float:
        """The tilt in force for the next step (after the ``t_schedule``)."""
        if self.t_schedule == "constant" or self.total_steps is None:
            return self.t
        progress = min(self.steps_taken / self.total_steps, 1.0)
        return self.t * (progress if self.t_schedule == "ramp_up" else 1.0 - progress)

    @property
    def weight_exponent(self) -> float:
        """Exponent of the weights: ``t - delta`` corrects for sampling from ``exp(delta L)``."""
        return self.current_t - self.delta

    def wrapper_state(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        self.steps_taken = int(state.get("steps_taken", 0))

    # ----------------------------------------------------------------- random draws
    def draw_start(self, params: list[torch.Tensor]) -> SampleStart:
        """Draw one sample's noise, then its momentum: the order both paths share."""
        noise = draw_noise(
            params,
            self.noise,
            scale=self.noise_scale,
            radius=self.noise_radius,
            generator=self.generator,
        )
        momentum = None
        if self.sampler == "hmc":
            momentum = _randn(params, self.generator)
            torch._foreach_mul_(momentum, self.momentum_std)
        return SampleStart(noise, momentum)

    def _finish(self, losses: torch.Tensor) -> torch.Tensor:
        """Record the step's diagnostics and take the base optimizer's step."""
        self.last_losses = losses
        self.last_tilted_loss = tilted_loss(losses, self.current_t)
        self.last_weights = tilted_weights(losses, self.weight_exponent)
        self.last_entropy = weight_entropy(self.last_weights)
        self.base_optimizer.step()
        self.steps_taken += 1
        # LR schedulers warn when they step before the optimizer's (patched) `step` was called;
        # step_on_batch is a step too.
        self._opt_called = True
        return self.last_tilted_loss

    # ----------------------------------------------------------------- loop path
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One TSAM step through ``closure`` (forward + backward, returns the loss).

        The closure is called ``2s`` times with ``ascent`` (``s`` with ``none``,
        ``s * (hmc_steps + 1)`` with ``hmc``), with gradients cleared before each call.
        Returns the step's empirical tilted loss. BatchNorm statistics are the caller's
        business on this path; :meth:`step_on_batch` handles them.
        """
        if closure is None:
            raise ValueError("TSAM.step needs a closure that runs forward and backward")
        params = self._params()
        return self._loop_step(params, torch.enable_grad()(closure), self.draw_start)

    def _loop_step(
        self,
        params: list[torch.Tensor],
        closure: Closure,
        next_start: Callable[[list[torch.Tensor]], SampleStart],
    ) -> torch.Tensor:
        """Evaluate the samples one after another, streaming ``sum_j w_j g_j``.

        Online softmax: keep the running max ``m`` of ``a_j = (t - delta) L_j``, the
        normaliser ``Z = sum exp(a_j - m)`` and ``G = sum exp(a_j - m) g_j``, rescaling both
        when ``m`` grows. Everything stays on the device (no ``.item()``), so there is no host
        sync per sample.
        """
        exponent = self.weight_exponent
        theta = [p.detach().clone() for p in params]
        acc: list[torch.Tensor] | None = None
        best = norm_z = None
        losses = []
        for _ in range(self.samples):
            eps = self._move_sample(params, theta, closure, next_start(params))
            self._set_grads_none()
            loss = _as_loss(closure())
            grads = self._grads(params)
            losses.append(loss)
            if acc is None:
                acc, best, norm_z = grads, loss * exponent, torch.ones_like(loss)
            elif math.isinf(exponent):
                better = (loss > losses_max(losses[:-1])).to(loss.dtype)
                torch._foreach_mul_(acc, 1 - better)
                torch._foreach_add_(acc, torch._foreach_mul(grads, better))
            else:
                a = loss * exponent
                new_best = torch.maximum(best, a)  # type: ignore[arg-type]
                keep, add = torch.exp(best - new_best), torch.exp(a - new_best)  # type: ignore[operator]
                torch._foreach_mul_(acc, keep)
                torch._foreach_mul_(grads, add)
                torch._foreach_add_(acc, grads)
                norm_z = norm_z * keep + add  # type: ignore[operator]
                best = new_best
            del eps
            for p, old in zip(params, theta, strict=True):
                p.copy_(old)
        assert acc is not None and norm_z is not None
        if not math.isinf(exponent):
            torch._foreach_div_(acc, norm_z)
        for p, g in zip(params, acc, strict=True):
            p.grad = g
        return self._finish(torch.stack(losses))

    def _move_sample(
        self,
        params: list[torch.Tensor],
        theta: list[torch.Tensor],
        closure: Closure,
        start: SampleStart,
    ) -> list[torch.Tensor] | None:
        """Put ``params`` at ``theta + eps_j`` (the sampler's output); returns ``eps_j``."""
        if self.sampler == "ascent":
            if start.noise is not None:
                torch._foreach_add_(params, start.noise)
            self._set_grads_none()
            closure()
            g0 = self._grads(params)
            scale = self.rho / (global_norm(g0) + EPS)
            torch._foreach_add_(params, torch._foreach_mul(g0, scale))
            return None
        if self.sampler == "none":
            if start.noise is not None:
                torch._foreach_add_(params, start.noise)
            return start.noise
        # hmc: Euler steps on H = -delta L(theta + eps) + |p|^2 / 2, kept in the rho-ball.
        eps = start.noise if start.noise is not None else [torch.zeros_like(p) for p in params]
        momentum = start.momentum
        assert momentum is not None
        project_to_ball(eps, self.rho)
        for _ in range(self.hmc_steps):
            _place(params, theta, eps)
            self._set_grads_none()
            closure()
            torch._foreach_add_(
                momentum, self._grads(params), alpha=self.hmc_step_size * self.delta
            )
            torch._foreach_add_(eps, momentum, alpha=self.hmc_step_size)
            project_to_ball(eps, self.rho)
        _place(params, theta, eps)
        return eps

    # ----------------------------------------------------------------- batched path
    def step_on_batch(
        self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """One TSAM step on a batch; returns the step's empirical tilted loss.

        The ``s`` perturbations are evaluated in one ``vmap`` call when ``torch.func``
        supports the model, else one after another; both give :meth:`step`'s update.
        BatchNorm running statistics are updated once, at the unperturbed weights.
        """
        params = self._params()
        starts = [self.draw_start(params) for _ in range(self.samples)]
        update_batchnorm_stats(model, inputs)
        with frozen_batchnorm_stats(model):
            if self.vectorize and not self._vmap_failed:
                try:
                    return self._vectorized_step(model, loss_fn, inputs, targets, params, starts)
                except (RuntimeError, NotImplementedError, ValueError) as err:
                    self._vmap_failed = True
                    warnings.warn(
                        f"TSAM: vectorized step unavailable for this model ({err}); "
                        "falling back to the per-sample loop",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            pending = iter(starts)

            def closure() -> torch.Tensor:
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                return loss

            with torch.no_grad():
                return self._loop_step(
                    params, torch.enable_grad()(closure), lambda _p: next(pending)
                )

    def _vectorized_step(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        params: list[torch.Tensor],
        starts: list[SampleStart],
    ) -> torch.Tensor:
        losses = _vectorized.tilted_backward(self, model, loss_fn, inputs, targets, params, starts)
        with torch.no_grad():
            return self._finish(losses)


def losses_max(losses: list[torch.Tensor]) -> torch.Tensor:
    """Max of 0-dim loss tensors without a host sync."""
    return torch.stack(losses).max()


def _as_loss(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError("the closure must return the loss as a tensor")
    return value.detach().float().reshape(())


def _place(params: list[torch.Tensor], theta: list[torch.Tensor], eps: list[torch.Tensor]) -> None:
    for p, old, e in zip(params, theta, eps, strict=True):
        p.copy_(old).add_(e)
