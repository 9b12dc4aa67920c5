"""The latency objective: each trial times its pruned model and the dense reference side by side on
its own device; ``objective: latency`` makes Optuna search on ``latency_ratio`` (pruned / dense), which
only the final result carries; fronts, tables, plots and promotion follow the sweep's objective.

Real parts throughout: torch trials on digits, Optuna studies, a Ray Tune sweep on the local node,
MLflow on SQLite.
"""
from __future__ import annotations

import csv
import glob
import math
import pickle
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import TINY_SWEEP
from helpers import small_trial_settings
from methods.errors import ConfigError
from search.cli import main
from search.compare import compare_fronts, resolve_sweep
from search.config import load_config
from search.fronts import DIRECTIONS
from search.pareto import front, hypervolume
from search.promote import pareto_candidates, select_candidate
from search.searcher import ParetoOptunaSearch, make_sampler
from search.space import make_space
from search.sweep import run_sweep
from search.tracking import TRIAL_TAG, child_runs
from trainables.trial import run_trial

LATENCY_KEYS = ("latency_ms", "dense_latency_ms", "latency_ratio", "latency_device", "latency_model")


# ---- the trial ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return small_trial_settings(tmp_path_factory.mktemp("base_models"), seed=0, finetune_epochs=2)


@pytest.mark.parametrize("name,hparams", [("l1_norm", {"prune_ratio": 0.7}),
                                          ("manidp", {"phase_epochs": 1, "prune_ratio": 0.5})])
def test_trial_times_pruned_and_dense_side_by_side(settings, name, hparams):
    reports = []
    final = run_trial(settings, name, hparams, lambda metrics, save: reports.append(dict(metrics)))
    assert reports[-1] == final
    # Measured once, after the last epoch: no epoch before it carries a latency (nothing made up).
    assert len(reports) >= 2 and all(k not in m for m in reports[:-1] for k in LATENCY_KEYS)
    assert final["latency_device"] == "cpu"
    assert math.isfinite(final["latency_ms"]) and final["latency_ms"] > 0
    assert math.isfinite(final["dense_latency_ms"]) and final["dense_latency_ms"] > 0
    assert final["latency_ratio"] == pytest.approx(final["latency_ms"] / final["dense_latency_ms"], rel=1e-12)
    # The pruned side is the method's inference path, the dense side the unpruned architecture.
    assert final["latency_model"] == ("SkippingView" if name == "manidp" else "CifarResNet")
    # Both sides timed with their batch norms folded (methods.fold), or neither: SkippingView
    # cannot be traced, so the ManiDP trial times both unfolded.
    assert final["latency_bn_folded"] == (0.0 if name == "manidp" else 1.0)
    assert 0 < final["macs"] < final["dense_macs"]


# ---- the searcher (a real Optuna study, no Ray run) --------------------------------------------------------------
def _searcher(objective):
    cfg = load_config("configs/quickstart.yaml", ["methods=[l1_norm]"])
    return ParetoOptunaSearch(make_space(cfg.search_space()), make_sampler("random", 0), objective=objective)


def test_searcher_requires_per_result_only_what_every_epoch_reports():
    """Tune checks every result for ``searcher.metric`` (strict metric checking); Optuna gets
    ``objectives`` from the final result."""
    from ray.tune.search import ConcurrencyLimiter

    macs, lat = _searcher("macs"), _searcher("latency")
    assert macs.objectives == macs.metric == ["accuracy", "macs"] and macs.mode == ["max", "min"]
    assert lat.objectives == ["accuracy", "latency_ratio"] and (lat.metric, lat.mode) == (["accuracy"], ["max"])
    limited = ConcurrencyLimiter(lat, max_concurrent=2)  # what Tune wraps it in (max_concurrent_trials)
    assert (limited.metric, limited.mode) == (["accuracy"], ["max"])
    assert [d.name for d in lat._ot_study.directions] == ["MAXIMIZE", "MINIMIZE"]


