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
``step_on_batch`` has the model, so on an accelerator it evaluates the ``s`` perturbations in
one vectorized call (``torch.func.functional_call`` + ``vmap``); on CPU it runs the same loop as
``step`` (see :meth:`TSAM.vectorizes` for why), and either way it updates BatchNorm statistics
once per step. Given the same ``generator`` both paths draw the noise in the same order and agree
to float tolerance.

Each sample costs what SAM's step costs (two forward-backward passes with the ``ascent``
sampler) plus its noise draw; everything else is kept off the per-sample path: the draws go into
flat buffers reused across samples and steps, ``theta`` is copied into reused buffers, and the
per-parameter updates are ``torch._foreach_*`` calls rather than Python loops.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
from tsam_core.perturb import (
    EPS,
    NOISE_LAWS,
    FlatLayout,
    draw_device,
    fill_noise,
    fill_randn,
    global_norm,
    project_to_ball,
)
from tsam_core.tilt import tilted_loss, tilted_weights, weight_entropy

SAMPLERS = ("ascent", "hmc", "none")
T_SCHEDULES = ("constant", "ramp_up", "ramp_down")


@dataclass
class SampleStart:
    """The random part of one sample: initial noise and (for ``hmc``) momentum, one tensor per
    parameter (or, from :meth:`StartBlock.stacked`, of all samples along a leading dim)."""

    noise: list[torch.Tensor] | None
    momentum: list[torch.Tensor] | None


