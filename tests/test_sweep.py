"""The sweep end to end on real parts: local Ray, Optuna inside Tune, MLflow on SQLite."""
import math
from pathlib import Path

from mlflow.tracking import MlflowClient

from search.config import load_config
from search.fronts import DIRECTIONS
from search.pareto import front
from search.sweep import run_sweep
from search.tracking import PARENT_TAG, child_runs


def test_sweep_records_parent_children_and_front(tiny_sweep):
    cfg, result = tiny_sweep
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model"] == "resnet20"
    children = child_runs(client, result.parent_run_id)
    assert len(children) == cfg.num_trials == result.finished
    methods_seen = set()
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags[PARENT_TAG] == result.parent_run_id
        assert run.data.params["method"] in ("l1_norm", "random")
        methods_seen.add(run.data.params["method"])
        assert 0.2 <= float(run.data.params["prune_ratio"]) <= 0.8
        for key in ("accuracy", "test_accuracy", "macs", "params", "latency_ms", "dense_latency_ms", "latency_ratio"):
            assert key in run.data.metrics, key
        assert run.data.tags["latency_device"] == "cpu" and run.data.tags["latency_model"] == "CifarResNet"
        assert run.data.metrics["macs"] < run.data.metrics["dense_macs"]
        # Per-epoch history: one accuracy per epoch (no phase for these methods; 1 fine-tune epoch).
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in history] == [1]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert artifacts == {"model/weights.pt", "model/spec.json"}
    # The pareto tags are exactly the non-dominated set of the recorded metrics.
    points = [(r.data.metrics["accuracy"], r.data.metrics["macs"]) for r in children]
    expected = {children[i].info.run_id for i in front(points, DIRECTIONS)}
    tagged = {r.info.run_id for r in children if r.data.tags.get("pareto") == "true"}
    assert tagged == expected and tagged
    assert {r.info.run_id for r in children if r.data.tags.get("pareto") == "false"} == \
        {r.info.run_id for r in children} - expected
    # Artifacts live beside the SQLite database, not in ./mlruns of whatever directory ran the sweep.
    db_dir = Path(cfg.tracking_uri[len("sqlite:///"):]).parent
    for run in [parent] + children:
        assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri()), run.info.artifact_uri
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"pareto_front.png", "pareto_front.csv"} <= parent_artifacts
    assert math.isclose(parent.data.metrics["hypervolume"], result.hypervolume)
    assert result.hypervolume > 0


def test_base_model_is_trained_once_and_reused(tiny_sweep):
    cfg, result = tiny_sweep
    base_dirs = [p for p in (Path(cfg.storage_path) / "base_models").iterdir() if not p.name.startswith(".")]
    assert len(base_dirs) == 1  # one dense base for all four trials
    # beside it, the digits splits as arrays (trainables.data_cache): the trials' workers read those
    data = [p.name for p in (Path(cfg.storage_path) / "base_models" / ".data").iterdir()]
    assert len(data) == 1 and data[0].startswith("digits-")
    assert result.base_metrics["accuracy"] > 0.5


def test_nonfinite_trials_fail_with_reason_and_sweep_finishes(ray_local, tmp_path):
    cfg = load_config("configs/quickstart.yaml", [
        "methods=[l1_norm]", "num_trials=2", "base.epochs=1", "finetune.epochs=2", "early_stopping.type=none", "finetune.lr=1.0e+12",
        f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray",
        "name=nan"])
    result = run_sweep(cfg)  # returns: failed trials do not stop the sweep
    client = MlflowClient(cfg.tracking_uri)
    children = child_runs(client, result.parent_run_id)
    assert result.failed == 2 and result.finished == 0
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FAILED"
        assert "training loss became nan" in run.data.tags["failure_reason"] or \
            "training loss became inf" in run.data.tags["failure_reason"]
