"""The Python client (service.client) against the app in-process (FastAPI's TestClient is an
httpx.Client), trials in threads with the zero-work sleep runner. The client does not care
which database the server uses, so one SQLite file serves."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import socket
import sys
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import (
    Client,
    Conflict,
    ExportExists,
    NotFound,
    SpecError,
    StudyHandle,
    Unreachable,
    ValidationFailed,
    format_errors,
    progress_of,
)
from service.settings import Settings
from workers.executor import InProcessExecutor

SPEC: dict[str, Any] = {
    "name": "client-study",
    "task": {"dataset": "digits", "model": "mlp", "epochs": 2},
    "optimizer": {"method": "tsam", "t": 1.0, "rho": 0.1, "samples": 3},
    "search_space": {
        "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
        "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    },
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 3, "max_parallel": 2},
    "runner": {"name": "sleep", "sleep_s": 0.02},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[Client]:
    root = tmp_path_factory.mktemp("client")
    settings = Settings(
        database_url=f"sqlite:///{root / 'tsam.db'}",
        checkpoint_root=str(root / "runs"),
        scheduler_tick_s=0.2,
    )
    app = create_app(settings, executor=InProcessExecutor(slots=2))
    with TestClient(app) as http, Client(http=http) as c:
        yield c


def spec(**budget: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out["budget"].update(budget)
    return out


def test_submit_from_yaml_and_wait(client, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    handle = client.submit(path)
    assert isinstance(handle, StudyHandle) and handle.status in ("queued", "running")
    study = handle.wait(poll_s=0.1, timeout=60)
    assert study["status"] == "completed" and handle.done
    assert handle.best_trial is not None and handle.best_trial["state"] == "complete"
    trials = handle.trials()
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert progress_of(study) == (3, 3)
    assert max(t["value"] for t in trials) == handle.best_trial["value"]
    frame = handle.dataframe()
    assert len(frame) == 3 and {"param_t", "param_rho", "metric_val_accuracy"} <= set(frame)
    rows = list(csv.DictReader(io.StringIO(client.export(handle.id, "csv"))))
    assert len(rows) == 3 and rows[0]["state"] == "complete"
    assert client.export(handle.id, "json")[0]["number"] == 0
    detail = client.trial(handle.id, 0)
    assert [r["epoch"] for r in detail["intermediate"]] == [1, 2]


def test_json_file_validate_only_and_idempotency(client, tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(spec(n_trials=1)))
    normalized = client.validate(path)
    assert normalized["budget"]["max_failures"] == 5 and "id" not in normalized
    first = client.create(path, idempotency_key="client-key-1")
    again = client.create(path, idempotency_key="client-key-1")
    assert first["id"] == again["id"]
    client.study(first["id"]).wait(poll_s=0.1, timeout=60)


def test_listing_and_trial_pages(client):
    handle = client.submit(spec(n_trials=5, max_parallel=2))
    handle.wait(poll_s=0.1, timeout=60)
    page = client.list_studies(limit=1)
    assert len(page["items"]) == 1 and page["next_cursor"]
    ids = [s["id"] for s in client.iter_studies(page_size=1)]
    assert handle.id in ids and len(ids) == len(set(ids))
    assert [s["status"] for s in client.iter_studies(status="completed")].count("completed") >= 1
    first = client.trials(handle.id, limit=2)
    assert len(first["items"]) == 2 and first["next_after"] == 1
    numbers = [t["number"] for t in client.iter_trials(handle.id, page_size=2)]
    assert numbers == [0, 1, 2, 3, 4]
    assert [t["number"] for t in client.iter_trials(handle.id, after=2)] == [3, 4]
    assert client.all_trials(handle.id, state="running") == []


def test_lifecycle_budget_and_enqueue(client):
    handle = client.submit(spec(n_trials=2, max_parallel=1))
    assert handle.pause()["status"] == "paused"
    edited = client.set_budget(handle.id, n_trials=4)
    assert edited["spec"]["budget"]["n_trials"] == 4
    assert client.patch(handle.id, priority=2)["priority"] == 2
    assert client.enqueue(handle.id, {"t": math.inf})["params"] == {"t": "inf"}
    item = client.enqueue(handle.id, {"method": "sam", "rho": 0.05})
    assert item["source"] == "enqueued" and item["state"] == "waiting"
    assert handle.resume()["status"] in ("queued", "running")
    final = handle.wait(poll_s=0.1, timeout=60)
    assert final["status"] == "completed"
    assert {t["source"] for t in handle.trials()} == {"sampler", "enqueued"}
    client.delete(handle.id)
    with pytest.raises(NotFound):
        client.get(handle.id)

    other = client.submit(spec(n_trials=1))
    other.cancel()
    with pytest.raises(Conflict) as err:
        other.resume()
    assert err.value.status == 409 and "cancelled" in err.value.message


def test_errors_are_typed(client, tmp_path):
    bad = spec()
    bad["search_space"]["t"]["low"] = 500.0
    with pytest.raises(ValidationFailed) as err:
        client.submit(bad)
    assert err.value.status == 422
    assert err.value.errors and err.value.errors[0]["loc"][:3] == ["body", "search_space", "t"]
    assert "search_space.t" in err.value.message
    with pytest.raises(NotFound) as missing:
        client.get("0123456789abcdef")
    assert missing.value.status == 404 and "0123456789abcdef" in missing.value.message
    with pytest.raises(SpecError, match="cannot read"):
        client.submit(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        client.submit(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SpecError, match="not valid JSON"):
        client.submit(tmp_path / "broken.json")
    assert format_errors([{"loc": ["query", "limit"], "msg": "bad"}]) == "limit: bad"


def test_health_and_unreachable(client):
    assert client.healthz() == {"status": "ok"}
    assert client.readyz()["ready"] is True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", token="secret", timeout=2) as dead:
        assert dead.http.headers["Authorization"] == "Bearer secret"
        with pytest.raises(Unreachable) as err:
            dead.healthz()
    assert err.value.status is None


def test_export_into_optuna_storage(client, tmp_path):
    body = spec(n_trials=3)
    body["pruner"] = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}
    handle = client.submit(body)
    client.enqueue(handle.id, {"method": "erm"})
    handle.wait(poll_s=0.1, timeout=60)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client.export_optuna(handle.id, storage)
    loaded = optuna.load_study(study_name="client-study", storage=storage)
    ours = {t["number"]: t for t in handle.trials()}
    assert len(loaded.trials) == len(ours)
    for frozen in loaded.trials:
        trial = ours[frozen.user_attrs["number"]]
        assert frozen.user_attrs["params"] == trial["params"]
        assert frozen.params == {k: v for k, v in trial["params"].items() if k != "method"}
        if trial["state"] == "complete":
            assert frozen.value == pytest.approx(trial["value"])
            assert sorted(frozen.intermediate_values) == [1, 2]
    with pytest.raises(ExportExists):
        client.export_optuna(handle.id, storage)
    assert len(client.export_optuna(handle.id, storage, overwrite=True).trials) == len(ours)


def test_dataframe_without_pandas(client, monkeypatch):
    handle = client.submit(spec(n_trials=1))
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="needs pandas"):
        handle.dataframe()
    handle.wait(poll_s=0.1, timeout=60)
