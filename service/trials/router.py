"""Routes of /api/v1/studies/{id}/trials and the export."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select

from service.deps import DbDep, OwnedStudy, SettingsDep, invalid_query
from service.trials import export
from service.trials import service as trial_service
from service.trials.models import TRIAL_STATES, Trial
from service.trials.schemas import TrialDetail, TrialItem, TrialPage

router = APIRouter(prefix="/api/v1/studies/{study_id}", tags=["trials"])


@router.get("/trials", response_model=TrialPage)
def list_trials(
    db: DbDep,
    study: OwnedStudy,
    settings: SettingsDep,
    state: Annotated[str | None, Query(description=" | ".join(TRIAL_STATES))] = None,
    after: Annotated[
        int | None, Query(ge=-1, description="only trials numbered above this")
    ] = None,
    limit: Annotated[int, Query(ge=1)] = 100,
) -> TrialPage:
    """Trials by number, paginated and incremental (``?after=`` the last number seen)."""
    if state is not None and state not in TRIAL_STATES:
        raise invalid_query(state=f"must be one of {list(TRIAL_STATES)}")
    limit = min(limit, settings.max_page_size)
    query = select(Trial).where(Trial.study_pk == study.pk)
    if state is not None:
        query = query.where(Trial.state == state)
    if after is not None:
        query = query.where(Trial.number > after)
    with db.read() as session:
        rows = list(session.execute(query.order_by(Trial.number).limit(limit + 1)).scalars())
    items = [TrialItem.of(t) for t in rows[:limit]]
    return TrialPage(items=items, next_after=rows[limit - 1].number if len(rows) > limit else None)


@router.get(
    "/trials/{number}",
    response_model=TrialDetail,
    responses={404: {"description": "no such trial"}},
)
def get_trial(db: DbDep, study: OwnedStudy, number: int) -> TrialDetail:
    """One trial with its per-epoch curve, error and where it ran."""
    with db.read() as session:
        trial = session.execute(
            select(Trial).where(Trial.study_pk == study.pk, Trial.number == number)
        ).scalar_one_or_none()
        if trial is None:
            raise HTTPException(404, f"trial {number} of study {study.id!r} not found")
        curve = trial_service.intermediate(session, [trial.pk])[trial.pk]
    return TrialDetail(
        **TrialItem.of(trial).model_dump(), intermediate=curve, error=trial.error, env=trial.env
    )


@router.get(
    "/export",
    response_model=None,
    responses={200: {"content": {"text/csv": {}, "application/json": {}}}},
)
def export_trials(db: DbDep, study: OwnedStudy, format: Literal["csv", "json"] = "csv") -> Response:
    """Every trial of the study, one flat row each."""
    with db.read() as session:
        trials = list(
            session.execute(
                select(Trial).where(Trial.study_pk == study.pk).order_by(Trial.number)
            ).scalars()
        )
    columns, data = export.rows(trials, list(study.spec.get("search_space", {})))
    filename = f"{study.name}-{study.id}"
    if format == "json":
        return JSONResponse(
            data, headers={"Content-Disposition": f'inline; filename="{filename}.json"'}
        )
    return PlainTextResponse(
        export.to_csv(columns, data),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'},
    )
