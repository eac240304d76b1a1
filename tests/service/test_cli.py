"""The remote ``tsam`` commands through Typer's CliRunner against one live server (uvicorn in a
thread, the in-process executor, a SQLite file): submit, watch, ls/show/trials, the verbs,
budget, enqueue, export (CSV, JSON, into an Optuna storage), and exit codes with messages."""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import optuna
import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app
from tests.service.live import LocalServer, local_server, sleep_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LocalServer]:
    with local_server(tmp_path_factory.mktemp("cli")) as live:
        yield live


def tsam(server: LocalServer, *args: str) -> Any:
    return runner.invoke(app, [*args, "--url", server.url])


def submitted(server: LocalServer, tmp_path, **overrides: Any) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(sleep_spec("cli-study", **overrides)))
    result = tsam(server, "submit", str(path))
    assert result.exit_code == 0, result.output
    return str(result.stdout.strip())


def test_submit_from_yaml_watch_and_export_csv(server, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(sleep_spec("cli-watch")))
    result = tsam(server, "submit", str(path), "--watch", "--poll-s", "0.1")
    assert result.exit_code == 0, result.output
    study_id = result.stdout.strip()
    assert len(study_id) == 16
    assert "completed" in result.stderr and "best trials" in result.stderr

    result = tsam(server, "export", study_id, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    show = json.loads(tsam(server, "show", study_id, "--json").stdout)
    assert len(rows) == sum(show["counts"].values()) == 4
    assert {"param_t", "param_rho", "param_samples"} <= set(rows[0])

    out = tmp_path / "trials.json"
    result = tsam(server, "export", study_id, "--format", "json", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert [r["number"] for r in json.loads(out.read_text())] == [0, 1, 2, 3]

    result = tsam(server, "watch", study_id, "--poll-s", "0.1")
    assert result.exit_code == 0 and "completed" in result.stderr


def test_ls_show_and_trials(server, tmp_path):
    study_id = submitted(server, tmp_path)
    server.wait_done(study_id)
    result = tsam(server, "ls", "--json", "--limit", "1")
    assert result.exit_code == 0, result.output
    page = json.loads(result.stdout)
    api = httpx.get(f"{server.url}/api/v1/studies", params={"limit": 1}).json()
    assert page == api and set(page) == {"items", "next_cursor"}
    result = tsam(server, "ls", "--status", "completed")
    assert result.exit_code == 0 and study_id in result.stdout
    result = tsam(server, "show", study_id)
    assert result.exit_code == 0 and "completed" in result.stdout and "best" in result.stdout
    result = tsam(server, "trials", study_id, "--state", "complete", "--json")
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)["items"]) == 4
    result = tsam(server, "trials", study_id, "--limit", "2")
    assert result.exit_code == 0 and "--after 1" in result.stderr


def test_verbs_budget_and_enqueue(server, tmp_path):
    study_id = submitted(
        server,
        tmp_path,
        task={"dataset": "digits", "model": "mlp", "epochs": 10},
        budget={"n_trials": 2, "max_parallel": 1},
    )
    result = tsam(server, "pause", study_id)
    assert result.exit_code == 0 and "paused" in result.stdout
    result = tsam(server, "budget", study_id, "--n-trials", "4", "--max-parallel", "2")
    assert result.exit_code == 0, result.output
    assert "n_trials=4" in result.stdout and "max_parallel=2" in result.stdout
    result = tsam(server, "enqueue", study_id, "method=sam", "rho=0.05")
    assert result.exit_code == 0, result.output
    number = int(result.stdout)
    result = tsam(server, "enqueue", study_id, "nope=1")
    assert result.exit_code == 2 and "params.nope" in result.stderr
    result = tsam(server, "enqueue", study_id, "t=inf")
    assert result.exit_code == 0, result.output
    assert tsam(server, "resume", study_id).exit_code == 0
    done = server.wait_done(study_id)
    assert done["status"] == "completed" and done["counts"] == {"complete": 4}
    trial = httpx.get(f"{server.url}/api/v1/studies/{study_id}/trials/{number}").json()
    assert trial["params"] == {"method": "sam", "rho": 0.05} and trial["source"] == "enqueued"

    result = tsam(server, "budget", study_id)
    assert result.exit_code == 2 and "nothing to change" in result.stderr
    result = tsam(server, "pause", study_id)
    assert result.exit_code == 1 and "completed" in result.stderr and "409" in result.stderr
    result = tsam(server, "delete", study_id)
    assert result.exit_code == 0 and "deleted" in result.stdout

    other = submitted(server, tmp_path, task={"dataset": "digits", "model": "mlp", "epochs": 40})
    result = tsam(server, "cancel", other)
    assert result.exit_code == 0 and "cancelled" in result.stdout
    result = tsam(server, "watch", other, "--poll-s", "0.1")
    assert result.exit_code == 1 and "cancelled" in result.stderr


