"""A live uvicorn server in a thread with the in-process executor (sleep-runner speed), for
tests that need real HTTP: server-sent events, the dashboard in a browser."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.app import create_app
from service.settings import Settings
from workers.executor import Executor, InProcessExecutor


@dataclass
class LocalServer:
    url: str
    app: Any
    database_url: str

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/api/v1/studies", json=spec, timeout=30)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait_done(self, study_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = httpx.get(f"{self.url}/api/v1/studies/{study_id}", timeout=30).json()
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
            time.sleep(0.1)
        raise AssertionError(f"study {study_id} did not finish: {body}")


@contextmanager
def local_server(
    root: Path, *, slots: int = 2, executor: Executor | None = None
) -> Iterator[LocalServer]:
    """``tsam serve`` in a thread over a SQLite file in ``root``, with ``executor`` (default:
    the in-process one, as ``TSAM_EXECUTOR=local``)."""
    settings = Settings(
        database_url=f"sqlite:///{root / 'tsam.db'}",
        checkpoint_root=str(root / "runs"),
        scheduler_tick_s=0.2,
        executor="local",
    )
    app = create_app(settings, executor=executor or InProcessExecutor(slots=slots))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "live server did not start"
        time.sleep(0.05)
    try:
        yield LocalServer(f"http://127.0.0.1:{port}", app, settings.database_url)
    finally:
        server.should_exit = True
        thread.join(30)


def sleep_spec(name: str = "sleep-study", **overrides: Any) -> dict[str, Any]:
    """A TSAM study spec on the zero-work sleep runner (t, rho and samples searched)."""
    spec: dict[str, Any] = {
        "name": name,
        "task": {"dataset": "digits", "model": "mlp", "epochs": 3, "seed": 0},
        "optimizer": {"method": "tsam", "t": 1.0, "rho": 0.05, "samples": 3},
        "search_space": {
            "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
            "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
            "samples": {"type": "int", "low": 1, "high": 8},
        },
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 4, "max_parallel": 2},
        "runner": {"name": "sleep", "sleep_s": 0.1},
    }
    spec.update(overrides)
    return spec
