"""search.config: defaults, round trip, --set overrides, one clear error per bad field, search space."""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest
import yaml

from methods import get_method_class, list_methods
from methods.errors import ConfigError
from search.config import (ResourcesConfig, SweepConfig, TrainConfig, config_from_dict, load_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, data, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ---- defaults and round trip ------------------------------------------------------------------------------
def test_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, {"name": "quickstart"}))
    assert cfg == SweepConfig() == config_from_dict({})
    assert (cfg.name, cfg.model, cfg.dataset, cfg.data_dir) == ("quickstart", "resnet20", "digits", None)
    assert cfg.methods == tuple(list_methods())
    assert (cfg.num_trials, cfg.max_concurrent_trials, cfg.sampler, cfg.seed) == (24, 2, "tpe", 0)
    assert cfg.resources_per_trial == ResourcesConfig(cpu=1, gpu=0)
    assert cfg.base == TrainConfig(epochs=15, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64)
    assert cfg.finetune == TrainConfig(epochs=5, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64)
    assert cfg.address is None and cfg.tracking_uri == "sqlite:///mlflow.db"
    assert cfg.storage_path == os.path.abspath("ray_results")  # made absolute for the trial workers
    assert (cfg.image_size, cfg.model_kwargs, cfg.max_failures, cfg.latency_batch_size, cfg.download,
            cfg.calibration_batches, cfg.objective) == (None, {}, 1, 1, False, 4, "macs")
    assert cfg.space == {}


def test_partial_sections_merge_over_their_defaults():
    cfg = config_from_dict({"base": {"epochs": 3}, "finetune": {"lr": 0.05}, "resources_per_trial": {"gpu": 0.5}})
    assert cfg.base == TrainConfig(epochs=3, lr=0.1)
    assert cfg.finetune == TrainConfig(epochs=5, lr=0.05)
    assert cfg.resources_per_trial == ResourcesConfig(cpu=1, gpu=0.5)


def test_round_trip(tmp_path):
    data = {
        "name": "rt", "methods": ["slimming", "l1_norm"], "space": {"prune_ratio": [0.3, 0.6], "s": 1.0e-4,
                                                                   "slimming": {"phase_epochs": [1, 3]}},
        "num_trials": 5, "resources_per_trial": {"cpu": 2, "gpu": 0.25}, "sampler": "nsga2", "seed": 7,
        "base": {"epochs": 2, "lr": 0.05}, "address": "auto", "tracking_uri": "http://localhost:5000",
        "image_size": 32, "model_kwargs": {"width_mult": 0.5}, "max_failures": 0, "download": True,
        "dataset": "cifar10", "data_dir": str(tmp_path / "cifar"), "objective": "latency",
    }
    cfg = config_from_dict(data)
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(SweepConfig)}
    assert config_from_dict(d) == cfg
    # Plain YAML types only (no tuples), so the dict can be written and read back as a file.
    assert load_config(_write(tmp_path, yaml.safe_dump(d))) == cfg
    assert d["methods"] == ["slimming", "l1_norm"] and d["space"]["prune_ratio"] == [0.3, 0.6]
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # it travels to Ray workers


def test_config_is_frozen():
    cfg = SweepConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_trials = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="num_trials"):
        dataclasses.replace(cfg, num_trials=0)  # replace re-validates


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads `5e-4` as a string; the config accepts it as the number it spells.
    path = _write(tmp_path, "base: {weight_decay: 5e-4, lr: 1e-2}\nspace: {s: [1e-5, 1e-4]}\nmethods: [slimming]\n")
    cfg = load_config(path)
    assert cfg.base.weight_decay == 5e-4 and cfg.base.lr == 1e-2
    s = cfg.search_space()["slimming"]["s"]
    assert (s.low, s.high) == (1e-5, 1e-4)


# ---- overrides -------------------------------------------------------------------------------------------------
def test_overrides(tmp_path):
    path = _write(tmp_path, {"num_trials": 8, "base": {"epochs": 10, "lr": 0.2}})
    cfg = load_config(path, [
        "base.epochs=3", "space.prune_ratio=[0.3,0.6]", "download=true", "num_trials=4", "address=auto",
        "methods=[l1_norm, slimming]", "resources_per_trial.gpu=0.5", "space.slimming.phase_epochs=[1, 2]",
        "model_kwargs.width_mult=0.5", "name=with=equals",
    ])
    assert cfg.base == TrainConfig(epochs=3, lr=0.2)  # the other keys of the section survive
    assert cfg.space["prune_ratio"] == (0.3, 0.6)
    assert cfg.download is True and cfg.num_trials == 4 and cfg.address == "auto"
    assert cfg.methods == ("l1_norm", "slimming")
    assert cfg.resources_per_trial.gpu == 0.5
    assert cfg.search_space()["slimming"]["phase_epochs"].high == 2
    assert cfg.model_kwargs == {"width_mult": 0.5}
    assert cfg.name == "with=equals"  # split at the first '='
    # Later overrides win; an empty value is null.
    cfg = load_config(path, ["num_trials=2", "num_trials=3", "address=auto", "address="])
    assert cfg.num_trials == 3 and cfg.address is None


