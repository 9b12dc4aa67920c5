"""`prunetune promote` on the real tiny sweep: MLflow (SQLite) registry, pt2 model, fresh-process load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from methods.errors import ConfigError
from search.cli import main
from search.compare import resolve_sweep
from search.promote import PromotionError, pareto_candidates, promote, select_candidate
from search.tracking import PARENT_TAG, SWEEP_TAG, child_runs

NAME = "tiny-resnet20"


def _versions(client, name):
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


def _alias_version(client, name, alias="champion"):
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@pytest.fixture(scope="module")
def promoted(tiny_sweep):
    """The sweep's most accurate front model promoted as NAME@champion (from the sweep directory)."""
    _, result = tiny_sweep
    return promote(result.experiment_dir, NAME)


def _front_runs(client, parent_run_id):
    return [r for r in child_runs(client, parent_run_id) if r.data.tags.get("pareto") == "true"]


def test_promotion_registers_version_moves_alias_and_tags_it(tiny_sweep, promoted):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    front_runs = _front_runs(client, result.parent_run_id)
    best = max(front_runs, key=lambda r: (r.data.metrics["accuracy"], -r.data.metrics["macs"]))
    assert promoted.source_run_id == best.info.run_id
    assert promoted.validated and promoted.alias_moved

    mv = client.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == promoted.version
    m = best.data.metrics
    assert mv.tags["method"] == best.data.tags["method"]
    assert mv.tags["source_run_id"] == best.info.run_id
    assert mv.tags["validation"] == "passed"
    assert float(mv.tags["accuracy"]) == pytest.approx(m["accuracy"], rel=1e-5)
    assert float(mv.tags["test_accuracy"]) == pytest.approx(m["test_accuracy"], rel=1e-5)
    assert float(mv.tags["macs"]) == m["macs"] and float(mv.tags["params"]) == m["params"]
    assert abs(promoted.reevaluated_test_accuracy - m["test_accuracy"]) <= 0.005

    # The model was logged in its own run, tagged with its source, in the sweep's experiment, and it
    # is not a child of the sweep: the sweep still has exactly its trials.
    run = client.get_run(promoted.promotion_run_id)
    assert run.data.tags["prunetune.source_run_id"] == best.info.run_id
    assert run.info.experiment_id == best.info.experiment_id
    assert promoted.promotion_run_id not in {r.info.run_id for r in child_runs(client, result.parent_run_id)}
    # The registered version is the trial's own pt2 model: its source run is the trial, tagged with it.
    assert mv.run_id == best.info.run_id
    assert client.get_run(best.info.run_id).data.tags["promoted_to"] == f"{NAME}/{promoted.version}"
    assert client.get_logged_model(promoted.logged_model_id).source_run_id == best.info.run_id
    # pt2 (torch.export) format: an exported program, no pickled module.
    assert mv.source == f"models:/{promoted.logged_model_id}"
    files = _model_files(client, promoted.logged_model_id)
    assert "model.pt2" in files and not any(f.endswith((".pth", ".pkl")) for f in files)


def _model_files(client, model_id):
    from urllib.parse import urlparse

    location = client.get_logged_model(model_id).artifact_location
    local = urlparse(location).path if location.startswith("file:") else location
    return [name for _, _, names in os.walk(local) for name in names]


