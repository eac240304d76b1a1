"""Optuna glue: samplers, pruners, the define-by-run search space and trial configs.

Optuna is the brain, our database the store. A study runs in an in-memory Optuna study
(:func:`create_optuna_study`); after a restart it is rebuilt from the stored trials with
``optuna.trial.create_trial(params=..., distributions={k: distributions(spec)[k] for k in
params}, values=...)`` and ``study.add_trials``. The scheduler drives it with ask/tell:
``trial = study.ask(); params = suggest_params(trial, spec)``, runs
``TrainConfig.from_dict(trial_config(spec, params))``, and tells
``objective_values(spec, metrics)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, GridSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from service.studies.spec import (
    METHOD_KEYS,
    SAMPLER_KEYS,
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    StudySpec,
    fixed_config,
)

# Optuna logs every trial at INFO; the service keeps its own records.
optuna.logging.set_verbosity(optuna.logging.WARNING)

GridValue = str | int | float | bool


class AskTellGridSampler(GridSampler):
    """Optuna's ``GridSampler``, fit for ask/tell over a conditional space and for rebuilds.

    * Optuna's version calls ``study.stop()`` once the grid is exhausted, which raises outside
      ``study.optimize``; here the scheduler's budget ends the study, and an ask past the grid
      repeats a point.
    * Optuna's version finds visited points by the ``grid_id`` it stamps on each trial, which trials
      rebuilt from our database do not carry, and it tells points apart by every axis, even one
      the trial's method ignores (``erm`` with ``t = 1`` and with ``t = 5`` is one run). Here a
      point counts as visited when a trial (stamped, rebuilt or enqueued) has the same values on
      the keys that point actually uses, and the next trial takes the first point not visited,
      in the grid's seeded order.
    """

    def __init__(self, spec: StudySpec) -> None:
        super().__init__(grid_values(spec), seed=spec.sampler.seed)
        self._spec = spec
        self._point_keys = [
            self._key(self._point(grid_id)) for grid_id in range(self._n_min_trials)
        ]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        visited: set[tuple[tuple[str, Any], ...]] = set()
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number:
                continue
            attrs = other.system_attrs
            if "grid_id" in attrs and self._same_search_space(attrs.get("search_space", {})):
                visited.add(self._point_keys[attrs["grid_id"]])
            elif other.params:
                visited.add(self._key(other.params))
            elif isinstance(attrs.get("fixed_params"), dict):
                visited.add(self._key(attrs["fixed_params"]))
        grid_id = next((i for i, key in enumerate(self._point_keys) if key not in visited), 0)
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None

    def _point(self, grid_id: int) -> dict[str, Any]:
        return dict(zip(self._param_names, self._all_grids[grid_id], strict=True))

    def _key(self, params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(active_params(self._spec, params).items()))


def create_optuna_study(spec: StudySpec) -> optuna.Study:
    """A fresh in-memory Optuna study for ``spec``: its directions, sampler and pruner."""
    return optuna.create_study(
        storage=None,
        sampler=build_sampler(spec),
        pruner=build_pruner(spec),
        study_name=spec.name,
        directions=[objective.direction for objective in spec.objectives],
    )


def build_sampler(spec: StudySpec) -> BaseSampler:
    """The spec's Optuna sampler, seeded by ``sampler.seed``.

    ``n_startup_trials`` reaches the samplers that have a random start-up phase (tpe, cmaes,
    gp); Optuna's default applies when it is None.
    """
    cfg = spec.sampler
    seed = cfg.seed
    startup: dict[str, Any] = (
        {} if cfg.n_startup_trials is None else {"n_startup_trials": cfg.n_startup_trials}
    )
    # A conditional space (method-specific keys) is sampled partly independently by design;
    # Optuna's per-trial warning about it would only fill the service log.
    quiet: dict[str, Any] = {"warn_independent_sampling": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        match cfg.name:
            case "tpe":
                return optuna.samplers.TPESampler(seed=seed, **startup)
            case "random":
                return optuna.samplers.RandomSampler(seed=seed)
            case "grid":
                return AskTellGridSampler(spec)
            case "cmaes":
                return optuna.samplers.CmaEsSampler(seed=seed, **startup, **quiet)
            case "gp":
                return optuna.samplers.GPSampler(seed=seed, **startup, **quiet)
            case "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed)
            case "qmc":
                return optuna.samplers.QMCSampler(seed=seed, **quiet)
    raise ValueError(f"unknown sampler {cfg.name!r}")  # pragma: no cover - Literal-checked


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's Optuna pruner (``none`` is Optuna's ``NopPruner``)."""
    cfg = spec.pruner
    match cfg.name:
        case "none":
            return optuna.pruners.NopPruner()
        case "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=cfg.n_startup_trials,
                n_warmup_steps=cfg.n_warmup_steps,
                interval_steps=cfg.interval_steps,
            )
        case "percentile":
            return optuna.pruners.PercentilePruner(
                cfg.percentile,
                n_startup_trials=cfg.n_startup_trials,
                n_warmup_steps=cfg.n_warmup_steps,
                interval_steps=cfg.interval_steps,
            )
        case "hyperband":
            return optuna.pruners.HyperbandPruner(
                # Optuna's HyperbandPruner takes no "auto" minimum; its default is 1.
                min_resource=1 if cfg.min_resource == "auto" else cfg.min_resource,
                max_resource=cfg.max_resource,
                reduction_factor=cfg.reduction_factor,
            )
        case "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=cfg.min_resource,
                reduction_factor=cfg.reduction_factor,
                min_early_stopping_rate=cfg.min_early_stopping_rate,
            )
    raise ValueError(f"unknown pruner {cfg.name!r}")  # pragma: no cover - Literal-checked


