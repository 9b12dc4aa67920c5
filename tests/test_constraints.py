"""Budgets as constraints: config checks, the prune_ratio narrowing, the values Optuna's samplers get
(a real study with a real TPE sampler), and feasibility tags that keep trials off the front and out
of promote (a real MLflow SQLite store holding hand-made trial records)."""
from __future__ import annotations

import logging
import math

import pytest
from mlflow.tracking import MlflowClient

from methods.errors import ConfigError
from search.config import load_config
from search.constraints import ConstraintsConfig, constraint_values, feasible
from search.fronts import FEASIBLE_TAG, record_front
from search.searcher import ParetoOptunaSearch, make_sampler
from search.space import make_space
from search.tracking import PARENT_TAG, SWEEP_TAG

QUICK = "configs/quickstart.yaml"


def test_max_macs_fraction_narrows_prune_ratio():
    cfg = load_config(QUICK, ["methods=[l1_norm, random]", "space.prune_ratio=[0.2, 0.8]",
                              "constraints.max_macs_fraction=0.4"])
    for method in ("l1_norm", "random"):
        hp = cfg.search_space()[method]["prune_ratio"]
        assert (hp.low, hp.high) == (pytest.approx(0.6), 0.8)
    with pytest.raises(ConfigError) as info:
        load_config(QUICK, ["methods=[l1_norm]", "space.prune_ratio=[0.2, 0.5]", "constraints.max_macs_fraction=0.4"])
    assert str(info.value) == ("constraints.max_macs_fraction: 0.4 needs prune_ratio >= 0.6, but l1_norm's "
                               "prune_ratio range ends at 0.5")


