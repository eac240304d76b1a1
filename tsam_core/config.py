"""``TrainConfig``: everything one training run depends on, validated at construction.

A trial of a study is exactly one ``TrainConfig``; the study's task and optimizer settings and
the trial's suggested parameters are merged into it. It is frozen so a config can be hashed,
logged and compared with the one stored in a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tsam_core.perturb import NOISE_LAWS

METHODS = ("erm", "sam", "tsam")
BASE_OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine")
SAMPLERS = ("ascent", "hmc", "none")
T_SCHEDULES = ("constant", "ramp_up", "ramp_down")

# Fields that may differ between a checkpoint and the config resuming from it: they change
# where or how long a run goes, not what it computes.
RESUMABLE_FIELDS = frozenset({"epochs", "checkpoint_dir", "device", "num_threads", "data_dir"})


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow the TSAM authors' released code where they apply."""

    # task
    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 20
    batch_size: int = 64
    label_noise: float = 0.0
    seed: int = 0
    data_seed: int | None = None  # label-noise draw; None = seed
    data_dir: str | None = None
    # optimizer
    method: str = "tsam"
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    lr_schedule: str = "constant"
    rho: float = 0.05
    adaptive: bool = False
    t: float = 1.0
    samples: int = 3
    noise: str = "gaussian"
    noise_scale: float = 1.0
    noise_radius: float = 1.0
    sampler: str = "ascent"
    delta: float = 0.0
    hmc_steps: int = 1
    hmc_step_size: float = 0.01
    momentum_std: float = 1.0
    t_schedule: str = "constant"
    vectorize: bool = True
    # where and how
    device: str = "cpu"
    num_threads: int | None = None
    checkpoint_dir: str | None = None
    # end-of-run flatness metrics (cheap by default)
    sharpness_sigmas: tuple[float, ...] = (0.01, 0.05)
    sharpness_draws: int = 8
    sharpness_examples: int = 512
    hessian_topk: int = 0
    eval_train: bool = True

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("base", self.base, BASE_OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("noise", self.noise, NOISE_LAWS)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("t_schedule", self.t_schedule, T_SCHEDULES)
        for name in ("epochs", "batch_size", "samples", "hmc_steps", "sharpness_draws"):
            _integer(name, getattr(self, name), low=1)
        for name in ("seed", "hessian_topk", "sharpness_examples"):
            _integer(name, getattr(self, name), low=0)
        if self.data_seed is not None:
            _integer("data_seed", self.data_seed, low=0)
        if self.num_threads is not None:
            _integer("num_threads", self.num_threads, low=1)
        for name in (
            "lr",
            "momentum",
            "weight_decay",
            "rho",
            "noise_scale",
            "noise_radius",
            "delta",
            "hmc_step_size",
            "momentum_std",
        ):
            _number(name, getattr(self, name), low=0.0)
        _number("t", self.t, low=0.0, allow_inf=True)
        _number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _number("label_noise", self.label_noise, low=0.0, high=1.0, high_open=True)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.delta and self.sampler != "hmc":
            raise ValueError("delta (the sampling tilt) only applies to sampler='hmc'")
        if self.t_schedule != "constant" and math.isinf(self.t):
            raise ValueError("t_schedule cannot ramp an infinite t")
        if not self.sharpness_sigmas or any(
            not isinstance(s, int | float) or s < 0 for s in self.sharpness_sigmas
        ):
            raise ValueError("sharpness_sigmas must be a non-empty list of numbers >= 0")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a flat mapping, or from a study-style one with ``task:`` and
        ``optimizer:`` sections (so a study's settings can be run as one training)."""
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("task", "optimizer") and isinstance(value, Mapping):
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        if "sharpness_sigmas" in flat:
            flat["sharpness_sigmas"] = tuple(flat["sharpness_sigmas"])
        if isinstance(flat.get("t"), str) and flat["t"].lower() in ("inf", "infinity"):
            flat["t"] = math.inf
        return cls(**flat)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _integer(name: str, value: object, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    allow_inf: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = not math.isnan(v) and (allow_inf or math.isfinite(v)) and v >= low
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        upper = "" if math.isinf(high) else f" and {'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be a number >= {low}{upper}, got {value!r}")
