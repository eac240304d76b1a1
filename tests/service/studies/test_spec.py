"""The study spec: parsing, defaults, JSON round trip, and every error at its location."""

import dataclasses
import json
import math
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from service.studies import spec as spec_module
from service.studies.spec import (
    METHOD_KEYS,
    SEARCHABLE_KEYS,
    BudgetSpec,
    CategoricalParam,
    FloatParam,
    IntParam,
    ObjectiveSpec,
    OptimizerSpec,
    PrunerSpec,
    ResourcesSpec,
    SamplerSpec,
    StudySpec,
    TaskSpec,
    grid_size,
    is_known_metric,
    semantic_errors,
)
from tsam_core.config import TrainConfig

# DESIGN.md 3a, verbatim as JSON.
EXAMPLE_SPEC: dict[str, Any] = {
    "name": "digits-noisy-tsam",
    "task": {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 20,
        "batch_size": 64,
        "label_noise": 0.3,
        "seed": 0,
    },
    "optimizer": {
        "method": "tsam",
        "base": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "t": 1.0,
        "rho": 0.05,
        "samples": 3,
    },
    "search_space": {
        "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
        "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "samples": {"type": "int", "low": 1, "high": 8},
    },
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median", "n_warmup_steps": 3},
    "budget": {"n_trials": 32, "max_parallel": 2, "timeout_s": 3600},
    "resources": {"cpus": 1, "gpus": 0},
}

ALL_MODELS: list[type[BaseModel]] = [
    TaskSpec,
    OptimizerSpec,
    FloatParam,
    IntParam,
    CategoricalParam,
    ObjectiveSpec,
    SamplerSpec,
    PrunerSpec,
    BudgetSpec,
    ResourcesSpec,
    StudySpec,
]


def error_locs(data: dict[str, Any], *, as_json: bool = False) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        if as_json:
            StudySpec.model_validate_json(json.dumps(data))
        else:
            StudySpec.model_validate(data)
    return [tuple(e["loc"]) for e in info.value.errors()]


def semantic_locs(data: dict[str, Any], **limits: float | None) -> list[list[Any]]:
    return [e["loc"] for e in semantic_errors(StudySpec.model_validate(data), **limits)]


# -- parsing ----------------------------------------------------------------------------------


def test_design_example_spec_parses_and_has_no_semantic_errors():
    spec = StudySpec.model_validate(EXAMPLE_SPEC)
    assert spec.name == "digits-noisy-tsam"
    assert spec.task.label_noise == 0.3
    assert isinstance(spec.search_space["t"], FloatParam) and spec.search_space["t"].log
    assert isinstance(spec.search_space["samples"], IntParam)
    assert spec.objectives == [ObjectiveSpec(metric="val_accuracy", direction="maximize")]
    assert spec.pruner.name == "median" and spec.pruner.n_warmup_steps == 3
    assert semantic_errors(spec, max_node_cpus=4, max_node_gpus=0) == []


def test_empty_spec_is_valid_with_defaults():
    spec = StudySpec.model_validate({})
    assert spec.name == "study"
    assert (spec.task.dataset, spec.task.model, spec.task.epochs) == ("digits", "mlp", 10)
    assert spec.optimizer.method == "tsam"
    assert spec.search_space == {}
    assert spec.objectives == [ObjectiveSpec(metric="val_accuracy", direction="maximize")]
    assert (spec.sampler.name, spec.pruner.name) == ("tpe", "none")
    assert (spec.budget.n_trials, spec.budget.max_parallel) == (20, 2)
    assert (spec.resources.cpus, spec.resources.gpus) == (1.0, 0.0)
    assert semantic_errors(spec) == []


def test_optimizer_defaults_equal_train_config_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, value in OptimizerSpec().model_dump().items():
        assert defaults[name] == value, name


@pytest.mark.parametrize("data", [{}, EXAMPLE_SPEC])
def test_json_dump_parses_back_to_an_equal_spec(data):
    spec = StudySpec.model_validate(data)
    dumped = spec.model_dump(mode="json")
    assert StudySpec.model_validate(dumped) == spec
    assert StudySpec.model_validate_json(json.dumps(dumped)) == spec
    assert StudySpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("text", ["inf", "Infinity", "INF"])
