"""Routes of /api/v1/studies/{id}/events, /importance and /curves: thin; logic in
``service.events`` and ``service.insights.service``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.deps import DbDep, OwnedStudy, SettingsDep, invalid_query
from service.events import EventBroker, sse_stream
from service.insights import service
from service.studies.models import Study
from service.studies.spec import StudySpec

router = APIRouter(prefix="/api/v1/studies/{study_id}", tags=["insights"])


class ImportanceOut(BaseModel):
    importances: dict[str, float] = Field(description="parameter -> importance (sums to 1)")
    evaluator: str
    objective: str = Field(description="the objective metric the importances explain")
    n_trials: int = Field(description="complete trials used")
    message: str | None = Field(description="why the importances are empty, when they are")


class CurveOut(BaseModel):
    number: int
    state: str
    points: list[tuple[int, float]] = Field(description="[epoch, value] pairs")


class CurvePage(BaseModel):
    metric: str
    items: list[CurveOut]
    next_after: int | None = Field(description="pass as ?after= for the next page")


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "events trial_started, trial_report, trial_finished, trial_retry, "
            "study (the stream ends after a finished study's event), resync (the reader fell "
            "behind: re-read the trials); a comment line every ~15 s keeps it open",
        },
        404: {"description": "no such study"},
    },
)
async def study_events(request: Request, study: OwnedStudy) -> StreamingResponse:
    """Server-sent events of the study as its trials start, report and finish."""
    broker: EventBroker = request.app.state.events
    db = request.app.state.db
    pk = study.pk
    # Subscribe before reading the status: an event in between is queued, not lost.
    sub = broker.subscribe(study.id)

    def read_status() -> str | None:
        with db.read() as session:
            status: str | None = session.execute(
                select(Study.status).where(Study.pk == pk)
            ).scalar_one_or_none()
            return status

    async def status() -> str | None:
        return await run_in_threadpool(read_status)

    return StreamingResponse(
        sse_stream(broker, sub, status),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/importance",
    response_model=ImportanceOut,
    responses={404: {"description": "no such study"}},
)
def importance(
    db: DbDep,
    study: OwnedStudy,
    evaluator: Annotated[str, Query(description=" | ".join(service.EVALUATORS))] = "fanova",
    objective: Annotated[int, Query(ge=0, description="index of the objective")] = 0,
) -> ImportanceOut:
    """Parameter importances (Optuna's evaluators) over the study's complete trials."""
    errors = {}
    if evaluator not in service.EVALUATORS:
        errors["evaluator"] = f"must be one of {list(service.EVALUATORS)}"
    n_objectives = len(StudySpec.model_validate(study.spec).objectives)
    if objective >= n_objectives:
        errors["objective"] = f"the study has {n_objectives} objective(s)"
    if errors:
        raise invalid_query(**errors)
    with db.read() as session:
        result = service.param_importances(session, study, evaluator=evaluator, objective=objective)
    return ImportanceOut(**result.__dict__)


@router.get("/curves", response_model=CurvePage, responses={404: {"description": "no such study"}})
def curves(
    db: DbDep,
    study: OwnedStudy,
    settings: SettingsDep,
    metric: Annotated[str | None, Query(max_length=200, description="default: objective")] = None,
    after: Annotated[int | None, Query(ge=-1, description="only trials numbered above")] = None,
    limit: Annotated[int, Query(ge=1)] = 500,
) -> Any:
    """One metric's per-epoch values for a page of trials (intermediate-values charts)."""
    name = metric or StudySpec.model_validate(study.spec).objectives[0].metric
    with db.read() as session:
        items, next_after = service.curves(
            session, study, metric=name, after=after, limit=min(limit, settings.max_page_size)
        )
    return CurvePage(
        metric=name,
        items=[CurveOut(number=c.number, state=c.state, points=c.points) for c in items],
        next_after=next_after,
    )
