"""REST API v1 over HTTP (TestClient): shapes and codes of DESIGN.md 3a, 422 field paths,
idempotency, owner scoping, pagination and export. Trials run in threads with the sleep
runner so these tests stay fast; tests/e2e runs the same path on a real Ray."""

from __future__ import annotations

import csv
import io
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.studies.test_spec import EXAMPLE_SPEC
from workers.executor import InProcessExecutor

# The DESIGN.md example, shortened to two epochs and four zero-work trials.
EXAMPLE = EXAMPLE_SPEC | {
    "task": EXAMPLE_SPEC["task"] | {"epochs": 2},
    "budget": EXAMPLE_SPEC["budget"] | {"n_trials": 4},
    "runner": {"name": "sleep"},
}


@pytest.fixture
def client(db_url, tmp_path):
    settings = Settings(
        database_url=db_url, checkpoint_root=str(tmp_path / "runs"), scheduler_tick_s=0.2
    )
    app = create_app(settings, executor=InProcessExecutor(slots=2))
    with TestClient(app) as c:
        yield c


def wait_done(client, study_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/studies/{study_id}").json()
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(body)


def test_create_runs_the_study_and_reads_it_back(client):
    r = client.post("/api/v1/studies", json=EXAMPLE)
    assert r.status_code == 201, r.text
    study = r.json()
    assert study["status"] in ("queued", "running") and study["name"] == "digits-noisy-tsam"
    assert (
        study["spec"]["sampler"] == {"name": "tpe", "seed": 0, "n_startup_trials": None}
        or study["spec"]["sampler"]["name"] == "tpe"
    )
    done = wait_done(client, study["id"])
    assert done["status"] == "completed" and done["counts"] == {"complete": 4}
    best = done["best_trial"]
    assert set(best) >= {
        "number",
        "state",
        "params",
        "value",
        "metrics",
        "attempts",
        "started_at",
        "finished_at",
    }
    items = client.get(f"/api/v1/studies/{study['id']}/trials").json()["items"]
    assert [t["number"] for t in items] == [0, 1, 2, 3]
    assert best["value"] == max(t["value"] for t in items)
    for t in items:
        assert 0.1 <= t["params"]["t"] <= 100 and 1 <= t["params"]["samples"] <= 8
        assert 0.0 <= t["value"] <= 1.0
    detail = client.get(f"/api/v1/studies/{study['id']}/trials/0").json()
    assert [row["epoch"] for row in detail["intermediate"]] == [1, 2]
    assert detail["error"] is None and detail["env"]["pid"] > 0


def test_create_answers_201_then_200_for_the_same_idempotency_key(client):
    first = client.post("/api/v1/studies", json=EXAMPLE, headers={"Idempotency-Key": "abc"})
    again = client.post("/api/v1/studies", json=EXAMPLE, headers={"Idempotency-Key": "abc"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert len(client.get("/api/v1/studies").json()["items"]) == 1


def test_validate_only_returns_the_normalized_spec_and_stores_nothing(client):
    r = client.post("/api/v1/studies?validate_only=true", json={"name": "x"})
    assert r.status_code == 200
    body = r.json()
    assert body["budget"]["n_trials"] >= 1 and body["optimizer"]["method"] == "tsam"
    assert client.get("/api/v1/studies").json()["items"] == []


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"surprise": 1}, ["body", "surprise"]),
        ({"task": {"dataset": "mnist"}}, ["body", "task", "dataset"]),
        (
            {"search_space": {"t": {"type": "float", "low": 5, "high": 1}}},
            ["body", "search_space", "t"],
        ),
        (
            {"search_space": {"rho": {"type": "float", "low": 0, "high": 1, "log": True}}},
            ["body", "search_space", "rho"],
        ),
        (
            {"search_space": {"lr": {"type": "float", "low": 0.1, "high": 1, "step": 0}}},
            ["body", "search_space", "lr"],
        ),
        (
            {"search_space": {"method": {"type": "categorical", "choices": []}}},
            ["body", "search_space", "method"],
        ),
        (
            {"search_space": {"seed": {"type": "int", "low": 0, "high": 3}}},
            ["body", "search_space", "seed"],
        ),
        (
            {
                "optimizer": {"method": "erm"},
                "search_space": {"t": {"type": "float", "low": 1, "high": 2}},
            },
            ["body", "search_space", "t"],
        ),
        ({"resources": {"gpus": 1}}, ["body", "resources", "gpus"]),
    ],
)
def test_bad_specs_are_422_with_the_field_path_and_store_nothing(client, patch, loc):
    spec = {**EXAMPLE, **patch}
    r = client.post("/api/v1/studies", json=spec)
    assert r.status_code == 422, r.text
    locs = [e["loc"][: len(loc)] for e in r.json()["detail"]]
    assert loc in locs, r.json()
    assert client.get("/api/v1/studies").json()["items"] == []