@pytest.mark.parametrize("override, message", [
    ("constraints.max_macs_fraction=1.5", "constraints.max_macs_fraction: must be a number > 0 and <= 1 or null, got 1.5"),
    ("constraints.max_macs=-3", "constraints.max_macs: must be a number > 0 or null, got -3"),
    ("constraints.min_accuracy=abc", "constraints.min_accuracy: must be a number >= 0 and <= 1 or null, got 'abc'"),
    ("constraints.max_flops=3", "constraints: unknown key 'max_flops'"),
])
def test_bad_constraints_are_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(QUICK, [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_constraint_values():
    c = ConstraintsConfig(max_macs_fraction=0.5, max_macs=1000, max_latency_ratio=0.8, min_accuracy=0.9)
    assert c.active == ["max_macs_fraction", "max_macs", "max_latency_ratio", "min_accuracy"]
    got = constraint_values(c, {"macs_reduction": 0.6, "macs": 1500, "latency_ratio": 0.7, "accuracy": 0.85})
    assert got == pytest.approx([-0.1, 0.5, -0.1, 0.05])
    # A stopped trial has no latency yet: unmeasured counts as met.
    assert constraint_values(c, {"macs_reduction": 0.6, "macs": 500, "accuracy": 0.95})[2] == 0.0
    assert feasible(c, {"macs_reduction": 0.6, "macs": 500, "accuracy": 0.95})
    assert not feasible(c, {"macs_reduction": 0.4, "macs": 500, "accuracy": 0.95})


def test_sampler_gets_the_constraint_values():
    cfg = load_config(QUICK, ["methods=[l1_norm]", "constraints={max_macs: 1000, min_accuracy: 0.9}"])
    searcher = ParetoOptunaSearch(make_space(cfg.search_space()), make_sampler("tpe", 0),
                                  objectives=cfg.objectives, constraints=cfg.constraints)
    searcher.suggest("a")
    searcher.suggest("b")
    final = {"test_accuracy": 0.9, "latency_ratio": 0.5}
    searcher.on_trial_complete("a", {"accuracy": 0.95, "macs": 800.0, **final})
    searcher.on_trial_complete("b", {"accuracy": 0.80, "macs": 1200.0, **final})
    study = searcher._ot_study
    a, b = (study.trials[searcher._ot_trials[t].number] for t in ("a", "b"))
    # What TPE and NSGA-II read (FrozenTrial.constraints), <= 0 feasible.
    assert a.constraints == pytest.approx({"max_macs": -0.2, "min_accuracy": -0.05})
    assert b.constraints == pytest.approx({"max_macs": 0.2, "min_accuracy": 0.1})
    # TPE splits the infeasible trial off by its violation (optuna.samplers._tpe.sampler).
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score
    assert (_get_infeasible_trial_score(a), _get_infeasible_trial_score(b)) == (0, pytest.approx(0.3))


def _run(client, exp_id, parent, method, **metrics):
    run = client.create_run(exp_id, tags={PARENT_TAG: parent, "method": method})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_infeasible_trials_are_tagged_off_the_front_and_never_promoted(tmp_path):
    from search.compare import resolve_sweep
    from search.promote import pareto_candidates, select_candidate
    import json

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("budget")
    parent = client.create_run(exp_id, tags={SWEEP_TAG: "true"}).info.run_id
    common = {"test_accuracy": 0.5, "latency_ratio": 0.5, "dense_macs": 1000.0, "params": 10.0}
    cheap = _run(client, exp_id, parent, "l1_norm", accuracy=0.70, macs=300.0, macs_reduction=0.7, **common)
    mid = _run(client, exp_id, parent, "l1_norm", accuracy=0.80, macs=500.0, macs_reduction=0.5, **common)
    best = _run(client, exp_id, parent, "random", accuracy=0.95, macs=800.0, macs_reduction=0.2, **common)
    stopped = client.create_run(exp_id, tags={PARENT_TAG: parent, "method": "random"}).info.run_id
    client.log_metric(stopped, "accuracy", 0.99)
    client.log_metric(stopped, "macs", 100.0)
    client.set_terminated(stopped, "KILLED")
    budget = ConstraintsConfig(max_macs_fraction=0.6)
    summary = record_front(client, parent, tmp_path / "front", {"dense_macs": 1000.0}, ("accuracy", "macs"), budget)
    tags = {r: client.get_run(r).data.tags for r in (cheap, mid, best, stopped)}
    assert [tags[r].get(FEASIBLE_TAG) for r in (cheap, mid, best)] == ["true", "true", "false"]
    assert tags[best]["prunetune.violated"] == "max_macs_fraction"
    assert [tags[r].get("pareto") for r in (cheap, mid, best, stopped)] == ["true", "true", "false", None]
    assert [p.run_id for p in summary["front"]] == [cheap, mid] and summary["infeasible"] == 1
    # hypervolume of the feasible front only: (500 - 300) * 0.7 + (1000 - 500) * 0.8
    assert summary["hypervolume"] == pytest.approx(200 * 0.7 + 500 * 0.8)
    # promote: the most accurate candidate is the feasible one, even if the tags were lost.
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "prunetune_sweep.json").write_text(json.dumps(
        {"parent_run_id": parent, "tracking_uri": uri, "config": {"objectives": ["accuracy", "macs"]}}))
    ref = resolve_sweep(tmp_path / "sweep")
    assert select_candidate(pareto_candidates(ref)).run_id == mid
    client.delete_tag(mid, "pareto")  # recomputed front: still no infeasible candidate
    assert {p.run_id for p in pareto_candidates(ref)} == {cheap, mid}
    assert math.isfinite(summary["hypervolume"])


def test_the_searcher_takes_its_seed_from_the_sampler_alone(caplog):
    # OptunaSearch ignores its own seed when given a sampler, and warned so in every sweep's output
    cfg = load_config(QUICK, ["methods=[l1_norm]"])
    ray_log = logging.getLogger("ray")  # Ray's loggers do not propagate to the root's (caplog's) handler
    ray_log.addHandler(caplog.handler)
    try:
        sampler = make_sampler("tpe", 3)
        searcher = ParetoOptunaSearch(make_space(cfg.search_space()), sampler, objectives=cfg.objectives)
        searcher.suggest("a")
    finally:
        ray_log.removeHandler(caplog.handler)
    assert searcher._ot_study.sampler is sampler
    assert not [r for r in caplog.records if "seed" in r.getMessage()]
