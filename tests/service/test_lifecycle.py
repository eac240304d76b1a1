"""Study lifecycle over HTTP (DESIGN.md 3a): pause, resume, cancel, delete, budget and priority
edits, enqueued trials. Real runs: the scheduler, in-process threads and the zero-work sleep
runner (its config is recorded so a test can see exactly what a trial ran with)."""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from workers.executor import InProcessExecutor
from workers.trial import TrialSpec, run_trial

SPEC: dict[str, Any] = {
    "name": "lifecycle",
    "task": {"dataset": "digits", "model": "mlp", "epochs": 3},
    "optimizer": {"method": "tsam", "t": 1.0, "rho": 0.1, "samples": 3},
    "search_space": {
        "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
        "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "samples": {"type": "int", "low": 1, "high": 8},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 4, "max_parallel": 2},
    "runner": {"name": "sleep", "sleep_s": 0.1},
}
FINISHED = ("completed", "cancelled", "failed")


class Recorder:
    """The sleep runner, remembering each attempt's config by (study, trial number)."""

    def __init__(self) -> None:
        self.configs: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: TrialSpec) -> Iterator[dict[str, Any]]:
        with self._lock:
            self.configs[(spec.study_id, spec.trial_number)] = dict(spec.config)
        yield from run_trial(spec)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(db_url: str, tmp_path, recorder: Recorder) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db_url, checkpoint_root=str(tmp_path / "runs"), scheduler_tick_s=0.2
    )
    app = create_app(settings, executor=InProcessExecutor(slots=2, runner=recorder))
    with TestClient(app) as c:
        yield c


def spec(**budget: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out["budget"].update(budget)
    return out


def create(client: TestClient, body: dict[str, Any]) -> str:
    r = client.post("/api/v1/studies", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def get(client: TestClient, study_id: str) -> dict[str, Any]:
    r = client.get(f"/api/v1/studies/{study_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def trials(client: TestClient, study_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/v1/studies/{study_id}/trials", params={"limit": 1000})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def wait_finished(client: TestClient, study_id: str) -> dict[str, Any]:
    wait_for(lambda: get(client, study_id)["status"] in FINISHED)
    return get(client, study_id)


def verb(client: TestClient, study_id: str, name: str) -> Any:
    return client.post(f"/api/v1/studies/{study_id}/{name}")


def test_pause_lets_running_trials_finish_and_resume_completes(client):
    study_id = create(client, spec(n_trials=6, max_parallel=2))
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) >= 1)
    r = verb(client, study_id, "pause")
    assert r.status_code == 200 and r.json()["status"] == "paused"
    assert verb(client, study_id, "pause").status_code == 200  # idempotent
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 0)
    made = len(trials(client, study_id))
    time.sleep(0.8)  # several scheduler passes: nothing new starts
    paused = get(client, study_id)
    assert paused["status"] == "paused" and len(trials(client, study_id)) == made < 6
    assert set(paused["counts"]) == {"complete"}, paused["counts"]

    r = verb(client, study_id, "resume")
    assert r.status_code == 200 and r.json()["status"] == "running"
    done = wait_finished(client, study_id)
    assert done["status"] == "completed"
    assert done["counts"] == {"complete": 6}


def test_cancel_stops_running_trials_and_ends_the_study(client):
    body = spec(n_trials=6, max_parallel=2)
    body["task"]["epochs"] = 50  # 5 s per trial: cancel lands mid-run
    study_id = create(client, body)
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 2)
    r = verb(client, study_id, "cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 0, timeout=10)
    study = get(client, study_id)
    assert study["status"] == "cancelled"
    assert study["counts"] == {"cancelled": 2}
    assert all(t["finished_at"] for t in trials(client, study_id))
    time.sleep(0.5)
    assert len(trials(client, study_id)) == 2  # nothing new starts
    assert verb(client, study_id, "cancel").status_code == 200  # idempotent


def test_cancel_turns_waiting_trials_cancelled(client):
    study_id = create(client, spec(n_trials=4))
    verb(client, study_id, "pause")
    r = client.post(f"/api/v1/studies/{study_id}/trials", json={"params": {"t": 2.0}})
    assert r.status_code == 201
    number = r.json()["number"]
    assert verb(client, study_id, "cancel").json()["status"] == "cancelled"
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 0)
    (enqueued,) = [t for t in trials(client, study_id) if t["number"] == number]
    assert enqueued["source"] == "enqueued" and enqueued["state"] == "cancelled"
    assert max(t["number"] for t in trials(client, study_id)) == number  # none after the pause
    assert set(get(client, study_id)["counts"]) <= {"cancelled", "complete"}


