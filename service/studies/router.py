"""Routes of /api/v1/studies: thin; the logic is in ``service.studies.service``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from service.deps import DbDep, OwnedStudy, OwnerDep, SettingsDep
from service.studies import service
from service.studies.models import STUDY_STATUSES
from service.studies.schemas import StudyOut, StudyPage
from service.studies.spec import StudySpec, semantic_errors

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])

EXAMPLE_SPEC: dict[str, Any] = {
    "name": "digits-noisy-tsam",
    "task": {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 20,
        "batch_size": 64,
        "label_noise": 0.3,
        "seed": 0,
    },
    "optimizer": {
        "method": "tsam",
        "base": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "t": 1.0,
        "rho": 0.05,
        "samples": 3,
    },
    "search_space": {
        "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
        "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "samples": {"type": "int", "low": 1, "high": 8},
    },
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median", "n_warmup_steps": 3},
    "budget": {"n_trials": 32, "max_parallel": 2, "timeout_s": 3600},
    "resources": {"cpus": 1, "gpus": 0},
}


def _summary(db: DbDep, study: Any) -> StudyOut:
    with db.read() as session:
        return StudyOut.of(service.summarize(session, [study])[0])


@router.post(
    "",
    status_code=201,
    response_model=StudyOut,
    responses={
        200: {"description": "replay of an Idempotency-Key, or validate_only: the normalized spec"},
        422: {"description": "invalid spec; `detail` lists each error with its field path"},
    },
)
def create_study(
    request: Request,
    response: Response,
    db: DbDep,
    owner: OwnerDep,
    spec: Annotated[StudySpec, Body(openapi_examples={"digits": {"value": EXAMPLE_SPEC}})],
    validate_only: Annotated[bool, Query(description="validate, store nothing")] = False,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """Create a study from a spec. The body is the bare spec (see the schema and example)."""
    capacity = request.app.state.scheduler.executor.capacity()
    errors = semantic_errors(
        spec, max_node_cpus=capacity.max_node_cpus, max_node_gpus=capacity.max_node_gpus
    )
    if errors:
        detail = [{**e, "loc": ["body", *e["loc"]]} for e in errors]
        raise HTTPException(422, detail)
    if validate_only:
        return JSONResponse(spec.model_dump(mode="json"), status_code=200)
    study, created = service.create_study(
        db, owner=owner, spec=spec, idempotency_key=idempotency_key
    )
    if created:
        request.app.state.scheduler.wake()
    else:
        response.status_code = 200
    return _summary(db, study)


@router.get("", response_model=StudyPage)
def list_studies(
    db: DbDep,
    owner: OwnerDep,
    settings: SettingsDep,
    status: Annotated[str | None, Query(description=" | ".join(STUDY_STATUSES))] = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: str | None = None,
) -> StudyPage:
    """The caller's studies, newest first."""
    if status is not None and status not in STUDY_STATUSES:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["query", "status"],
                    "msg": f"must be one of {list(STUDY_STATUSES)}",
                    "type": "value_error",
                }
            ],
        )
    with db.read() as session:
        try:
            studies, next_cursor = service.list_studies(
                session,
                owner=owner,
                status=status,
                limit=min(limit, settings.max_page_size),
                cursor=cursor,
            )
        except ValueError:
            raise HTTPException(
                422, [{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}]
            ) from None
        items = [StudyOut.of(s) for s in service.summarize(session, studies)]
    return StudyPage(items=items, next_cursor=next_cursor)


@router.get(
    "/{study_id}", response_model=StudyOut, responses={404: {"description": "no such study"}}
)
def get_study(db: DbDep, study: OwnedStudy) -> StudyOut:
    """One study: status, spec, trial counts by state, best trial."""
    return _summary(db, study)
