"""Flatness metrics of the TSAM paper (Li, Zhou, Bilmes, 2025): loss under Gaussian weight noise,
top Hessian eigenvalues, and the empirical tilted loss of a trained model.

They run mid-sweep on models that keep training, so each leaves the model exactly as found
(weights, buffers, every submodule's train/eval flag), even when the loss raises. Evaluation is in
eval mode, so BatchNorm reads but never updates its running statistics, and dropout is off."""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from tsam_core.tilt import tilted_loss

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Op = Callable[[torch.Tensor], torch.Tensor]
Draw = Callable[[], torch.Tensor]
Tensors = Sequence[torch.Tensor]
METHODS = ("lanczos", "power")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@contextlib.contextmanager
def _preserved(model: nn.Module, batches: Batches) -> Iterator[tuple[Tensors, Tensors]]:
    """Eval mode inside; on exit restore modes, weights and buffers by ``copy_`` from a snapshot:
    exact, and an optimizer keeps its tensors. Yields trainable parameters and snapshot."""
    _require(sum(int(x.shape[0]) for x, _ in batches) > 0, "batches must hold an example")
    modes = [(m, m.training) for m in model.modules()]
    params = [p for p in model.parameters() if p.requires_grad]
    tensors = [*params, *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    model.eval()
    try:
        yield params, saved[: len(params)]
    finally:
        with torch.no_grad():
            for tensor, snapshot in zip(tensors, saved, strict=True):
                tensor.copy_(snapshot)
        for m, mode in modes:
            m.training = mode


def _randn(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Normal draw like ``p`` made on the generator's device, so a seed works on any device."""
    device = p.device if generator is None else generator.device
    return torch.randn(p.shape, dtype=p.dtype, device=device, generator=generator).to(p.device)


def _loss(model: nn.Module, loss_fn: LossFn, batches: Batches) -> float:
    """Example-weighted mean loss, independent of the batching; one host sync, not one per batch."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in batches:
            total = total + loss_fn(model(x), y).detach().double() * x.shape[0]
            count += int(x.shape[0])
    return float(total) / count


def dataset_loss(model: nn.Module, loss_fn: LossFn, batches: Batches) -> float:
    """Example-weighted mean of ``loss_fn`` over all batches, in eval mode without gradients."""
    with _preserved(model, batches):
        return _loss(model, loss_fn, batches)


def _check_noise(sigmas: Sequence[float], n_draws: int) -> None:
    ok = len(sigmas) > 0 and all(math.isfinite(s) and s >= 0 for s in sigmas)
    _require(ok, f"sigmas must be a non-empty list of finite values >= 0, got {list(sigmas)}")
    _require(len(set(sigmas)) == len(sigmas), f"sigmas must not repeat, got {list(sigmas)}")
    _require(n_draws >= 1, f"n_draws must be >= 1, got {n_draws}")


def loss_under_noise(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    sigmas: Sequence[float] = (0.01, 0.05),
    n_draws: int = 8,
    generator: torch.Generator | None = None,
) -> dict[float, tuple[float, float]]:
    """Map each sigma to the (mean, variance) of the dataset loss at ``theta + sigma * N(0, I)``;
    a flat minimum keeps both small as sigma grows. The variance is the population one (ddof=0,
    defined for one draw); both are exact, so sigma = 0 gives the clean loss and exactly 0."""
    _check_noise(sigmas, n_draws)
    out: dict[float, tuple[float, float]] = {}
    with _preserved(model, batches) as (params, origin):
        for sigma in sigmas:
            losses = []
            for _ in range(n_draws):
                with torch.no_grad():
                    for p, p0 in zip(params, origin, strict=True):
                        p.copy_(p0).add_(_randn(p, generator), alpha=sigma)
                losses.append(_loss(model, loss_fn, batches))
            out[sigma] = (statistics.mean(losses), statistics.pvariance(losses))
    return out


def _hvp(model: nn.Module, loss_fn: LossFn, batches: Batches, params: Tensors) -> Op:
    """Hessian-vector product of the full-data loss on flat vectors, by double backward: the mean
    of the batch HVPs weighted by batch size, so only one batch's graph is alive at a time."""
    sizes = [p.numel() for p in params]
    total = sum(int(x.shape[0]) for x, _ in batches)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        vs = [c.view_as(p).to(p) for c, p in zip(torch.split(v, sizes), params, strict=True)]
        out = torch.zeros_like(v)
        for x, y in batches:
            with torch.enable_grad():
                loss = loss_fn(model(x), y)
                grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
                dot = torch.stack([(g * u).sum() for g, u in zip(grads, vs, strict=True)]).sum()
                if not dot.requires_grad:  # gradient constant in the weights: zero Hessian
                    continue
                hv = torch.autograd.grad(dot, params, materialize_grads=True)
            out += torch.cat([h.reshape(-1).to(v) for h in hv]) * (int(x.shape[0]) / total)
        return out

    return hvp


def _orth(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Project out ``basis`` (orthonormal) twice: "twice is enough" for working precision."""
    if basis:
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
    return w


def _power(hvp: Op, draw: Draw, k: int, iters: int, tol: float) -> list[float]:
    """Power iteration on ``P (H + c I) P``, ``P`` projecting out the eigenvectors found so far. It
    finds the largest eigenvalue in *magnitude*, not the largest *algebraic* one: when that comes
    out negative, the shift ``c`` grows by its size, making the rest of the spectrum non-negative,
    and the search repeats. Residuals are relative to the spectral radius, as in Lanczos."""
    found: list[torch.Tensor] = []
    values: list[float] = []
    shift = 0.0
    for _ in range(k):
        for attempt in range(2):
            v = nn.functional.normalize(_orth(draw(), found), dim=0)
            for _ in range(iters):
                w = _orth(hvp(v) + shift * v, found)
                theta = float(v @ w)
                scale = max([abs(theta), shift, *map(abs, values)])  # spectral radius estimate
                if float((w - theta * v).norm()) <= tol * scale:  # also when w == 0
                    break
                v = w / w.norm()
            if theta >= -tol * scale or attempt == 1:
                break
            shift -= theta
        found.append(v)
        values.append(theta - shift)
    return sorted(values, reverse=True)


def _lanczos(hvp: Op, draw: Draw, k: int, iters: int, tol: float) -> list[float]:
    """Lanczos, fully reorthogonalized so rounding cannot duplicate converged Ritz values. Stops
    once each top-k residual ``beta * |last entry of the Ritz vector|`` is below ``tol`` times the
    largest |Ritz value|. On breakdown (an invariant Krylov space, e.g. a low-rank Hessian) it
    restarts orthogonally to the basis, so ``k <= iters`` eigenvalues are always found."""
    q = draw()
    q, n, eps = q / q.norm(), q.numel(), torch.finfo(q.dtype).eps
    basis: list[torch.Tensor] = []
    diag: list[float] = []
    off: list[float] = []  # off[j] couples q_j and q_(j+1); 0 after a restart
    for _ in range(min(iters, n)):
        basis.append(q)
        w = hvp(q)
        diag.append(float(q @ w))
        scale, w = float(w.norm()), _orth(w, basis)
        beta = float(w.norm())
        sub = torch.tensor(off, dtype=torch.float64)
        t = torch.tensor(diag, dtype=torch.float64).diag() + sub.diag(1) + sub.diag(-1)
        ritz, vectors = torch.linalg.eigh(t)
        if len(diag) >= k and bool((beta * vectors[-1, -k:].abs() <= tol * ritz.abs().max()).all()):
            break
        if beta <= 100 * eps * scale:  # restart, decoupled in T by a zero off-diagonal
            w, beta = draw(), 0.0
            w_scale, w = float(w.norm()), _orth(w, basis)
            if float(w.norm()) <= 100 * eps * w_scale:  # the basis spans the whole space
                break
        q = w / w.norm()
        off.append(beta)
    return [float(r) for r in ritz.flip(0)[:k]]


def _check_hessian(k: int, iters: int, method: str, tol: float, pre: str = "") -> None:
    _require(k >= 1, f"{pre}k must be >= 1, got {k}")
    _require(iters >= 1, f"{pre}iters must be >= 1, got {iters}")
    _require(method in METHODS, f"method must be one of {METHODS}, got {method!r}")
    _require(method != "lanczos" or k <= iters, f"{pre}k must be <= {pre}iters for lanczos")
    _require(tol >= 0, f"tol must be >= 0, got {tol}")


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    k: int = 1,
    iters: int = 20,
    method: str = "lanczos",
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
) -> list[float]:
    """Top-``k`` (largest algebraic) eigenvalues of the full-data loss Hessian, descending, from
    Hessian-vector products only, so it scales to real networks. ``iters`` bounds the Lanczos basis
    (the number of products), or for ``"power"`` the iterations per eigenvalue; ``tol`` is the
    relative residual at which either stops early."""
    _check_hessian(k, iters, method, tol)
    with _preserved(model, batches) as (params, _):
        n = sum(p.numel() for p in params)
        _require(k <= n, f"k must be <= the number of trainable parameters ({n}), got {k}")
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
        draw = functools.partial(_randn, params[0].new_empty(n, dtype=dtype), generator)
        solver = _lanczos if method == "lanczos" else _power
        return solver(_hvp(model, loss_fn, batches, params), draw, k, iters, tol)


def _check_tilt(t: float, rho: float, samples: int, pre: str = "") -> None:
    _require(t >= 0, f"{pre}t must be >= 0, got {t}")  # also rejects NaN
    _require(math.isfinite(rho) and rho >= 0, f"{pre}rho must be finite and >= 0, got {rho}")
    _require(samples >= 1, f"{pre}samples must be >= 1, got {samples}")


def empirical_tilted_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    t: float,
    rho: float,
    samples: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """``(1/t) log((1/s) sum_j exp(t L(theta + eps_j)))``, ``eps_j`` uniform on the sphere of
    radius ``rho`` (one norm over all trainable parameters, as in SAM): TSAM's own objective on
    the trained model, the mean perturbed loss at ``t = 0`` and moving to the worst as t grows."""
    _check_tilt(t, rho, samples)
    losses = []
    with _preserved(model, batches) as (params, origin):
        for _ in range(samples):
            z = [_randn(p, generator) for p in params]
            norm = math.sqrt(sum(float(zi.double().square().sum()) for zi in z))
            with torch.no_grad():
                for p, p0, zi in zip(params, origin, z, strict=True):
                    p.copy_(p0).add_(zi, alpha=rho / norm if norm > 0 else 0.0)
            losses.append(_loss(model, loss_fn, batches))
    return float(tilted_loss(torch.tensor(losses, dtype=torch.float64), t))


def flatness_report(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    sigmas: Sequence[float] = (0.01, 0.05),
    n_draws: int = 8,
    hessian_k: int = 0,
    hessian_iters: int = 20,
    tilt_t: float | None = None,
    tilt_rho: float = 0.05,
    tilt_samples: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """All flatness metrics of a run as one flat ``str -> float`` dict, for a metric store.
    ``sharpness`` (mean loss at the largest sigma minus the clean loss) is the one number to rank
    runs by; the rest explain it. Every argument is checked before the first costly metric."""
    _check_noise(sigmas, n_draws)
    _require(hessian_k >= 0, f"hessian_k must be >= 0, got {hessian_k}")
    if hessian_k > 0:
        _check_hessian(hessian_k, hessian_iters, "lanczos", 0.0, "hessian_")
    if tilt_t is not None:
        _check_tilt(tilt_t, tilt_rho, tilt_samples, "tilt_")
    args = (model, loss_fn, batches)
    report = {"loss_clean": dataset_loss(*args)}
    noise = loss_under_noise(*args, sigmas=sigmas, n_draws=n_draws, generator=generator)
    for sigma, (mean, var) in noise.items():
        report |= {f"noise_loss_mean@{sigma:g}": mean, f"noise_loss_var@{sigma:g}": var}
    report["sharpness"] = noise[max(sigmas)][0] - report["loss_clean"]
    if hessian_k > 0:
        top = hessian_eigenvalues(*args, k=hessian_k, iters=hessian_iters, generator=generator)
        report.update({f"hessian_top{i + 1}": value for i, value in enumerate(top)})
    if tilt_t is not None:
        report["tilted_loss_eval"] = empirical_tilted_loss(
            *args, t=tilt_t, rho=tilt_rho, samples=tilt_samples, generator=generator
        )
    return report