def test_budget_edits_take_effect(client):
    study_id = create(client, spec(n_trials=2, max_parallel=2))
    verb(client, study_id, "pause")
    r = client.patch(
        f"/api/v1/studies/{study_id}",
        json={"budget": {"n_trials": 5, "max_parallel": 1, "timeout_s": 600}, "priority": 3},
    )
    assert r.status_code == 200, r.text
    edited = r.json()
    assert edited["priority"] == 3
    assert edited["spec"]["budget"]["n_trials"] == 5
    assert edited["spec"]["budget"]["max_parallel"] == 1
    assert edited["spec"]["budget"]["timeout_s"] == 600
    assert edited["spec"]["budget"]["max_failures"] == 5  # untouched fields keep their value
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 0)
    before = len(trials(client, study_id))
    verb(client, study_id, "resume")
    done = wait_finished(client, study_id)
    assert done["status"] == "completed" and done["counts"] == {"complete": 5}
    later = [t for t in trials(client, study_id) if t["number"] >= before]
    assert len(later) == 5 - before
    spans = sorted((t["started_at"], t["finished_at"]) for t in later)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "max_parallel=1: trials after the edit ran one at a time"


def test_budget_validation(client):
    study_id = create(client, spec(n_trials=3, max_parallel=2))
    wait_for(lambda: len(trials(client, study_id)) >= 2)
    r = client.patch(f"/api/v1/studies/{study_id}", json={"budget": {"n_trials": 1}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "budget", "n_trials"]
    assert "already made" in r.json()["detail"][0]["msg"]
    r = client.patch(f"/api/v1/studies/{study_id}", json={"budget": {"max_parallel": 0}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "budget", "max_parallel"]
    r = client.patch(f"/api/v1/studies/{study_id}", json={"budget": {"max_attempts": 2}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "budget", "max_attempts"]
    r = client.patch(f"/api/v1/studies/{study_id}", json={"budget": {"n_trials": None}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "budget", "n_trials"]
    r = client.patch(f"/api/v1/studies/{study_id}", json={"priority": "high"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "priority"]
    wait_finished(client, study_id)
    r = client.patch(f"/api/v1/studies/{study_id}", json={"budget": {"n_trials": 10}})
    assert r.status_code == 409 and "completed" in r.json()["detail"]


def test_enqueued_baselines_run_first_with_exactly_their_params(client, recorder):
    study_id = create(client, spec(n_trials=5, max_parallel=1))
    verb(client, study_id, "pause")
    baselines = [{"method": "sam", "rho": 0.05}, {"method": "erm"}, {"t": 200.0, "rho": 0.05}]
    enqueued = []
    for params in baselines:
        r = client.post(f"/api/v1/studies/{study_id}/trials", json={"params": params})
        assert r.status_code == 201, r.text
        item = r.json()
        assert item["state"] == "waiting" and item["source"] == "enqueued"
        assert item["params"] == params
        enqueued.append(item["number"])
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 0)
    verb(client, study_id, "resume")
    done = wait_finished(client, study_id)
    assert done["status"] == "completed" and done["counts"] == {"complete": 5}

    rows = {t["number"]: t for t in trials(client, study_id)}
    sampler_after = [t for t in rows.values() if t["number"] > max(enqueued)]
    for number, params in zip(enqueued, baselines, strict=True):
        trial = rows[number]
        assert trial["params"] == params and trial["source"] == "enqueued"
        assert all(trial["started_at"] <= t["started_at"] for t in sampler_after)
        config = recorder.configs[(study_id, number)]
        # Exactly its params on top of the study's task and optimizer.
        expected = {**SPEC["optimizer"], **params}
        assert {k: config[k] for k in expected} == expected
        assert config["epochs"] == 3
    # Optuna was told only what each trial used and the space holds: nothing for erm, rho
    # for sam, and not t=200 (outside the range) for the last one.
    scheduler = client.app.state.scheduler  # type: ignore[attr-defined]
    runtime = next(r for r in scheduler._runtimes.values() if r.study_id == study_id)
    # An ask that lost the race with "pause" is told FAIL and never ran: leave it out.
    told = [
        t.params for t in runtime.optuna_study.trials if t.state != optuna.trial.TrialState.FAIL
    ]
    assert {"rho": 0.05} in told and {} in told
    assert all(set(p) <= {"t", "rho", "samples"} for p in told)
    assert len(told) == 5


def test_enqueue_validation(client):
    study_id = create(client, spec(n_trials=2))
    verb(client, study_id, "pause")
    url = f"/api/v1/studies/{study_id}/trials"
    cases = [
        ({"params": {"epochs": 5}}, ["body", "params", "epochs"]),
        ({"params": {"nope": 1}}, ["body", "params", "nope"]),
        ({"params": {"method": "adam"}}, ["body", "params", "method"]),
        ({"params": {"rho": -1}}, ["body", "params", "rho"]),
        ({"params": {"samples": "three"}}, ["body", "params", "samples"]),
        ({"method": "erm"}, ["body", "params"]),
    ]
    for body, loc in cases:
        r = client.post(url, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"][0]["loc"] == loc, (body, r.json())
    raw = '{"params": {"t": 1e400}}'  # JSON text that parses to infinity
    r = client.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "params", "t"]
    made = len(trials(client, study_id))
    for _ in range(2 - made):
        assert client.post(url, json={"params": {"method": "erm"}}).status_code == 201
    r = client.post(url, json={"params": {"method": "erm"}})
    assert r.status_code == 409 and "n_trials" in r.json()["detail"]
    verb(client, study_id, "resume")
    wait_finished(client, study_id)
    r = client.post(url, json={"params": {"method": "erm"}})
    assert r.status_code == 409


def test_illegal_transitions_are_409(client):
    done_id = create(client, spec(n_trials=1))
    assert wait_finished(client, done_id)["status"] == "completed"
    for name in ("pause", "resume", "cancel"):
        r = verb(client, done_id, name)
        assert r.status_code == 409, name
        assert "completed" in r.json()["detail"]

    body = spec(n_trials=1)
    body["task"]["epochs"] = 30
    cancelled_id = create(client, body)
    assert verb(client, cancelled_id, "cancel").status_code == 200
    for name in ("pause", "resume"):
        r = verb(client, cancelled_id, name)
        assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_delete(client):
    body = spec(n_trials=2)
    body["task"]["epochs"] = 30
    study_id = create(client, body)
    r = client.delete(f"/api/v1/studies/{study_id}")
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    verb(client, study_id, "cancel")
    wait_for(lambda: get(client, study_id)["counts"].get("running", 0) == 0)
    r = client.delete(f"/api/v1/studies/{study_id}")
    assert r.status_code == 204, r.text
    assert client.get(f"/api/v1/studies/{study_id}").status_code == 404
    assert client.get(f"/api/v1/studies/{study_id}/trials").status_code == 404
    assert client.delete(f"/api/v1/studies/{study_id}").status_code == 404
    # A new study (SQLite may hand out the deleted pk again) starts from scratch.
    again = create(client, spec(n_trials=2))
    done = wait_finished(client, again)
    assert done["status"] == "completed" and done["counts"] == {"complete": 2}


def test_unknown_study_is_404(client):
    missing = "0123456789abcdef"
    for name in ("pause", "resume", "cancel"):
        assert verb(client, missing, name).status_code == 404
    assert client.delete(f"/api/v1/studies/{missing}").status_code == 404
    assert client.patch(f"/api/v1/studies/{missing}", json={"priority": 1}).status_code == 404
    r = client.post(f"/api/v1/studies/{missing}/trials", json={"params": {"t": 1.0}})
    assert r.status_code == 404 and missing in r.json()["detail"]
