"""The driver's MLflow records of a trial, kept off the trial's path (issue 12). The trial's model
(~0.5-1 s of ``torch.export``) is logged in a thread of its own: the run still ends FINISHED at
the time its trial ended (not when its model was logged), its weights + spec artifacts and its pt2
LoggedModel are there once the logging thread is drained (Tune's end of the experiment does it),
and a trial the scheduler stopped is closed at once, so the early-stopping recorder that comes next
marks it KILLED; a model the driver had not logged when it died is logged by the resumed sweep.
Its epochs are written together, by its next checkpoint or its end at the latest.
Real MLflow on SQLite, a real model."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch
from mlflow.tracking import MlflowClient
from ray import tune

from search import model_logs
from search.mlflow_model import trial_model_id
from search.tracking import MODEL_PENDING_TAG, TRIAL_TAG, MLflowTrialLogger, child_runs, open_parent_run
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
    # Closed before on_trial_complete returned, when the trial ended (the recorder's KILLED of a
    # stopped trial comes next); their models follow in the model-logging thread.
    run = client.get_run(runs["fin"])
    assert run.info.status == "FINISHED" and before <= run.info.end_time <= returned
    assert client.get_run(runs["stop"]).info.status == "FINISHED"

    logger.on_experiment_end(trials=[finished, stopped])  # Tune's end: waits for the logging thread
    for tid in ("fin", "stop"):
        run = client.get_run(runs[tid])
        assert run.info.status == "FINISHED" and MODEL_PENDING_TAG not in run.data.tags
        model_id = trial_model_id(client, runs[tid])
        assert model_id is not None  # its pt2 model READY, logged after the run ended
        assert client.get_logged_model(model_id).last_updated_timestamp > run.info.end_time
        assert {a.path for a in client.list_artifacts(runs[tid], "model")} >= {"model/weights.pt", "model/spec.json"}
    assert model_logs.drain() == 0  # nothing left on its way


def test_a_trials_epochs_reach_mlflow_together_by_its_checkpoint_and_its_end(tmp_path):
    """Epochs are sent at most every METRICS_EVERY_S (one SQLite transaction for several), and at
    once when the trial checkpoints (a trial restored from that checkpoint re-reports only later
    epochs) or ends; each epoch once, in its own step."""
    from search.tracking import METRICS_EVERY_S

    assert METRICS_EVERY_S >= 1.0  # the three results below come well within it
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = open_parent_run(client, "batch", None, {}, {})
    logger = MLflowTrialLogger(client.tracking_uri, parent)
    trial = _trial("t", tmp_path, final=True)
    trial.checkpoint = None
    logger.on_step_begin(iteration=0, trials=[])
    logger.on_trial_start(iteration=0, trials=[], trial=trial)
    (run_id,) = [r.info.run_id for r in child_runs(client, parent)]
    steps = lambda: sorted(m.step for m in client.get_metric_history(run_id, "accuracy"))  # noqa: E731

    for epoch in (1, 2, 3):
        logger.on_trial_result(iteration=0, trials=[], trial=trial,
                               result={"epoch": epoch, "stage": "finetune", "accuracy": 0.1 * epoch, "macs": 1e5})
    assert steps() == []  # not sent yet
    logger.on_checkpoint(iteration=0, trials=[], trial=trial, checkpoint=None)
    assert steps() == [1, 2, 3]
    assert client.get_run(run_id).data.tags["stage"] == "finetune"
    logger.on_trial_result(iteration=0, trials=[], trial=trial, result={"epoch": 4, "accuracy": 0.4, "macs": 1e5,
                                                                         "test_accuracy": 0.5})
    logger.on_trial_complete(iteration=0, trials=[], trial=trial)
    assert steps() == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "test_accuracy")] == [4]
    logger.on_experiment_end(trials=[trial])
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_model_the_driver_did_not_log_before_it_died_is_logged_on_resume(tmp_path):
    """A run closed FINISHED whose model was still on its way (the driver killed meanwhile) keeps
    ``MODEL_PENDING_TAG``; the logger of the resumed sweep logs the model then, run left FINISHED."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = open_parent_run(client, "pending", None, {}, {})
    first = MLflowTrialLogger(client.tracking_uri, parent)
    trial = _trial("p", tmp_path, final=True)
    first.on_step_begin(iteration=0, trials=[])
    first.on_trial_start(iteration=0, trials=[], trial=trial)
    (run_id,) = [r.info.run_id for r in child_runs(client, parent)]
    # What the killed driver left: the run FINISHED with the tag, no model.
    client.set_tag(run_id, MODEL_PENDING_TAG, "true")
    client.set_terminated(run_id, status="FINISHED")
    end = client.get_run(run_id).info.end_time

    second = MLflowTrialLogger(client.tracking_uri, parent)
    second.on_step_begin(iteration=0, trials=[trial])  # the restored trial, TERMINATED
    second.on_experiment_end(trials=[trial])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == end and MODEL_PENDING_TAG not in run.data.tags
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/weights.pt", "model/spec.json"}


def test_trial_models_front_exports_the_trials_on_the_front_when_they_finish(tmp_path):
    """``trial_models: front``: a trial gets a pt2 model when no earlier finished (feasible) trial
    dominates it; a dominated one (and one outside the budget) gets its weights and spec only.
    Finishing order: a (0.90 @ 2e5), b (0.80 @ 3e5: dominated by a), c (0.95 @ 1e5: dominates a, but
    a was on the front when it finished), d (0.99 @ 4e5: outside max_macs)."""
    from search.constraints import ConstraintsConfig

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = open_parent_run(client, "front", None, {}, {})
    logger = MLflowTrialLogger(client.tracking_uri, parent, example=torch.zeros(4, 1, 8, 8).numpy(), models="front",
                               constraints=ConstraintsConfig(max_macs=3.5e5))
    results = {"a": (0.90, 2e5), "b": (0.80, 3e5), "c": (0.95, 1e5), "d": (0.99, 4e5)}
    trials = {tid: _trial(tid, tmp_path, final=True) for tid in results}
    logger.on_step_begin(iteration=0, trials=[])
    for tid, t in trials.items():
        t.last_result.update(accuracy=results[tid][0], macs=results[tid][1])
        logger.on_trial_start(iteration=0, trials=[], trial=t)
    for t in trials.values():
        logger.on_trial_complete(iteration=0, trials=[], trial=t)
    logger.on_experiment_end(trials=list(trials.values()))
    runs = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in child_runs(client, parent)}
    exported = {tid for tid in results if trial_model_id(client, runs[tid]) is not None}
    assert exported == {"a", "c"}
    for tid in results:  # promote can still rebuild and log any of them
        assert {a.path for a in client.list_artifacts(runs[tid], "model")} >= {"model/weights.pt", "model/spec.json"}
        assert MODEL_PENDING_TAG not in client.get_run(runs[tid]).data.tags
    restored = MLflowTrialLogger.__new__(MLflowTrialLogger)
    restored.__setstate__(logger.__getstate__())  # Tune pickles its callbacks: the choice survives
    assert (restored.models, restored.objectives, restored.constraints) == ("front", ("accuracy", "macs"),
                                                                            ConstraintsConfig(max_macs=3.5e5))
