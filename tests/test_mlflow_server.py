"""MLflow as a real tracking SERVER (`mlflow server`, started here on 127.0.0.1 with proxied artifacts):
a whole sweep, `prunetune fronts` and `prunetune promote` through ``http://`` only. Every artifact
(the trials' models, the front's PNG and CSV, the promoted pt2 model) goes through the server into its
``--artifacts-destination``; the driver's working directory stays empty."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_SWEEP
from mlflow_server import running_server

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
NAME = "server-resnet20"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (SQLite backend, artifacts served from a folder) in its own session; stopped by
    its PID at the end (SIGTERM, then SIGKILL to its process group), and nothing of it may survive."""
    with running_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="module")
def server_sweep(ray_local, mlflow_server, tmp_path_factory):
    """The tiny sweep (two fine-tune epochs, so each trial has a metric history) tracked by the server,
    run from an empty working directory. Returns ``(config, SweepResult, cwd, root)``."""
    from search.config import load_config
    from search.sweep import run_sweep

    root = tmp_path_factory.mktemp("server-sweep")
    cwd = root / "cwd"
    cwd.mkdir()
    cfg = load_config(str(QUICKSTART), TINY_SWEEP + [
        "finetune.epochs=2", "early_stopping.type=none", f"tracking_uri={mlflow_server.uri}", f"storage_path={root}/ray_results",
        "name=tiny-server"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = run_sweep(cfg)
    return cfg, result, cwd, root


def test_sweep_records_everything_through_the_server(server_sweep, mlflow_server):
    from search.tracking import PARENT_TAG, child_runs

    cfg, result, cwd, root = server_sweep
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tracking_uri"] == mlflow_server.uri
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == cfg.name and exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location

    children = child_runs(client, result.parent_run_id)
    assert len(children) == cfg.num_trials == result.finished and result.failed == 0
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags[PARENT_TAG] == result.parent_run_id
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        for key in ("accuracy", "loss", "macs"):  # one record per fine-tune epoch
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
        for key in ("test_accuracy", "params", "latency_ms"):
            assert key in run.data.metrics, key
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/weights.pt",
                                                                                      "model/spec.json"}
        assert mlflow_server.local_file(run.info.artifact_uri, "model", "weights.pt").is_file()

    # Pareto tags on every finished trial; the front is the tagged set.
    tags = {r.info.run_id: r.data.tags.get("pareto") for r in children}
    assert set(tags.values()) <= {"true", "false"} and "true" in tags.values()
    tagged = {rid for rid, t in tags.items() if t == "true"}
    assert {p.run_id for p in result.front} == tagged

    # The front's CSV and PNG: downloadable through the server, stored in its artifacts folder, equal
    # to the copy in the sweep directory.
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {"pareto_front.png", "pareto_front.csv"}
    download = root / "download"
    for name in ("pareto_front.csv", "pareto_front.png"):
        got = Path(client.download_artifacts(result.parent_run_id, name, str(download)))
        stored = mlflow_server.local_file(parent.info.artifact_uri, name)
        assert stored.is_file(), stored
        assert got.read_bytes() == stored.read_bytes() == (result.experiment_dir / "front" / name).read_bytes()
    assert (download / "pareto_front.png").read_bytes().startswith(PNG_MAGIC)
    with open(download / "pareto_front.csv", newline="") as f:
        assert {row["run_id"] for row in csv.DictReader(f)} == tagged
    assert parent.data.metrics["hypervolume"] == pytest.approx(result.hypervolume) and result.hypervolume > 0

    # Nothing on the driver's disk beside the sweep directory: no mlruns/, mlartifacts/ or mlflow.db.
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == ["cwd", "download", "ray_results"]


def test_fronts_by_experiment_name_through_the_server(server_sweep, mlflow_server, tmp_path, capsys):
    from search.cli import main

    cfg, result, cwd, _ = server_sweep
    out = tmp_path / "fronts.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        rc = main(["fronts", cfg.name, "--tracking-uri", mlflow_server.uri, "--out", str(out)])
    assert rc == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    text = capsys.readouterr().out
    for p in result.front:
        assert p.run_id in text
    assert list(cwd.iterdir()) == []


def test_promote_registers_and_loads_back_through_the_server(server_sweep, mlflow_server, tmp_path, monkeypatch):
    import mlflow.pytorch

    from search.promote import _tracking_uri, promote
    from trainables.data import load
    from trainables.model_io import load_model

    cfg, result, cwd, _ = server_sweep
    monkeypatch.chdir(cwd)
    promoted = promote(result.experiment_dir, NAME)
    client = MlflowClient(mlflow_server.uri)
    best = max(result.front, key=lambda p: (p.accuracy, -p.macs))
    assert promoted.source_run_id == best.run_id and promoted.validated and promoted.alias_moved

    mv = client.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == promoted.version and mv.tags["validation"] == "passed"
    assert mv.tags["source_run_id"] == best.run_id and mv.source == f"models:/{promoted.logged_model_id}"
    assert client.get_run(promoted.promotion_run_id).info.status == "FINISHED"
    # The pt2 program went through the server into its artifacts folder.
    logged = client.get_logged_model(promoted.logged_model_id)
    location = logged.artifact_location
    assert logged.experiment_id == client.get_run(result.parent_run_id).info.experiment_id  # not Default's
    assert location.startswith("mlflow-artifacts:/"), location
    stored = [f.name for f in mlflow_server.local_file(location).rglob("*") if f.is_file()]
    assert "model.pt2" in stored and not any(f.endswith((".pth", ".pkl")) for f in stored), stored

    # The registered model, loaded by alias through the server with pickle refused, computes what the
    # trial's own model (its weights + spec, downloaded from the trial's run) computes.
    trial_model, _ = load_model(client.download_artifacts(best.run_id, "model", str(tmp_path)))
    data = load(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed, augment=False)
    x = torch.stack([data.test[i][0] for i in range(32)])
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with _tracking_uri(mlflow_server.uri):
        champion = mlflow.pytorch.load_model(f"models:/{NAME}@champion")
    with torch.no_grad():
        expected, got = trial_model(x), champion(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert list(cwd.iterdir()) == []
