"""The ``studies`` table."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow

STUDY_STATUSES = ("queued", "running", "paused", "completed", "cancelled", "failed")
ACTIVE_STATUSES = ("queued", "running")
FINISHED_STATUSES = ("completed", "cancelled", "failed")


class Study(Base):
    """A study: its spec (as submitted, normalised), owner, status and trial-number counter.

    ``pk`` orders and paginates (monotonic); ``id`` is the opaque public identifier.
    """

    __tablename__ = "studies"
    __table_args__ = (
        # One study per (owner, Idempotency-Key): concurrent retries resolve to one row.
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_studies_owner_pk", "owner", "pk"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    owner: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    # Next trial number to hand out: numbers are never reused, even across restarts.
    next_number: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