@pytest.mark.parametrize("override, match", [
    ("num_trials", r"--set 'num_trials': expected key=value"),
    ("=3", r"--set '=3': malformed key"),
    ("base..epochs=3", r"--set 'base..epochs=3': malformed key"),
    ("base.epochs.x=3", r"--set 'base.epochs.x=3': base.epochs is 10, not a mapping"),
    ("space=[1, 2", r"--set 'space=\[1, 2': value is not valid YAML"),
])
def test_bad_overrides(tmp_path, override, match):
    path = _write(tmp_path, {"base": {"epochs": 10}})
    with pytest.raises(ConfigError, match=match):
        load_config(path, [override])


def test_override_of_unknown_key_is_reported_like_the_file_would_be(tmp_path):
    with pytest.raises(ConfigError, match=r"^base: unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        load_config(_write(tmp_path, {}), ["base.epoch=3"])


# ---- the file itself ---------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file '{path}' does not exist"):
        load_config(path)


@pytest.mark.parametrize("text, match", [
    ("", "an empty file"),
    ("- a\n- b\n", "a list"),
    ("just a string", "a str"),
    ("name: [unclosed\n", "not valid YAML at line"),
])
def test_file_not_a_yaml_mapping(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---- one clear line per bad field --------------------------------------------------------------------------------
BAD = [
    ({"nm_trials": 3}, ["unknown key 'nm_trials'", "did you mean 'num_trials'", "valid keys:"]),
    ({"name": ""}, ["name:", "''"]),
    ({"name": "a/b"}, ["name:", "'a/b'"]),
    ({"model": "resnet21"}, ["model: unknown model 'resnet21'", "valid models:", "resnet20"]),
    ({"dataset": "mnist"}, ["dataset: unknown dataset 'mnist'", "valid datasets:", "digits"]),
    ({"dataset": "cifar10"}, ["data_dir:", "needs data_dir", "null"]),
    ({"dataset": "imagefolder", "data_dir": "/no/such/dir"}, ["data_dir: /no/such/dir does not exist"]),
    ({"dataset": "cifar10", "data_dir": "/no/such/dir"}, ["data_dir: /no/such/dir does not exist", "download: true"]),
    ({"download": "yes"}, ["download:", "'yes'"]),
    ({"methods": ["l1_norm", "random", "foo"]}, ["methods[2]: unknown method 'foo'", "valid methods: csgd, ista, l1_norm"]),
    ({"methods": []}, ["methods:", "[]"]),
    ({"methods": ["random", "random"]}, ["methods[1]:", "'random'", "twice"]),
    ({"space": {"prune_ratio": [0.2, 1.5]}}, ["space.prune_ratio: 1.5 is outside [0.05, 0.98]"]),
    ({"space": {"prune_ratio": 1.5}}, ["space.prune_ratio: 1.5 is outside [0.05, 0.98]"]),
    ({"space": {"prune_ratio": [0.6, 0.3]}}, ["space.prune_ratio:", "0.6", "0.3"]),
    ({"space": {"prune_ratio": [0.1, 0.2, 0.3]}}, ["space.prune_ratio: expected [low, high]", "[0.1, 0.2, 0.3]"]),
    ({"space": {"prune_ratio": "abc"}}, ["space.prune_ratio:", "'abc'"]),
    ({"space": {"foo": [1, 2]}}, ["space.foo: not a hyperparameter of any method", "prune_ratio"]),
    ({"methods": ["l1_norm"], "space": {"slimming": {"s": 1.0}}}, ["space.slimming.s: 1.0 is outside"]),
    ({"space": {"slimming": {"foo": 1}}}, ["space.slimming.foo: not a hyperparameter of slimming"]),
    ({"space": {"slimming": {"phase_epochs": [0, 500]}}}, ["space.slimming.phase_epochs: 500 is outside"]),
    ({"methods": ["scratch", "manidp"], "space": {"lambda": [0.2, 0.5]}},
     ["space.lambda: 0.2 is outside [0.001, 0.1]", "manidp", "space.manidp.lambda"]),
    ({"space": {"method": ["l1_norm"]}}, ["space.method:", "methods"]),
    ({"space": [0.2, 0.5]}, ["space:", "[0.2, 0.5]"]),
    ({"num_trials": 0}, ["num_trials: must be an integer >= 1, got 0"]),
    ({"num_trials": 2.5}, ["num_trials: must be an integer >= 1, got 2.5"]),
    ({"num_trials": True}, ["num_trials: must be an integer >= 1, got True"]),
    ({"max_concurrent_trials": 0}, ["max_concurrent_trials: must be an integer >= 1, got 0"]),
    ({"resources_per_trial": {"cpu": 0}}, ["resources_per_trial.cpu: must be a number > 0, got 0"]),
    ({"resources_per_trial": {"gpu": -1}}, ["resources_per_trial.gpu: must be a number >= 0, got -1"]),
    ({"resources_per_trial": {"gpu": 1.5}}, ["resources_per_trial.gpu:", "1.5"]),
    ({"resources_per_trial": {"gpus": 1}}, ["resources_per_trial: unknown key 'gpus'", "did you mean 'gpu'"]),
    ({"resources_per_trial": 4}, ["resources_per_trial: must be a mapping, got 4"]),
    ({"sampler": "cmaes"}, ["sampler: unknown sampler 'cmaes'", "tpe, nsga2, random"]),
    ({"trial_models": "best"}, ["trial_models: unknown value 'best'", "all, front"]),
    ({"seed": -1}, ["seed:", "-1"]),
    ({"seed": "abc"}, ["seed:", "'abc'"]),
    ({"base": {"epochs": -1}}, ["base.epochs: must be an integer >= 0, got -1"]),
    ({"finetune": {"epochs": 1.5}}, ["finetune.epochs: must be an integer >= 0, got 1.5"]),
    ({"base": {"lr": 0}}, ["base.lr: must be a number > 0, got 0"]),
    ({"finetune": {"lr": "fast"}}, ["finetune.lr: must be a number > 0, got 'fast'"]),
    ({"base": {"momentum": 1.0}}, ["base.momentum:", "1.0"]),
    ({"base": {"weight_decay": -0.1}}, ["base.weight_decay:", "-0.1"]),
    ({"finetune": {"batch_size": 0}}, ["finetune.batch_size: must be an integer >= 1, got 0"]),
    ({"finetune": {"epoch": 3}}, ["finetune: unknown key 'epoch'", "valid keys: batch_size, epochs"]),
    ({"address": ""}, ["address:", "''"]),
    ({"tracking_uri": "mlruns"}, ["tracking_uri: 'mlruns' is a file store", "sqlite:///mlflow.db"]),
    ({"tracking_uri": "file:///tmp/mlruns"}, ["tracking_uri: 'file:///tmp/mlruns'", "sqlite:///mlflow.db"]),
    ({"tracking_uri": "/tmp/mlruns"}, ["tracking_uri: '/tmp/mlruns'", "server URL"]),
    ({"storage_path": None}, ["storage_path:", "None"]),
    ({"image_size": 0}, ["image_size: must be an integer >= 1, got 0"]),
    ({"model_kwargs": {"depth": 3}}, ["model_kwargs: unknown key 'depth'", "width_mult"]),
    ({"model_kwargs": {"num_classes": 3}}, ["model_kwargs.num_classes:", "3"]),
    ({"model_kwargs": {"width_mult": 0}}, ["model_kwargs.width_mult: must be a number > 0, got 0"]),
    ({"model_kwargs": {"weights": "/no/such/w.pth"}}, ["model_kwargs.weights: /no/such/w.pth does not exist"]),
    ({"model_kwargs": [1]}, ["model_kwargs: must be a mapping", "[1]"]),
    ({"max_failures": -2}, ["max_failures: must be an integer >= -1, got -2"]),
    ({"latency_batch_size": 0}, ["latency_batch_size: must be an integer >= 1, got 0"]),
    ({"calibration_batches": 0}, ["calibration_batches: must be an integer >= 1, got 0"]),
    ({"compile": "yes"}, ["compile: must be true or false, got 'yes'"]),
    ({"objective": "flops"}, ["objective: expected one of macs, latency, got 'flops'"]),
    ({"objective": None}, ["objective: expected one of macs, latency, got None"]),
]


@pytest.mark.parametrize("data, fragments", BAD, ids=[str(d)[:60] for d, _ in BAD])
def test_bad_field_names_field_and_value(tmp_path, data, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        config_from_dict({"num_trials": 0})
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_dict([("num_trials", 3)])  # type: ignore[arg-type]


# ---- data_dir rules ----------------------------------------------------------------------------------------------
def test_data_dir_rules(tmp_path):
    # cifar with download: the folder may not exist yet; it is stored absolute.
    cfg = config_from_dict({"dataset": "cifar10", "data_dir": str(tmp_path / "new"), "download": True})
    assert cfg.data_dir == str(tmp_path / "new")
    # cifar without download: the extracted folder must be there.
    (tmp_path / "c10").mkdir()
    with pytest.raises(ConfigError, match="has no cifar-10-batches-py/"):
        config_from_dict({"dataset": "cifar10", "data_dir": str(tmp_path / "c10")})
    (tmp_path / "c10" / "cifar-10-batches-py").mkdir()
    assert config_from_dict({"dataset": "cifar10", "data_dir": str(tmp_path / "c10")}).data_dir == str(tmp_path / "c10")
    # a file where a folder should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        config_from_dict({"dataset": "cifar100", "data_dir": str(tmp_path / "file"), "download": True})
    # imagefolder needs train/ and val/; download does not help it.
    (tmp_path / "inet" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data_dir: .*inet has no val/ folder"):
        config_from_dict({"dataset": "imagefolder", "data_dir": str(tmp_path / "inet"), "download": True})
    (tmp_path / "inet" / "val").mkdir()
    assert config_from_dict({"dataset": "imagefolder", "data_dir": str(tmp_path / "inet")}).dataset == "imagefolder"
    # digits ignores data_dir entirely.
    assert config_from_dict({"dataset": "digits", "data_dir": "/no/such/dir"}).dataset == "digits"


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cifar-100-python").mkdir(parents=True)
    (tmp_path / "w.pth").write_bytes(b"")
    cfg = config_from_dict({"dataset": "cifar100", "data_dir": "data", "storage_path": "runs",
                            "model_kwargs": {"weights": "w.pth"}})
    assert cfg.data_dir == str(tmp_path / "data")
    assert cfg.storage_path == str(tmp_path / "runs")
    assert cfg.model_kwargs["weights"] == str(tmp_path / "w.pth")
    assert config_from_dict({"storage_path": "s3://bucket/runs"}).storage_path == "s3://bucket/runs"


def test_accepted_tracking_uris():
    for uri in ("sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "http://HEAD:5000", "https://mlflow.example.com",
                "postgresql://user@db/mlflow", "databricks"):
        assert config_from_dict({"tracking_uri": uri}).tracking_uri == uri


# ---- search space --------------------------------------------------------------------------------------------------
def test_search_space_without_narrowing_is_declared():
    cfg = config_from_dict({})
    space = cfg.search_space()
    assert list(space) == list(cfg.methods)
    for method, hps in space.items():
        assert hps == {hp.name: hp for hp in get_method_class(method).hyperparameters}


def test_search_space_narrowing():
    cfg = config_from_dict({
        "methods": ["l1_norm", "slimming"],
        "space": {"prune_ratio": [0.3, 0.6], "s": [1e-5, 1e-4], "slimming": {"prune_ratio": 0.5}},
    })
    space = cfg.search_space()
    pr = space["l1_norm"]["prune_ratio"]
    assert (pr.low, pr.high) == (0.3, 0.6) and pr.low <= pr.default <= pr.high
    # The method-scoped entry wins over the plain one for that method only.
    assert space["slimming"]["prune_ratio"].fixed and space["slimming"]["prune_ratio"].low == 0.5
    s = space["slimming"]["s"]
    assert (s.low, s.high, s.log) == (1e-5, 1e-4, True)
    # Untouched declarations stay as declared.
    declared = {hp.name: hp for hp in get_method_class("slimming").hyperparameters}
    assert space["slimming"]["phase_epochs"] == declared["phase_epochs"]


def test_empty_sections_are_defaults(tmp_path):
    # `space:` / `model_kwargs:` / `base:` with every entry commented out are YAML nulls.
    cfg = load_config(_write(tmp_path, "space:\n  # prune_ratio: [0.2, 0.9]\nmodel_kwargs:\nbase:\n"))
    assert cfg.space == {} and cfg.model_kwargs == {} and cfg.base == SweepConfig().base


def test_search_space_single_value_fixes_a_parameter():
    cfg = config_from_dict({"methods": ["random"], "space": {"prune_ratio": 0.4}})
    hp = cfg.search_space()["random"]["prune_ratio"]
    assert hp.fixed and hp.default == 0.4


# ---- the shipped configs ------------------------------------------------------------------------------------------
def _cluster_overrides(path: Path, tmp_path: Path) -> list[str]:
    """The cluster configs name data folders that exist only on the cluster (/mnt/imagenet).
    Rather than weaken validation, point data_dir at a stand-in folder with the expected layout."""
    raw = yaml.safe_load(path.read_text())
    if raw.get("dataset") != "imagefolder" or Path(raw["data_dir"]).is_dir():
        return []
    for sub in ("train", "val"):
        (tmp_path / "imagenet" / sub).mkdir(parents=True, exist_ok=True)
    return [f"data_dir={tmp_path / 'imagenet'}"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    overrides = _cluster_overrides(path, tmp_path)
    if overrides:  # without the stand-in, the only complaint is the missing data folder
        with pytest.raises(ConfigError, match=r"^data_dir: "):
            load_config(path)
    cfg = load_config(path, overrides)
    assert cfg.name == path.stem
    assert cfg.search_space()  # every space entry fits the methods it names


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {
        "quickstart.yaml", "cifar10_resnet56.yaml", "imagenet_resnet50.yaml"}


def test_quickstart_lists_every_registered_method():
    """A newly registered method must be added to configs/quickstart.yaml (the product's demo)."""
    cfg = load_config(CONFIGS / "quickstart.yaml")
    assert sorted(cfg.methods) == list_methods()
    assert (cfg.dataset, cfg.model) == ("digits", "resnet20")


def test_entries_for_unselected_methods_are_ignored_so_methods_can_be_overridden():
    # quickstart narrows phase_epochs and thinet's parameters; picking two methods without either
    # must still load, and leave their spaces untouched.
    cfg = load_config("configs/quickstart.yaml", ["methods=[l1_norm, random]"])
    space = cfg.search_space()
    assert sorted(space) == ["l1_norm", "random"]
    assert (space["l1_norm"]["prune_ratio"].low, space["l1_norm"]["prune_ratio"].high) == (0.5, 0.98)
    assert space["l1_norm"]["scope"].choices == ("all",) and space["random"]["allocation"].choices == ("global",)


def test_bad_objective_is_one_exact_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "quickstart.yaml", ["objective=x"])
    assert str(info.value) == "objective: expected one of macs, latency, got 'x'"
    assert load_config(CONFIGS / "quickstart.yaml", ["objective=latency"]).objective == "latency"


def test_quickstart_searches_macs():
    """MACs stay the quickstart's (and the default) cost: latency on a shared CPU is noisy."""
    assert load_config(CONFIGS / "quickstart.yaml").objective == "macs"
    assert "objective: macs" in (CONFIGS / "quickstart.yaml").read_text()


# ---- objectives ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, objective, objectives", [
    ([], "macs", ("accuracy", "macs")),
    (["objective=latency"], "latency", ("accuracy", "latency_ratio")),
    (["objectives=[accuracy, macs]"], "macs", ("accuracy", "macs")),
    (["objectives=[accuracy, latency_ratio]"], "latency", ("accuracy", "latency_ratio")),
    (["objectives=[accuracy, macs, params]"], None, ("accuracy", "macs", "params")),
    (["objective=latency", "objectives=[params, accuracy]"], None, ("params", "accuracy")),
])
def test_objectives_list_and_shorthand(overrides, objective, objectives):
    cfg = load_config(CONFIGS / "quickstart.yaml", overrides)
    assert (cfg.objective, cfg.objectives) == (objective, objectives)
    assert config_from_dict(cfg.to_dict()) == cfg  # the round trip through the state file


@pytest.mark.parametrize("value, message", [
    ("[accuracy]", "objectives: must name 2 or 3 objectives, got 1: ['accuracy']"),
    ("[accuracy, macs, params, latency_ratio]", "objectives: must name 2 or 3 objectives, got 4: "
                                                "['accuracy', 'macs', 'params', 'latency_ratio']"),
    ("[accuracy, flops]", "objectives[1]: unknown objective 'flops'; valid: accuracy, macs, params, latency_ratio"),
    ("[macs, macs]", "objectives[1]: 'macs' is listed twice"),
    ("macs", "objectives: must be a list of 2 or 3 of accuracy, macs, params, latency_ratio, got 'macs'"),
])
def test_bad_objectives_is_one_exact_line(value, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "quickstart.yaml", [f"objectives={value}"])
    assert str(info.value) == message
