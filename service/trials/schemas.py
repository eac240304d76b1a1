"""Trial shapes of API v1 (DESIGN.md 3a); field names are a contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.trials.models import Trial


class TrialItem(BaseModel):
    number: int
    state: str = Field(description="waiting | running | complete | pruned | failed | cancelled")
    params: dict[str, Any]
    value: float | None = Field(description="objective value; a pruned trial's last reported")
    values: list[float | None] | None = Field(None, description="all objectives' values")
    metrics: dict[str, Any] | None = Field(description="final metrics (or last epoch's)")
    attempts: int
    source: str = Field(description="sampler | enqueued")
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, trial: Trial) -> TrialItem:
        return cls(
            number=trial.number,
            state=trial.state,
            params=trial.params,
            value=trial.value,
            values=trial.values,
            metrics=trial.metrics,
            attempts=trial.attempts,
            source=trial.source,
            started_at=trial.started_at,
            finished_at=trial.finished_at,
        )


class TrialDetail(TrialItem):
    intermediate: list[dict[str, Any]] = Field(description="per-epoch metrics: {epoch, ...}")
    error: str | None = Field(description="traceback of the last failed attempt")
    env: dict[str, Any] | None = Field(description="where and with what it ran")


class TrialPage(BaseModel):
    items: list[TrialItem]
    next_after: int | None = Field(description="pass as ?after= for the next page")
