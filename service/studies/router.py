"""Routes of /api/v1/studies: thin; the logic is in ``service.studies.service``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from service.deps import DbDep, OwnedStudy, OwnerDep, SettingsDep, invalid_query
from service.studies import lifecycle, service
from service.studies.models import STUDY_STATUSES
from service.studies.schemas import StudyOut, StudyPage
from service.studies.spec import StudySpec, semantic_errors
from service.trials.schemas import TrialItem

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
        raise invalid_query(status=f"must be one of {list(STUDY_STATUSES)}")
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
            raise invalid_query(cursor="invalid cursor") from None
        items = [StudyOut.of(s) for s in service.summarize(session, studies)]
    return StudyPage(items=items, next_cursor=next_cursor)


@router.get(
    "/{study_id}", response_model=StudyOut, responses={404: {"description": "no such study"}}
)
def get_study(db: DbDep, study: OwnedStudy) -> StudyOut:
    """One study: status, spec, trial counts by state, best trial."""
    return _summary(db, study)


# -- lifecycle ---------------------------------------------------------------------------------

LIFECYCLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such study"},
    409: {"description": "the study's status does not allow it"},
}


@contextmanager
def _as_http(study_id: str) -> Iterator[None]:
    """Lifecycle errors as HTTP answers: no such study 404, wrong state 409, bad input 422."""
    try:
        yield
    except service.StudyNotFound:
        raise HTTPException(404, f"study {study_id!r} not found") from None
    except lifecycle.Conflict as err:
        raise HTTPException(409, str(err)) from None
    except lifecycle.InvalidInput as err:
        raise HTTPException(422, err.errors) from None


def _lifecycle(request: Request, db: DbDep, owner: str, study_id: str, verb: Any) -> StudyOut:
    """Run a lifecycle call, map its errors to HTTP, wake the scheduler, answer the study."""
    with _as_http(study_id):
        study = verb(db, owner=owner, study_id=study_id)
    request.app.state.scheduler.wake()
    return _summary(db, study)


@router.post("/{study_id}/pause", response_model=StudyOut, responses=LIFECYCLE_RESPONSES)
def pause_study(request: Request, db: DbDep, owner: OwnerDep, study_id: str) -> StudyOut:
    """Start no new trials; running ones finish. Pausing a paused study changes nothing."""
    return _lifecycle(request, db, owner, study_id, lifecycle.pause)


@router.post("/{study_id}/resume", response_model=StudyOut, responses=LIFECYCLE_RESPONSES)
def resume_study(request: Request, db: DbDep, owner: OwnerDep, study_id: str) -> StudyOut:
    """Continue a paused study."""
    return _lifecycle(request, db, owner, study_id, lifecycle.resume)


@router.post("/{study_id}/cancel", response_model=StudyOut, responses=LIFECYCLE_RESPONSES)
def cancel_study(request: Request, db: DbDep, owner: OwnerDep, study_id: str) -> StudyOut:
    """End the study: waiting trials are cancelled, running ones stopped and stored cancelled."""
    return _lifecycle(request, db, owner, study_id, lifecycle.cancel)


@router.delete("/{study_id}", status_code=204, responses=LIFECYCLE_RESPONSES)
def delete_study(db: DbDep, owner: OwnerDep, study_id: str) -> Response:
    """Remove a finished (completed, cancelled or failed) study and its trials."""
    with _as_http(study_id):
        lifecycle.delete_study(db, owner=owner, study_id=study_id)
    return Response(status_code=204)


@router.patch(
    "/{study_id}",
    response_model=StudyOut,
    responses={**LIFECYCLE_RESPONSES, 422: {"description": "invalid budget or priority"}},
)
def patch_study(
    request: Request, db: DbDep, owner: OwnerDep, study_id: str, changes: lifecycle.StudyPatch
) -> StudyOut:
    """Change budget fields (n_trials, max_parallel, timeout_s, trial_timeout_s, max_failures)
    or the priority of an unfinished study; takes effect at the scheduler's next pass."""

    def verb(db: DbDep, *, owner: str, study_id: str) -> Any:
        return lifecycle.patch(db, owner=owner, study_id=study_id, changes=changes)

    return _lifecycle(request, db, owner, study_id, verb)


@router.post(
    "/{study_id}/trials",
    status_code=201,
    response_model=TrialItem,
    responses={**LIFECYCLE_RESPONSES, 422: {"description": "invalid params"}},
)
def enqueue_trial(
    request: Request, db: DbDep, owner: OwnerDep, study_id: str, body: lifecycle.EnqueueIn
) -> TrialItem:
    """Enqueue a trial with fixed params (e.g. ``{"params": {"method": "sam", "rho": 0.05}}``);
    it runs before new sampler trials and counts towards ``n_trials``."""
    with _as_http(study_id):
        trial = lifecycle.enqueue(db, owner=owner, study_id=study_id, params=body.params)
    request.app.state.scheduler.wake()
    return TrialItem.of(trial)
