"""Study shapes of API v1 (DESIGN.md 3a); field names are a contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.studies.service import StudySummary
from service.trials.schemas import TrialItem


class StudyOut(BaseModel):
    id: str
    name: str
    status: str = Field(description="queued | running | paused | completed | cancelled | failed")
    spec: dict[str, Any]
    counts: dict[str, int] = Field(description="number of trials in each state")
    best_trial: TrialItem | None = Field(description="best complete trial (single objective)")
    best_trials: list[TrialItem] = Field(description="Pareto front (or the best trial)")
    priority: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, summary: StudySummary) -> StudyOut:
        s = summary.study
        return cls(
            id=s.id,
            name=s.name,
            status=s.status,
            spec=s.spec,
            counts=summary.counts,
            best_trial=TrialItem.of(summary.best_trial) if summary.best_trial else None,
            best_trials=[TrialItem.of(t) for t in summary.best_trials],
            priority=s.priority,
            error=s.error,
            created_at=s.created_at,
            updated_at=s.updated_at,
            started_at=s.started_at,
            finished_at=s.finished_at,
        )


class StudyPage(BaseModel):
    items: list[StudyOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")
