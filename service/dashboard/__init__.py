"""The web dashboard: server-rendered pages, small JS, charts drawn by Plotly in the browser
from the JSON API. No build step and no CDN: plotly.js is served from the installed ``plotly``
Python package."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's pages and static files to ``app``."""
    from service.dashboard.router import router

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