@dataclass
class StartBlock:
    """The random parts of ``rows`` samples, drawn flat: row ``j`` of each block is sample ``j``.

    ``noise`` and ``momentum`` are ``(rows, numel)`` tensors on the generator's device (``None``
    when the configuration draws none). The loop path keeps a one-row block for the whole run and
    refills it for every sample; when the draw lands in the parameters' own device and dtype the
    per-parameter views of that row are made once and reused too.
    """

    layout: FlatLayout
    noise: torch.Tensor | None
    momentum: torch.Tensor | None
    _views: dict[int, SampleStart] = field(default_factory=dict)

    def sample(self, j: int) -> SampleStart:
        """Sample ``j`` split per parameter (views of the block where the layout allows)."""
        cached = self._views.get(j)
        if cached is not None:
            return cached
        start = SampleStart(
            None if self.noise is None else self.layout.split(self.noise[j]),
            None if self.momentum is None else self.layout.split(self.momentum[j]),
        )
        if self.layout.in_place:
            self._views[j] = start
        return start

    def stacked(self) -> SampleStart:
        """All samples at once: per parameter a ``(rows, *shape)`` tensor on its device."""
        return SampleStart(
            None if self.noise is None else self.layout.split(self.noise),
            None if self.momentum is None else self.layout.split(self.momentum),
        )


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
        vectorize: let :meth:`step_on_batch` batch the ``s`` samples with ``vmap`` on devices
            where that pays (not CPU; see :meth:`vectorizes`).
        vectorize_cpu: batch them on CPU too (slower there as measured; kept for tests and for
            hardware where it pays).
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
        vectorize_cpu: bool = False,
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
        if not isinstance(vectorize_cpu, bool):
            raise ValueError(f"vectorize_cpu must be a bool, got {vectorize_cpu!r}")
        self.generator = generator
        self.vectorize = vectorize
        self.vectorize_cpu = vectorize_cpu
        self._loop_block: StartBlock | None = None
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
    def _fill_sample(self, noise: torch.Tensor | None, momentum: torch.Tensor | None) -> None:
        """Draw one sample into flat rows: its noise, then its momentum -- the order both paths
        share, so the same ``generator`` gives both the same numbers."""
        if noise is not None:
            fill_noise(
                noise,
                self.noise,
                scale=self.noise_scale,
                radius=self.noise_radius,
                generator=self.generator,
            )
        if momentum is not None:
            fill_randn(momentum, self.generator).mul_(self.momentum_std)

    def _new_block(self, layout: FlatLayout, rows: int) -> StartBlock:
        return StartBlock(
            layout,
            None if self.noise == "none" else layout.empty(rows),
            layout.empty(rows) if self.sampler == "hmc" else None,
        )

    def _draw_row(self, block: StartBlock, j: int) -> SampleStart:
        """Draw sample ``j`` of ``block`` (overwriting what the row held) and return it."""
        self._fill_sample(
            None if block.noise is None else block.noise[j],
            None if block.momentum is None else block.momentum[j],
        )
        return block.sample(j)

    def draw_starts(self, params: list[torch.Tensor], rows: int) -> StartBlock:
        """Draw ``rows`` samples, one after another, into a new block."""
        block = self._new_block(FlatLayout(params, draw_device(params, self.generator)), rows)
        for j in range(rows):
            self._draw_row(block, j)
        return block

    def _reusable_block(self, params: list[torch.Tensor]) -> StartBlock:
        """The loop's one-row block, kept across samples and steps.

        Its tensors are scratch: each draw overwrites them, which the loop allows because it is
        done with a sample before it draws the next. It is allocated again only when the
        parameters' shapes, dtypes or devices (or the generator's device) change.
        """
        block = self._loop_block
        device = draw_device(params, self.generator)
        if block is None or not block.layout.matches(params, device):
            block = self._loop_block = self._new_block(FlatLayout(params, device), 1)
        return block

    def _loop_draws(self, params: list[torch.Tensor]) -> Callable[[int], SampleStart]:
        """Sample ``j``'s draw for the loop, made when the loop asks for it, into the reused
        one-row block (so the layout check runs once per step, not once per sample)."""
        block = self._reusable_block(params)
        return lambda _j: self._draw_row(block, 0)

    def draw_start(self, params: list[torch.Tensor]) -> SampleStart:
        """Draw one sample into the loop's reused block (valid until the next draw)."""
        return self._draw_row(self._reusable_block(params), 0)

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
        return self._loop_step(params, torch.enable_grad()(closure), self._loop_draws(params))

    def _loop_step(
        self,
        params: list[torch.Tensor],
        closure: Closure,
        next_start: Callable[[int], SampleStart],
    ) -> torch.Tensor:
        """Evaluate the samples one after another, streaming ``sum_j w_j g_j``.

        The accumulator holds the weighted *mean* of the gradients seen so far; each new
        gradient is folded in with one ``lerp`` by its share of the running normaliser (see
        :func:`streamed_weight`), so there is no final division and no per-sample copy. The
        first sample's gradient tensors become the accumulator. Everything stays on the device
        (no ``.item()``), so there is no host sync per sample.
        """
        exponent = self.weight_exponent
        theta = self._snapshot(params)
        losses: list[torch.Tensor] = []
        for j in range(self.samples):
            self._move_sample(params, theta, closure, next_start(j))
            self._set_grads_none(params)
            loss = _as_loss(closure())
            grads = self._grads(params)
            if j == 0:  # the first gradients become the accumulator, with weight 1
                acc = grads
                best = loss if math.isinf(exponent) else loss * exponent
                norm_z = torch.ones_like(loss)
            else:
                weight, best, norm_z = streamed_weight(loss, best, norm_z, exponent)
                torch._foreach_lerp_(acc, grads, [weight] * len(acc))
            losses.append(loss)
            torch._foreach_copy_(params, theta)
        for p, g in zip(params, acc, strict=True):
            p.grad = g
        return self._finish(torch.stack(losses))

    def _move_sample(
        self,
        params: list[torch.Tensor],
        theta: list[torch.Tensor],
        closure: Closure,
        start: SampleStart,
    ) -> None:
        """Put ``params`` (at ``theta``) at ``theta + eps_j``, the sampler's output."""
        if self.sampler == "ascent":
            if start.noise is not None:
                torch._foreach_add_(params, start.noise)
            self._set_grads_none(params)
            closure()
            # SAM's ascent step, in place on this pass's gradients (they are dropped next).
            g0 = self._grads(params)
            scale = self.rho / (global_norm(g0) + EPS)
            torch._foreach_mul_(g0, scale)
            torch._foreach_add_(params, g0)
            return
        if self.sampler == "none":
            if start.noise is not None:
                torch._foreach_add_(params, start.noise)
            return
        # hmc: Euler steps on H = -delta L(theta + eps) + |p|^2 / 2, kept in the rho-ball.
        eps = start.noise if start.noise is not None else [torch.zeros_like(p) for p in params]
        momentum = start.momentum
        assert momentum is not None
        project_to_ball(eps, self.rho)
        for _ in range(self.hmc_steps):
            _place(params, theta, eps)
            self._set_grads_none(params)
            closure()
            torch._foreach_add_(
                momentum, self._grads(params), alpha=self.hmc_step_size * self.delta
            )
            torch._foreach_add_(eps, momentum, alpha=self.hmc_step_size)
            project_to_ball(eps, self.rho)
        _place(params, theta, eps)

    # ----------------------------------------------------------------- batched path
    def vectorizes(self, params: list[torch.Tensor]) -> bool:
        """Whether :meth:`step_on_batch` batches the samples with ``vmap`` for ``params``.

        Only off the CPU (unless ``vectorize_cpu``). Measured on the digits MLP and CNN (1
        thread, ``bench/tsam_step.py --vmap``) the vectorized step is 5-40% *slower* than the
        loop on CPU for ``s`` from 3 to 8, and twice as slow at ``s = 1``: the ascent needs
        per-sample gradients, and ``vmap(grad)`` turns every matmul into a batched matmul and
        every convolution into a grouped one, which CPU kernels run slower than ``s`` plain
        passes, while the loop's per-pass overhead is small next to a CPU pass. On a GPU the
        ``s`` small passes are launch-bound, which batching removes.
        """
        if not self.vectorize or self._vmap_failed:
            return False
        return self.vectorize_cpu or all(p.device.type != "cpu" for p in params)

    def step_on_batch(
        self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """One TSAM step on a batch; returns the step's empirical tilted loss.

        The ``s`` perturbations are evaluated in one ``vmap`` call where :meth:`vectorizes`
        says so and ``torch.func`` supports the model, else one after another; both give
        :meth:`step`'s update. BatchNorm running statistics are updated once, at the
        unperturbed weights.
        """
        params = self._params()
        update_batchnorm_stats(model, inputs)
        with frozen_batchnorm_stats(model):
            if not self.vectorizes(params):
                next_start = self._loop_draws(params)
            else:
                block = self.draw_starts(params, self.samples)
                try:
                    return self._vectorized_step(model, loss_fn, inputs, targets, params, block)
                except (RuntimeError, NotImplementedError, ValueError) as err:
                    self._vmap_failed = True
                    warnings.warn(
                        f"TSAM: vectorized step unavailable for this model ({err}); "
                        "falling back to the per-sample loop",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                # The samples are drawn already: the loop evaluates those same ones.
                next_start = block.sample

            def closure() -> torch.Tensor:
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                return loss

            with torch.no_grad():
                return self._loop_step(params, torch.enable_grad()(closure), next_start)

    def _vectorized_step(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        params: list[torch.Tensor],
        block: StartBlock,
    ) -> torch.Tensor:
        losses = _vectorized.tilted_backward(self, model, loss_fn, inputs, targets, params, block)
        with torch.no_grad():
            return self._finish(losses)


def streamed_weight(
    loss: torch.Tensor, best: torch.Tensor, norm_z: torch.Tensor, exponent: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online softmax: the weight of a new sample in the running weighted mean.

    With ``a_j = exponent * L_j``, ``best`` the running max of ``a`` and ``norm_z`` the running
    ``sum exp(a_j - best)``, the mean ``sum_j w_j g_j`` (``w = softmax(a)``) absorbs a new
    gradient as ``lerp(mean, g, exp(a - best') / norm_z')``. For an infinite exponent ``best`` is
    the running max loss and the weight is 1 exactly when the new loss beats it (ties keep the
    first, as ``argmax`` does), so the mean is the worst sample's gradient. Returns
    ``(weight, best', norm_z')``.
    """
    if math.isinf(exponent):
        return (loss > best).to(loss.dtype), torch.maximum(best, loss), norm_z
    a = loss * exponent
    new_best = torch.maximum(best, a)
    added = torch.exp(a - new_best)
    norm_z = norm_z * torch.exp(best - new_best) + added
    return added / norm_z, new_best, norm_z


def _as_loss(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError("the closure must return the loss as a tensor")
    return value.detach().float().reshape(())


def _place(params: list[torch.Tensor], theta: list[torch.Tensor], eps: list[torch.Tensor]) -> None:
    torch._foreach_copy_(params, theta)
    torch._foreach_add_(params, eps)
