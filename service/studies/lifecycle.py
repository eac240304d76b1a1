"""Study lifecycle: the verbs (pause, resume, cancel, delete), budget and priority edits, and
enqueued trials (DESIGN.md 3 and 3a).

Each function owns its transaction and takes the caller's study id and owner, so another
owner's study is a :class:`~service.studies.service.StudyNotFound` (a 404). An illegal
transition is a :class:`Conflict` (a 409); bad input an :class:`InvalidInput` carrying
FastAPI-style errors located relative to the request body (a 422).

What each status means to the scheduler: it only starts trials of ``queued``/``running``
studies, so a ``paused`` study starts nothing while its running trials finish and are
recorded; its ``_enforce_limits`` cancels the running trials of a ``cancelled`` study and
records them ``cancelled``. The verbs are idempotent: pausing a paused study, resuming a
running one or cancelling a cancelled one changes nothing and is not an error.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db import Database, utcnow
from service.search import trial_config
from service.studies.models import ACTIVE_STATUSES, FINISHED_STATUSES, Study
from service.studies.service import StudyNotFound
from service.studies.spec import SEARCHABLE_KEYS, StudySpec, _config_error, _section_error
from service.trials import service as trial_service
from service.trials.models import Trial, TrialMetric


class Conflict(RuntimeError):
    """The study's status does not allow the operation (a 409)."""


class InvalidInput(ValueError):
    """Errors FastAPI style, ``[{"loc": [...], "msg", "type"}]`` (a 422)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e["msg"]) for e in errors))
        self.errors = errors


class BudgetPatch(BaseModel):
    """The budget fields a running study may change; omitted ones keep their value."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int | None = Field(None, ge=1, le=10_000, description="Trials to make in all.")
    max_parallel: int | None = Field(None, ge=1, le=256, description="Trials running at once.")
    timeout_s: float | None = Field(
        None, gt=0.0, allow_inf_nan=False, description="Wall-clock limit of the study (null: none)."
    )
    trial_timeout_s: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="Wall-clock limit of one trial attempt (null: none).",
    )
    max_failures: int | None = Field(None, ge=1, le=10_000, description="Failures that fail it.")


class StudyPatch(BaseModel):
    """Body of ``PATCH /api/v1/studies/{id}``."""

    model_config = ConfigDict(extra="forbid")

    budget: BudgetPatch | None = None
    priority: int | None = Field(None, ge=-1000, le=1000, description="Higher runs first.")


