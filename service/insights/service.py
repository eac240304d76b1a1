"""Insight logic: parameter importances and learning curves of a study's stored trials.

Importances use Optuna's evaluators on an in-memory Optuna study rebuilt from our tables
(the tables are the truth; see :mod:`service.search`). They are cached per study, evaluator,
objective and set of complete trials, so a dashboard asking again after every event costs
one count query until a trial completes.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import optuna
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import search
from service.studies.models import Study
from service.studies.spec import StudySpec
from service.trials.models import Trial, TrialMetric

Evaluator = Literal["fanova", "mean_decrease_impurity", "ped_anova"]
EVALUATORS: tuple[str, ...] = ("fanova", "mean_decrease_impurity", "ped_anova")
MIN_TRIALS = 2
_CACHE_SIZE = 128


@dataclass(frozen=True)
class Importances:
    """Normalised importances (summing to 1) by parameter, most important first."""

    importances: dict[str, float]
    evaluator: str
    objective: str
    n_trials: int
    message: str | None = None


_cache: OrderedDict[tuple[Any, ...], Importances] = OrderedDict()
_cache_lock = threading.Lock()


def build_evaluator(name: str) -> optuna.importance.BaseImportanceEvaluator:
    """Optuna's evaluator called ``name``, seeded where it takes a seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "fanova":
            return optuna.importance.FanovaImportanceEvaluator(seed=0)
        if name == "mean_decrease_impurity":
            return optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        if name == "ped_anova":
            return optuna.importance.PedAnovaImportanceEvaluator()
    raise ValueError(f"unknown evaluator {name!r}; known: {', '.join(EVALUATORS)}")


def param_importances(
    session: Session, study: Study, *, evaluator: str = "fanova", objective: int = 0
) -> Importances:
    """Importances of the searched parameters for objective number ``objective``, from the
    study's complete trials. Empty (with a message) below two complete trials, without
    searched parameters, or when the evaluator cannot rank them (e.g. every trial has the
    same params)."""
    spec = StudySpec.model_validate(study.spec)
    objectives = spec.objectives
    if not 0 <= objective < len(objectives):
        raise ValueError(f"objective must be in 0..{len(objectives) - 1}, got {objective}")
    build_evaluator(evaluator)  # reject an unknown name before touching the database
    name = objectives[objective].metric
    count, last = session.execute(
        select(func.count(), func.max(Trial.number)).where(
            Trial.study_pk == study.pk, Trial.state == "complete"
        )
    ).one()
    n = int(count)
    if not spec.search_space:
        return Importances({}, evaluator, name, n, "the study searches no parameters")
    if n < MIN_TRIALS:
        return Importances(
            {}, evaluator, name, n, f"needs at least {MIN_TRIALS} complete trials, has {n}"
        )
    key = (study.pk, evaluator, objective, n, last)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    rows = list(
        session.execute(
            select(Trial.params, Trial.values, Trial.value).where(
                Trial.study_pk == study.pk, Trial.state == "complete"
            )
        ).all()
    )
    result = _compute(spec, rows, evaluator, objective)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def _compute(spec: StudySpec, rows: Sequence[Any], evaluator: str, objective: int) -> Importances:
    name = spec.objectives[objective].metric
    dists = search.distributions(spec)
    ostudy = search.create_optuna_study(spec)
    frozen = []
    for params, values, value in rows:
        vals = list(values) if values else ([value] if value is not None else [])
        if len(vals) != len(spec.objectives) or not all(_finite(v) for v in vals):
            continue
        kept = {k: v for k, v in (params or {}).items() if k in dists and _fits(dists[k], v)}
        frozen.append(
            optuna.trial.create_trial(
                params=kept,
                distributions={k: dists[k] for k in kept},
                values=[float(v) for v in vals],
                state=optuna.trial.TrialState.COMPLETE,
            )
        )
    if len(frozen) < MIN_TRIALS:
        return Importances(
            {}, evaluator, name, len(frozen), f"needs at least {MIN_TRIALS} complete trials"
        )
    ostudy.add_trials(frozen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(
                ostudy,
                evaluator=build_evaluator(evaluator),
                target=lambda t: t.values[objective],
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return Importances({}, evaluator, name, len(frozen), f"cannot rank the parameters: {err}")
    importances = {k: float(v) for k, v in raw.items() if _finite(v)}
    message = None if importances else "no parameter is searched in every complete trial"
    return Importances(importances, evaluator, name, len(frozen), message)


def _finite(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fits(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Curve:
    number: int
    state: str
    points: list[tuple[int, float]]


def curves(
    session: Session, study: Study, *, metric: str, after: int | None, limit: int
) -> tuple[list[Curve], int | None]:
    """One metric's per-epoch values of a page of trials (by number, above ``after``): what
    the intermediate-values chart needs, without every trial's every metric."""
    query = select(Trial.pk, Trial.number, Trial.state).where(Trial.study_pk == study.pk)
    if after is not None:
        query = query.where(Trial.number > after)
    trials = list(session.execute(query.order_by(Trial.number).limit(limit + 1)).all())
    page = trials[:limit]
    points: dict[int, list[tuple[int, float]]] = {pk: [] for pk, _, _ in page}
    if page:
        rows = session.execute(
            select(TrialMetric.trial_pk, TrialMetric.epoch, TrialMetric.metrics)
            .where(TrialMetric.trial_pk.in_(list(points)))
            .order_by(TrialMetric.trial_pk, TrialMetric.epoch)
        )
        for pk, epoch, metrics in rows:
            value = (metrics or {}).get(metric)
            if _finite(value):
                points[pk].append((int(epoch), float(value)))
    out = [Curve(number, state, points[pk]) for pk, number, state in page]
    return out, (page[-1][1] if len(trials) > limit else None)