def test_unknown_and_other_owners_studies_are_404(client):
    assert client.get("/api/v1/studies/nope").status_code == 404
    assert client.get("/api/v1/studies/nope/trials").status_code == 404
    study = client.post("/api/v1/studies", json={**EXAMPLE, "budget": {"n_trials": 1}}).json()
    client.app.state.settings.default_owner = "someone-else"
    try:
        assert client.get(f"/api/v1/studies/{study['id']}").status_code == 404
        assert client.get("/api/v1/studies").json()["items"] == []
    finally:
        client.app.state.settings.default_owner = "local"


def test_list_paginates_with_a_cursor_and_filters_by_status(client):
    ids = [
        client.post(
            "/api/v1/studies", json={**EXAMPLE, "name": f"s{i}", "budget": {"n_trials": 1}}
        ).json()["id"]
        for i in range(3)
    ]
    page = client.get("/api/v1/studies?limit=2").json()
    rest = client.get(f"/api/v1/studies?limit=2&cursor={page['next_cursor']}").json()
    assert [s["id"] for s in page["items"] + rest["items"]] == ids[::-1]
    assert rest["next_cursor"] is None
    assert client.get("/api/v1/studies?status=bogus").status_code == 422
    assert client.get("/api/v1/studies?cursor=garbage").status_code == 422


def test_export_csv_has_one_row_per_trial_and_the_contract_columns(client):
    study = client.post(
        "/api/v1/studies", json={**EXAMPLE, "budget": {"n_trials": 3, "max_parallel": 2}}
    ).json()
    wait_done(client, study["id"])
    r = client.get(f"/api/v1/studies/{study['id']}/export?format=csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 3
    header = list(rows[0])
    assert header[:6] == ["number", "state", "value", "attempts", "started_at", "finished_at"]
    assert header[6:9] == ["param_t", "param_rho", "param_samples"]
    assert "metric_val_accuracy" in header
    as_json = client.get(f"/api/v1/studies/{study['id']}/export?format=json").json()
    assert [row["number"] for row in as_json] == [0, 1, 2]


def test_trials_filter_by_state_and_page_incrementally(client):
    study = client.post("/api/v1/studies", json={**EXAMPLE, "budget": {"n_trials": 3}}).json()
    wait_done(client, study["id"])
    page = client.get(f"/api/v1/studies/{study['id']}/trials?limit=2").json()
    assert [t["number"] for t in page["items"]] == [0, 1] and page["next_after"] == 1
    rest = client.get(f"/api/v1/studies/{study['id']}/trials?after=1").json()
    assert [t["number"] for t in rest["items"]] == [2]
    assert client.get(f"/api/v1/studies/{study['id']}/trials?state=pruned").json()["items"] == []
    assert client.get(f"/api/v1/studies/{study['id']}/trials?state=bogus").status_code == 422
    assert client.get(f"/api/v1/studies/{study['id']}/trials/99").status_code == 404


def test_oversized_bodies_are_refused(client):
    r = client.post(
        "/api/v1/studies",
        content=b"{" + b" " * 2_000_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


def test_openapi_documents_the_spec_with_an_example(client):
    doc = client.get("/openapi.json").json()
    assert "StudySpec" in doc["components"]["schemas"]
    post = doc["paths"]["/api/v1/studies"]["post"]
    assert "digits" in post["requestBody"]["content"]["application/json"]["examples"]
