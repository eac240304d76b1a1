"""The server as a process: killed mid-study and restarted on the same database, and drained
by SIGTERM. Trials use the in-process executor and the zero-work sleep runner: what is tested
is the server and its database, which behave the same whatever executes the trials."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

SPEC = {
    "name": "restart",
    "task": {"epochs": 4},
    "search_space": {"lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}},
    "sampler": {"name": "random", "seed": 0},
    "budget": {"n_trials": 6, "max_parallel": 2},
    "runner": {"name": "sleep", "sleep_s": 0.25},
}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TSAM_DATABASE_URL": f"sqlite:///{tmp_path / 'tsam.db'}",
            "TSAM_EXECUTOR": "local",
            "TSAM_CHECKPOINT_ROOT": str(tmp_path / "runs"),
            "TSAM_SCHEDULER_TICK_S": "0.2",
        }
        self.log = tmp_path / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        # A cold process imports torch, Optuna and the app: slow on a loaded 2-core machine.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            assert self.proc.poll() is None, self.log.read_text()
        raise AssertionError("server did not start:\n" + self.log.read_text())

    def stop(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def trials(self, study_id: str) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/studies/{study_id}/trials", timeout=10).json()["items"]

    def wait(self, study_id: str, predicate, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            study = httpx.get(f"{self.url}/api/v1/studies/{study_id}", timeout=10).json()
            if predicate(study):
                return study
            time.sleep(0.1)
        raise AssertionError(study)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def _midway(study: dict) -> bool:
    return study["counts"].get("complete", 0) >= 1 and study["counts"].get("running", 0) >= 1


def test_a_killed_server_restarts_and_the_study_continues(server):
    server.start()
    study = httpx.post(f"{server.url}/api/v1/studies", json=SPEC, timeout=10).json()
    server.wait(study["id"], _midway)
    before = {t["number"]: t for t in server.trials(study["id"])}
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    interrupted = {n for n, t in before.items() if t["state"] == "running"}

    server.start()
    done = server.wait(study["id"], lambda s: s["status"] == "completed")
    after = {t["number"]: t for t in server.trials(study["id"])}
    assert sorted(after) == list(range(6)) and done["counts"] == {"complete": 6}
    for n, t in before.items():
        assert after[n]["params"] == t["params"]
        if t["state"] == "complete":
            assert after[n] == t
    assert interrupted and all(after[n]["attempts"] == 2 for n in interrupted)


def test_sigterm_drains_stores_reports_and_exits_cleanly(server):
    server.start()
    study = httpx.post(f"{server.url}/api/v1/studies", json=SPEC, timeout=10).json()
    server.wait(study["id"], _midway)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean
    # exit here (the drain below proves the lifespan ran).
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    # Drained: no attempt is left running under a lease, and the interrupted trials' reports
    # made it to the database.
    engine = sa.create_engine(server.env["TSAM_DATABASE_URL"])
    with engine.connect() as conn:
        states = [r[0] for r in conn.execute(sa.text("SELECT state FROM trials"))]
        leases = conn.execute(
            sa.text("SELECT count(*) FROM trials WHERE lease_token IS NOT NULL")
        ).scalar()
        reports = conn.execute(sa.text("SELECT count(*) FROM trial_metrics")).scalar()
    engine.dispose()
    assert "running" not in states and "waiting" in states and leases == 0
    assert reports >= 4
    server.start()
    done = server.wait(study["id"], lambda s: s["status"] == "completed")
    assert done["counts"] == {"complete": 6}
    assert "Traceback" not in server.log.read_text()
