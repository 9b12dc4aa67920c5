"""Three objectives end to end (issue 12 item 4): a real sweep searching accuracy, MACs and params,
with the quickstart's early stopping ranking on all three. Optuna gets the three values of every
finished trial, the front is the 3-D non-dominated set of the finished trials (stopped ones never on
it), and the recorded hypervolume equals an independent brute-force computation."""
from __future__ import annotations

import csv
import glob
import itertools
import pickle
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.config import load_config
from search.early_stopping import STOPPED_RUNG_TAG
from search.sweep import run_sweep
from search.tracking import TRIAL_TAG, child_runs

from conftest import TINY_SWEEP

NAMES = ("accuracy", "macs", "params")


def _brute_force_front(points):
    """Indices of the points no other point weakly beats on all three (accuracy max, costs min) and
    strictly on one."""
    def beats(q, p):
        return q[0] >= p[0] and q[1] <= p[1] and q[2] <= p[2] and (q[0] > p[0] or q[1] < p[1] or q[2] < p[2])
    return {i for i, p in enumerate(points) if not any(beats(q, p) for j, q in enumerate(points) if j != i)}


def _brute_force_hypervolume(points, ref):
    """Volume dominated by ``points`` inside the reference box, summed over the cells of the grid that
    every coordinate spans (a cell counts when one point dominates its best corner)."""
    mins = [(-a, m, p) for a, m, p in points]  # accuracy negated: everything minimised
    r = (-ref[0], ref[1], ref[2])
    axes = [sorted({q[k] for q in mins if q[k] < r[k]} | {r[k]}) for k in range(3)]
    volume = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        low = [axes[k][cell[k]] for k in range(3)]
        if any(all(q[k] <= low[k] for k in range(3)) for q in mins):
            volume += ((axes[0][cell[0] + 1] - low[0]) * (axes[1][cell[1] + 1] - low[1])
                       * (axes[2][cell[2] + 1] - low[2]))
    return volume


@pytest.fixture(scope="module")
def three_sweep(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("three_sweep")
    overrides = [o for o in TINY_SWEEP if not o.startswith(("finetune.epochs", "early_stopping", "num_trials"))] + [
        "num_trials=6", "finetune.epochs=2", "objectives=[accuracy, macs, params]",
        "early_stopping={type: successive_halving, grace_epochs: 1, reduction_factor: 2}",
        f"tracking_uri=sqlite:///{root}/mlflow.db", f"storage_path={root}/ray_results", "name=three"]
    cfg = load_config("configs/quickstart.yaml", overrides)
    return cfg, run_sweep(cfg)


def test_three_objective_sweep_records_the_3d_front_and_its_exact_hypervolume(three_sweep):
    cfg, result = three_sweep
    assert result.objectives == NAMES and result.failed == 0
    client = MlflowClient(cfg.tracking_uri)
    children = child_runs(client, result.parent_run_id)
    assert len(children) == cfg.num_trials
    finished = [r for r in children if r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics]
    stopped = [r for r in children if STOPPED_RUNG_TAG in r.data.tags]
    assert len(finished) + len(stopped) == cfg.num_trials and finished

    # Optuna: three directions; a finished trial told its three values, a stopped one PRUNED.
    exp_dir = Path(result.experiment_dir)
    state = pickle.loads(Path(sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))[-1]).read_bytes())
    study, ot_trials = state["_ot_study"], state["_ot_trials"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    for run in finished:
        ft = frozen[ot_trials[run.data.tags[TRIAL_TAG]].number]
        assert ft.state == optuna.trial.TrialState.COMPLETE
        assert ft.values == [run.data.metrics[n] for n in NAMES]
    for run in stopped:
        assert frozen[ot_trials[run.data.tags[TRIAL_TAG]].number].state == optuna.trial.TrialState.PRUNED
        assert run.data.tags.get("pareto") != "true"

    # The front: the brute-force 3-D non-dominated set of the finished trials, in MLflow and the CSV.
    points = [tuple(r.data.metrics[n] for n in NAMES) for r in finished]
    expected = {finished[i].info.run_id for i in _brute_force_front(points)}
    assert {r.info.run_id for r in children if r.data.tags.get("pareto") == "true"} == expected
    with open(exp_dir / "front" / "pareto_front.csv", newline="") as f:
        assert {row["run_id"] for row in csv.DictReader(f)} == expected
    assert {p.run_id for p in result.front} == expected

    # Hypervolume against (accuracy 0, the dense MACs, the dense params), computed independently.
    parent = client.get_run(result.parent_run_id).data.metrics
    ref = (0.0, parent["dense_macs"], parent["dense_params"])
    assert all(p[1] < ref[1] and p[2] < ref[2] for p in points)  # every trial pruned something
    hv = _brute_force_hypervolume(points, ref)
    assert result.hypervolume == pytest.approx(hv, rel=1e-9) and hv > 0
    assert parent["hypervolume"] == pytest.approx(hv, rel=1e-9)
