"""``create_app(settings)``: the FastAPI application with its scheduler.

The lifespan opens the database (migrating it to head unless told not to), starts the
executor and the scheduler, and on shutdown (SIGTERM included: uvicorn runs the lifespan's
exit) drains them: no new trials, in-flight reports stored, attempts handed back.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service import migrate
from service.dashboard import mount_dashboard
from service.db import Database
from service.events import EventBroker, end_streams_on_server_exit
from service.insights.router import router as insights_router
from service.scheduler import Scheduler
from service.settings import Settings
from service.studies.router import router as studies_router
from service.trials.router import router as trials_router
from workers.executor import Executor

log = logging.getLogger("tsam.app")


class SchemaBehind(RuntimeError):
    """The database schema is older than this code and migration on start is off."""


def build_executor(settings: Settings) -> Executor:
    if settings.executor == "local":
        from workers.executor import InProcessExecutor

        return InProcessExecutor(slots=settings.local_slots)
    from workers.ray_executor import RayExecutor

    return RayExecutor(
        settings.ray_address,
        num_cpus=settings.ray_num_cpus,
        warm_workers=settings.ray_warm_workers,
        idle_worker_s=settings.ray_idle_worker_s,
    )


def detect_git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def prepare_database(settings: Settings) -> Database:
    """Open the database at head: migrate, or refuse when migration is off and it is behind."""
    db = Database(settings.database_url)
    if settings.migrate_on_start:
        migrate.upgrade(settings.database_url)
    elif not migrate.is_at_head(db.engine, settings.database_url):
        db.dispose()
        raise SchemaBehind(
            f"the schema of {settings.database_url} is at "
            f"{migrate.current_revision(db.engine)!r}, this code needs "
            f"{migrate.head_revision(settings.database_url)!r}: run `alembic upgrade head` "
            "or start without --no-migrate"
        )
    return db


def create_app(settings: Settings | None = None, executor: Executor | None = None) -> FastAPI:
    """The application. ``executor`` replaces the one ``settings`` would build (tests)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = prepare_database(settings)
        scheduler = Scheduler(
            db,
            executor or build_executor(settings),
            checkpoint_root=settings.checkpoint_root,
            tick_s=settings.scheduler_tick_s,
            batch_s=settings.scheduler_batch_s,
            git_revision=settings.git_revision or detect_git_revision(),
        )
        scheduler.hooks.append(app.state.events.publish)
        end_streams_on_server_exit()
        scheduler.start()
        app.state.db, app.state.scheduler = db, scheduler
        try:
            yield
        finally:
            app.state.events.close()
            scheduler.stop()
            db.dispose()

    app = FastAPI(
        title="tsam-sweep",
        version="0.1.0",
        summary="Hyperparameter search for Tilted SAM: studies, trials on Ray, results in SQL.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.events = EventBroker()

    @app.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse(
                {"detail": f"request body larger than {settings.max_body_bytes} bytes"},
                status_code=413,
            )
        return await call_next(request)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "not ready"}})
    def readyz(request: Request) -> JSONResponse:
        """Readiness: the database answers and the executor reports capacity."""
        checks: dict[str, str] = {}
        try:
            with request.app.state.db.read() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as err:
            checks["database"] = f"error: {err.__class__.__name__}"
        try:
            cap = request.app.state.scheduler.executor.capacity()
            checks["executor"] = f"ok: {cap.total_cpus:g} cpus, {cap.total_gpus:g} gpus"
        except Exception as err:
            checks["executor"] = f"error: {err.__class__.__name__}"
        ready = all(v.startswith("ok") for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    app.include_router(studies_router)
    app.include_router(trials_router)
    app.include_router(insights_router)
    mount_dashboard(app)
    return app
