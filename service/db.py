"""Engine, sessions and the declarative base.

SQLite needs care to be a good single-node store: WAL so readers never block the writer, a
busy timeout so a writer waits instead of failing, and ``BEGIN IMMEDIATE`` for write
transactions -- a deferred transaction that reads first and upgrades to a write later gets
SQLITE_BUSY at once, whatever the busy timeout. pysqlite's own transaction handling is switched
off so these BEGINs are ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, MetaData, create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, *, pre_ping: bool = True, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings each backend needs. ``pre_ping`` checks a
    pooled server connection before each use (a round trip per transaction): right for
    request handlers, which cannot retry, wasted on a loop that retries a failed pass."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    options: dict[str, Any] = {"pool_size": 10, "max_overflow": 20, **kwargs}
    return create_engine(url, pool_pre_ping=pre_ping, **options)


class Database:
    """Sessions over one engine: ``read()`` for queries, ``write()`` for transactions that
    change something (``BEGIN IMMEDIATE`` on SQLite). Both commit on success and roll back on
    error; ``expire_on_commit=False`` so returned objects stay readable after the block."""

    def __init__(self, url: str, *, pre_ping: bool = True, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, pre_ping=pre_ping, **engine_kwargs)
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        writer_engine = (
            self.engine.execution_options(sqlite_immediate=True) if self.is_sqlite else self.engine
        )
        self._writer = sessionmaker(writer_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._writer() as session, session.begin():
            yield session

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection where each statement commits on its own: one round trip for a write
        that is a single statement, instead of BEGIN, the statement and COMMIT."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    @contextmanager
    def autocommit_session(self) -> Iterator[Session]:
        """A session on an :meth:`autocommit` connection: each statement commits on its own,
        for a unit of work that is one write statement (plus reads that need not see the
        same snapshot)."""
        with self.autocommit() as conn, Session(bind=conn, expire_on_commit=False) as session:
            yield session

    def dedicated(self) -> Database:
        """A second handle on the same database for one thread that retries its own failures
        (the scheduler): a small pool without the pre-use ping. A connection the server
        dropped fails one transaction, SQLAlchemy discards it as disconnected, and the retry
        gets a fresh one."""
        if self.is_sqlite:
            return Database(self.url)
        return Database(self.url, pre_ping=False, pool_size=1, max_overflow=2)

    def dispose(self) -> None:
        self.engine.dispose()
