"""The study spec: the body of ``POST /api/v1/studies`` (DESIGN.md 3 and 3a).

Two layers of validation:

* the pydantic models below check each field on its own (types, ranges, registries, unknown
  keys are rejected everywhere with ``extra="forbid"``), and each search-space parameter on its
  own (``low <= high``, ``low > 0`` with ``log``, ``step > 0``, non-empty unique choices);
* :func:`semantic_errors` does the cross-field checks: which keys may be searched, whether every
  bound and choice makes a valid :class:`~tsam_core.config.TrainConfig`, sampler and pruner
  compatibility with the objectives, and resources against the executor's nodes.

Errors of both layers carry a location (``loc``) relative to the spec, so the API can answer a
FastAPI-style 422 pointing at the offending field.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from tsam_core.config import METHODS, TrainConfig
from tsam_core.data import DATASETS
from tsam_core.models import MODELS

# Hyperparameters a study may search, in the order the docs list them.
SEARCHABLE_KEYS: tuple[str, ...] = (
    "t",
    "rho",
    "samples",
    "lr",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "method",
    "base",
    "lr_schedule",
    "batch_size",
    "noise",
    "noise_scale",
    "noise_radius",
    "sampler",
    "delta",
    "hmc_steps",
    "hmc_step_size",
    "momentum_std",
    "t_schedule",
    "adaptive",
)

_TSAM_ONLY = frozenset({"tsam"})
# Method-specific keys -> the methods that use them; every other searchable key is used by all.
METHOD_KEYS: dict[str, frozenset[str]] = {
    **{
        key: _TSAM_ONLY
        for key in (
            "t",
            "samples",
            "noise",
            "noise_scale",
            "noise_radius",
            "sampler",
            "delta",
            "hmc_steps",
            "hmc_step_size",
            "momentum_std",
            "t_schedule",
        )
    },
    "rho": frozenset({"sam", "tsam"}),
    "adaptive": frozenset({"sam"}),
}

# Keys only the ``hmc`` TSAM sampler reads. They are conditional on the sampler the way
# METHOD_KEYS are on the method: a trial whose sampler is not ``hmc`` does not suggest them
# (TrainConfig even rejects a non-zero ``delta`` without ``hmc``).
SAMPLER_KEYS: dict[str, frozenset[str]] = {
    key: frozenset({"hmc"}) for key in ("delta", "hmc_steps", "hmc_step_size", "momentum_std")
}

# Keys that only take values from a fixed set: searched with a categorical param only.
CATEGORICAL_KEYS = frozenset(
    {"method", "base", "lr_schedule", "noise", "sampler", "t_schedule", "adaptive"}
)
# Keys that only take integers: never searched with a float param.
INT_KEYS = frozenset({"samples", "batch_size", "hmc_steps"})

KNOWN_METRICS: tuple[str, ...] = (
    "val_accuracy",
    "best_val_accuracy",
    "val_loss",
    "test_accuracy",
    "test_loss",
    "train_accuracy",
    "train_loss",
    "step_loss",
    "tilted_loss",
    "weight_entropy",
    "sharpness",
    "loss_clean",
    "hessian_top1",
    "tilted_loss_eval",
    "noisy_memorized",
    "wall_time",
)
# Flatness metrics per noise level, e.g. ``noise_loss_mean@0.05`` (tsam_core.sharpness).
NOISE_METRIC_RE = re.compile(r"noise_loss_(mean|var)@(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")

MAX_GRID_SIZE = 100_000
_MAX_INT = 2**53  # int params stay exact as floats (JSON clients, Optuna's internal repr)
_INF_STRINGS = ("inf", "infinity")


def is_known_metric(name: str) -> bool:
    """Whether ``name`` is a metric a trial reports (and so can be an objective)."""
    return name in KNOWN_METRICS or NOISE_METRIC_RE.fullmatch(name) is not None


class _SpecModel(BaseModel):
    # Unknown keys are errors everywhere; JSON has no inf/nan, so no float field takes them
    # unless it says so (``t``).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- task and optimizer ------------------------------------------------------------------------


class TaskSpec(_SpecModel):
    """What is trained: the dataset, model and training length, fixed for every trial."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "digits",
        description="Dataset to train on.",
        json_schema_extra={"enum": list(DATASETS)},
    )
    model: str = Field(
        "mlp",
        description="Model architecture.",
        json_schema_extra={"enum": list(MODELS)},
    )
    epochs: int = Field(10, ge=1, le=1000, description="Training epochs of every trial.")
    batch_size: int = Field(64, ge=1, le=8192, description="Minibatch size.")
    label_noise: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of training labels replaced at random."
    )
    seed: int = Field(0, ge=0, description="Seed of the training run and the label-noise draw.")
    data_dir: str | None = Field(
        None,
        max_length=1000,
        description="Where the worker finds or downloads datasets; None = the worker's default.",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; known: {', '.join(DATASETS)}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known: {', '.join(MODELS)}")
        return value


def _t_schema(schema: JsonDict) -> None:
    for key in ("type", "minimum"):
        schema.pop(key, None)
    schema["anyOf"] = [
        {"type": "number", "minimum": 0},
        {"type": "string", "enum": list(_INF_STRINGS)},
    ]


def _parse_t(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _INF_STRINGS:
        return math.inf
    return value


class OptimizerSpec(_SpecModel):
    """The optimizer settings every trial starts from; searched keys override them per trial.

    Defaults equal :class:`~tsam_core.config.TrainConfig`'s.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["erm", "sam", "tsam"] = Field("tsam", description="Training method.")
    base: Literal["sgd", "adamw"] = Field("sgd", description="Base optimizer taking the step.")
    lr: float = Field(0.05, gt=0.0, description="Learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (AdamW: beta1).")
    weight_decay: float = Field(5e-4, ge=0.0, description="Weight decay.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing of the training loss."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning-rate schedule over the epochs."
    )
    rho: float = Field(0.05, ge=0.0, description="Perturbation radius (SAM and TSAM).")
    adaptive: bool = Field(False, description="Adaptive (scale-invariant) SAM; SAM only.")
    t: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=True,
        description=(
            "TSAM tilt: 0 averages the perturbed losses, larger t weights the worst ones more, "
            'the string "inf" is SAM-like (the largest loss only).'
        ),
        json_schema_extra=_t_schema,
    )
    samples: int = Field(3, ge=1, le=64, description="TSAM perturbations per step.")
    noise: Literal["none", "sphere", "ball", "gaussian"] = Field(
        "gaussian", description="Law of TSAM's initial perturbation noise."
    )
    noise_scale: float = Field(1.0, ge=0.0, description="Scale of the initial noise.")
    noise_radius: float = Field(
        1.0, ge=0.0, description="Global-norm clip of the gaussian initial noise."
    )
    sampler: Literal["ascent", "hmc", "none"] = Field(
        "ascent", description="How TSAM moves each perturbation after the noise."
    )
    delta: float = Field(0.0, ge=0.0, description="Sampling tilt of the hmc sampler.")
    hmc_steps: int = Field(1, ge=1, le=1000, description="Euler steps of the hmc sampler.")
    hmc_step_size: float = Field(0.01, ge=0.0, description="Step size of the hmc sampler.")
    momentum_std: float = Field(1.0, ge=0.0, description="Momentum std of the hmc sampler.")
    t_schedule: Literal["constant", "ramp_up", "ramp_down"] = Field(
        "constant", description="How t varies over training."
    )

    @field_validator("t", mode="before")
    @classmethod
    def _t_infinity(cls, value: Any) -> Any:
        return _parse_t(value)

    @field_serializer("t", when_used="json")
    def _t_json(self, value: float) -> float | str:
        return "inf" if math.isinf(value) else value


# -- search space ------------------------------------------------------------------------------


class FloatParam(_SpecModel):
    """A float searched in ``[low, high]``, optionally on a log scale or on a ``step`` grid."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float"] = Field("float", description="Parameter kind.")
    low: float = Field(description="Lower bound (inclusive).")
    high: float = Field(description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (needs low > 0).")
    step: float | None = Field(
        None, description="Discretization step (not with log); required by the grid sampler."
    )

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntParam(_SpecModel):
    """An integer searched in ``[low, high]``, optionally on a log scale or with a ``step``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["int"] = Field("int", description="Parameter kind.")
    low: int = Field(ge=-_MAX_INT, le=_MAX_INT, description="Lower bound (inclusive).")
    high: int = Field(ge=-_MAX_INT, le=_MAX_INT, description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (needs low > 0).")
    step: int | None = Field(None, description="Step between values (default 1; not with log).")

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


Choice = bool | int | float | str


class CategoricalParam(_SpecModel):
    """One of a list of values."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["categorical"] = Field("categorical", description="Parameter kind.")
    choices: list[Choice] = Field(
        max_length=1000,
        description='The values, unique (for t, "inf" is infinity).',
    )

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        if not self.choices:
            raise ValueError("choices must not be empty")
        seen: list[Choice] = []
        for choice in self.choices:
            # 1, 1.0 and True are one value to Optuna (it finds a choice by equality).
            if any(choice == other for other in seen):
                raise ValueError(f"choices must be unique; {choice!r} is repeated")
            seen.append(choice)
        return self


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    if step is not None and step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if log and low <= 0:
        raise ValueError(f"a log-scale range needs low > 0, got low={low}")
    if log and step is not None:
        raise ValueError("log and step cannot be combined")


Param = FloatParam | IntParam | CategoricalParam
_PARAM_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "float": TypeAdapter(FloatParam),
    "int": TypeAdapter(IntParam),
    "categorical": TypeAdapter(CategoricalParam),
}


def _validate_param(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Dispatch on ``type`` ourselves so that errors are located at the param
    # (search_space.<key>.low) rather than behind the union tag (search_space.<key>.float.low).
    if isinstance(value, Mapping):
        kind = value.get("type")
        adapter = _PARAM_ADAPTERS.get(kind) if isinstance(kind, str) else None
        if adapter is not None:
            return adapter.validate_python(value)
    return handler(value)  # instances, or pydantic's own error for a missing or unknown type


SearchParam = Annotated[
    Annotated[Param, Field(discriminator="type")], WrapValidator(_validate_param)
]


# -- objective, sampler, pruner, budget, resources ---------------------------------------------


class ObjectiveSpec(_SpecModel):
    """A metric of the finished trial to optimize."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(
        "val_accuracy",
        max_length=200,
        description=(
            f"A reported metric: one of {', '.join(KNOWN_METRICS)}, "
            "or noise_loss_mean@<sigma> / noise_loss_var@<sigma>."
        ),
    )
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="Whether larger or smaller is better."
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if not is_known_metric(value):
            raise ValueError(
                f"unknown metric {value!r}; known: {', '.join(KNOWN_METRICS)}, "
                "noise_loss_mean@<sigma>, noise_loss_var@<sigma>"
            )
        return value


_OBJECTIVE = TypeAdapter(ObjectiveSpec)
_OBJECTIVES = TypeAdapter(list[ObjectiveSpec])


def _validate_objective(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Not a plain union: a union reports an error once per member, behind the member's name.
    if isinstance(value, list):
        objectives = _OBJECTIVES.validate_python(value)
        if not objectives:
            raise ValueError("objective must be one objective or a non-empty list of them")
        if len(objectives) > 8:
            raise ValueError("at most 8 objectives")
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"objective metrics must be unique, got {metrics}")
        return objectives
    if isinstance(value, ObjectiveSpec):
        return value
    return _OBJECTIVE.validate_python(value)


class SamplerSpec(_SpecModel):
    """Optuna's sampler: how the next trial's parameters are chosen."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["tpe", "random", "grid", "cmaes", "gp", "nsga2", "qmc"] = Field(
        "tpe",
        description=(
            "tpe (default), random, grid (every combination; float params need a step), "
            "cmaes (single objective), gp, nsga2, qmc."
        ),
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Seed for reproducible suggestions."
    )
    n_startup_trials: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description=(
            "Random trials before the model kicks in (tpe, cmaes, gp; ignored by the others); "
            "None = Optuna's default."
        ),
    )


