"""The scheduler's batched trial writes: a pass's new trials, starts, reports and outcomes in
as few statements as the backend allows, whatever their number.

Each statement costs a round trip on PostgreSQL (and its share of a loaded machine's
scheduling), and SQLAlchemy's own Python on both backends, so the scheduler's hot path writes
a pass's rows together: as one JSON parameter (``json_to_recordset`` on PostgreSQL,
``json_each`` on SQLite) rather than an executemany, and on PostgreSQL as data-modifying CTEs
that do in one statement what would otherwise take several. Every write is the same lease
compare-and-set as :mod:`service.trials.service`'s (a stale attempt's rows change nothing);
the caller owns the transaction, or runs a single statement autocommitted.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, DateTime, Table, TextualSelect, bindparam, insert, text, tuple_, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from service.db import utcnow
from service.studies.models import Study
from service.trials.models import Trial, TrialMetric
from service.trials.service import Outcome, finish, new_lease

__all__ = [
    "Report",
    "create_running",
    "create_running_if_unchanged",
    "finish_many",
    "record_events",
    "record_events_and_read",
    "record_report",
    "record_reports",
    "record_started",
]

_S = cast(Table, Study.__table__)
_T = cast(Table, Trial.__table__)
_M = cast(Table, TrialMetric.__table__)
_LEASED = (_T.c.pk == bindparam("b_pk")) & (_T.c.state == "running")
_LEASED &= _T.c.lease_token == bindparam("b_lease")


def _on_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@functools.cache
def _events_and_read_pg(read: str) -> TextualSelect:
    """The pass statement with ``read`` in its final SELECT: the writes' results as one JSON
    array (the same on every row), then ``read``'s columns; one row with them NULL when
    ``read`` has none (hence a LEFT JOIN from one row)."""
    written = "coalesce(json_agg(json_build_array(t.pk, t.lease, t.ends)), '[]'::json)"
    return text(
        f"{_EVENTS_CTE_PG} SELECT (SELECT {written} FROM t) AS written, q.* "
        f"FROM (SELECT 1) AS one LEFT JOIN ({read}) AS q ON true"
    ).columns(written=JSON)


def _finished_at(outcome: Outcome, now: datetime, *, sqlite_format: bool = False) -> str:
    """An outcome's end time for a JSON row: when the attempt ended if known, else ``now``;
    ISO 8601 for PostgreSQL, the text SQLAlchemy stores a datetime as for SQLite (its
    fields as they are: the scheduler's datetimes are all UTC)."""
    at = outcome.finished_at or now
    return at.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite_format else at.isoformat()


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


_STARTED = update(_T).where(_LEASED).values(env=bindparam("b_env"), heartbeat_at=bindparam("b_now"))


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


def finish_many(session: Session, ends: Sequence[tuple[int, str, Outcome]]) -> set[tuple[int, str]]:
    """:func:`finish` for several attempts, ``(pk, lease, outcome)`` each; returns the
    ``(pk, lease)`` pairs recorded (a stale lease's outcome is dropped, as :func:`finish`
    drops it). One statement each: the pass's outcomes normally travel in
    :func:`record_events`; this is its fallback on SQLite."""
    return {(pk, lease) for pk, lease, outcome in ends if finish(session, pk, lease, outcome)}


# What one row ``v`` of a pass (see record_events) changes in its trial: where it runs
# (``has_env``), a heartbeat (``beat``), how it ended (``ends``); the rest stays as it is.
_UPDATE_FROM_V = """UPDATE trials SET
        env = CASE WHEN v.has_env THEN v.env ELSE trials.env END,
        heartbeat_at = CASE WHEN v.beat THEN :now ELSE trials.heartbeat_at END,
        state = CASE WHEN v.ends THEN v.state ELSE trials.state END,
        value = CASE WHEN v.ends THEN v.value ELSE trials.value END,
        "values" = CASE WHEN v.ends THEN v."values" ELSE trials."values" END,
        metrics = CASE WHEN v.ends THEN v.metrics ELSE trials.metrics END,
        error = CASE WHEN v.ends THEN v.error ELSE trials.error END,
        lease_token = CASE WHEN v.ends THEN NULL ELSE trials.lease_token END,
        finished_at = CASE WHEN v.ends THEN v.finished_at ELSE trials.finished_at END"""

# A pass's starts, reports and outcomes in one statement (PostgreSQL; see record_events): one
# row per attempt says what its events of the pass change; the metric upsert takes only the
# reports of the attempts the compare-and-set found running under their lease.
_EVENTS_CTE_PG = f"""
    WITH v AS (
        SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS v(
            pk integer, lease text, has_env boolean, env json, beat boolean, ends boolean,
            state text, value double precision, "values" json, metrics json, error text,
            finished_at timestamptz)
    ), t AS (
        {_UPDATE_FROM_V}
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
"""
_RECORD_EVENTS_PG = text(_EVENTS_CTE_PG + "SELECT pk, lease, ends FROM t")


# The same on SQLite (3.35+: UPDATE ... FROM, RETURNING, json_each), less the metric upsert,
# which SQLite cannot put in the same statement. RETURNING may name only the target table, so
# an attempt is known by its pk (record_events falls back when a pass holds two leases of one).
_RECORD_EVENTS_SQLITE = text(
    f"""
    {_UPDATE_FROM_V}
    FROM (
        SELECT json_extract(value, '$.pk') AS pk, json_extract(value, '$.lease') AS lease,
            json_extract(value, '$.has_env') AS has_env, json_extract(value, '$.env') AS env,
            json_extract(value, '$.beat') AS beat, json_extract(value, '$.ends') AS ends,
            json_extract(value, '$.state') AS state, json_extract(value, '$.value') AS value,
            json_extract(value, '$.values') AS "values",
            json_extract(value, '$.metrics') AS metrics, json_extract(value, '$.error') AS error,
            json_extract(value, '$.finished_at') AS finished_at
        FROM json_each(:rows)
    ) AS v
    WHERE trials.pk = v.pk AND trials.state = 'running' AND trials.lease_token = v.lease
    RETURNING trials.pk
    """
).bindparams(bindparam("now", type_=DateTime(timezone=True)))


def record_events_and_read(
    session: Session,
    started: Sequence[tuple[int, str, dict[str, Any]]],
    reports: Sequence[Report],
    ends: Sequence[tuple[int, str, Outcome]],
    read: str,
) -> tuple[list[Report], set[tuple[int, str]], list[Any]]:
    """:func:`record_events` on PostgreSQL plus the rows of ``read`` (a SELECT's text, with no
    parameters, whose first column is never NULL), in the same statement: one round trip for
    a pass's writes and its next read. The rows come back in no particular order.
    Every part of a statement sees the same snapshot, taken before its writes, so ``read``
    sees the database as it was just before them."""
    if not _on_postgres(session):
        raise ValueError("record_events_and_read is PostgreSQL-only")
    return _record_events(session, started, reports, ends, read)


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
    stored, ended, _ = _record_events(session, started, reports, ends, None)
    return stored, ended


def _record_events(
    session: Session,
    started: Sequence[tuple[int, str, dict[str, Any]]],
    reports: Sequence[Report],
    ends: Sequence[tuple[int, str, Outcome]],
    read: str | None,
) -> tuple[list[Report], set[tuple[int, str]], list[Any]]:
    read_rows: list[Any] = []  # record_events_and_read's
    postgres = _on_postgres(session)
    if not (started or reports or ends):
        if read is not None:
            read_rows.extend(session.execute(text(read)).all())
        return [], set(), read_rows
    pks = [pk for pk, _, _ in started] + [r.pk for r in reports] + [pk for pk, _, _ in ends]
    keys = {(pk, lease) for pk, lease, _ in started} | {(r.pk, r.lease) for r in reports}
    keys |= {(pk, lease) for pk, lease, _ in ends}
    if not postgres and len(keys) != len(set(pks)):  # two leases of one trial: rare, and
        record_started(session, started)  # SQLite's RETURNING could not tell them apart
        stored = record_reports(session, reports)
        return stored, finish_many(session, ends), read_rows
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
    now = utcnow()
    for pk, lease, o in ends:
        row(pk, lease).update(
            ends=True,
            state=o.state,
            value=o.value,
            values=o.values,
            metrics=o.metrics,
            error=o.error,
            finished_at=_finished_at(o, now, sqlite_format=not postgres),
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
    if postgres:
        params = {
            "now": now,
            "rows": json.dumps(list(rows.values())),
            "reports": json.dumps(list(metric_rows.values())),
        }
        if read is None:
            found = [tuple(r) for r in session.execute(_RECORD_EVENTS_PG, params)]
        else:
            result = session.execute(_events_and_read_pg(read), params).all()
            found = [tuple(r) for r in result[0].written] if result else []
            read_rows.extend(row[1:] for row in result if row[1] is not None)
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
    return [r for r in reports if (r.pk, r.lease) in alive], ended, read_rows