def test_searcher_tells_optuna_the_final_latency_ratio_or_fail_or_pruned():
    searcher = _searcher("latency")
    for tid in ("done", "nan", "no_ratio", "early", "error"):
        assert searcher.suggest(tid)["method"] == "l1_norm"
    final = {"epoch": 2, "accuracy": 0.9, "macs": 1e5, "test_accuracy": 0.88, "latency_ms": 1.5,
             "dense_latency_ms": 2.0, "latency_ratio": 0.75}
    searcher.on_trial_complete("done", final)
    searcher.on_trial_complete("nan", {"epoch": 1, "accuracy": math.nan, "macs": math.nan, "nonfinite": 1})
    searcher.on_trial_complete("no_ratio", {k: v for k, v in final.items() if k != "latency_ratio"})
    searcher.on_trial_complete("early", {"epoch": 1, "accuracy": 0.5, "macs": 1e5})  # no final result
    searcher.on_trial_complete("error", final, error=True)
    searcher.on_trial_complete("done", final)  # a second completion changes nothing
    trials = {tid: searcher._ot_study.trials[ot.number] for tid, ot in searcher._ot_trials.items()}
    assert {tid: t.state.name for tid, t in trials.items()} == {
        "done": "COMPLETE", "nan": "FAIL", "no_ratio": "FAIL", "early": "PRUNED", "error": "FAIL"}
    assert trials["done"].values == [0.9, 0.75]
    assert len(searcher._ot_study.trials) == 5


# ---- a real sweep with objective: latency ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def latency_sweep(ray_local, tmp_path_factory):
    """4 digits trials, 2 fine-tune epochs each: every trial reports one epoch without a latency
    before its final one, which Tune's strict metric checking must accept."""
    root = tmp_path_factory.mktemp("latency_sweep")
    overrides = [o for o in TINY_SWEEP if not o.startswith("finetune.epochs")] + [
        "finetune.epochs=2", "objective=latency", f"tracking_uri=sqlite:///{root}/mlflow.db",
        f"storage_path={root}/ray_results", "name=tiny_latency"]
    cfg = load_config("configs/quickstart.yaml", overrides)
    return cfg, run_sweep(cfg)


