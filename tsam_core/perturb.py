"""Weight perturbations shared by SAM, TSAM and the flatness metrics.

Everything here works on *lists* of tensors, one per parameter, so a perturbation of a whole
model is a list the same shape as its parameters, and norms are global (over all parameters
together) as in SAM. Random draws take an optional ``torch.Generator``; the draw happens on the
generator's device and is then moved, so a CPU generator reproduces the same noise for a model on
any device, and the loop and the vectorized TSAM paths see the same numbers in the same order.
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


def randn_like_params(
    params: Sequence[torch.Tensor], generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Standard normal draws shaped like ``params``, drawn in parameter order."""
    out = []
    for p in params:
        if generator is None:
            out.append(torch.randn(p.shape, device=p.device, dtype=p.dtype))
        else:
            z = torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype)
            out.append(z.to(p.device, non_blocking=True))
    return out


def draw_noise(
    params: Sequence[torch.Tensor],
    law: str,
    *,
    scale: float,
    radius: float,
    generator: torch.Generator | None,
) -> list[torch.Tensor] | None:
    """One draw of the initial perturbation ``eps_0`` from ``law``; ``None`` for ``"none"``.

    - ``sphere``: uniform direction, norm exactly ``scale``;
    - ``ball``: uniform in the ball of radius ``scale`` (radius law ``U^(1/d)``);
    - ``gaussian``: ``N(0, scale^2)`` per coordinate, rescaled to global norm
      ``min(||z||, radius)`` -- the clipped Gaussian of the TSAM authors' code.
    """
    if law == "none":
        return None
    if law not in NOISE_LAWS:
        raise ValueError(f"noise must be one of {NOISE_LAWS}, got {law!r}")
    z = randn_like_params(params, generator)
    norm = global_norm(z)
    if law == "gaussian":
        # scale*z has norm scale*||z||; clip it to `radius` without a host sync.
        factor = torch.clamp(radius / (scale * norm + EPS), max=1.0) * scale
    elif law == "sphere":
        factor = scale / (norm + EPS)
    else:  # ball
        d = sum(p.numel() for p in params)
        device = generator.device if generator is not None else params[0].device
        u = torch.rand((), generator=generator, device=device, dtype=params[0].dtype)
        factor = scale * u.to(norm.device) ** (1.0 / d) / (norm + EPS)
    torch._foreach_mul_(z, factor)
    return z


def project_to_ball(eps: list[torch.Tensor], radius: float) -> None:
    """Shrink ``eps`` in place onto the ball of ``radius`` when it lies outside."""
    factor = torch.clamp(radius / (global_norm(eps) + EPS), max=1.0)
    torch._foreach_mul_(eps, factor)
