"""Trial persistence: creation, claims, reports and results, each a compare-and-set.

Execution is at least once, recording exactly once. Every write that concerns a running
attempt names its lease token and only applies while the trial is running under that token
(``UPDATE ... WHERE pk = :pk AND state = 'running' AND lease_token = :lease``), so a late
report or result from an attempt that was reaped or cancelled changes nothing, and a second
copy of a result is a no-op. Functions take the caller's session; the caller owns the
transaction (a result, its metrics and the state change commit together).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    DateTime,
    Table,
    bindparam,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
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


def create_running(
    session: Session, *, study_pk: int, params: Sequence[dict[str, Any]]
) -> list[tuple[int, int, str]]:
    """New sampler trials that start at once: ``(pk, number, lease)`` per params, in order.

    The scheduler's fast path: the numbers are reserved with one ``UPDATE ... RETURNING`` and
    each row is inserted already ``running`` as attempt 1 under a fresh lease -- what
    :func:`create_trial` followed by :func:`claim` would do, in two statements (the rows go
    in as one multi-row ``INSERT ... RETURNING``, their pks back in parameter order).
    The caller holds the study row (``FOR UPDATE`` / ``BEGIN IMMEDIATE``).
    """
    if not params:
        return []
    end = session.execute(
        update(_S)
        .where(_S.c.pk == study_pk)
        .values(next_number=_S.c.next_number + len(params))
        .returning(_S.c.next_number)
    ).scalar_one()
    now = utcnow()
    first = end - len(params)
    leases = [new_lease() for _ in params]
    rows = [
        {
            "study_pk": study_pk,
            "number": first + offset,
            "params": trial_params,
            "source": "sampler",
            "state": "running",
            "attempts": 1,
            "lease_token": lease,
            "created_at": now,
            "started_at": now,
            "heartbeat_at": now,
        }
        for offset, (trial_params, lease) in enumerate(zip(params, leases, strict=True))
    ]
    pks = session.execute(_INSERT_RUNNING, rows).scalars().all()
    return [
        (pk, first + offset, lease)
        for offset, (pk, lease) in enumerate(zip(pks, leases, strict=True))
    ]


# Reserve numbers and insert the trials in one statement, on the condition that the study row
# is as the caller last read it (``updated_at`` moves with every write to it: a pause, a
# budget edit, an enqueue). PostgreSQL only: SQLite has no data-modifying CTE, and needs none
# -- its statements cost no round trip.
_CREATE_RUNNING_IF_UNCHANGED = text(
    """
    WITH s AS (
        UPDATE studies
        SET next_number = next_number + :k, status = 'running',
            started_at = COALESCE(started_at, :now), updated_at = :now
        WHERE pk = :study_pk AND updated_at = :seen AND status IN ('queued', 'running')
        RETURNING next_number - :k AS first
    )
    INSERT INTO trials (study_pk, number, params, source, state, attempts, lease_token,
                        created_at, started_at, heartbeat_at)
    SELECT :study_pk, s.first + v.i, v.params, 'sampler', 'running', 1, v.lease,
           :now, :now, :now
    FROM s CROSS JOIN json_to_recordset(CAST(:rows AS json))
        AS v(i integer, params json, lease text)
    RETURNING pk, number, lease_token
    """
)


def create_running_if_unchanged(
    conn: Connection,
    *,
    study_pk: int,
    seen: datetime,
    params: Sequence[dict[str, Any]],
    now: datetime | None = None,
) -> list[tuple[int, int, str]] | None:
    """:func:`create_running` as one autocommitted statement on PostgreSQL, applied only if the
    study is still active and its row unchanged since the caller read ``updated_at == seen``
    (None otherwise, and nothing written); also marks a queued study running. ``now``
    (default: the current time) becomes the row's ``updated_at`` (and ``started_at`` if unset).

    The scheduler's fast path for the commonest fill -- new sampler trials for a study whose
    stored spec it already holds: one round trip instead of BEGIN, a locking read, two writes
    and COMMIT. A study that changed meanwhile goes the locking way (:func:`create_running`).
    """
    leases = [new_lease() for _ in params]
    rows = [
        {"i": i, "params": p, "lease": lease}
        for i, (p, lease) in enumerate(zip(params, leases, strict=True))
    ]
    found = conn.execute(
        _CREATE_RUNNING_IF_UNCHANGED,
        {
            "k": len(params),
            "now": now or utcnow(),
            "study_pk": study_pk,
            "seen": seen,
            "rows": json.dumps(rows),
        },
    ).all()
    if not found:
        return None
    by_lease = {lease: (pk, number) for pk, number, lease in found}
    return [(*by_lease[lease], lease) for lease in leases]


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


# The scheduler's hot writes as prebuilt Core statements on the tables: SQLAlchemy then reuses
# their compiled form, and skips the ORM's bulk-update bookkeeping (matching objects in the
# identity map), which cost more than the statements themselves.
_S = cast(Table, Study.__table__)
_T = cast(Table, Trial.__table__)
_M = cast(Table, TrialMetric.__table__)
_LEASED = (_T.c.pk == bindparam("b_pk")) & (_T.c.state == "running")
_LEASED &= _T.c.lease_token == bindparam("b_lease")
_STARTED = update(_T).where(_LEASED).values(env=bindparam("b_env"), heartbeat_at=bindparam("b_now"))
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
        finished_at=bindparam("b_now"),
    )
)
_INSERT_RUNNING = insert(_T).returning(_T.c.pk, sort_by_parameter_order=True)
_SQLITE_INSERT_METRIC = sqlite.insert(_M)
_UPSERT_METRIC_SQLITE = _SQLITE_INSERT_METRIC.on_conflict_do_update(
    index_elements=[_M.c.trial_pk, _M.c.epoch],
    set_={
        "attempt": _SQLITE_INSERT_METRIC.excluded.attempt,
        "metrics": _SQLITE_INSERT_METRIC.excluded.metrics,
    },
)


# On PostgreSQL the scheduler's batch writes take their rows as one JSON parameter
# (``json_to_recordset``): one statement, one round trip and one compiled form whatever the
# number of rows, where an executemany goes through psycopg's pipeline machinery per batch.
_STARTED_PG = text(
    """
    UPDATE trials SET env = v.env, heartbeat_at = :now
    FROM json_to_recordset(CAST(:rows AS json)) AS v(pk integer, lease text, env json)
    WHERE trials.pk = v.pk AND trials.state = 'running' AND trials.lease_token = v.lease
    """
)
_BEAT_PG = text(
    """
    UPDATE trials SET heartbeat_at = :now
    FROM json_to_recordset(CAST(:rows AS json)) AS v(pk integer, lease text)
    WHERE trials.pk = v.pk AND trials.state = 'running' AND trials.lease_token = v.lease
    RETURNING trials.pk, trials.lease_token
    """
)
_UPSERT_METRICS_PG = text(
    """
    INSERT INTO trial_metrics (trial_pk, epoch, attempt, metrics, created_at)
    SELECT v.trial_pk, v.epoch, v.attempt, v.metrics, :now
    FROM json_to_recordset(CAST(:rows AS json))
        AS v(trial_pk integer, epoch integer, attempt integer, metrics json)
    ON CONFLICT (trial_pk, epoch) DO UPDATE
        SET attempt = excluded.attempt, metrics = excluded.metrics
    """
)


def _on_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _cas(session: Session, statement: Any, pk: int, lease: str, **params: Any) -> bool:
    """Run a lease compare-and-set; True if the attempt was still running under ``lease``."""
    result = session.execute(statement, {"b_pk": pk, "b_lease": lease, "b_now": utcnow(), **params})
    return cast(CursorResult[Any], result).rowcount == 1


def record_started(session: Session, started: Sequence[tuple[int, str, dict[str, Any]]]) -> None:
    """Where attempts run (node, device, versions): ``(pk, lease, env)`` each, stored under
    the lease (a stale one changes nothing) in one statement whatever their number."""
    if not started:
        return
    now = utcnow()
    if _on_postgres(session):
        rows = [{"pk": pk, "lease": lease, "env": env} for pk, lease, env in started]
        session.execute(_STARTED_PG, {"now": now, "rows": json.dumps(rows)})
        return
    params = [
        {"b_pk": pk, "b_lease": lease, "b_env": env, "b_now": now} for pk, lease, env in started
    ]
    session.execute(_STARTED, params)


@dataclass(frozen=True)
class Report:
    """One epoch's metrics from the attempt running under ``lease``."""

    pk: int
    lease: str
    epoch: int
    attempt: int
    metrics: dict[str, Any]


