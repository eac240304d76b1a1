"""Dashboard pages: ``/`` (studies), ``/studies/{id}``, ``/studies/{id}/trials/{number}``.

Pages carry what they show at first paint (rendered here from the same services the API
uses, owner-scoped); the JS then reads the JSON API for charts and live updates.
"""

from __future__ import annotations

import math
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import plotly
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from service.deps import DbDep, OwnerDep
from service.studies import service as studies
from service.studies.models import STUDY_STATUSES
from service.studies.spec import StudySpec, study_methods
from service.trials import service as trial_service
from service.trials.models import FINISHED_STATES, Trial

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
PAGE_SIZE = 50


@lru_cache(maxsize=1)
def plotly_js_path() -> Path:
    """plotly.min.js as the installed ``plotly`` package ships it."""
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the plotly package")
    return path


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC" if value is not None else "—"


def fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


templates.env.filters["time"] = fmt_time
templates.env.filters["num"] = fmt_value


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    return templates.TemplateResponse(request, name, context, status_code=status)


def _not_found(request: Request, what: str) -> Response:
    return _page(request, "error.html", {"title": "Not found", "message": what}, status=404)


def study_view(summary: studies.StudySummary) -> dict[str, Any]:
    """What the pages show of one study at a glance."""
    study = summary.study
    spec = StudySpec.model_validate(study.spec)
    counts = summary.counts
    done = sum(counts.get(s, 0) for s in FINISHED_STATES)
    best = summary.best_trial
    return {
        "id": study.id,
        "name": study.name,
        "status": study.status,
        "error": study.error,
        "done": done,
        "total": spec.budget.n_trials,
        "running": counts.get("running", 0),
        "counts": counts,
        "best": best,
        "front": summary.best_trials,
        "methods": study_methods(spec),
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in spec.objectives],
        "spec": spec,
        "created_at": study.created_at,
        "started_at": study.started_at,
        "finished_at": study.finished_at,
    }


@router.get("/vendor/plotly.min.js")
def plotly_js() -> FileResponse:
    """plotly.js from the installed Python package (no CDN, works offline)."""
    return FileResponse(
        plotly_js_path(),
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/", response_class=HTMLResponse)
def studies_page(
    request: Request,
    db: DbDep,
    owner: OwnerDep,
    status: Annotated[str | None, Query()] = None,
    cursor: Annotated[str | None, Query()] = None,
) -> Response:
    """The caller's studies, newest first, filtered by status."""
    status = status or None
    if status is not None and status not in STUDY_STATUSES:
        return _page(
            request,
            "error.html",
            {"title": "Bad filter", "message": f"unknown status {status!r}"},
            status=422,
        )
    with db.read() as session:
        try:
            rows, next_cursor = studies.list_studies(
                session, owner=owner, status=status, limit=PAGE_SIZE, cursor=cursor
            )
        except ValueError:
            return _page(
                request, "error.html", {"title": "Bad page", "message": "invalid cursor"}, 422
            )
        views = [study_view(s) for s in studies.summarize(session, rows)]
    return _page(
        request,
        "studies.html",
        {
            "studies": views,
            "status": status,
            "statuses": STUDY_STATUSES,
            "next_cursor": next_cursor,
            "cursor": cursor,
        },
    )


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(request: Request, study_id: str, db: DbDep, owner: OwnerDep) -> Response:
    """One study: header, charts and trial table (filled and kept live by study.js)."""
    with db.read() as session:
        try:
            study = studies.get_study(session, owner=owner, study_id=study_id)
        except studies.StudyNotFound:
            return _not_found(request, f"No study {study_id!r}.")
        view = study_view(studies.summarize(session, [study])[0])
    spec: StudySpec = view["spec"]
    page = {
        "study_id": study.id,
        "status": study.status,
        "objectives": view["objectives"],
        "search_space": {k: v.model_dump(mode="json") for k, v in spec.search_space.items()},
        # In the spec's order (tojson sorts the keys of the mapping above).
        "searched": list(spec.search_space),
        "methods": view["methods"],
        "optimizer": spec.optimizer.model_dump(mode="json"),
        "n_trials": spec.budget.n_trials,
    }
    return _page(request, "study.html", {"s": view, "page": page})


@router.get("/studies/{study_id}/trials/{number}", response_class=HTMLResponse)
def trial_page(
    request: Request, study_id: str, number: int, db: DbDep, owner: OwnerDep
) -> Response:
    """One trial: params, final metrics, per-epoch curves, error, attempts, environment."""
    with db.read() as session:
        try:
            study = studies.get_study(session, owner=owner, study_id=study_id)
        except studies.StudyNotFound:
            return _not_found(request, f"No study {study_id!r}.")
        trial = session.execute(
            select(Trial).where(Trial.study_pk == study.pk, Trial.number == number)
        ).scalar_one_or_none()
        if trial is None:
            return _not_found(request, f"Study {study.name!r} has no trial {number}.")
        curve = trial_service.intermediate(session, [trial.pk])[trial.pk]
    return _page(
        request,
        "trial.html",
        {
            "study": study,
            "trial": trial,
            "curve": curve,
            "page": {
                "study_id": study.id,
                "number": trial.number,
                "state": trial.state,
                "objective": StudySpec.model_validate(study.spec).objectives[0].metric,
            },
        },
    )
