"""Optuna glue: samplers, pruners, the conditional search space, rebuilds and objectives."""

import itertools
import math
from typing import Any

import optuna
import pytest

from service import search
from service.studies.spec import METHOD_KEYS, SAMPLER_KEYS, StudySpec, semantic_errors
from tsam_core.config import TrainConfig


def make_spec(**sections: Any) -> StudySpec:
    spec = StudySpec.model_validate(sections)
    assert semantic_errors(spec) == []
    return spec


def run_trials(study: optuna.Study, spec: StudySpec, n: int) -> list[dict[str, Any]]:
    suggestions = []
    for _ in range(n):
        trial = study.ask()
        params = search.suggest_params(trial, spec)
        suggestions.append(params)
        study.tell(trial, float(len(params)))
    return suggestions


CONDITIONAL_SPACE = {
    "method": {"type": "categorical", "choices": ["erm", "sam", "tsam"]},
    "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
    "rho": {"type": "float", "low": 0.01, "high": 0.5},
    "samples": {"type": "int", "low": 1, "high": 8},
    "lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
}


def test_random_suggestions_respect_bounds_and_the_methods_keys():
    spec = make_spec(search_space=CONDITIONAL_SPACE, sampler={"name": "random", "seed": 7})
    study = search.create_optuna_study(spec)
    seen_methods = set()
    for params in run_trials(study, spec, 60):
        method = params["method"]
        seen_methods.add(method)
        expected = {"method", "lr"} | {
            key for key in ("t", "rho", "samples") if method in METHOD_KEYS[key]
        }
        assert set(params) == expected
        if method == "erm":
            assert "t" not in params and "rho" not in params
        if method == "sam":
            assert "rho" in params and "t" not in params
        assert 0.01 <= params["lr"] <= 0.1
        if "t" in params:
            assert 0.1 <= params["t"] <= 100.0
        if "rho" in params:
            assert 0.01 <= params["rho"] <= 0.5
        if "samples" in params:
            assert isinstance(params["samples"], int) and 1 <= params["samples"] <= 8
        config = TrainConfig.from_dict(search.trial_config(spec, params))
        assert config.method == method and config.lr == params["lr"]
    assert seen_methods == {"erm", "sam", "tsam"}


def test_method_is_suggested_first_whatever_the_spec_order():
    space = dict(reversed(list(CONDITIONAL_SPACE.items())))
    spec = make_spec(search_space=space, sampler={"name": "random", "seed": 0})
    study = search.create_optuna_study(spec)
    trial = study.ask()
    params = search.suggest_params(trial, spec)
    assert next(iter(params)) == "method"
    assert next(iter(trial.params)) == "method"


def test_hmc_only_keys_are_suggested_only_for_hmc_trials():
    spec = make_spec(
        search_space={
            "delta": {"type": "float", "low": 0.0, "high": 1.0},
            "hmc_steps": {"type": "int", "low": 1, "high": 4},
            "sampler": {"type": "categorical", "choices": ["ascent", "hmc", "none"]},
        },
        sampler={"name": "random", "seed": 3},
    )
    study = search.create_optuna_study(spec)
    samplers = set()
    for params in run_trials(study, spec, 40):
        samplers.add(params["sampler"])
        hmc_keys = set(params) & set(SAMPLER_KEYS)
        assert hmc_keys == ({"delta", "hmc_steps"} if params["sampler"] == "hmc" else set())
        TrainConfig.from_dict(search.trial_config(spec, params))
    assert samplers == {"ascent", "hmc", "none"}


def test_tpe_suggestions_over_a_conditional_space_all_build_configs():
    spec = make_spec(
        search_space=CONDITIONAL_SPACE, sampler={"name": "tpe", "seed": 0, "n_startup_trials": 5}
    )
    study = search.create_optuna_study(spec)
    for params in run_trials(study, spec, 15):
        TrainConfig.from_dict(search.trial_config(spec, params))