def record_reports(session: Session, reports: Sequence[Report]) -> list[Report]:
    """Store several reports, of one attempt or many, in two statements whatever their number.

    Reports are the most frequent write, and one scheduler pass often holds a burst of them.
    One compare-and-set beats the heartbeat of every attempt still running under its lease
    (``UPDATE ... RETURNING pk, lease_token`` over the ``(pk, lease)`` pairs; the row locks it
    takes keep those attempts running until the caller commits), then one statement upserts
    their reports on ``(trial_pk, epoch)`` -- a resumed attempt's report of an epoch replaces
    the old one. On PostgreSQL both take their rows as one JSON parameter; on SQLite the
    pairs are an ``IN`` list and the upsert an executemany. Returns the reports stored: a
    stale lease's are dropped, nothing else is.
    """
    if not reports:
        return []
    now = utcnow()
    keys = sorted({(r.pk, r.lease) for r in reports})
    postgres = _on_postgres(session)
    if postgres:
        rows_in = json.dumps([{"pk": pk, "lease": lease} for pk, lease in keys])
        beaten = session.execute(_BEAT_PG, {"now": now, "rows": rows_in})
    else:
        beaten = session.execute(
            update(_T)
            .where(_T.c.state == "running", tuple_(_T.c.pk, _T.c.lease_token).in_(keys))
            .values(heartbeat_at=now)
            .returning(_T.c.pk, _T.c.lease_token)
        )
    alive = {(pk, lease) for pk, lease in beaten}
    stored = [r for r in reports if (r.pk, r.lease) in alive]
    # The last report of an epoch wins, as it would one statement at a time.
    rows = {
        (r.pk, r.epoch): {
            "trial_pk": r.pk,
            "epoch": r.epoch,
            "attempt": r.attempt,
            "metrics": r.metrics,
        }
        for r in stored
    }
    if rows and postgres:
        session.execute(_UPSERT_METRICS_PG, {"now": now, "rows": json.dumps(list(rows.values()))})
    elif rows:
        for row in rows.values():
            row["created_at"] = now
        session.execute(_UPSERT_METRIC_SQLITE, list(rows.values()))
    return stored