def test_t_inf_string_is_infinity_in_python_and_inf_in_json(text):
    spec = StudySpec.model_validate({"optimizer": {"method": "tsam", "t": text}})
    assert spec.optimizer.t == math.inf
    dumped = spec.model_dump(mode="json")
    assert dumped["optimizer"]["t"] == "inf"
    assert json.loads(spec.model_dump_json())["optimizer"]["t"] == "inf"
    assert StudySpec.model_validate(dumped) == spec
    assert semantic_errors(spec) == []


def test_finite_t_stays_a_number_in_json():
    spec = StudySpec.model_validate({"optimizer": {"t": 5}})
    assert spec.model_dump(mode="json")["optimizer"]["t"] == 5.0


def test_multi_objective_list_gives_objectives_in_order():
    spec = StudySpec.model_validate(
        {
            "objective": [
                {"metric": "val_accuracy", "direction": "maximize"},
                {"metric": "noise_loss_mean@0.05", "direction": "minimize"},
            ]
        }
    )
    assert [o.metric for o in spec.objectives] == ["val_accuracy", "noise_loss_mean@0.05"]
    assert StudySpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("metric", "known"),
    [
        ("val_accuracy", True),
        ("wall_time", True),
        ("noise_loss_mean@0.05", True),
        ("noise_loss_var@1e-05", True),
        ("noise_loss_var@1", True),
        ("noise_loss_mean@", False),
        ("noise_loss_max@0.05", False),
        ("accuracy", False),
    ],
)
def test_known_metrics_include_noise_losses_at_any_sigma(metric, known):
    assert is_known_metric(metric) is known


def test_every_model_forbids_unknown_keys_and_documents_every_field():
    for model in ALL_MODELS:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
    schema = StudySpec.model_json_schema()
    assert schema["additionalProperties"] is False


def test_searchable_keys_are_train_config_fields_and_method_keys_searchable():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(SEARCHABLE_KEYS) <= fields
    assert len(SEARCHABLE_KEYS) == 21
    assert set(METHOD_KEYS) <= set(SEARCHABLE_KEYS)
    assert METHOD_KEYS["rho"] == {"sam", "tsam"}
    assert METHOD_KEYS["adaptive"] == {"sam"}
    assert METHOD_KEYS["t"] == {"tsam"}
    assert "lr" not in METHOD_KEYS


# -- field-level errors (pydantic) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"foo": 1}, ("foo",)),
        ({"task": {"lr": 0.1}}, ("task", "lr")),
        ({"task": {"dataset": "mnist"}}, ("task", "dataset")),
        ({"task": {"model": "vit"}}, ("task", "model")),
        ({"task": {"label_noise": 1.0}}, ("task", "label_noise")),
        ({"optimizer": {"method": "adam"}}, ("optimizer", "method")),
        ({"optimizer": {"lr": 0}}, ("optimizer", "lr")),
        ({"optimizer": {"lr": "inf"}}, ("optimizer", "lr")),
        ({"optimizer": {"t": -1}}, ("optimizer", "t")),
        ({"optimizer": {"t": "nan"}}, ("optimizer", "t")),
        ({"optimizer": {"samples": 65}}, ("optimizer", "samples")),
        ({"search_space": {"t": {"type": "float", "low": 2, "high": 1}}}, ("search_space", "t")),
        (
            {"search_space": {"t": {"type": "float", "low": 0, "high": 1, "log": True}}},
            ("search_space", "t"),
        ),
        (
            {"search_space": {"lr": {"type": "float", "low": 0.1, "high": 1, "step": 0}}},
            ("search_space", "lr"),
        ),
        (
            {"search_space": {"samples": {"type": "int", "low": 1, "high": 8, "step": -1}}},
            ("search_space", "samples"),
        ),
        (
            {
                "search_space": {
                    "lr": {"type": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}
                }
            },
            ("search_space", "lr"),
        ),
        ({"search_space": {"t": {"type": "int", "low": 5, "high": 1}}}, ("search_space", "t")),
        (
            {"search_space": {"method": {"type": "categorical", "choices": []}}},
            ("search_space", "method"),
        ),
        (
            {"search_space": {"t": {"type": "categorical", "choices": [1, 1.0]}}},
            ("search_space", "t"),
        ),
        (
            {"search_space": {"t": {"type": "float", "low": 1, "high": 2, "foo": 3}}},
            ("search_space", "t", "foo"),
        ),
        ({"search_space": {"t": {"type": "float", "low": 1}}}, ("search_space", "t", "high")),
        ({"search_space": {"t": {"type": "range", "low": 1, "high": 2}}}, ("search_space", "t")),
        ({"search_space": {"t": {"low": 1, "high": 2}}}, ("search_space", "t")),
        ({"objective": {"metric": "accuracy"}}, ("objective", "metric")),
        ({"objective": {"metric": "val_loss", "direction": "down"}}, ("objective", "direction")),
        ({"objective": [{"metric": "val_loss"}, {"metric": "foo"}]}, ("objective", 1, "metric")),
        ({"objective": []}, ("objective",)),
        ({"objective": [{"metric": "val_loss"}, {"metric": "val_loss"}]}, ("objective",)),
        ({"sampler": {"name": "bayes"}}, ("sampler", "name")),
        ({"pruner": {"percentile": 100}}, ("pruner", "percentile")),
        ({"pruner": {"reduction_factor": 1}}, ("pruner", "reduction_factor")),
        ({"pruner": {"min_resource": 0}}, ("pruner", "min_resource")),
        ({"pruner": {"min_resource": 5, "max_resource": 2}}, ("pruner",)),
        ({"budget": {"n_trials": 0}}, ("budget", "n_trials")),
        ({"budget": {"max_attempts": 11}}, ("budget", "max_attempts")),
        ({"budget": {"timeout_s": 0}}, ("budget", "timeout_s")),
        ({"resources": {"cpus": 0}}, ("resources", "cpus")),
        ({"resources": {"gpus": -1}}, ("resources", "gpus")),
        ({"name": ""}, ("name",)),
    ],
)
def test_invalid_field_is_reported_at_its_location(data, loc):
    assert loc in error_locs(data)
    assert loc in error_locs(data, as_json=True)