def test_latency_sweep_searches_and_records_the_latency_ratio(latency_sweep):
    cfg, result = latency_sweep
    assert result.objective == "latency" and result.finished == cfg.num_trials and result.failed == 0
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["objective"] == "latency"
    children = child_runs(client, result.parent_run_id)
    assert len(children) == cfg.num_trials
    for run in children:
        m = run.data.metrics
        assert run.info.status == "FINISHED"
        assert m["latency_ratio"] == pytest.approx(m["latency_ms"] / m["dense_latency_ms"], rel=1e-9)
        assert m["dense_latency_ms"] > 0
        assert run.data.tags["latency_device"] == "cpu" and run.data.tags["latency_model"] == "CifarResNet"
        # Accuracy every epoch, the latency ratio once, with the last epoch.
        assert [h.step for h in client.get_metric_history(run.info.run_id, "accuracy")] == [1, 2]
        assert [h.step for h in client.get_metric_history(run.info.run_id, "latency_ratio")] == [2]

    # Optuna was told [accuracy, latency_ratio], exactly what MLflow recorded for each trial.
    exp_dir = Path(result.experiment_dir)
    state = pickle.loads(Path(sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))[-1]).read_bytes())
    study, ot_trials = state["_ot_study"], state["_ot_trials"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert len(frozen) == cfg.num_trials
    for run in children:
        ft = frozen[ot_trials[run.data.tags[TRIAL_TAG]].number]
        assert ft.state == optuna.trial.TrialState.COMPLETE
        assert ft.values == [run.data.metrics["accuracy"], run.data.metrics["latency_ratio"]]

    # The pareto tags are the front of (accuracy max, latency_ratio min) over the recorded runs.
    points = [(r.data.metrics["accuracy"], r.data.metrics["latency_ratio"]) for r in children]
    expected = {children[i].info.run_id for i in front(points, DIRECTIONS)}
    assert {r.info.run_id for r in children if r.data.tags.get("pareto") == "true"} == expected and expected
    assert {p.run_id for p in result.front} == expected
    assert [p.latency_ratio for p in result.front] == sorted(p.latency_ratio for p in result.front)
    # Hypervolume against accuracy 0 and the dense model's ratio, 1.0.
    hv = hypervolume(points, (0.0, 1.0), DIRECTIONS)
    assert result.hypervolume == pytest.approx(hv, rel=1e-12)
    assert parent.data.metrics["hypervolume"] == pytest.approx(hv, rel=1e-12)

    # The front's CSV carries both latencies and the ratio.
    with open(exp_dir / "front" / "pareto_front.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == expected
    for row in rows:
        assert float(row["latency_ratio"]) == pytest.approx(float(row["latency_ms"]) / float(row["dense_latency_ms"]))


def test_fronts_cli_labels_the_latency_cost(latency_sweep, tmp_path, capsys):
    cfg, result = latency_sweep
    out = tmp_path / "latency.png"
    assert main(["fronts", str(result.experiment_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0].split()
    assert header[:4] == ["label", "method", "accuracy", "latency_ratio"] and "MACs" in header
    client = MlflowClient(cfg.tracking_uri)
    recorded = {r.info.run_id: r.data.metrics for r in child_runs(client, result.parent_run_id)}
    rows = [line.split() for line in text.splitlines()[1:text.splitlines().index("")]]
    assert rows
    for row in rows:  # label method accuracy latency_ratio latency_ms dense_ms MACs params test_acc run_id
        m = recorded[row[-1]]
        assert float(row[3]) == pytest.approx(m["latency_ratio"], abs=5e-5)
        assert float(row[4]) == pytest.approx(m["latency_ms"], abs=5e-4)
        assert float(row[6].replace(",", "")) == m["macs"]
    assert "hypervolume (reference: accuracy 0, latency_ratio 1):" in text
    # The plot's x axis is the latency ratio (the PNG's text chunks name its axes).
    info = Image.open(out).info
    assert "latency_ratio" in info["Description"] and "MACs" not in info["Description"], info
    assert info["Title"] == "validation accuracy vs latency_ratio"

    # By method: each series' front is the (accuracy, latency_ratio) front of that method's trials.
    runs_of: dict[str, list] = {}
    for run in child_runs(client, result.parent_run_id):
        runs_of.setdefault(run.data.params["method"], []).append(run)
    fronts = compare_fronts([result.experiment_dir], tmp_path / "by_method.png", by_method=True)
    assert set(fronts) == set(runs_of)
    for method, pts in fronts.items():
        runs = runs_of[method]
        idx = front([(r.data.metrics["accuracy"], r.data.metrics["latency_ratio"]) for r in runs], DIRECTIONS)
        assert {p.run_id for p in pts} == {runs[i].info.run_id for i in idx}
        assert [p.latency_ratio for p in pts] == sorted(p.latency_ratio for p in pts)


def test_sweeps_of_different_objectives_are_not_compared(latency_sweep, tiny_sweep, tmp_path, capsys):
    (_, lat), (macs_cfg, macs) = latency_sweep, tiny_sweep
    assert resolve_sweep(lat.experiment_dir).objective == "latency"
    assert resolve_sweep(macs.experiment_dir).objective == "macs"
    assert resolve_sweep(macs_cfg.name, macs_cfg.tracking_uri).objective == "macs"
    rc = main(["fronts", str(lat.experiment_dir), str(macs.experiment_dir), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "different objectives" in err
    assert "latency" in err and "macs" in err
    with pytest.raises(ConfigError, match="different objectives"):
        compare_fronts([lat.experiment_dir, macs.experiment_dir], tmp_path / "y.png")


def test_promotion_candidates_follow_the_latency_objective(latency_sweep):
    _, result = latency_sweep
    candidates = pareto_candidates(resolve_sweep(result.experiment_dir))
    assert {p.run_id for p in candidates} == {p.run_id for p in result.front}
    ratios = [p.latency_ratio for p in candidates]
    assert ratios == sorted(ratios)  # cheapest (in the searched cost) first
    fastest, best = candidates[0], max(candidates, key=lambda p: p.accuracy)
    assert select_candidate(candidates, min_accuracy=0.0) == fastest
    assert select_candidate(candidates, max_latency_ratio=fastest.latency_ratio) == fastest
    assert select_candidate(candidates, max_latency_ratio=best.latency_ratio) == best
    with pytest.raises(ConfigError, match=r"no model on the Pareto front has latency_ratio <= "):
        select_candidate(candidates, max_latency_ratio=fastest.latency_ratio * 0.999)
    with pytest.raises(ConfigError, match="not both --max-macs and --max-latency-ratio"):
        select_candidate(candidates, max_macs=1e9, max_latency_ratio=1.0)