def test_grid_sampler_enumerates_exactly_the_grid():
    spec = make_spec(
        search_space={
            "lr": {"type": "float", "low": 0.1, "high": 0.3, "step": 0.1},
            "samples": {"type": "int", "low": 1, "high": 5, "step": 2},
            "base": {"type": "categorical", "choices": ["sgd", "adamw"]},
        },
        sampler={"name": "grid", "seed": 0},
    )
    expected = {
        (lr, samples, base)
        for lr, samples, base in itertools.product([0.1, 0.2, 0.3], [1, 3, 5], ["sgd", "adamw"])
    }
    study = search.create_optuna_study(spec)
    suggestions = run_trials(study, spec, len(expected))  # telling the last one must not raise
    got = [(p["lr"], p["samples"], p["base"]) for p in suggestions]
    assert len(got) == len(set(got)) and set(got) == expected
    for params in suggestions:
        TrainConfig.from_dict(search.trial_config(spec, params))
    run_trials(study, spec, 1)  # past the grid: a repeat, not an error


def test_grid_over_a_conditional_space_runs_each_distinct_configuration_once():
    spec = make_spec(
        search_space={
            "method": {"type": "categorical", "choices": ["erm", "tsam"]},
            "t": {"type": "categorical", "choices": [1.0, 5.0, 20.0]},
        },
        sampler={"name": "grid", "seed": 0},
    )
    study = search.create_optuna_study(spec)
    got = run_trials(study, spec, 4)  # erm ignores t: 1 + 3 distinct runs, not 2 * 3
    assert sorted(got, key=str) == sorted(
        [{"method": "erm"}, *({"method": "tsam", "t": t} for t in (1.0, 5.0, 20.0))], key=str
    )


def test_grid_rebuilt_from_stored_trials_runs_only_the_points_not_yet_run():
    spec = make_spec(
        search_space={
            "base": {"type": "categorical", "choices": ["sgd", "adamw"]},
            "samples": {"type": "int", "low": 1, "high": 3},
        },
        sampler={"name": "grid", "seed": 1},
    )
    study = search.create_optuna_study(spec)
    first = run_trials(study, spec, 3)
    # A restart: the middle trial was still running and is not rebuilt.
    dists = search.distributions(spec)
    rebuilt = search.create_optuna_study(spec)
    rebuilt.add_trials(
        [
            optuna.trial.create_trial(
                params=p, distributions={k: dists[k] for k in p}, values=[0.5]
            )
            for p in (first[0], first[2])
        ]
    )
    rest = run_trials(rebuilt, spec, 4)
    everything = {(p["base"], p["samples"]) for p in [first[0], first[2], *rest]}
    assert len(everything) == 6 and first[1] in rest


def test_grid_values_put_floats_exactly_on_their_steps():
    spec = make_spec(
        search_space={"rho": {"type": "float", "low": 0.01, "high": 0.05, "step": 0.01}},
        sampler={"name": "grid"},
    )
    assert search.grid_values(spec) == {"rho": [0.01, 0.02, 0.03, 0.04, 0.05]}


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("gp", optuna.samplers.GPSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("qmc", optuna.samplers.QMCSampler),
    ],
)
def test_build_sampler_maps_names_to_optuna_samplers(name, cls):
    spec = make_spec(sampler={"name": name, "seed": 1})
    assert isinstance(search.build_sampler(spec), cls)


def test_build_sampler_grid_is_a_grid_sampler():
    spec = make_spec(
        sampler={"name": "grid"}, search_space={"base": {"type": "categorical", "choices": ["sgd"]}}
    )
    assert isinstance(search.build_sampler(spec), optuna.samplers.GridSampler)


@pytest.mark.parametrize(
    ("pruner", "cls"),
    [
        ({"name": "none"}, optuna.pruners.NopPruner),
        ({"name": "median", "n_warmup_steps": 3}, optuna.pruners.MedianPruner),
        ({"name": "percentile", "percentile": 10.0}, optuna.pruners.PercentilePruner),
        ({"name": "hyperband"}, optuna.pruners.HyperbandPruner),
        (
            {"name": "hyperband", "min_resource": 2, "max_resource": 20},
            optuna.pruners.HyperbandPruner,
        ),
        ({"name": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"name": "successive_halving", "min_resource": 2}, optuna.pruners.SuccessiveHalvingPruner),
    ],
)
def test_build_pruner_maps_names_to_optuna_pruners(pruner, cls):
    assert isinstance(search.build_pruner(make_spec(pruner=pruner)), cls)


def test_hyperband_auto_min_resource_is_optunas_default_of_one():
    pruner = search.build_pruner(make_spec(pruner={"name": "hyperband"}))
    assert pruner._min_resource == 1  # Optuna's HyperbandPruner keeps it here


