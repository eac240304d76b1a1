"""Trial persistence: creation, claims, reports and results, each a compare-and-set.

Execution is at least once, recording exactly once. Every write that concerns a running
attempt names its lease token and only applies while the trial is running under that token
(``UPDATE ... WHERE pk = :pk AND state = 'running' AND lease_token = :lease``), so a late
report or result from an attempt that was reaped or cancelled changes nothing, and a second
copy of a result is a no-op. Functions take the caller's session; the caller owns the
transaction (a result, its metrics and the state change commit together). The scheduler's
batched forms of these writes -- a pass's new trials, starts, reports and outcomes in a
statement or two -- are in :mod:`service.trials.batch`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Table,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from service.db import utcnow
from service.studies.models import Study
from service.trials.models import Trial, TrialMetric


def _changed(session: Session, statement: Any) -> int:
    """Rows an UPDATE changed: the compare-and-set's answer."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


def new_lease() -> str:
    return secrets.token_hex(16)


def create_trial(
    session: Session,
    *,
    study: Study,
    params: dict[str, Any],
    source: str = "sampler",
    state: str = "waiting",
) -> Trial:
    """A new trial with the study's next number (numbers are never reused)."""
    number = (
        session.execute(
            update(Study)
            .where(Study.pk == study.pk)
            .values(next_number=Study.next_number + 1)
            .returning(Study.next_number)
        ).scalar_one()
        - 1
    )
    trial = Trial(study_pk=study.pk, number=number, params=params, source=source, state=state)
    session.add(trial)
    session.flush()
    return trial


def claim(session: Session, trial: Trial) -> str | None:
    """Move a waiting trial to running as its next attempt; returns the new lease, or None
    when someone else claimed it first."""
    lease = new_lease()
    now = utcnow()
    done = _changed(
        session,
        update(Trial)
        .where(Trial.pk == trial.pk, Trial.state == "waiting")
        .values(
            state="running",
            lease_token=lease,
            attempts=Trial.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            error=None,
        ),
    )
    if done != 1:
        return None
    session.refresh(trial)
    return lease


def _running(pk: int, lease: str) -> Any:
    return (Trial.pk == pk) & (Trial.state == "running") & (Trial.lease_token == lease)


# A hot write as a prebuilt Core statement on the table: SQLAlchemy then reuses its compiled
# form, and skips the ORM's bulk-update bookkeeping (matching objects in the identity map),
# which cost more than the statement itself. The scheduler's batched writes: batch.py.
_T = cast(Table, Trial.__table__)
_LEASED = (_T.c.pk == bindparam("b_pk")) & (_T.c.state == "running")
_LEASED &= _T.c.lease_token == bindparam("b_lease")
_FINISH = (
    update(_T)
    .where(_LEASED)
    .values(
        state=bindparam("b_state"),
        value=bindparam("b_value"),
        values=bindparam("b_values"),
        metrics=bindparam("b_metrics"),
        error=bindparam("b_error"),
        lease_token=None,
        finished_at=bindparam("b_finished"),
    )
)


def _cas(session: Session, statement: Any, pk: int, lease: str, **params: Any) -> bool:
    """Run a lease compare-and-set; True if the attempt was still running under ``lease``."""
    result = session.execute(statement, {"b_pk": pk, "b_lease": lease, "b_now": utcnow(), **params})
    return cast(CursorResult[Any], result).rowcount == 1


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as stored."""

    state: str  # complete | pruned | failed | cancelled
    value: float | None = None
    values: list[float] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    finished_at: datetime | None = None  # when the attempt ended; None: when it is recorded


def finish(session: Session, pk: int, lease: str, outcome: Outcome) -> bool:
    """Record the attempt's final state; False (and nothing written) if the lease is stale."""
    return _cas(
        session,
        _FINISH,
        pk,
        lease,
        b_state=outcome.state,
        b_value=outcome.value,
        b_values=outcome.values,
        b_metrics=outcome.metrics,
        b_error=outcome.error,
        b_finished=outcome.finished_at or utcnow(),
    )


def release(session: Session, pk: int, lease: str, error: str | None = None) -> bool:
    """Give a running attempt up without ending the trial: it waits for its next attempt."""
    return bool(
        _changed(
            session,
            update(Trial)
            .where(_running(pk, lease))
            .values(state="waiting", lease_token=None, error=error),
        )
    )


def release_all_running(session: Session) -> int:
    """After a restart: every attempt that was running belonged to the dead process."""
    return _changed(
        session,
        update(Trial)
        .where(Trial.state == "running")
        .values(state="waiting", lease_token=None, error="interrupted: the server restarted"),
    )


def counts_by_state(session: Session, study_pks: Sequence[int]) -> dict[int, dict[str, int]]:
    """``{study_pk: {state: n}}`` in one grouped query."""
    out: dict[int, dict[str, int]] = {pk: {} for pk in study_pks}
    if not study_pks:
        return out
    rows = session.execute(
        select(Trial.study_pk, Trial.state, func.count())
        .where(Trial.study_pk.in_(study_pks))
        .group_by(Trial.study_pk, Trial.state)
    )
    for study_pk, state, n in rows:
        out[study_pk][state] = int(n)
    return out


def intermediate(session: Session, trial_pks: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Per-epoch metrics of several trials, ``{trial_pk: [{"epoch": e, **metrics}]}``."""
    out: dict[int, list[dict[str, Any]]] = {pk: [] for pk in trial_pks}
    if not trial_pks:
        return out
    rows = session.execute(
        select(TrialMetric)
        .where(TrialMetric.trial_pk.in_(trial_pks))
        .order_by(TrialMetric.trial_pk, TrialMetric.epoch)
    ).scalars()
    for row in rows:
        out[row.trial_pk].append({"epoch": row.epoch, **row.metrics})
    return out
