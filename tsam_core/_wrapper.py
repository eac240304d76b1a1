"""What SAM and TSAM share: wrapping a base optimizer and keeping BatchNorm out of the way.

Both follow the convention of the reference SAM code: the wrapper is constructed with a base
optimizer *class* and its keyword arguments, and adopts the base optimizer's ``param_groups``
so learning-rate schedulers that edit the wrapper's groups edit the base optimizer's too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Closure = Callable[[], Any]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class WrappedOptimizer(torch.optim.Optimizer):
    """Base class: an ``Optimizer`` whose update is delegated to a wrapped base optimizer."""

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD, "
                f"got {base_optimizer!r}"
            )
        super().__init__(params, {**defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._snapshot_buffers: list[torch.Tensor] = []

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _set_grads_none(self, params: list[torch.Tensor] | None = None) -> None:
        """Drop the gradients (of ``params``, default all), so the next backward allocates
        fresh ones instead of accumulating."""
        for p in self._params() if params is None else params:
            p.grad = None

    def _grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients of ``params``; an unused parameter counts as a zero gradient."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    def _snapshot(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of ``params`` (the point ``theta`` to return to after a perturbation).

        The copy goes into buffers kept from the previous step, so a step allocates no
        parameter-sized memory for it; they are allocated again only when the parameters'
        shapes, dtypes or devices change (a new param group, a model moved to another device).
        The buffers are scratch space: valid until the next call.
        """
        buffers = self._snapshot_buffers
        if len(buffers) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
            for b, p in zip(buffers, params, strict=True)
        ):
            buffers = self._snapshot_buffers = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(buffers, params)
        return buffers

    def wrapper_state(self) -> dict[str, Any]:
        """State of the wrapper itself (not the base optimizer); subclasses extend it."""
        return {}

    def load_wrapper_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``wrapper_state``."""

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (momentum buffers included) plus the wrapper's."""
        state = self.base_optimizer.state_dict()
        state["wrapper"] = self.wrapper_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        wrapper = state.pop("wrapper", {})
        self.base_optimizer.load_state_dict(state)
        # The base optimizer rebuilt its groups: re-link ours to them (reference SAM PR #39).
        self.param_groups = self.base_optimizer.param_groups
        self.load_wrapper_state(wrapper)


def tracking_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that update running statistics in training mode."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BN_TYPES) and m.track_running_stats and m.running_mean is not None
    ]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but updates no buffer.

    Used for every pass at a perturbed point: running statistics should describe the weights
    we keep, not the perturbed ones, and ``torch.vmap`` cannot update a buffer in place from a
    batched input anyway. Toggling ``track_running_stats`` makes ``BatchNorm.forward`` pass no
    running buffers to ``F.batch_norm`` while still using batch statistics.
    """
    layers = tracking_batchnorms(model)
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@torch.no_grad()
def update_batchnorm_stats(model: nn.Module, inputs: torch.Tensor) -> None:
    """One forward pass at the current weights, only to update BatchNorm running statistics.

    For a plain ``nn.Sequential`` the pass stops after the last child that holds a tracking
    BatchNorm: the children after it cannot change any running statistic, and on the digits
    CNN they (pooling, classifier) are half the cost of the forward, which TSAM pays on top of
    its ``2s`` passes. Other models (subclasses included, whose ``forward`` may differ) run
    whole.
    """
    if not (model.training and tracking_batchnorms(model)):
        return
    if type(model) is nn.Sequential:
        last = max(i for i, child in enumerate(model) if tracking_batchnorms(child))
        model = model[: last + 1]
    model(inputs)
