"""The ``trials`` and ``trial_metrics`` tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow

TRIAL_STATES = ("waiting", "running", "complete", "pruned", "failed", "cancelled")
FINISHED_STATES = ("complete", "pruned", "failed", "cancelled")


class Trial(Base):
    """One trial: fixed number and params, re-run as new attempts after infrastructure
    failures. A running attempt holds ``lease_token``; results are accepted only under it."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("study_pk", "number"),
        Index("ix_trials_study_pk_state", "study_pk", "state"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.pk", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="waiting")
    params: Mapped[dict[str, Any]]
    source: Mapped[str] = mapped_column(String(16), default="sampler")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    value: Mapped[float | None] = mapped_column(Float)
    values: Mapped[list[Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    env: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TrialMetric(Base):
    """Metrics one trial reported after one epoch (the latest attempt's report wins)."""

    __tablename__ = "trial_metrics"
    __table_args__ = (UniqueConstraint("trial_pk", "epoch"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.pk", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
