"""The shipped examples are valid, and the YAML and JSON study specs say the same thing."""

import json
from pathlib import Path

import yaml

from service.studies.spec import StudySpec, semantic_errors
from tsam_core.config import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_study_spec_is_valid_and_the_same_in_yaml_and_json():
    from_yaml = StudySpec.model_validate(
        yaml.safe_load((EXAMPLES / "digits-tsam.yaml").read_text())
    )
    from_json = StudySpec.model_validate(json.loads((EXAMPLES / "digits-tsam.json").read_text()))
    assert from_yaml == from_json
    assert semantic_errors(from_yaml, max_node_cpus=2, max_node_gpus=0) == []


def test_the_example_training_config_is_valid():
    config = TrainConfig.from_dict(yaml.safe_load((EXAMPLES / "train-digits.yaml").read_text()))
    assert config.method == "tsam" and config.dataset == "digits"


def test_the_compose_file_runs_commands_this_project_provides():
    compose = yaml.safe_load((EXAMPLES.parent / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "ray-head", "ray-gpu-worker", "api"}
    assert services["api"]["command"][:2] == ["tsam", "serve"]
    assert services["api"]["environment"]["TSAM_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["ray-head"]["command"][:3] == ["ray", "start", "--head"]
    worker = services["ray-gpu-worker"]
    assert worker["command"][:3] == ["ray", "start", "--address=ray-head:6379"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