class PrunerSpec(_SpecModel):
    """Optuna's pruner: stops unpromising trials early from their per-epoch reports.

    Pruning needs a single objective.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["none", "median", "percentile", "hyperband", "successive_halving"] = Field(
        "none", description="Pruning rule."
    )
    n_startup_trials: int = Field(
        5, ge=0, description="median/percentile: finished trials before pruning starts."
    )
    n_warmup_steps: int = Field(
        0, ge=0, description="median/percentile: epochs of a trial before it can be pruned."
    )
    interval_steps: int = Field(
        1, ge=1, description="median/percentile: check every this many epochs."
    )
    percentile: float = Field(
        25.0, gt=0.0, lt=100.0, description="percentile: prune below this percentile."
    )
    min_resource: int | Literal["auto"] = Field(
        "auto",
        description=(
            "hyperband/successive_halving: epochs before the first rung; "
            '"auto" = Optuna\'s default (1 for hyperband, estimated for successive_halving).'
        ),
    )
    max_resource: int | Literal["auto"] = Field(
        "auto",
        description='hyperband: the most epochs a trial gets; "auto" = from the first trial.',
    )
    reduction_factor: int = Field(
        3, ge=2, description="hyperband/successive_halving: rung-to-rung reduction."
    )
    min_early_stopping_rate: int = Field(
        0, ge=0, description="successive_halving: minimum early-stopping rate."
    )

    @field_validator("min_resource", "max_resource")
    @classmethod
    def _positive_resource(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f'must be an integer >= 1 or "auto", got {value}')
        return value

    @model_validator(mode="after")
    def _resources_ordered(self) -> PrunerSpec:
        if (
            isinstance(self.min_resource, int)
            and isinstance(self.max_resource, int)
            and self.min_resource > self.max_resource
        ):
            raise ValueError(
                f"min_resource ({self.min_resource}) must be <= max_resource ({self.max_resource})"
            )
        return self


class BudgetSpec(_SpecModel):
    """How much the study may spend."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int = Field(20, ge=1, le=10_000, description="Trials to finish.")
    max_parallel: int = Field(2, ge=1, le=256, description="Trials running at once.")
    timeout_s: float | None = Field(
        None, gt=0.0, description="Wall-clock limit of the study; no new trial after it."
    )
    trial_timeout_s: float | None = Field(
        None, gt=0.0, description="Wall-clock limit of one trial attempt."
    )
    max_failures: int = Field(
        5, ge=1, le=10_000, description="The study fails after this many failed trials."
    )
    max_attempts: int = Field(
        3, ge=1, le=10, description="Attempts of one trial before it counts as failed."
    )


