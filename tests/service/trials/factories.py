"""Studies and trials for the trial-storage tests."""

from typing import Any

from service.db import Database
from service.studies import service as studies
from service.studies.models import Study
from service.studies.spec import StudySpec
from service.trials import service as trials
from service.trials.models import Trial


def make_study(db: Database, key: str | None = None) -> Study:
    study, _ = studies.create_study(db, owner="local", spec=StudySpec(), idempotency_key=key)
    return study


def make_trial(db: Database, study: Study, params: dict[str, Any] | None = None) -> Trial:
    with db.write() as s:
        return trials.create_trial(s, study=study, params=params or {"t": 1.0})
