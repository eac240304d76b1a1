"""`tsam train`: one local run from YAML, and exit code 2 on bad input."""

import json

from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def test_train_runs_a_yaml_config_and_prints_metrics(tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text(
        "task: {dataset: digits, model: mlp, epochs: 1}\n"
        "optimizer: {method: sam, rho: 0.05}\n"
        "sharpness_draws: 1\n"
    )
    result = runner.invoke(app, ["train", str(spec), "--json", "--set", "num_threads=1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["epoch"] == 1


def test_train_with_an_unknown_setting_exits_2(tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text("task: {dataset: digits, epoch: 1}\n")
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2
    assert "unknown training setting" in result.stderr


def test_train_with_a_missing_file_exits_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_train_with_invalid_yaml_exits_2(tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text("task: [unclosed\n")
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2 and "not valid YAML" in result.stderr