class ResourcesSpec(_SpecModel):
    """What one trial reserves on a node."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1.0, gt=0.0, le=1024.0, description="CPUs per trial (fractions allowed).")
    gpus: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per trial (fractions allowed).")


class RunnerSpec(_SpecModel):
    """What a trial executes: the TSAM training (``train``), or a zero-work trial (``sleep``)
    that reports a made-up objective -- for testing a deployment and measuring the service's
    own overhead."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["train", "sleep"] = Field("train", description="train | sleep (zero work).")
    sleep_s: float = Field(
        0.0, ge=0.0, le=3600.0, description="Seconds a `sleep` trial waits per epoch."
    )


# -- the study ---------------------------------------------------------------------------------


class StudySpec(_SpecModel):
    """A hyperparameter search. Every section is optional: ``{}`` is a valid spec."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("study", min_length=1, max_length=200, description="Display name.")
    description: str | None = Field(None, max_length=10_000, description="Free text.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="What is trained.")
    optimizer: OptimizerSpec = Field(
        default_factory=OptimizerSpec,
        description="Optimizer settings; searched keys override them per trial.",
    )
    search_space: dict[str, SearchParam] = Field(
        default_factory=dict,
        max_length=64,
        description=f"Searched hyperparameters by name; searchable: {', '.join(SEARCHABLE_KEYS)}.",
    )
    objective: Annotated[
        ObjectiveSpec | list[ObjectiveSpec], WrapValidator(_validate_objective)
    ] = Field(
        default_factory=ObjectiveSpec,
        description="One objective, or a list of them for a multi-objective (Pareto) study.",
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="Optuna sampler.")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec, description="Optuna pruner.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Budget.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Resources of one trial."
    )
    runner: RunnerSpec = Field(default_factory=RunnerSpec, description="What a trial runs.")

    @property
    def objectives(self) -> list[ObjectiveSpec]:
        """The objectives as a list (one for a single-objective study)."""
        if isinstance(self.objective, list):
            return list(self.objective)
        return [self.objective]


# -- cross-field checks ------------------------------------------------------------------------


def study_methods(spec: StudySpec) -> list[str]:
    """The methods the study's trials can run: the ``method`` param's valid choices when the
    method is searched, else the fixed ``optimizer.method``."""
    param = spec.search_space.get("method")
    if isinstance(param, CategoricalParam):
        return [c for c in METHODS if c in param.choices]
    return [spec.optimizer.method]


def study_samplers(spec: StudySpec) -> list[str]:
    """The TSAM samplers the study's trials can use (searched choices or the fixed one)."""
    param = spec.search_space.get("sampler")
    if isinstance(param, CategoricalParam):
        return [c for c in ("ascent", "hmc", "none") if c in param.choices]
    return [spec.optimizer.sampler]


