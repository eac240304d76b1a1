"""Study logic: create (idempotently), read, list, summarise. Every query is scoped by owner:
another owner's study does not exist (a 404, never a 403)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import Database
from service.studies.models import Study
from service.studies.spec import StudySpec
from service.trials import service as trial_service
from service.trials.models import Trial


class StudyNotFound(LookupError):
    """No study with that id for this owner."""


def new_study_id() -> str:
    return uuid.uuid4().hex[:16]


def create_study(
    db: Database, *, owner: str, spec: StudySpec, idempotency_key: str | None = None
) -> tuple[Study, bool]:
    """Store a study; returns ``(study, created)``. A repeated Idempotency-Key returns the
    first study (``created`` False), also when two requests race: the unique constraint on
    (owner, key) lets exactly one insert win and the loser reads the winner's row."""
    if idempotency_key is not None:
        existing = _by_key(db, owner, idempotency_key)
        if existing is not None:
            return existing, False
    study = Study(
        id=new_study_id(),
        owner=owner,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        status="queued",
        idempotency_key=idempotency_key,
    )
    try:
        with db.write() as session:
            session.add(study)
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = _by_key(db, owner, idempotency_key)
        if existing is None:
            raise
        return existing, False
    return study, True


def _by_key(db: Database, owner: str, key: str) -> Study | None:
    with db.read() as session:
        return session.execute(
            select(Study).where(Study.owner == owner, Study.idempotency_key == key)
        ).scalar_one_or_none()


def get_study(session: Session, *, owner: str, study_id: str) -> Study:
    study = session.execute(
        select(Study).where(Study.owner == owner, Study.id == study_id)
    ).scalar_one_or_none()
    if study is None:
        raise StudyNotFound(study_id)
    return study


def encode_cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(f"s{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The study pk a cursor points below; ValueError for anything we did not issue."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError("invalid cursor") from err
    if not raw.startswith("s") or not raw[1:].isdigit():
        raise ValueError("invalid cursor")
    return int(raw[1:])


def list_studies(
    session: Session, *, owner: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Study], str | None]:
    """Newest first, keyset-paginated on the monotonic pk (stable under inserts)."""
    query = select(Study).where(Study.owner == owner)
    if status is not None:
        query = query.where(Study.status == status)
    if cursor is not None:
        query = query.where(Study.pk < decode_cursor(cursor))
    rows = list(session.execute(query.order_by(Study.pk.desc()).limit(limit + 1)).scalars())
    next_cursor = encode_cursor(rows[limit - 1].pk) if len(rows) > limit else None
    return rows[:limit], next_cursor


@dataclass(frozen=True)
class StudySummary:
    """A study with what its readers want at a glance."""

    study: Study
    counts: dict[str, int]
    best_trial: Trial | None
    best_trials: list[Trial]


def best_trials(session: Session, study: Study) -> tuple[Trial | None, list[Trial]]:
    """The best complete trial (single objective) or the Pareto front (several)."""
    spec = StudySpec.model_validate(study.spec)
    objectives = spec.objectives
    if len(objectives) == 1:
        order = Trial.value.desc() if objectives[0].direction == "maximize" else Trial.value.asc()
        best = session.execute(
            select(Trial)
            .where(Trial.study_pk == study.pk, Trial.state == "complete", Trial.value.is_not(None))
            .order_by(order, Trial.number)
            .limit(1)
        ).scalar_one_or_none()
        return best, [best] if best is not None else []
    complete = list(
        session.execute(
            select(Trial).where(Trial.study_pk == study.pk, Trial.state == "complete")
        ).scalars()
    )
    signs = [1.0 if o.direction == "maximize" else -1.0 for o in objectives]
    scored = [(t, [s * v for s, v in zip(signs, t.values or [], strict=False)]) for t in complete]
    front = [
        t
        for t, a in scored
        if len(a) == len(signs)
        and not any(_dominates(b, a) for u, b in scored if u is not t and len(b) == len(signs))
    ]
    return None, sorted(front, key=lambda t: t.number)


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def summarize(session: Session, studies: list[Study]) -> list[StudySummary]:
    counts = trial_service.counts_by_state(session, [s.pk for s in studies])
    out = []
    for study in studies:
        best, front = best_trials(session, study)
        out.append(StudySummary(study, counts[study.pk], best, front))
    return out