def test_median_pruner_prunes_a_trial_far_below_the_others():
    spec = make_spec(pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    study = search.create_optuna_study(spec)
    for _ in range(3):
        trial = study.ask()
        trial.report(0.9, step=1)
        study.tell(trial, 0.9)
    trial = study.ask()
    trial.report(0.1, step=1)
    assert trial.should_prune()


def test_study_directions_follow_the_objectives():
    spec = make_spec(
        objective=[
            {"metric": "val_accuracy", "direction": "maximize"},
            {"metric": "sharpness", "direction": "minimize"},
        ]
    )
    study = search.create_optuna_study(spec)
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]


def test_distributions_match_what_suggest_params_records():
    spec = make_spec(search_space=CONDITIONAL_SPACE, sampler={"name": "random", "seed": 0})
    dists = search.distributions(spec)
    assert set(dists) == set(CONDITIONAL_SPACE)
    study = search.create_optuna_study(spec)
    for _ in range(10):
        trial = study.ask()
        search.suggest_params(trial, spec)
        frozen = study.tell(trial, 0.5)
        for key, dist in frozen.distributions.items():
            assert dist == dists[key]


def test_rebuilt_study_has_the_same_best_trial_and_continues_numbering():
    spec = make_spec(search_space=CONDITIONAL_SPACE, sampler={"name": "tpe", "seed": 0})
    study = search.create_optuna_study(spec)
    stored = []
    for i in range(5):
        trial = study.ask()
        params = search.suggest_params(trial, spec)
        value = [0.3, 0.9, 0.5, 0.7, 0.1][i]
        study.tell(trial, value)
        stored.append((params, [value]))

    dists = search.distributions(spec)
    rebuilt = search.create_optuna_study(spec)
    rebuilt.add_trials(
        [
            optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, values=values
            )
            for params, values in stored
        ]
    )
    assert rebuilt.best_trial.params == study.best_trial.params
    assert rebuilt.best_trial.value == study.best_trial.value == 0.9
    assert rebuilt.best_trial.number == study.best_trial.number == 1
    assert rebuilt.ask().number == 5


def test_trial_config_merges_task_optimizer_and_params():
    spec = make_spec(
        task={"dataset": "digits", "epochs": 3},
        optimizer={"method": "sam", "lr": 0.1},
        search_space={"rho": {"type": "float", "low": 0.01, "high": 0.1}},
    )
    flat = search.trial_config(spec, {"rho": 0.07})
    assert "data_dir" not in flat
    assert (flat["epochs"], flat["method"], flat["lr"], flat["rho"]) == (3, "sam", 0.1, 0.07)
    config = TrainConfig.from_dict(flat)
    assert config.rho == 0.07 and config.epochs == 3


def test_trial_config_keeps_a_data_dir_and_turns_t_inf_into_infinity(tmp_path):
    spec = make_spec(
        task={"data_dir": str(tmp_path)},
        search_space={"t": {"type": "categorical", "choices": [1.0, "inf"]}},
    )
    flat = search.trial_config(spec, {"t": "inf"})
    assert flat["data_dir"] == str(tmp_path)
    assert flat["t"] == math.inf
    assert TrainConfig(**flat).t == math.inf


def test_objective_values_single_and_multi():
    single = make_spec(objective={"metric": "val_accuracy", "direction": "maximize"})
    multi = make_spec(
        objective=[
            {"metric": "sharpness", "direction": "minimize"},
            {"metric": "val_accuracy", "direction": "maximize"},
        ]
    )
    metrics = {"val_accuracy": 0.9, "sharpness": 0.02, "val_loss": 0.3}
    assert search.objective_values(single, metrics) == [0.9]
    assert search.objective_values(multi, metrics) == [0.02, 0.9]


@pytest.mark.parametrize(
    "metrics",
    [
        {},
        {"val_loss": 0.3},
        {"val_accuracy": math.nan},
        {"val_accuracy": math.inf},
        {"val_accuracy": None},
        {"val_accuracy": "0.9"},
    ],
)
def test_objective_values_none_when_missing_or_not_finite(metrics):
    assert search.objective_values(make_spec(), metrics) is None


def test_multi_objective_values_none_when_one_is_missing():
    spec = make_spec(
        objective=[{"metric": "val_accuracy"}, {"metric": "sharpness", "direction": "minimize"}]
    )
    assert search.objective_values(spec, {"val_accuracy": 0.9}) is None
