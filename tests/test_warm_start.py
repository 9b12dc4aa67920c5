"""Warm start: the finished trials of an earlier sweep (the real tiny sweep) join a new sweep's Optuna
study before its first suggestion, only inside the new space; other models or data sets are refused."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from methods.errors import ConfigError
from search.cli import main
from search.config import load_config
from search.space import make_space
from search.tracking import child_runs
from search.warm_start import WARM_START_ATTR, warm_start_trials

from conftest import TINY_SWEEP


def _cfg(tiny_cfg, tmp_path, *extra):
    return load_config("configs/quickstart.yaml", TINY_SWEEP + [
        f"tracking_uri={tiny_cfg.tracking_uri}", f"storage_path={tmp_path}/ray_results", "name=warm", *extra])


def _finished(cfg, result):
    client = MlflowClient(cfg.tracking_uri)
    return {r.info.run_id: r for r in child_runs(client, result.parent_run_id)
            if r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics}


def test_warm_start_trials_inside_the_new_space(tiny_sweep, tmp_path):
    tiny_cfg, result = tiny_sweep
    finished = _finished(tiny_cfg, result)
    cfg = _cfg(tiny_cfg, tmp_path, f"warm_start=[{result.experiment_dir}]")
    trials = warm_start_trials(cfg, make_space(cfg.search_space()))
    assert {t.user_attrs[WARM_START_ATTR] for t in trials} == set(finished)
    for t in trials:
        run = finished[t.user_attrs[WARM_START_ATTR]]
        method = run.data.tags["method"]
        assert t.values == [run.data.metrics["accuracy"], run.data.metrics["macs"]]
        assert t.params["method"] == method
        # prune_ratio: one Optuna parameter shared by the methods (search.space.shared_names)
        assert t.params["prune_ratio"] == float(run.data.params["prune_ratio"])

    # A narrower space keeps only the trials inside it; the experiment name works like the directory.
    narrow = _cfg(tiny_cfg, tmp_path, f"warm_start=[{tiny_cfg.name}]", "space.prune_ratio=[0.5, 0.8]")
    inside = {rid for rid, r in finished.items() if float(r.data.params["prune_ratio"]) >= 0.5}
    got = warm_start_trials(narrow, make_space(narrow.search_space()))
    assert {t.user_attrs[WARM_START_ATTR] for t in got} == inside
    # Three objectives: the new sweep's values (accuracy, MACs, params) from the old runs.
    three = _cfg(tiny_cfg, tmp_path, f"warm_start=[{result.experiment_dir}]", "objectives=[accuracy, macs, params]")
    for t in warm_start_trials(three, make_space(three.search_space())):
        m = finished[t.user_attrs[WARM_START_ATTR]].data.metrics
        assert t.values == [m["accuracy"], m["macs"], m["params"]]


def test_other_model_is_refused_in_one_line(tiny_sweep, tmp_path, capsys):
    tiny_cfg, result = tiny_sweep
    cfg = _cfg(tiny_cfg, tmp_path, f"warm_start=[{result.experiment_dir}]", "model=resnet56")
    with pytest.raises(ConfigError) as info:
        warm_start_trials(cfg, make_space(cfg.search_space()))
    assert str(info.value) == (f"warm_start[0]: sweep {result.experiment_dir.name!r} searched model 'resnet20', "
                               "this sweep model 'resnet56'; warm-start only from sweeps of the same model and dataset")
    rc = main(["run", "configs/quickstart.yaml", "--set", f"warm_start=[{result.experiment_dir}]", "--set",
               "model=resnet56", "--set", f"tracking_uri={tiny_cfg.tracking_uri}", "--set",
               f"storage_path={tmp_path}/refused"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "warm_start[0]: sweep" in err
    assert not (tmp_path / "refused").exists()  # refused before the sweep directory exists
    with pytest.raises(ConfigError, match=r"warm_start\[0\]: unknown experiment 'nope'"):
        c = _cfg(tiny_cfg, tmp_path, "warm_start=[nope]")
        warm_start_trials(c, make_space(c.search_space()))


def test_sweep_starts_from_the_earlier_trials(tiny_sweep, tmp_path):
    from ray.tune.search import Searcher

    from search.searcher import ParetoOptunaSearch
    from search.sweep import run_sweep

    tiny_cfg, old = tiny_sweep
    finished = _finished(tiny_cfg, old)
    cfg = _cfg(tiny_cfg, tmp_path, f"warm_start=[{old.experiment_dir}]", "num_trials=1", "sampler=tpe")
    new = run_sweep(cfg)
    searcher = ParetoOptunaSearch.__new__(ParetoOptunaSearch)
    Searcher.restore_from_dir(searcher, str(new.experiment_dir))
    trials = searcher._ot_study.trials
    assert len(trials) == len(finished) + 1
    assert {t.user_attrs.get(WARM_START_ATTR) for t in trials[:-1]} == set(finished)  # added first
    assert WARM_START_ATTR not in trials[-1].user_attrs and trials[-1].state.name == "COMPLETE"
    assert new.finished == 1  # the earlier trials are in the study only, not runs of the new sweep


@pytest.mark.parametrize("value, message", [
    ("a-sweep", "warm_start: must be a list of sweep directories or experiment names, got 'a-sweep'"),
    ("['']", "warm_start[0]: must be a non-empty string, got ''"),
])
def test_bad_warm_start_config_is_one_line(value, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/quickstart.yaml", [f"warm_start={value}"])
    assert str(info.value) == message
