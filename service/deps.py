"""Shared FastAPI dependencies: the database, the caller's owner id, the caller's study."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.db import Database
from service.settings import Settings
from service.studies.models import Study
from service.studies.service import StudyNotFound, get_study


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def current_owner(request: Request) -> str:
    """Who is calling. With auth off every caller is the default owner; token auth will
    resolve it from the bearer token here, and no query needs to change."""
    settings: Settings = request.app.state.settings
    return settings.default_owner


DbDep = Annotated[Database, Depends(get_db)]
OwnerDep = Annotated[str, Depends(current_owner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def owned_study(study_id: str, db: DbDep, owner: OwnerDep) -> Study:
    """The caller's study ``study_id``, or 404 (also for another owner's study)."""
    with db.read() as session:
        try:
            return get_study(session, owner=owner, study_id=study_id)
        except StudyNotFound:
            raise HTTPException(404, f"study {study_id!r} not found") from None


OwnedStudy = Annotated[Study, Depends(owned_study)]


def invalid_query(**errors: str) -> HTTPException:
    """A 422 naming each bad query parameter the way FastAPI's own validation does
    (``{"loc": ["query", name], "msg": ..., "type": "value_error"}``), so clients read one
    error shape whether pydantic or a route rejected the value."""
    return HTTPException(
        422,
        [
            {"loc": ["query", name], "msg": msg, "type": "value_error"}
            for name, msg in errors.items()
        ],
    )