def test_export_into_optuna_storage(server, tmp_path):
    study_id = submitted(server, tmp_path)
    server.wait_done(study_id)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = tsam(server, "export", study_id, "--optuna-storage", storage)
    assert result.exit_code == 0, result.output
    loaded = optuna.load_study(study_name="cli-study", storage=storage)
    ours = httpx.get(f"{server.url}/api/v1/studies/{study_id}/trials").json()["items"]
    assert len(loaded.trials) == len(ours) == 4
    for frozen, trial in zip(
        sorted(loaded.trials, key=lambda t: t.user_attrs["number"]), ours, strict=True
    ):
        assert frozen.params == trial["params"]
        assert frozen.value == pytest.approx(trial["value"])
        assert sorted(frozen.intermediate_values) == [1, 2, 3]
        assert frozen.distributions["t"] == optuna.distributions.FloatDistribution(
            0.1, 100.0, log=True
        )
    result = tsam(server, "export", study_id, "--optuna-storage", storage)
    assert result.exit_code == 1 and "already has an Optuna study" in result.stderr
    result = tsam(server, "export", study_id, "--optuna-storage", storage, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(optuna.load_study(study_name="cli-study", storage=storage).trials) == 4


def test_error_exit_codes(server, tmp_path):
    bad = tmp_path / "bad.yaml"
    spec = sleep_spec("bad")
    spec["search_space"]["rho"]["low"] = 0.9
    bad.write_text(yaml.safe_dump(spec))
    result = tsam(server, "submit", str(bad))
    assert result.exit_code == 2
    assert "search_space.rho" in result.stderr and "error" in result.stderr

    result = tsam(server, "submit", str(bad), "--validate-only")
    assert result.exit_code == 2
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(sleep_spec("good")))
    result = tsam(server, "submit", str(good), "--validate-only")
    assert result.exit_code == 0 and json.loads(result.stdout)["budget"]["max_failures"] == 5

    result = tsam(server, "submit", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2 and "cannot read" in result.stderr
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    result = tsam(server, "submit", str(tmp_path / "broken.yaml"))
    assert result.exit_code == 2 and "not valid YAML" in result.stderr

    result = tsam(server, "show", "0123456789abcdef")
    assert result.exit_code == 1
    assert "study '0123456789abcdef' not found" in result.stderr and "404" in result.stderr
    result = tsam(server, "export", "0123456789abcdef", "--format", "xml")
    assert result.exit_code == 2
    result = tsam(server, "enqueue", "0123456789abcdef", "novalue")
    assert result.exit_code == 2 and "key=value" in result.stderr
    result = tsam(server, "ls", "--limit", "zero")
    assert result.exit_code == 2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = runner.invoke(app, ["ls", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1 and "cannot reach" in result.stderr


def test_url_from_the_environment(server):
    result = runner.invoke(app, ["ls", "--json"], env={"TSAM_URL": server.url})
    assert result.exit_code == 0, result.output
    assert "items" in json.loads(result.stdout)