# -- cross-field errors (semantic_errors) -----------------------------------------------------


def cat(*choices: Any) -> dict[str, Any]:
    return {"type": "categorical", "choices": list(choices)}


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        (
            {"search_space": {"seed": {"type": "int", "low": 0, "high": 3}}},
            ["search_space", "seed"],
        ),
        ({"search_space": {"foo": cat(1, 2)}}, ["search_space", "foo"]),
        (
            {"optimizer": {"method": "erm"}, "search_space": {"t": cat(1.0, 5.0)}},
            ["search_space", "t"],
        ),
        (
            {"search_space": {"method": cat("tsam"), "adaptive": cat(True, False)}},
            ["search_space", "adaptive"],
        ),
        (
            {"search_space": {"samples": {"type": "int", "low": 0, "high": 4}}},
            ["search_space", "samples", "low"],
        ),
        (
            {"search_space": {"samples": {"type": "int", "low": 1, "high": 100}}},
            ["search_space", "samples", "high"],
        ),
        (
            {"search_space": {"lr": {"type": "float", "low": 0.0, "high": 0.1}}},
            ["search_space", "lr", "low"],
        ),
        ({"search_space": {"method": cat("sam", "adam")}}, ["search_space", "method", "choices"]),
        (
            {"search_space": {"noise": cat("gaussian", "cauchy")}},
            ["search_space", "noise", "choices"],
        ),
        (
            {"search_space": {"samples": {"type": "float", "low": 1, "high": 4}}},
            ["search_space", "samples"],
        ),
        (
            {"search_space": {"method": {"type": "int", "low": 0, "high": 2}}},
            ["search_space", "method"],
        ),
        (
            {"search_space": {"delta": {"type": "float", "low": 0, "high": 0.5}}},
            ["search_space", "delta"],
        ),
        (
            {"optimizer": {"t_schedule": "ramp_up"}, "search_space": {"t": cat(1.0, "inf")}},
            ["search_space", "t", "choices"],
        ),
        (
            {"search_space": {"t": cat(1.0, "inf"), "t_schedule": cat("constant", "ramp_up")}},
            ["search_space", "t"],
        ),
        ({"optimizer": {"delta": 0.5, "sampler": "ascent"}}, ["optimizer"]),
        ({"optimizer": {"t": "inf", "t_schedule": "ramp_down"}}, ["optimizer"]),
        (
            {
                "objective": [
                    {"metric": "val_accuracy", "direction": "maximize"},
                    {"metric": "sharpness", "direction": "minimize"},
                ],
                "pruner": {"name": "median"},
            },
            ["pruner", "name"],
        ),
        (
            {
                "objective": [{"metric": "val_accuracy"}, {"metric": "val_loss"}],
                "sampler": {"name": "cmaes"},
            },
            ["sampler", "name"],
        ),
        (
            {
                "sampler": {"name": "grid"},
                "search_space": {"lr": {"type": "float", "low": 0.01, "high": 0.1}},
            },
            ["search_space", "lr"],
        ),
        (
            {
                "sampler": {"name": "grid"},
                "search_space": {
                    "lr": {"type": "float", "low": 0.001, "high": 1.0, "step": 0.001},
                    "batch_size": {"type": "int", "low": 1, "high": 1000},
                },
            },
            ["search_space"],
        ),
        ({"sampler": {"name": "grid"}}, ["search_space"]),
    ],
)
def test_cross_field_error_is_reported_at_its_location(data, loc):
    assert loc in semantic_locs(data)
    for error in semantic_errors(StudySpec.model_validate(data)):
        assert error["type"] == "value_error" and error["msg"]
        assert error["loc"][0] != "body"


