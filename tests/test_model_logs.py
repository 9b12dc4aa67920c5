"""The driver logs a finished trial's model in a thread of its own (issue 12: ~0.5-1 s of
``torch.export`` a trial no longer holds Tune's event loop, nor counts in the trial's run time).
What must hold: the run ends FINISHED at the time its trial ended (not when its model was logged),
its weights + spec artifacts and its pt2 LoggedModel are there once the logging thread is drained
(Tune's end of the experiment does it), and a trial the scheduler stopped is closed at once, so the
early-stopping recorder that comes next marks it KILLED. Real MLflow on SQLite, a real model."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch
from mlflow.tracking import MlflowClient
from ray import tune

from search import model_logs
from search.mlflow_model import trial_model_id
from search.tracking import TRIAL_TAG, MLflowTrialLogger, child_runs, open_parent_run
from trainables.model_io import model_spec, save_model
from trainables.models import create_model


def _trial(tid: str, tmp_path: Path, final: bool):
    model = create_model("resnet20", num_classes=10, in_channels=1, width_mult=0.5)
    ckpt = tmp_path / f"ckpt-{tid}"
    save_model(model, ckpt / "model", model_spec(model, "resnet20", 10, in_channels=1, width_mult=0.5))
    result = {"epoch": 2, "accuracy": 0.5, "macs": 1e5}
    if final:
        result.update(test_accuracy=0.5, latency_ratio=0.7)
    return SimpleNamespace(trial_id=tid, status="TERMINATED", config={"method": "l1_norm", "l1_norm.prune_ratio": 0.5},
                           last_result=result, checkpoint=tune.Checkpoint.from_directory(str(ckpt)), error_msg="")


def test_a_finished_trials_run_ends_when_the_trial_did_and_its_model_follows(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = open_parent_run(client, "bg", None, {}, {})
    logger = MLflowTrialLogger(client.tracking_uri, parent, example=torch.zeros(4, 1, 8, 8).numpy())
    finished, stopped = _trial("fin", tmp_path, final=True), _trial("stop", tmp_path, final=False)
    logger.on_step_begin(iteration=0, trials=[])
    for t in (finished, stopped):
        logger.on_trial_start(iteration=0, trials=[], trial=t)
    runs = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in child_runs(client, parent)}

    before = int(time.time() * 1000)
    logger.on_trial_complete(iteration=0, trials=[], trial=finished)
    returned = int(time.time() * 1000)
    logger.on_trial_complete(iteration=0, trials=[], trial=stopped)
    # Stopped early: closed before on_trial_complete returned (the recorder's KILLED comes next).
    assert client.get_run(runs["stop"]).info.status == "FINISHED"

    logger.on_experiment_end(trials=[finished, stopped])  # Tune's end: waits for the logging thread
    run = client.get_run(runs["fin"])
    assert run.info.status == "FINISHED"
    assert before <= run.info.end_time <= returned  # when the trial ended ...
    model_id = trial_model_id(client, runs["fin"])
    assert model_id is not None  # ... its pt2 model READY ...
    assert client.get_logged_model(model_id).last_updated_timestamp > run.info.end_time  # ... logged after
    assert {a.path for a in client.list_artifacts(runs["fin"], "model")} >= {"model/weights.pt", "model/spec.json"}
    assert model_logs.drain() == 0  # nothing left on its way
