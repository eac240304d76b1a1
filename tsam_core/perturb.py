"""Weight perturbations shared by SAM, TSAM and the flatness metrics.

Everything here works on *lists* of tensors, one per parameter, so a perturbation of a whole
model is a list the same shape as its parameters, and norms are global (over all parameters
together) as in SAM.

Random draws are made *flat*: one ``normal_`` call fills one vector with the numbers for all
parameters, in parameter order, and is then split into per-parameter views. On CPU the cost of
a draw is the Mersenne Twister itself (about 2.4 ns per number here, the same for one call over
85k numbers as for six calls over the same numbers), so the flat draw does not make the random
numbers cheaper; it makes everything around them one kernel instead of one per parameter (the
norm, the rescaling, the move to the parameters' device) and lets callers reuse the vector
across steps. Draws take an optional ``torch.Generator``; the draw happens on the generator's
device and is then moved, so a CPU generator reproduces the same noise for a model on any
device, and the loop and the vectorized TSAM paths see the same numbers in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NOISE_LAWS = ("none", "sphere", "ball", "gaussian")

# Added to norms before dividing, as in the reference SAM code, so a zero gradient gives a zero
# (not NaN) ascent step.
EPS = 1e-12


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors taken together, as a 0-dim tensor (no host sync)."""
    if not tensors:
        raise ValueError("tensors must not be empty")
    norms = torch._foreach_norm(list(tensors))
    out: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms))
    return out


class FlatLayout:
    """How a list of parameters maps onto one flat vector, in parameter order.

    Draws are made into a flat vector of ``numel`` numbers of ``dtype`` (the parameters' common
    dtype) on ``draw_device`` (the generator's); :meth:`split` turns such a vector -- or a
    ``(rows, numel)`` block of them -- back into tensors shaped like the parameters.
    """

    def __init__(self, params: Sequence[torch.Tensor], draw_device: torch.device) -> None:
        if not params:
            raise ValueError("params must not be empty")
        self.shapes = tuple(p.shape for p in params)
        self.numels = tuple(p.numel() for p in params)
        self.numel = sum(self.numels)
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.draw_device = torch.device(draw_device)
        self.targets = tuple((p.device, p.dtype) for p in params)
        # A draw lands directly in the parameters' memory format when they all live on the draw
        # device in the draw dtype (the common case): then `split` returns views, no copies.
        self.in_place = all(t == (self.draw_device, dtype) for t in self.targets)

    def matches(self, params: Sequence[torch.Tensor], draw_device: torch.device) -> bool:
        """Whether this layout still describes ``params`` drawn on ``draw_device``."""
        return (
            self.draw_device == draw_device
            and len(params) == len(self.shapes)
            and all(
                p.shape == shape and (p.device, p.dtype) == target
                for p, shape, target in zip(params, self.shapes, self.targets, strict=True)
            )
        )

    def empty(self, rows: int | None = None) -> torch.Tensor:
        """An uninitialised flat vector (or ``(rows, numel)`` block) on the draw device."""
        shape = (self.numel,) if rows is None else (rows, self.numel)
        return torch.empty(shape, device=self.draw_device, dtype=self.dtype)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter tensors from ``flat`` of shape ``(..., numel)``: ``(..., *shape)`` each.

        Views of ``flat`` when the layout is ``in_place``; otherwise moved to each parameter's
        device and dtype (one transfer for the whole vector when they all share one).
        """
        if not self.in_place:
            targets = set(self.targets)
            if len(targets) == 1:
                device, dtype = next(iter(targets))
                flat = flat.to(device=device, dtype=dtype, non_blocking=True)
        lead = flat.shape[:-1]
        out = []
        start = 0
        for shape, numel, (device, dtype) in zip(
            self.shapes, self.numels, self.targets, strict=True
        ):
            view = flat[..., start : start + numel].view(*lead, *shape)
            out.append(view.to(device=device, dtype=dtype, non_blocking=True))
            start += numel
        return out


def draw_device(params: Sequence[torch.Tensor], generator: torch.Generator | None) -> torch.device:
    """Where random numbers for ``params`` are drawn: the generator's device, else theirs."""
    return generator.device if generator is not None else params[0].device


def fill_randn(flat: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``flat`` in place with standard normal numbers (one call) and return it."""
    return flat.normal_(generator=generator)


def fill_noise(
    flat: torch.Tensor,
    law: str,
    *,
    scale: float,
    radius: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Fill the flat vector ``flat`` in place with one draw of ``eps_0`` from ``law``.

    - ``sphere``: uniform direction, norm exactly ``scale``;
    - ``ball``: uniform in the ball of radius ``scale`` (radius law ``U^(1/d)``);
    - ``gaussian``: ``N(0, scale^2)`` per coordinate, rescaled to global norm
      ``min(||z||, radius)`` -- the clipped Gaussian of the TSAM authors' code.

    All three start from one standard normal vector ``z`` and rescale it by a factor computed
    on the device (no host sync).
    """
    if law not in NOISE_LAWS or law == "none":
        raise ValueError(f"noise must be one of {NOISE_LAWS[1:]}, got {law!r}")
    z = fill_randn(flat, generator)
    norm = torch.linalg.vector_norm(z)
    if law == "gaussian":
        # scale*z has norm scale*||z||; clip it to `radius`.
        factor = torch.clamp(radius / (scale * norm + EPS), max=1.0) * scale
    elif law == "sphere":
        factor = scale / (norm + EPS)
    else:  # ball
        u = torch.rand((), generator=generator, device=z.device, dtype=z.dtype)
        factor = scale * u ** (1.0 / z.numel()) / (norm + EPS)
    return z.mul_(factor)


def randn_like_params(
    params: Sequence[torch.Tensor], generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Standard normal draws shaped like ``params``, drawn flat in parameter order."""
    layout = FlatLayout(params, draw_device(params, generator))
    return layout.split(fill_randn(layout.empty(), generator))


def draw_noise(
    params: Sequence[torch.Tensor],
    law: str,
    *,
    scale: float,
    radius: float,
    generator: torch.Generator | None,
) -> list[torch.Tensor] | None:
    """One draw of the initial perturbation ``eps_0`` from ``law`` (see :func:`fill_noise`),
    shaped like ``params``; ``None`` for ``"none"``. Fresh tensors on every call."""
    if law == "none":
        return None
    if law not in NOISE_LAWS:
        raise ValueError(f"noise must be one of {NOISE_LAWS}, got {law!r}")
    layout = FlatLayout(params, draw_device(params, generator))
    flat = fill_noise(layout.empty(), law, scale=scale, radius=radius, generator=generator)
    return layout.split(flat)


def project_to_ball(eps: list[torch.Tensor], radius: float) -> None:
    """Shrink ``eps`` in place onto the ball of ``radius`` when it lies outside."""
    factor = torch.clamp(radius / (global_norm(eps) + EPS), max=1.0)
    torch._foreach_mul_(eps, factor)
