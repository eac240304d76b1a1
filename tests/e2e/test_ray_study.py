"""A study end to end on a real local Ray: HTTP submit, scheduler, Ray tasks training digits,
SQL, and the results read back over HTTP."""

from __future__ import annotations

import csv
import io
import time

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DIGITS_STUDY = {
    "name": "digits-e2e",
    "task": {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 2,
        "batch_size": 64,
        "label_noise": 0.2,
        "seed": 0,
    },
    "optimizer": {"method": "tsam", "lr": 0.05, "t": 1.0, "rho": 0.05, "samples": 2},
    "search_space": {
        "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
        "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "samples": {"type": "int", "low": 1, "high": 3},
    },
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "sampler": {"name": "random", "seed": 0},
    "budget": {"n_trials": 3, "max_parallel": 2},
    "resources": {"cpus": 1},
}


def wait_done(url: str, study_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = httpx.get(f"{url}/api/v1/studies/{study_id}", timeout=10).json()
        if study["status"] in ("completed", "failed", "cancelled"):
            return study
        time.sleep(0.5)
    raise AssertionError(study)


def test_digits_study_runs_on_ray_and_reads_back(live_server):
    url = live_server.url
    r = httpx.post(f"{url}/api/v1/studies", json=DIGITS_STUDY, timeout=30)
    assert r.status_code == 201, r.text
    study = wait_done(url, r.json()["id"])
    assert study["status"] == "completed" and study["counts"] == {"complete": 3}, study

    trials = httpx.get(f"{url}/api/v1/studies/{study['id']}/trials", timeout=10).json()["items"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    for t in trials:
        p = t["params"]
        assert 0.1 <= p["t"] <= 100 and 0.01 <= p["rho"] <= 0.5 and 1 <= p["samples"] <= 3
        assert 0.0 <= t["value"] <= 1.0 and t["attempts"] == 1
        assert 0.0 <= t["metrics"]["test_accuracy"] <= 1.0 and "sharpness" in t["metrics"]
    assert study["best_trial"]["value"] == max(t["value"] for t in trials)

    detail = httpx.get(f"{url}/api/v1/studies/{study['id']}/trials/0", timeout=10).json()
    assert [row["epoch"] for row in detail["intermediate"]] == [1, 2]
    assert all("val_accuracy" in row and "tilted_loss" in row for row in detail["intermediate"])
    env = detail["env"]
    assert env["node_id"] and env["node_ip"] == "127.0.0.1" and env["torch"], env

    exported = httpx.get(f"{url}/api/v1/studies/{study['id']}/export?format=csv", timeout=10)
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 3 and {
        "param_t",
        "param_rho",
        "param_samples",
        "metric_test_accuracy",
    } <= set(rows[0])


def test_a_clearly_worse_trial_is_pruned_on_ray(live_server):
    url = live_server.url
    spec = {
        "name": "prune-e2e",
        "task": {"dataset": "digits", "model": "mlp", "epochs": 4, "seed": 0},
        "optimizer": {"method": "erm"},
        # Seed 6 draws the choices in the order 0, 0, 1, 0, 1, 1: a good trial comes first.
        "search_space": {"lr": {"type": "categorical", "choices": [0.2, 1e-6]}},
        "sampler": {"name": "random", "seed": 6},
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "budget": {"n_trials": 4, "max_parallel": 1},
    }
    r = httpx.post(f"{url}/api/v1/studies", json=spec, timeout=30)
    assert r.status_code == 201, r.text
    study = wait_done(url, r.json()["id"])
    trials = httpx.get(f"{url}/api/v1/studies/{study['id']}/trials", timeout=10).json()["items"]
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned, trials
    assert all(t["params"]["lr"] == 1e-6 for t in pruned)
    assert all(t["value"] is not None and t["value"] < 0.5 for t in pruned)
    assert any(t["state"] == "complete" and t["value"] > 0.8 for t in trials)