def grid_values(spec: StudySpec) -> dict[str, list[GridValue]]:
    """The grid sampler's axes: every value of every search-space param.

    Categorical: the choices; int: ``low..high`` by ``step`` (default 1); float: ``low..high``
    by ``step``, computed in decimal as Optuna does so every point lies on its distribution.
    A float param without step has no grid (:func:`semantic_errors` rejects it).
    """
    return {key: _axis(key, param) for key, param in spec.search_space.items()}


def _axis(key: str, param: Param) -> list[GridValue]:
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step or 1))
    if param.step is None:
        raise ValueError(f"search_space.{key}: the grid sampler needs a step for a float param")
    low, step = Decimal(str(param.low)), Decimal(str(param.step))
    count = int((Decimal(str(param.high)) - low) // step) + 1
    return [float(low + i * step) for i in range(count)]


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every search-space key, the same ones
    :func:`suggest_params` suggests from (so stored trials can be rebuilt)."""
    return {key: _distribution(param) for key, param in spec.search_space.items()}


def _distribution(param: Param) -> BaseDistribution:
    if isinstance(param, FloatParam):
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step or 1)
    return CategoricalDistribution(param.choices)


def suggestion_order(spec: StudySpec) -> list[str]:
    """The search-space keys in the order they are suggested: ``method`` first, then
    ``sampler`` (the keys the others depend on), then the rest in the spec's order."""
    first = [key for key in ("method", "sampler") if key in spec.search_space]
    return first + [key for key in spec.search_space if key not in first]


def is_active(spec: StudySpec, key: str, chosen: Mapping[str, Any]) -> bool:
    """Whether a trial that has chosen ``chosen`` so far uses the searched ``key``: not when
    its method does not (``METHOD_KEYS``), nor an hmc-only key (``SAMPLER_KEYS``) when its
    TSAM sampler is not ``hmc``."""
    method = chosen.get("method", spec.optimizer.method)
    sampler = chosen.get("sampler", spec.optimizer.sampler)
    if key in METHOD_KEYS and method not in METHOD_KEYS[key]:
        return False
    return not (key in SAMPLER_KEYS and sampler not in SAMPLER_KEYS[key])


def active_params(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``params`` a trial with those values actually uses."""
    chosen: dict[str, Any] = {}
    for key in suggestion_order(spec):
        if key in params and is_active(spec, key, chosen):
            chosen[key] = params[key]
    return chosen


def optuna_params(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a trial's ``params`` Optuna can be told: searched keys the trial uses (given
    its own ``method``/``sampler``, searched or not) whose values lie in their distribution.

    A sampler trial's params are exactly these. A fixed (enqueued) trial may set keys outside
    the search space (``method: sam`` in a TSAM-only study) or values outside a range; those
    run as given but stay unknown to Optuna, which sees the trial over the keys it shares with
    the space -- and never a key the trial does not use, which it would attribute to it.
    """
    dists = distributions(spec)
    chosen = {k: params[k] for k in ("method", "sampler") if k in params}
    out: dict[str, Any] = {}
    for key in suggestion_order(spec):
        if key not in params or not is_active(spec, key, chosen):
            continue
        try:
            contained = dists[key]._contains(dists[key].to_internal_repr(params[key]))
        except (ValueError, TypeError):
            contained = False
        if contained:
            out[key] = params[key]
    return out


def suggest_fixed(trial: Trial, spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Suggest exactly :func:`optuna_params` on ``trial`` (enqueued with those values)."""
    fixed = optuna_params(spec, params)
    return {key: _suggest(trial, key, spec.search_space[key]) for key in fixed}


def suggest_params(trial: Trial, spec: StudySpec) -> dict[str, Any]:
    """Ask ``trial`` for the spec's parameters, define-by-run.

    The space is conditional: keys are suggested in :func:`suggestion_order`, and a key the
    trial does not use given what it chose before (:func:`is_active`: ``t`` for an ``erm``
    trial, ``delta`` when the sampler is not ``hmc``) is not suggested, so the trial keeps the
    fixed optimizer value there.
    """
    params: dict[str, Any] = {}
    for key in suggestion_order(spec):
        if is_active(spec, key, params):
            params[key] = _suggest(trial, key, spec.search_space[key])
    return params


def _suggest(trial: Trial, key: str, param: Param) -> Any:
    if isinstance(param, FloatParam):
        return trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return trial.suggest_int(key, param.low, param.high, log=param.log, step=param.step or 1)
    return trial.suggest_categorical(key, param.choices)


def trial_config(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The flat ``TrainConfig`` settings of one trial: the spec's task and optimizer with the
    trial's parameters on top (``data_dir`` left out when None; ``t`` given as "inf" becomes
    ``math.inf``)."""
    flat = fixed_config(spec)
    flat.update(params)
    t = flat.get("t")
    if isinstance(t, str) and t.strip().lower() in ("inf", "infinity"):
        flat["t"] = math.inf
    return flat


def objective_values(spec: StudySpec, metrics: Mapping[str, Any]) -> list[float] | None:
    """The objective value(s) of a trial's metrics, in the spec's objective order; None when
    one is missing or not a finite number (Optuna cannot be told it)."""
    values: list[float] = []
    for objective in spec.objectives:
        value = metrics.get(objective.metric)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        if not math.isfinite(value):
            return None
        values.append(float(value))
    return values