def test_gpu_request_on_an_executor_without_gpus_is_an_error():
    errors = semantic_errors(
        StudySpec.model_validate({"resources": {"gpus": 1}}), max_node_cpus=8, max_node_gpus=0
    )
    assert [e["loc"] for e in errors] == [["resources", "gpus"]]
    assert errors[0]["msg"] == "no node of this executor has a GPU"


def test_resources_larger_than_the_largest_node_are_errors():
    data = {"resources": {"cpus": 8, "gpus": 2}}
    assert semantic_locs(data, max_node_cpus=2, max_node_gpus=1) == [
        ["resources", "gpus"],
        ["resources", "cpus"],
    ]
    assert semantic_locs(data, max_node_cpus=8, max_node_gpus=2) == []


def test_resource_checks_are_skipped_without_a_known_maximum():
    assert semantic_locs({"resources": {"cpus": 64, "gpus": 4}}) == []


def test_conditional_keys_are_fine_when_some_searched_method_uses_them():
    data = {
        "optimizer": {"method": "erm"},
        "search_space": {
            "method": cat("erm", "sam", "tsam"),
            "t": {"type": "float", "low": 0.0, "high": 20.0},
            "rho": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
            "adaptive": cat(True, False),
            "samples": {"type": "int", "low": 1, "high": 8},
            "sampler": cat("ascent", "hmc"),
            "delta": {"type": "float", "low": 0.0, "high": 1.0},
            "hmc_steps": cat(1, 2),
        },
    }
    assert semantic_locs(data) == []


def test_hmc_only_keys_need_an_hmc_sampler():
    space = {"hmc_steps": {"type": "int", "low": 1, "high": 4}}
    assert semantic_locs({"search_space": space}) == [["search_space", "hmc_steps"]]
    assert semantic_locs({"optimizer": {"sampler": "hmc"}, "search_space": space}) == []


def test_searched_sampler_choice_conflicting_with_fixed_delta_is_an_error():
    data = {
        "optimizer": {"sampler": "hmc", "delta": 0.5},
        "search_space": {"sampler": cat("ascent", "hmc")},
    }
    assert semantic_locs(data) == [["search_space", "sampler", "choices"]]


def test_t_inf_choice_is_valid_with_a_constant_schedule():
    assert semantic_locs({"search_space": {"t": cat(0.0, 1.0, "inf")}}) == []


def test_grid_size_counts_every_combination():
    spec = StudySpec.model_validate(
        {
            "search_space": {
                "lr": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1},
                "samples": {"type": "int", "low": 1, "high": 7, "step": 3},
                "base": cat("sgd", "adamw"),
            }
        }
    )
    assert grid_size(spec) == 5 * 3 * 2


def test_cmaes_without_its_package_is_an_error(monkeypatch):
    real = spec_module.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "cmaes" else real(name, *args)

    monkeypatch.setattr(spec_module.importlib.util, "find_spec", find_spec)
    assert semantic_locs({"sampler": {"name": "cmaes"}}) == [["sampler", "name"]]


def test_the_spec_reference_in_docs_is_generated_from_the_models():
    from pathlib import Path

    from service.studies.reference import render

    path = Path(__file__).resolve().parents[3] / "docs" / "spec.md"
    assert path.read_text() == render(), (
        "regenerate: python -m service.studies.reference > docs/spec.md"
    )
