"""One frozen settings dataclass per paper experiment (``upweight.paper.config``).

For each experiment ``upweight reproduce`` runs: the options' defaults are the config's defaults
(an empty command line gives the default config), each option sets its field, a bad value is an
InputError naming the setting (and, from the CLI, the option), and results.json's ``settings`` is
``dataclasses.asdict`` of the config the run used. Fig. 2's are in tests/test_fig2.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest

from conftest import shared_data
from upweight.cli.main import build_parser, main
from upweight.errors import InputError
from upweight.paper.config import (
    AttackConfig,
    CompareModelsConfig,
    FeatureConfig,
    Fig1Config,
    Fig2Config,
    Fig3Config,
    MislabelConfig,
    MismatchConfig,
)

MNIST = shared_data("mnist")
HOSPITAL = shared_data("hospital", "hospital_koh2017.npz")
ENRON = shared_data("enron1", "enron1.csv.gz")

#: experiment → (CLI module, config class, fields without an option)
EXPERIMENTS = {
    "fig1": ("fig1", Fig1Config, set()),
    "fig3": ("fig3", Fig3Config, {"tol"}),
    "compare-models": ("compare_models", CompareModelsConfig, set()),
    "attack": ("attack", AttackConfig, {"multi_k"}),
    "mismatch": ("mismatch", MismatchConfig, {"top", "baseline"}),
    "mislabel": ("mislabel", MislabelConfig, {"gtol"}),
}

_FEATURES = {
    "digits": (3, 5),
    "n_per_class": 11,
    "n_test_per_class": 12,
    "cnn_images": 13,
    "cnn_epochs": 2,
    "n_features": 14,
    "l2": 0.5,
    "seed": 6,
    "extractor": "resnet",
}
#: experiment → a value other than the default for every field that has an option
GIVEN = {
    "fig1": {"l2": 0.5, "test_index": 3, "n_train": 50, "top_k": 4},
    "fig3": {"l2": 0.5, "test_index": 3, "n_train": 50, "k": 4, "ts": (0.5, 0.25)},
    "compare-models": {
        **_FEATURES,
        "test_index": 2,
        "gamma_scale": 2.0,
        "t": 0.5,
        "svm_l2": 0.25,
        "n_tests": 7,
    },
    "attack": {
        **_FEATURES,
        "targets": 2,
        "projection": "levels",
        "epsilon": 9,
        "step": 2,
        "iterations": 7,
        "max_k": 3,
        "group_size": 0,
    },
    "mismatch": {"l2": 0.5, "seed": 3, "test_index": 4},
    "mislabel": {
        "l2": 0.5,
        "flip_fraction": 0.2,
        "fractions": (0.0, 0.5),
        "repeats": 2,
        "seed": 3,
        "solver": "cg",
        "refit_gtol": 1e-4,
        "min_df": 2,
        "vocab_size": 100,
        "lemmatize": True,
    },
}
#: the options not named ``--field-with-dashes``
OPTIONS = {("fig3", "ts"): "--t"}


def _cli(name: str):
    return importlib.import_module(f"upweight.paper.cli.{EXPERIMENTS[name][0]}")


def _argv(name: str, values: dict) -> list[str]:
    argv = ["reproduce", name, "--data", "x"]
    for field, value in values.items():
        argv.append(OPTIONS.get((name, field), "--" + field.replace("_", "-")))
        if value is True:  # a switch: --lemmatize
            continue
        if field == "ts":  # --t T [T ...]
            argv += [str(v) for v in value]
        elif isinstance(value, tuple):  # --digits 3,5, --fractions 0.0,0.5
            argv.append(",".join(map(str, value)))
        else:
            argv.append(str(value))
    return argv


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_an_empty_command_line_gives_the_default_config(name):
    parse = build_parser().parse_args
    assert _cli(name)._config(parse(["reproduce", name, "--data", "x"])) == EXPERIMENTS[name][1]()


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_option_sets_its_field(name):
    _, cls, no_option = EXPERIMENTS[name]
    given = GIVEN[name]
    default = cls()
    assert all(getattr(default, k) != v for k, v in given.items()), "values other than the defaults"
    assert {f.name for f in dataclasses.fields(cls)} - set(given) == no_option
    assert _cli(name)._config(build_parser().parse_args(_argv(name, given))) == cls(**given)


@pytest.mark.parametrize(
    "cls",
    [
        Fig1Config,
        Fig3Config,
        FeatureConfig,
        CompareModelsConfig,
        AttackConfig,
        MismatchConfig,
        MislabelConfig,
    ],
)
def test_configs_are_frozen_and_their_asdict_is_json(cls):
    c = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 1  # type: ignore[misc]
    assert json.loads(json.dumps(dataclasses.asdict(c))) is not None


BAD = [
    (Fig2Config, {"panels": ()}, "panels must be a comma-separated subset"),
    (Fig2Config, {"loo_k": 0}, "loo_k must be ≥ 1"),
    (Fig2Config, {"lissa_scale": 0.0}, "lissa_scale must be a number > 0"),
    (Fig2Config, {"lissa_depth": 0}, "lissa_depth must be ≥ 1"),
    (Fig2Config, {"cnn_retrain_steps": 0}, "cnn_retrain_steps must be ≥ 1"),
    (Fig2Config, {"cnn_damping": -0.1}, "cnn_damping must be a number ≥ 0"),
    (Fig2Config, {"cnn_retrain_lr": 0.0}, "cnn_retrain_lr must be a number > 0"),
    (Fig2Config, {"refit_method": "exact"}, "refit_method must be 'auto', 'newton' or 'lbfgs'"),
    (Fig2Config, {"cnn_retrain": "sgd"}, "cnn_retrain must be 'adam' or 'momentum'"),
    (Fig1Config, {"l2": 0}, "l2 must be a number > 0"),
    (Fig1Config, {"test_index": -1}, "test_index must be ≥ 0"),
    (Fig1Config, {"n_train": 5}, "n_train must be ≥ 10"),
    (Fig1Config, {"top_k": 0}, "top_k must be ≥ 1"),
    (Fig3Config, {"l2": -1.0}, "l2 must be"),
    (Fig3Config, {"k": 0}, "k must be ≥ 1"),
    (Fig3Config, {"ts": ()}, "ts must be temperatures > 0"),
    (Fig3Config, {"ts": (0.1, 0.0)}, "ts must be temperatures > 0"),
    (Fig3Config, {"tol": float("nan")}, "tol must be"),
    (FeatureConfig, {"digits": (4, 4)}, "digits must be two different digits"),
    (FeatureConfig, {"digits": (4, 10)}, "digits must be two different digits"),
    (FeatureConfig, {"cnn_epochs": 0}, "cnn_epochs must be ≥ 1"),
    (CompareModelsConfig, {"n_per_class": 0}, "n_per_class must be ≥ 1"),
    (CompareModelsConfig, {"gamma_scale": 0.0}, "gamma_scale must be a number > 0"),
    (CompareModelsConfig, {"n_tests": 0}, "n_tests must be ≥ 1"),
    (AttackConfig, {"projection": "levels", "epsilon": 256}, "epsilon must be between 1 and 255"),
    (AttackConfig, {"projection": "levels", "epsilon": 0.5}, "epsilon must be between 1 and 255"),
    (AttackConfig, {"projection": "levels", "epsilon": 2.5}, "epsilon must be between 1 and 255"),
    (AttackConfig, {"projection": "levels", "epsilon": 8, "step": 0.5}, "step must be ≥ 1"),
    (AttackConfig, {"epsilon": 0.6}, r"epsilon must be a number in \(0, 0.5\]"),
    (AttackConfig, {"epsilon": 0.0}, r"epsilon must be a number in \(0, 0.5\]"),
    (AttackConfig, {"step": -0.02}, "step must be a number > 0"),
    (AttackConfig, {"projection": "round"}, "projection must be one of same-8bit, levels"),
    (AttackConfig, {"targets": 0}, "targets must be ≥ 1"),
    (AttackConfig, {"group_size": -1}, "group_size must be ≥ 0"),
    (AttackConfig, {"multi_k": (0,)}, "multi_k must be integers ≥ 1"),
    (MislabelConfig, {"lemmatize": "yes"}, "lemmatize must be True or False"),
    (MismatchConfig, {"l2": -1e-4}, "l2 must be a number ≥ 0"),
    (MismatchConfig, {"top": 0}, "top must be ≥ 1"),
    (MismatchConfig, {"baseline": "yes"}, "baseline must be True or False"),
    (MislabelConfig, {"flip_fraction": 1.0}, "flip_fraction must be a number > 0 and < 1"),
    (MislabelConfig, {"fractions": (0.0, 1.5)}, r"fractions must be in \[0, 1\]"),
    (MislabelConfig, {"repeats": 0}, "repeats must be ≥ 1"),
    (MislabelConfig, {"solver": "lissa"}, "solver must be one of direct, cg"),
    (MislabelConfig, {"vocab_size": 0}, "vocab_size must be ≥ 1"),
]


@pytest.mark.parametrize(
    "cls, kwargs, match", BAD, ids=lambda v: getattr(v, "__name__", None) or str(v)[:40]
)
def test_bad_values_are_input_errors_naming_the_setting(cls, kwargs, match):
    with pytest.raises(InputError, match=f"^{cls.__name__}: {match}"):
        cls(**kwargs)


@pytest.mark.parametrize(
    "name, argv, option",
    [
        ("fig1", ["--top-k", "0"], "--top-k"),
        ("fig3", ["--t", "0.1", "-1"], "--t"),
        ("compare-models", ["--digits", "4,4"], "--digits"),
        ("attack", ["--epsilon", "300"], "--epsilon"),
        ("mismatch", ["--l2", "-1"], "--l2"),
        ("mislabel", ["--fractions", "0,2"], "--fractions"),
    ],
)
def test_the_cli_names_the_option_of_a_bad_setting(name, argv, option, tmp_path, capsys):
    assert main(["reproduce", name, "--data", "x", "--out", str(tmp_path / "o"), *argv]) == 2
    assert f"error: {option} must be" in capsys.readouterr().err


def test_mislabel_fractions_are_kept_sorted_and_once():
    assert MislabelConfig(fractions=[0.2, 0, 0.2, 0.1]).fractions == (0.0, 0.1, 0.2)


def _settings_of_a_run(tmp_path, name: str, data: str, config, argv: list[str]) -> None:
    out = tmp_path / name
    assert main(["reproduce", name, "--data", data, "--out", str(out), "--no-progress", *argv]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["settings"] == json.loads(json.dumps(dataclasses.asdict(config)))
    assert r["experiment"] == name and "paper" in r and "seconds" in r


def test_fig1_results_record_the_config(tmp_path):
    _settings_of_a_run(
        tmp_path,
        "fig1",
        "bundled",
        Fig1Config(n_train=60, top_k=5),
        ["--n-train", "60", "--top-k", "5"],
    )


def test_fig3_results_record_the_config(tmp_path):
    _settings_of_a_run(
        tmp_path,
        "fig3",
        "bundled",
        Fig3Config(n_train=200, k=5, ts=(0.01,)),
        ["--n-train", "200", "--k", "5", "--t", "0.01"],
    )


_TINY_FEATURES = {
    "n_per_class": 60,
    "n_test_per_class": 30,
    "cnn_images": 600,
    "cnn_epochs": 1,
    "n_features": 16,
}


def _tiny_feature_argv(extra: dict) -> list[str]:
    values = {**_TINY_FEATURES, **extra}
    return [a for k, v in values.items() for a in ("--" + k.replace("_", "-"), str(v))]


@pytest.mark.skipif(not (MNIST / "mnist.npz").is_file(), reason=f"the MNIST data is not at {MNIST}")
def test_compare_models_results_record_the_config(tmp_path):
    extra = {"n_tests": 3}
    config = CompareModelsConfig(**_TINY_FEATURES, **extra)
    _settings_of_a_run(tmp_path, "compare-models", str(MNIST), config, _tiny_feature_argv(extra))


@pytest.mark.skipif(not (MNIST / "mnist.npz").is_file(), reason=f"the MNIST data is not at {MNIST}")
def test_attack_results_record_the_config(tmp_path):
    extra = {"targets": 1, "max_k": 1, "iterations": 3, "group_size": 0, "extractor": "resnet"}
    _settings_of_a_run(
        tmp_path,
        "attack",
        str(MNIST),
        AttackConfig(**_TINY_FEATURES, **extra),
        _tiny_feature_argv(extra),
    )


@pytest.mark.skipif(not HOSPITAL.is_file(), reason=f"the hospital data is not at {HOSPITAL}")
def test_mismatch_results_record_the_config(tmp_path):
    _settings_of_a_run(
        tmp_path, "mismatch", str(HOSPITAL), MismatchConfig(l2=1e-3), ["--l2", "1e-3"]
    )


@pytest.mark.skipif(not ENRON.is_file(), reason=f"the Enron1 data is not at {ENRON}")
def test_mislabel_results_record_the_config(tmp_path):
    config = MislabelConfig(l2=1e-2, repeats=1, fractions=(0.0, 0.1), vocab_size=200)
    argv = ["--l2", "1e-2", "--repeats", "1", "--fractions", "0,0.1", "--vocab-size", "200"]
    _settings_of_a_run(tmp_path, "mislabel", str(ENRON), config, argv)


@pytest.mark.skipif(not (MNIST / "mnist.npz").is_file(), reason=f"the MNIST data is not at {MNIST}")
def test_a_setup_built_with_other_settings_is_refused():
    from upweight.datasets import load_mnist
    from upweight.paper.attack import run_attack
    from upweight.paper.compare_models import run_compare_models
    from upweight.paper.features import build_feature_model

    s = build_feature_model(load_mnist(MNIST), FeatureConfig(**_TINY_FEATURES))
    with pytest.raises(InputError, match="n_features=64 .setup: 16."):
        run_compare_models(s, CompareModelsConfig(**{**_TINY_FEATURES, "n_features": 64}))
    with pytest.raises(InputError, match="seed=1 .setup: 0."):
        run_attack(s, AttackConfig(**_TINY_FEATURES, seed=1))
