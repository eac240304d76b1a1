"""The in-memory Optuna side of a study, and how it is rebuilt from our tables.

Optuna runs in memory per active study (ask/tell); the database is the truth. The first time
the scheduler touches a study after start-up it replays the stored trials into a fresh Optuna
study with ``optuna.trial.create_trial`` + ``add_trials``, intermediate values included, so
samplers and pruners see the same history they saw before a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import search
from service.studies.spec import StudySpec
from service.trials import service as trials
from service.trials.models import Trial

OPTUNA_STATE = {
    "complete": optuna.trial.TrialState.COMPLETE,
    "pruned": optuna.trial.TrialState.PRUNED,
    "failed": optuna.trial.TrialState.FAIL,
    "cancelled": optuna.trial.TrialState.FAIL,
}


@dataclass
class StudyRuntime:
    """One study's Optuna study and its live (asked, not yet told) Optuna trials.

    ``raw_spec`` is the stored spec the runtime was validated from: re-validating the spec with
    pydantic on every scheduler pass would cost more than the pass itself, so it is redone only
    when the stored spec changed (a budget edit).
    """

    spec: StudySpec
    optuna_study: optuna.Study
    study_id: str = ""
    raw_spec: dict[str, Any] = field(default_factory=dict)
    live: dict[int, optuna.trial.Trial] = field(default_factory=dict)

    def refresh(self, spec: dict[str, Any]) -> None:
        """Take the stored ``spec`` as just read (re-validated only if it changed)."""
        if spec != self.raw_spec:
            self.spec = StudySpec.model_validate(spec)
            self.raw_spec = dict(spec)

    def tell(self, number: int, state: str, values: list[float] | None) -> None:
        """Tell Optuna how trial ``number`` ended (a no-op if it is not live here)."""
        otrial = self.live.pop(number, None)
        if otrial is None:
            return
        optuna_state = OPTUNA_STATE[state]
        told = values if optuna_state == optuna.trial.TrialState.COMPLETE else None
        self.optuna_study.tell(otrial, told, state=optuna_state, skip_if_finished=True)

    def ask(self) -> tuple[optuna.trial.Trial, dict[str, Any]]:
        """A new Optuna trial and the params the sampler suggests for it (define-by-run)."""
        otrial = self.optuna_study.ask()
        return otrial, search.suggest_params(otrial, self.spec)

    def abandon(self, asked: list[optuna.trial.Trial]) -> None:
        """Tell Optuna that trials asked for but never started failed: a fill whose write did
        not happen must leave no Optuna trial running forever."""
        for otrial in asked:
            self.optuna_study.tell(otrial, state=optuna.trial.TrialState.FAIL)

    def ask_fixed(self, params: dict[str, Any]) -> optuna.trial.Trial:
        """An Optuna trial fixed to ``params`` (the part of them Optuna can be told:
        :func:`search.optuna_params`), so the sampler learns from an enqueued trial without
        being told values of keys the trial does not use."""
        fixed = search.optuna_params(self.spec, params)
        self.optuna_study.enqueue_trial(fixed, skip_if_exists=False)
        otrial = self.optuna_study.ask()
        search.suggest_fixed(otrial, self.spec, params)
        return otrial


def rebuild(
    session: Session, study_pk: int, study_id: str, raw_spec: dict[str, Any]
) -> StudyRuntime:
    """A runtime for the study with every finished stored trial replayed into Optuna;
    ``raw_spec`` is its stored spec as just read."""
    spec = StudySpec.model_validate(raw_spec)
    ostudy = search.create_optuna_study(spec)
    dists = search.distributions(spec)
    rows = list(
        session.execute(
            select(Trial).where(Trial.study_pk == study_pk).order_by(Trial.number)
        ).scalars()
    )
    curves = trials.intermediate(session, [t.pk for t in rows if t.state in OPTUNA_STATE])
    frozen = []
    for trial in rows:
        state = OPTUNA_STATE.get(trial.state)
        if state is None:
            continue
        params = search.optuna_params(spec, trial.params)
        values = (trial.values or None) if state == optuna.trial.TrialState.COMPLETE else None
        frozen.append(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                values=values,
                state=state,
                intermediate_values=_intermediate_values(curves[trial.pk], spec),
                user_attrs={"number": trial.number},
            )
        )
    ostudy.add_trials(frozen)
    return StudyRuntime(spec, ostudy, study_id, dict(raw_spec))


def _intermediate_values(curve: list[dict[str, Any]], spec: StudySpec) -> dict[int, float]:
    """The single objective's per-epoch values (Optuna's pruners read these)."""
    if len(spec.objectives) != 1:
        return {}
    out = {}
    for row in curve:
        value = row.get(spec.objectives[0].metric)
        if isinstance(value, int | float) and math.isfinite(value):
            out[int(row["epoch"])] = float(value)
    return out