def test_champion_loads_in_a_fresh_process_without_the_project(tiny_sweep, promoted, tmp_path):
    cfg, _ = tiny_sweep
    from trainables.data import load

    data = load(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed, augment=False)
    xs, ys = zip(*(data.test[i] for i in range(len(data.test))))
    fresh = tmp_path / "fresh"  # the subprocess's working directory, outside the repository
    fresh.mkdir()
    torch.save({"x": torch.stack(xs), "y": torch.tensor(ys)}, fresh / "test.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class NoProject(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("methods", "trainables", "search"):
                    raise ImportError("the promoted model must not need project module " + name)
        sys.meta_path.insert(0, NoProject())
        import mlflow.pytorch, torch
        model = mlflow.pytorch.load_model("models:/{NAME}@champion")
        t = torch.load("test.pt", weights_only=True)
        with torch.no_grad():
            pred = model(t["x"]).argmax(1)
        project = [m for m in sys.modules if m.split(".")[0] in ("methods", "trainables", "search")]
        print(json.dumps({{"correct": int((pred == t["y"]).sum()), "n": len(t["y"]), "project": project}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_URI=cfg.tracking_uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    proc = subprocess.run([sys.executable, "-c", script], cwd=fresh, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["project"] == []
    assert out["n"] == len(ys)
    assert out["correct"] / out["n"] == pytest.approx(promoted.reevaluated_test_accuracy, abs=1e-12)


def test_budgets_pick_from_the_front(tiny_sweep):
    _, result = tiny_sweep
    candidates = pareto_candidates(resolve_sweep(result.experiment_dir))
    assert candidates == sorted(candidates, key=lambda p: p.macs)
    cheapest, best = candidates[0], max(candidates, key=lambda p: p.accuracy)
    assert select_candidate(candidates) == best
    assert select_candidate(candidates, max_macs=cheapest.macs) == cheapest
    assert select_candidate(candidates, max_macs=best.macs) == best
    assert select_candidate(candidates, min_accuracy=0.0) == cheapest
    assert select_candidate(candidates, min_accuracy=best.accuracy) == best
    with pytest.raises(ConfigError, match=r"accuracy >= "):
        select_candidate(candidates, min_accuracy=best.accuracy + 1e-9)
    with pytest.raises(ConfigError, match="not both"):
        select_candidate(candidates, max_macs=1e12, min_accuracy=0.0)


def test_budget_nothing_meets_registers_and_moves_nothing(tiny_sweep, promoted):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    exp_id = client.get_experiment_by_name(cfg.name).experiment_id
    before = (_versions(client, NAME), _alias_version(client, NAME), len(client.search_runs([exp_id])))
    with pytest.raises(ConfigError, match=r"no model on the Pareto front has macs <= 1\b") as err:
        promote(result.experiment_dir, NAME, max_macs=1)
    for r in _front_runs(client, result.parent_run_id):  # lists the options
        assert r.info.run_id in str(err.value)
    with pytest.raises(ConfigError, match="no model on the Pareto front"):
        promote(cfg.name, "tiny-never", max_macs=1, tracking_uri=cfg.tracking_uri)
    after = (_versions(client, NAME), _alias_version(client, NAME), len(client.search_runs([exp_id])))
    assert after == before
    assert client.search_registered_models("name='tiny-never'") == []


def test_cli_bad_budget_exits_2_with_one_line(tiny_sweep, capsys):
    cfg, _ = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    before = (_versions(client, NAME), _alias_version(client, NAME))
    rc = main(["promote", cfg.name, "--tracking-uri", cfg.tracking_uri, "--name", NAME, "--max-macs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("prunetune: error: ") and "macs <= 1" in err
    assert (_versions(client, NAME), _alias_version(client, NAME)) == before
    with pytest.raises(SystemExit) as exc:  # the two budgets exclude each other
        main(["promote", cfg.name, "--name", NAME, "--max-macs", "5", "--min-accuracy", "0.5"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_cli_promotes_under_a_budget_and_prints_it(tiny_sweep, capsys):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    cheapest = min(_front_runs(client, result.parent_run_id), key=lambda r: r.data.metrics["macs"])
    rc = main(["promote", cfg.name, "--tracking-uri", cfg.tracking_uri, "--name", "tiny-small",
               "--max-macs", str(int(cheapest.data.metrics["macs"])), "--alias", "small"])
    out = capsys.readouterr().out
    assert rc == 0
    mv = client.get_model_version_by_alias("tiny-small", "small")
    assert mv.tags["source_run_id"] == cheapest.info.run_id
    assert f"promoted tiny-small @small -> version {mv.version}\n" in out and cheapest.info.run_id in out


def _clone_sweep(client, parent_run_id, source_run_ids, experiment, test_accuracy=None, pareto_tags=True):
    """A copy of some trials of the sweep in another experiment, WITHOUT a sweep directory (so promotion
    reads the data config from the parent run's params); optionally with a tampered recorded test
    accuracy, or without the ``pareto`` tags."""
    exp = client.get_experiment_by_name(experiment)  # a second clone into one experiment: a second sweep
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.get_run(parent_run_id)
    new_parent = client.create_run(exp_id, run_name="sweep-copy", tags={SWEEP_TAG: "true"}).info.run_id
    client.log_batch(new_parent, params=[Param(k, v) for k, v in parent.data.params.items()])
    for source_run_id in source_run_ids:
        src = client.get_run(source_run_id)
        tags = {PARENT_TAG: new_parent, "method": src.data.tags["method"], "copy_of": source_run_id}
        if pareto_tags:
            tags["pareto"] = src.data.tags["pareto"]
        child = client.create_run(exp_id, run_name="trial-copy", tags=tags).info.run_id
        metrics = dict(src.data.metrics)
        if test_accuracy is not None:
            metrics["test_accuracy"] = test_accuracy
        client.log_batch(child, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in src.data.params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifacts(child, client.download_artifacts(source_run_id, "model", tmp), "model")
        client.set_terminated(child, "FINISHED")
    client.set_terminated(new_parent, "FINISHED")
    return new_parent


def test_front_is_recomputed_when_pareto_tags_are_missing(tiny_sweep):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    trials = [r for r in child_runs(client, result.parent_run_id) if r.info.status == "FINISHED"]
    _clone_sweep(client, result.parent_run_id, [r.info.run_id for r in trials], "tiny-untagged", pareto_tags=False)
    untagged = pareto_candidates(resolve_sweep("tiny-untagged", cfg.tracking_uri))
    tagged = pareto_candidates(resolve_sweep(result.experiment_dir))
    assert [(p.method, p.accuracy, p.macs) for p in untagged] == [(p.method, p.accuracy, p.macs) for p in tagged]
    assert {client.get_run(p.run_id).data.tags["copy_of"] for p in untagged} == {p.run_id for p in tagged}


def test_validation_failure_keeps_the_alias_and_tags_the_version(tiny_sweep, promoted, capsys):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    wrong = 0.0 if promoted.reevaluated_test_accuracy > 0.5 else 1.0
    _clone_sweep(client, result.parent_run_id, [promoted.source_run_id], "tiny-tampered", test_accuracy=wrong)
    alias_before = _alias_version(client, NAME)
    versions_before = _versions(client, NAME)

    rc = main(["promote", "tiny-tampered", "--tracking-uri", cfg.tracking_uri, "--name", NAME])
    err = capsys.readouterr().err
    assert rc != 0 and rc != 2
    ours = [ln for ln in err.splitlines() if "prunetune" in ln]  # MLflow adds its own progress lines
    assert len(ours) == 1 and ours[0].startswith("prunetune: error: ")
    assert "validation failed" in ours[0] and "NOT moved" in ours[0]
    new = [v for v in _versions(client, NAME) if v not in versions_before]
    assert len(new) == 1
    mv = client.get_model_version(NAME, str(new[0]))
    assert mv.tags["validation"] == "failed"
    assert _alias_version(client, NAME) == alias_before == promoted.version

    # The library raises, carrying what was registered.
    with pytest.raises(PromotionError) as exc:
        promote("tiny-tampered", NAME, tracking_uri=cfg.tracking_uri)
    assert not exc.value.result.alias_moved and exc.value.result.test_accuracy == wrong
    assert _alias_version(client, NAME) == promoted.version


def test_experiment_name_means_the_best_over_all_its_sweeps(tiny_sweep, capsys):
    """Two sweeps in one experiment: the older holds the most accurate front trial, the latest a
    cheaper, less accurate one. By name: the best over both, and the output names its sweep;
    ``--latest``: the latest sweep's (the old behaviour)."""
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    front_runs = sorted(_front_runs(client, result.parent_run_id), key=lambda r: r.data.metrics["accuracy"])
    if len(front_runs) < 2:
        pytest.skip("the tiny sweep's front has a single trial")
    older = _clone_sweep(client, result.parent_run_id, [front_runs[-1].info.run_id], "tiny-two")
    latest = _clone_sweep(client, result.parent_run_id, [front_runs[0].info.run_id], "tiny-two")

    rc = main(["promote", "tiny-two", "--tracking-uri", cfg.tracking_uri, "--name", "tiny-two-best"])
    out = capsys.readouterr().out
    assert rc == 0
    mv = client.get_model_version_by_alias("tiny-two-best", "champion")
    assert client.get_run(mv.tags["source_run_id"]).data.tags["copy_of"] == front_runs[-1].info.run_id
    assert mv.tags["sweep_run_id"] == older and f"(sweep run {older})" in out and "from sweep tiny-two@" in out

    by_latest = promote("tiny-two", "tiny-two-latest", tracking_uri=cfg.tracking_uri, latest=True)
    assert by_latest.sweep_run_id == latest and by_latest.sweep == "tiny-two"
    assert client.get_run(by_latest.source_run_id).data.tags["copy_of"] == front_runs[0].info.run_id
    # A trial recorded without an MLflow model (these copies) gets one logged in the promotion run.
    assert client.get_model_version("tiny-two-latest", by_latest.version).run_id == by_latest.promotion_run_id
    assert client.get_run(by_latest.source_run_id).data.tags["promoted_to"] == f"tiny-two-latest/{by_latest.version}"