def fixed_config(spec: StudySpec) -> dict[str, Any]:
    """The flat TrainConfig settings of the spec's task and optimizer (no searched values)."""
    flat = spec.task.model_dump()
    if flat.get("data_dir") is None:
        flat.pop("data_dir", None)
    flat.update(spec.optimizer.model_dump())
    return flat


def grid_size(spec: StudySpec) -> int:
    """How many combinations the grid sampler would enumerate (floats without step count 0)."""
    size = 1
    for param in spec.search_space.values():
        size *= _axis_size(param)
    return size


def _axis_size(param: Param) -> int:
    if isinstance(param, CategoricalParam):
        return len(param.choices)
    if isinstance(param, IntParam):
        return (param.high - param.low) // (param.step or 1) + 1
    if param.step is None:
        return 0
    # The same decimal arithmetic Optuna uses to put a float grid on its steps.
    span = Decimal(str(param.high)) - Decimal(str(param.low))
    return int(span // Decimal(str(param.step))) + 1


def _error(loc: list[str | int], msg: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": "value_error"}


def _config_error(flat: Mapping[str, Any]) -> str | None:
    try:
        TrainConfig.from_dict(flat)
    except (ValueError, TypeError, ArithmeticError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _section_error(spec: StudySpec, key: str, value: Any) -> str | None:
    """A searched value must also fit the field it overrides (e.g. samples <= 64)."""
    model: type[TaskSpec] | type[OptimizerSpec]
    if key in TaskSpec.model_fields:
        model, data = TaskSpec, spec.task.model_dump()
    else:
        model, data = OptimizerSpec, spec.optimizer.model_dump()
    data[key] = value
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return "; ".join(str(e["msg"]) for e in exc.errors())
    return None


def _candidates(param: Param) -> list[tuple[str, Any]]:
    """The values of a param worth checking against TrainConfig, with the field naming each."""
    if isinstance(param, CategoricalParam):
        return [("choices", c) for c in param.choices]
    return [("low", param.low), ("high", param.high)]


# Searched keys whose values TrainConfig checks against each other.
_PAIRED_KEYS = (("t", "t_schedule"),)


def semantic_errors(
    spec: StudySpec,
    *,
    max_node_cpus: float | None = None,
    max_node_gpus: float | None = None,
) -> list[dict[str, Any]]:
    """The cross-field errors of a spec pydantic alone cannot see, FastAPI style.

    Each error is ``{"loc": [...], "msg": ..., "type": "value_error"}`` with ``loc`` relative to
    the spec (no leading ``"body"``). ``max_node_cpus``/``max_node_gpus`` are the largest node
    of the executor; a resource check is skipped when its maximum is None. An empty list means
    the spec can run.
    """
    errors: list[dict[str, Any]] = []
    space = spec.search_space
    base = fixed_config(spec)

    fixed_problem = _config_error(base)
    if fixed_problem is not None:
        field = fixed_problem.split(" ", 1)[0]
        section = "task" if field in TaskSpec.model_fields else "optimizer"
        errors.append(_error([section], fixed_problem))

    methods = study_methods(spec)
    samplers = study_samplers(spec)
    checkable: list[str] = []  # keys whose values can be tried in a TrainConfig
    for key, param in space.items():
        loc: list[str | int] = ["search_space", key]
        if key not in SEARCHABLE_KEYS:
            errors.append(
                _error(
                    loc,
                    f"{key!r} cannot be searched; searchable: {', '.join(SEARCHABLE_KEYS)}",
                )
            )
            continue
        if key in METHOD_KEYS and not METHOD_KEYS[key] & set(methods):
            users = " and ".join(sorted(METHOD_KEYS[key]))
            errors.append(
                _error(
                    loc,
                    f"{key!r} is only used by method {users}, "
                    f"and this study runs {', '.join(methods) or 'no valid method'}",
                )
            )
            continue
        if key in SAMPLER_KEYS and not SAMPLER_KEYS[key] & set(samplers):
            errors.append(
                _error(
                    loc,
                    f"{key!r} is only used by sampler 'hmc', "
                    f"and this study's TSAM sampler is {', '.join(samplers)}",
                )
            )
            continue
        if key in CATEGORICAL_KEYS and not isinstance(param, CategoricalParam):
            errors.append(
                _error(
                    loc, f"{key!r} takes one of a set of values: search it with a categorical param"
                )
            )
            continue
        if key in INT_KEYS and isinstance(param, FloatParam):
            errors.append(
                _error(loc, f"{key!r} is an integer: search it with an int or categorical param")
            )
            continue
        if key == "method":
            assert isinstance(param, CategoricalParam)
            bad = [c for c in param.choices if c not in METHODS]
            for choice in bad:
                errors.append(
                    _error(
                        [*loc, "choices"],
                        f"{choice!r} is not a method; methods: {', '.join(METHODS)}",
                    )
                )
            if not bad:
                checkable.append(key)
            continue
        checkable.append(key)

    if fixed_problem is None:
        errors += _value_errors(spec, base, checkable)

    errors += _sampler_pruner_errors(spec)

    if max_node_gpus is not None and spec.resources.gpus > max_node_gpus:
        msg = (
            "no node of this executor has a GPU"
            if max_node_gpus == 0
            else f"gpus ({spec.resources.gpus:g}) exceeds the largest node's {max_node_gpus:g}"
        )
        errors.append(_error(["resources", "gpus"], msg))
    if max_node_cpus is not None and spec.resources.cpus > max_node_cpus:
        errors.append(
            _error(
                ["resources", "cpus"],
                f"cpus ({spec.resources.cpus:g}) exceeds the largest node's {max_node_cpus:g}",
            )
        )
    return errors


def _value_errors(spec: StudySpec, base: dict[str, Any], keys: list[str]) -> list[dict[str, Any]]:
    """Every bound and choice of the searched keys must make a valid TrainConfig."""
    errors: list[dict[str, Any]] = []
    space = spec.search_space
    failed: set[str] = set()
    for key in keys:
        context = dict(base)
        if key in SAMPLER_KEYS and "sampler" in space:
            context["sampler"] = "hmc"  # these keys are only suggested for hmc trials
        for where, value in _candidates(space[key]):
            problem = _section_error(spec, key, value) or _config_error({**context, key: value})
            if problem is not None:
                failed.add(key)
                errors.append(_error(["search_space", key, where], f"{key} = {value!r}: {problem}"))
    for first, second in _PAIRED_KEYS:
        if first not in keys or second not in keys or {first, second} & failed:
            continue
        for _, a in _candidates(space[first]):
            for _, b in _candidates(space[second]):
                problem = _config_error({**base, first: a, second: b})
                if problem is not None:
                    errors.append(
                        _error(
                            ["search_space", first],
                            f"{first} = {a!r} with {second} = {b!r}: {problem}",
                        )
                    )
    return errors


def _sampler_pruner_errors(spec: StudySpec) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    several = len(spec.objectives) > 1
    if several and spec.pruner.name != "none":
        errors.append(
            _error(
                ["pruner", "name"],
                "Optuna cannot prune a multi-objective study: use pruner 'none'",
            )
        )
    if several and spec.sampler.name == "cmaes":
        errors.append(
            _error(
                ["sampler", "name"],
                "the cmaes sampler handles a single objective only: use tpe, nsga2 or gp",
            )
        )
    if spec.sampler.name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        errors.append(
            _error(
                ["sampler", "name"],
                "the cmaes sampler needs the 'cmaes' package, which this server lacks",
            )
        )
    if spec.sampler.name == "grid":
        if not spec.search_space:
            errors.append(_error(["search_space"], "the grid sampler needs a search space"))
        for key, param in spec.search_space.items():
            if isinstance(param, FloatParam) and param.step is None:
                errors.append(
                    _error(
                        ["search_space", key],
                        "the grid sampler needs a step for a float param (or use categorical)",
                    )
                )
        size = grid_size(spec)
        if size > MAX_GRID_SIZE:
            errors.append(
                _error(
                    ["search_space"],
                    f"the grid has {size} combinations; at most {MAX_GRID_SIZE}",
                )
            )
    return errors