class EnqueueIn(BaseModel):
    """Body of ``POST /api/v1/studies/{id}/trials``: a trial with fixed parameters."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(
        max_length=64,
        description="Hyperparameters of the trial (searchable keys), e.g. "
        '{"method": "sam", "rho": 0.05}; the rest comes from the study\'s task and optimizer.',
    )


def _locked(session: Session, owner: str, study_id: str) -> Study:
    """The study, row-locked on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises)."""
    study = session.execute(
        select(Study).where(Study.owner == owner, Study.id == study_id).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        raise StudyNotFound(study_id)
    return study


def pause(db: Database, *, owner: str, study_id: str) -> Study:
    """No new trials start; the running ones finish and are recorded."""
    with db.write() as session:
        study = _locked(session, owner, study_id)
        if study.status in ACTIVE_STATUSES:
            study.status = "paused"
        elif study.status != "paused":
            raise Conflict(
                f"study {study_id!r} is {study.status}: only a queued or running one pauses"
            )
    return study


def resume(db: Database, *, owner: str, study_id: str) -> Study:
    """Back to ``running`` (``queued`` if no trial ever started)."""
    with db.write() as session:
        study = _locked(session, owner, study_id)
        if study.status == "paused":
            study.status = "running" if study.started_at is not None else "queued"
        elif study.status not in ACTIVE_STATUSES:
            raise Conflict(f"study {study_id!r} is {study.status}: only a paused one resumes")
    return study


def cancel(db: Database, *, owner: str, study_id: str) -> Study:
    """Status ``cancelled``; waiting trials become ``cancelled`` now, running ones when the
    scheduler has stopped them."""
    with db.write() as session:
        study = _locked(session, owner, study_id)
        if study.status in (*ACTIVE_STATUSES, "paused"):
            study.status, study.finished_at = "cancelled", utcnow()
            session.execute(
                update(Trial)
                .where(Trial.study_pk == study.pk, Trial.state == "waiting")
                .values(state="cancelled", finished_at=utcnow())
            )
        elif study.status != "cancelled":
            raise Conflict(f"study {study_id!r} is {study.status}: it cannot be cancelled")
    return study


def delete_study(db: Database, *, owner: str, study_id: str) -> None:
    """Remove a finished study with its trials and their metrics."""
    with db.write() as session:
        study = _locked(session, owner, study_id)
        if study.status not in FINISHED_STATUSES:
            raise Conflict(
                f"study {study_id!r} is {study.status}: only a completed, cancelled or failed "
                "study can be deleted (cancel it first)"
            )
        trial_pks = select(Trial.pk).where(Trial.study_pk == study.pk)
        running = session.execute(
            select(func.count())
            .select_from(Trial)
            .where(Trial.study_pk == study.pk, Trial.state == "running")
        ).scalar_one()
        if running:
            raise Conflict(
                f"study {study_id!r} still has {running} trial(s) stopping; retry shortly"
            )
        session.execute(delete(TrialMetric).where(TrialMetric.trial_pk.in_(trial_pks)))
        session.execute(delete(Trial).where(Trial.study_pk == study.pk))
        session.execute(delete(Study).where(Study.pk == study.pk))


def patch(db: Database, *, owner: str, study_id: str, changes: StudyPatch) -> Study:
    """Change budget fields and/or the priority of an unfinished study."""
    with db.write() as session:
        study = _locked(session, owner, study_id)
        if study.status in FINISHED_STATUSES:
            raise Conflict(f"study {study_id!r} is {study.status}: its budget is final")
        if changes.budget is not None:
            edits = changes.budget.model_dump(exclude_unset=True)
            n_trials = edits.get("n_trials")
            if n_trials is not None and n_trials < study.next_number:
                raise InvalidInput(
                    [
                        {
                            "loc": ["body", "budget", "n_trials"],
                            "msg": f"n_trials ({n_trials}) is below the {study.next_number} "
                            "trials the study already made",
                            "type": "value_error",
                        }
                    ]
                )
            for key in ("n_trials", "max_parallel", "max_failures"):
                if key in edits and edits[key] is None:
                    raise InvalidInput(
                        [
                            {
                                "loc": ["body", "budget", key],
                                "msg": f"{key} cannot be null",
                                "type": "value_error",
                            }
                        ]
                    )
            spec = dict(study.spec)
            spec["budget"] = {**spec.get("budget", {}), **edits}
            try:
                normalized = StudySpec.model_validate(spec)
            except ValidationError as err:  # pragma: no cover - BudgetPatch checks the same
                raise InvalidInput(
                    [
                        {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                        for e in err.errors()
                    ]
                ) from err
            study.spec = normalized.model_dump(mode="json")
        if changes.priority is not None:
            study.priority = changes.priority
    return study


def enqueue(db: Database, *, owner: str, study_id: str, params: dict[str, Any]) -> Trial:
    """A ``waiting`` trial with ``params`` (source ``enqueued``); the scheduler starts waiting
    trials before it asks the sampler for new ones. It takes the study's next number and
    counts towards ``n_trials``."""
    with db.write() as session:
        study = _locked(session, owner, study_id)
        if study.status in FINISHED_STATUSES:
            raise Conflict(f"study {study_id!r} is {study.status}: no more trials run in it")
        spec = StudySpec.model_validate(study.spec)
        errors = param_errors(spec, params)
        if errors:
            raise InvalidInput(errors)
        if study.next_number >= spec.budget.n_trials:
            raise Conflict(
                f"study {study_id!r} already made its n_trials={spec.budget.n_trials} trials: "
                "raise budget.n_trials first"
            )
        return trial_service.create_trial(session, study=study, params=params, source="enqueued")


def param_errors(spec: StudySpec, params: dict[str, Any]) -> list[dict[str, Any]]:
    """What is wrong with fixed trial ``params``: a key that is not a searchable
    hyperparameter, a value its field rejects, or a TrainConfig the merge would not make."""
    errors: list[dict[str, Any]] = []
    for key, value in params.items():
        loc: list[str | int] = ["body", "params", key]
        if key not in SEARCHABLE_KEYS:
            msg = f"{key!r} is not a searchable hyperparameter ({', '.join(SEARCHABLE_KEYS)})"
            errors.append({"loc": loc, "msg": msg, "type": "value_error"})
            continue
        if isinstance(value, float) and not math.isfinite(value):
            msg = f"{key} must be a finite number (t takes the string 'inf')"
            errors.append({"loc": loc, "msg": msg, "type": "value_error"})
            continue
        problem = _section_error(spec, key, value)
        if problem is not None:
            errors.append(
                {"loc": loc, "msg": f"{key} = {value!r}: {problem}", "type": "value_error"}
            )
    if not errors:
        problem = _config_error(trial_config(spec, params))
        if problem is not None:
            errors.append({"loc": ["body", "params"], "msg": problem, "type": "value_error"})
    return errors