def record_report(
    session: Session, pk: int, lease: str, *, epoch: int, attempt: int, metrics: dict[str, Any]
) -> bool:
    """Store one epoch's metrics under the attempt's lease (:func:`record_reports` of one)."""
    return bool(record_reports(session, [Report(pk, lease, epoch, attempt, metrics)]))


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as stored."""

    state: str  # complete | pruned | failed | cancelled
    value: float | None = None
    values: list[float] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None


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
    )


# Every result of a scheduler pass in one compare-and-set (PostgreSQL; see finish_many).
_FINISH_MANY = text(
    """
    UPDATE trials SET state = v.state, value = v.value, "values" = v."values",
        metrics = v.metrics, error = v.error, lease_token = NULL, finished_at = :now
    FROM json_to_recordset(CAST(:rows AS json)) AS v(
        pk integer, lease text, state text, value double precision, "values" json,
        metrics json, error text)
    WHERE trials.pk = v.pk AND trials.state = 'running' AND trials.lease_token = v.lease
    RETURNING trials.pk, v.lease
    """
)


def finish_many(session: Session, ends: Sequence[tuple[int, str, Outcome]]) -> set[tuple[int, str]]:
    """:func:`finish` for several attempts, ``(pk, lease, outcome)`` each; returns the
    ``(pk, lease)`` pairs recorded (a stale lease's outcome is dropped, as :func:`finish`
    drops it). On PostgreSQL one ``UPDATE ... FROM json_to_recordset(...) RETURNING``
    whatever their number -- a pass often ends several trials, and each statement is a
    round trip; on SQLite, where a statement costs none, one :func:`finish` each."""
    if not ends:
        return set()
    if not _on_postgres(session):
        return {(pk, lease) for pk, lease, outcome in ends if finish(session, pk, lease, outcome)}
    rows = [
        {
            "pk": pk,
            "lease": lease,
            "state": o.state,
            "value": o.value,
            "values": o.values,
            "metrics": o.metrics,
            "error": o.error,
        }
        for pk, lease, o in ends
    ]
    found = session.execute(_FINISH_MANY, {"now": utcnow(), "rows": json.dumps(rows)})
    return {(pk, lease) for pk, lease in found}


# A pass's starts, reports and outcomes in one statement (PostgreSQL; see record_events): one
# row per attempt says what its events of the pass change; the metric upsert takes only the
# reports of the attempts the compare-and-set found running under their lease.
_RECORD_EVENTS_PG = text(
    """
    WITH v AS (
        SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS v(
            pk integer, lease text, has_env boolean, env json, beat boolean, ends boolean,
            state text, value double precision, "values" json, metrics json, error text)
    ), t AS (
        UPDATE trials SET
            env = CASE WHEN v.has_env THEN v.env ELSE trials.env END,
            heartbeat_at = CASE WHEN v.beat THEN :now ELSE trials.heartbeat_at END,
            state = CASE WHEN v.ends THEN v.state ELSE trials.state END,
            value = CASE WHEN v.ends THEN v.value ELSE trials.value END,
            "values" = CASE WHEN v.ends THEN v."values" ELSE trials."values" END,
            metrics = CASE WHEN v.ends THEN v.metrics ELSE trials.metrics END,
            error = CASE WHEN v.ends THEN v.error ELSE trials.error END,
            lease_token = CASE WHEN v.ends THEN NULL ELSE trials.lease_token END,
            finished_at = CASE WHEN v.ends THEN :now ELSE trials.finished_at END
        FROM v
        WHERE trials.pk = v.pk AND trials.state = 'running' AND trials.lease_token = v.lease
        RETURNING trials.pk, v.lease, v.ends
    ), m AS (
        INSERT INTO trial_metrics (trial_pk, epoch, attempt, metrics, created_at)
        SELECT r.trial_pk, r.epoch, r.attempt, r.metrics, :now
        FROM json_to_recordset(CAST(:reports AS json)) AS r(
            trial_pk integer, lease text, epoch integer, attempt integer, metrics json)
        JOIN t ON t.pk = r.trial_pk AND t.lease = r.lease
        ON CONFLICT (trial_pk, epoch) DO UPDATE
            SET attempt = excluded.attempt, metrics = excluded.metrics
    )
    SELECT pk, lease, ends FROM t
    """
)


# The same on SQLite (3.35+: UPDATE ... FROM, RETURNING, json_each), less the metric upsert,
# which SQLite cannot put in the same statement. RETURNING may name only the target table, so
# an attempt is known by its pk (record_events falls back when a pass holds two leases of one).
_RECORD_EVENTS_SQLITE = text(
    """
    UPDATE trials SET
        env = CASE WHEN v.has_env THEN v.env ELSE trials.env END,
        heartbeat_at = CASE WHEN v.beat THEN :now ELSE trials.heartbeat_at END,
        state = CASE WHEN v.ends THEN v.state ELSE trials.state END,
        value = CASE WHEN v.ends THEN v.value ELSE trials.value END,
        "values" = CASE WHEN v.ends THEN v."values" ELSE trials."values" END,
        metrics = CASE WHEN v.ends THEN v.metrics ELSE trials.metrics END,
        error = CASE WHEN v.ends THEN v.error ELSE trials.error END,
        lease_token = CASE WHEN v.ends THEN NULL ELSE trials.lease_token END,
        finished_at = CASE WHEN v.ends THEN :now ELSE trials.finished_at END
    FROM (
        SELECT json_extract(value, '$.pk') AS pk, json_extract(value, '$.lease') AS lease,
            json_extract(value, '$.has_env') AS has_env, json_extract(value, '$.env') AS env,
            json_extract(value, '$.beat') AS beat, json_extract(value, '$.ends') AS ends,
            json_extract(value, '$.state') AS state, json_extract(value, '$.value') AS value,
            json_extract(value, '$.values') AS "values",
            json_extract(value, '$.metrics') AS metrics, json_extract(value, '$.error') AS error
        FROM json_each(:rows)
    ) AS v
    WHERE trials.pk = v.pk AND trials.state = 'running' AND trials.lease_token = v.lease
    RETURNING trials.pk
    """
).bindparams(bindparam("now", type_=DateTime(timezone=True)))


def record_events(
    session: Session,
    started: Sequence[tuple[int, str, dict[str, Any]]],
    reports: Sequence[Report],
    ends: Sequence[tuple[int, str, Outcome]],
) -> tuple[list[Report], set[tuple[int, str]]]:
    """A scheduler pass's writes for its attempts: :func:`record_started`, then
    :func:`record_reports`, then :func:`finish_many`, with their results (the reports stored,
    the ``(pk, lease)`` pairs whose outcome was recorded).

    One row per attempt carries what its events of the pass change (where it runs, a
    heartbeat, how it ended) into one compare-and-set on ``(pk, lease)``; the metric upsert
    takes the reports of the attempts that set found running. The effect is that of the three
    in order -- an attempt's outcome is its last event of a pass. On PostgreSQL it is one
    statement (one round trip instead of four); on SQLite two (the upsert cannot join the
    update there), where the three took one per kind and one per outcome -- each
    statement's Python overhead was most of the cost.
    """
    if not (started or reports or ends):
        return [], set()
    postgres = _on_postgres(session)
    pks = [pk for pk, _, _ in started] + [r.pk for r in reports] + [pk for pk, _, _ in ends]
    keys = {(pk, lease) for pk, lease, _ in started} | {(r.pk, r.lease) for r in reports}
    keys |= {(pk, lease) for pk, lease, _ in ends}
    if not postgres and len(keys) != len(set(pks)):  # two leases of one trial: rare, and
        record_started(session, started)  # SQLite's RETURNING could not tell them apart
        stored = record_reports(session, reports)
        return stored, finish_many(session, ends)
    rows: dict[tuple[int, str], dict[str, Any]] = {}

    def row(pk: int, lease: str) -> dict[str, Any]:
        return rows.setdefault(
            (pk, lease),
            {"pk": pk, "lease": lease, "has_env": False, "beat": False, "ends": False},
        )

    for pk, lease, env in started:
        row(pk, lease).update(has_env=True, env=env, beat=True)
    for report in reports:
        row(report.pk, report.lease)["beat"] = True
    for pk, lease, o in ends:
        row(pk, lease).update(
            ends=True,
            state=o.state,
            value=o.value,
            values=o.values,
            metrics=o.metrics,
            error=o.error,
        )
    # The last report of an attempt's epoch wins, as it would one statement at a time (and
    # of two attempts' reports of an epoch, the stale one drops out in the lease join).
    metric_rows = {
        (r.pk, r.lease, r.epoch): {
            "trial_pk": r.pk,
            "lease": r.lease,
            "epoch": r.epoch,
            "attempt": r.attempt,
            "metrics": r.metrics,
        }
        for r in reports
    }
    now = utcnow()
    if postgres:
        found = session.execute(
            _RECORD_EVENTS_PG,
            {
                "now": now,
                "rows": json.dumps(list(rows.values())),
                "reports": json.dumps(list(metric_rows.values())),
            },
        ).all()
        alive = {(pk, lease) for pk, lease, _ in found}
        ended = {(pk, lease) for pk, lease, done in found if done}
    else:
        changed = set(
            session.execute(
                _RECORD_EVENTS_SQLITE, {"now": now, "rows": json.dumps(list(rows.values()))}
            ).scalars()
        )
        alive = {key for key in rows if key[0] in changed}
        ended = {key for key, row in rows.items() if key[0] in changed and row["ends"]}
        upserts = [
            {**{k: v for k, v in row.items() if k != "lease"}, "created_at": now}
            for row in metric_rows.values()
            if (row["trial_pk"], row["lease"]) in alive
        ]
        if upserts:
            session.execute(_UPSERT_METRIC_SQLITE, upserts)
    return [r for r in reports if (r.pk, r.lease) in alive], ended


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
