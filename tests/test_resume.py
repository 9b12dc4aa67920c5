"""Driver fault, end to end on real processes: `prunetune run` is SIGKILLed (its whole process
group, with the embedded Ray node it started) while one trial has finished and another is running;
`prunetune resume EXPERIMENT_DIR` then finishes the sweep with the same MLflow parent run, one
child run per trial, no trial lost, doubled or re-run, and an Optuna study with exactly one trial
per Tune trial and none left RUNNING. Also, without Ray: how the MLflow logger reconciles its child
runs with the trials Tune restores (the snapshot it restores lags the kill); and a driver killed
before Tune started."""
from __future__ import annotations

import glob
import json
import os
import pickle
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from helpers import live_processes, prunetune_cli
from loopback_cluster import tune_state, wait_mid_sweep
from search.fronts import DIRECTIONS
from search.pareto import front
from search.sweep import STATE_FILE
from search.tracking import TRIAL_TAG, child_runs

NUM_TRIALS, FINETUNE_EPOCHS = 4, 4  # l1_norm and random have no training phase: 4 epochs a trial
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
MARK = "PRUNETUNE_TEST_DRIVER_MARK"


def _env(mark: str) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               TUNE_GLOBAL_CHECKPOINT_S="1")  # Tune snapshots its experiment state every second
    env[MARK] = mark  # inherited by every process the driver starts (Ray's gcs, raylet, workers)
    return env


def _session_processes(sid: int, mark: str) -> list[int]:
    """PIDs in the driver's session or carrying its environment marker (Ray daemons, workers)."""
    found = []
    for pid, entry, session in live_processes():
        try:
            marked = f"{MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if session == sid or marked:
            found.append(pid)
    return found


def _kill_by_pid(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _result_epochs(exp_dir: Path, trial_id: str) -> list[int]:
    (path,) = glob.glob(str(exp_dir / f"*_{trial_id}_*" / "result.json"))
    return [json.loads(line)["epoch"] for line in Path(path).read_text().splitlines() if line.strip()]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.timeout(600)
def test_killed_sweep_resumes_with_same_parent_trials_and_study(tmp_path):
    storage, db = tmp_path / "ray", tmp_path / "mlflow.db"
    tracking_uri = f"sqlite:///{db}"
    overrides = ["methods=[l1_norm, random]", "space={prune_ratio: [0.2, 0.8]}", f"num_trials={NUM_TRIALS}",
                 "max_concurrent_trials=2", "base.epochs=1", f"finetune.epochs={FINETUNE_EPOCHS}", "early_stopping.type=none", "checkpoint_period_s=0", "sampler=random",
                 "name=resume", f"tracking_uri={tracking_uri}", f"storage_path={storage}"]
    mark = uuid.uuid4().hex
    env = _env(mark)
    args = prunetune_cli() + ["run", str(QUICKSTART)] + [a for o in overrides for a in ("--set", o)]
    log_run = open(tmp_path / "run.log", "wb")
    driver = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log_run, stderr=subprocess.STDOUT,
                              start_new_session=True)
    resume = None
    try:
        # 1. Wait until Tune's synced state has a finished trial and a running one with a checkpoint.
        found = wait_mid_sweep(storage, "resume", FINETUNE_EPOCHS, driver, timeout=240)
        if found is None:
            log_run.flush()
            pytest.fail(f"the sweep never had a finished and a running trial at once (exit {driver.poll()}):\n"
                        + (tmp_path / "run.log").read_text()[-3000:])
        exp_dir, snapshot = found

        # 2. SIGKILL the driver's whole process group: the driver and the Ray node it embedded.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        strays, until = _session_processes(driver.pid, mark), time.monotonic() + 20
        while strays and time.monotonic() < until:  # Ray's daemons die with their parent (fate sharing)
            time.sleep(0.5)
            strays = _session_processes(driver.pid, mark)
        _kill_by_pid(strays)
        assert not strays, f"processes of the killed sweep outlived it by 20 s: {strays}"

        state = json.loads((exp_dir / STATE_FILE).read_text())
        parent_id = state["parent_run_id"]
        client = MlflowClient(tracking_uri)
        assert client.get_run(parent_id).info.status == "RUNNING"  # killed: nobody closed it
        snapshot = tune_state(exp_dir)  # what the resume restores (no more writes after the kill)
        done_before = {tid for tid, t in snapshot.items() if t["status"] == "TERMINATED"}
        running_before = {tid: t["epoch"] for tid, t in snapshot.items()
                          if t["status"] == "RUNNING" and t["epoch"] >= 1}
        assert done_before and running_before
        before = {r.data.tags[TRIAL_TAG]: r for r in child_runs(client, parent_id)}
        finished_before = {tid: r for tid, r in before.items() if r.info.status == "FINISHED"}
        assert done_before <= set(finished_before)
        history_before = {tid: {k: _history(client, r.info.run_id, k) for k in ("accuracy", "macs", "test_accuracy")}
                          for tid, r in finished_before.items()}

        # 3. Resume to the end.
        with open(tmp_path / "resume.log", "wb") as log_resume:
            resume = subprocess.Popen(prunetune_cli() + ["resume", str(exp_dir)], env=env, cwd=tmp_path, stdout=log_resume,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            rc = resume.wait(timeout=420)
        output = (tmp_path / "resume.log").read_text()
        assert rc == 0, output[-4000:]
        assert f"MLflow parent run: {parent_id}" in output

        # 4. MLflow: the same parent, FINISHED; exactly one FINISHED child per trial.
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED"
        assert json.loads((exp_dir / STATE_FILE).read_text())["parent_run_id"] == parent_id
        assert [m.step for m in client.get_metric_history(parent_id, "base_accuracy")] == [0]
        assert len(client.get_metric_history(parent_id, "hypervolume")) == 1
        children = child_runs(client, parent_id)
        trial_ids = [r.data.tags[TRIAL_TAG] for r in children]
        assert len(children) == NUM_TRIALS and len(set(trial_ids)) == NUM_TRIALS, trial_ids
        assert all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
        final = tune_state(exp_dir)
        assert set(final) == set(trial_ids) and all(t["status"] == "TERMINATED" for t in final.values())
        for run in children:
            for key in ("accuracy", "macs", "test_accuracy", "loss"):
                steps = [s for s, _ in _history(client, run.info.run_id, key)]
                assert len(steps) == len(set(steps)), (run.data.tags[TRIAL_TAG], key, steps)  # each epoch once
            assert [s for s, _ in _history(client, run.info.run_id, "accuracy")] == list(range(1, FINETUNE_EPOCHS + 1))

        # 5. Trials finished before the kill were not re-run; those running continued from a checkpoint.
        by_tid = {r.data.tags[TRIAL_TAG]: r for r in children}
        for tid, old in finished_before.items():
            new = by_tid[tid]
            assert new.info.run_id == old.info.run_id and new.info.end_time == old.info.end_time
            assert {k: _history(client, new.info.run_id, k) for k in history_before[tid]} == history_before[tid]
        for tid in done_before:
            assert _result_epochs(exp_dir, tid) == list(range(1, FINETUNE_EPOCHS + 1)), tid
        for tid, epoch in running_before.items():
            epochs = _result_epochs(exp_dir, tid)
            assert set(epochs) == set(range(1, FINETUNE_EPOCHS + 1)), (tid, epochs)
            # Not from scratch: Tune snapshots its state every second (TUNE_GLOBAL_CHECKPOINT_S=1),
            # so an epoch reported a few seconds before the kill may be re-run, but not epoch 1
            # once a later epoch had been reported.
            if epoch >= 2:
                assert epochs.count(1) == 1, (tid, epoch, epochs)

        # 6. The front tagged in MLflow is the front of every recorded trial.
        points = [(r.data.metrics["accuracy"], r.data.metrics["macs"]) for r in children]
        expected = {children[i].info.run_id for i in front(points, DIRECTIONS)}
        assert {r.info.run_id for r in children if r.data.tags.get("pareto") == "true"} == expected

        # 7. The Optuna study Tune saved at the end: one trial per Tune trial (the restarted ones kept
        # theirs, no new ask), all told, none RUNNING, each with its MLflow run's hyperparameters.
        searcher = pickle.loads(Path(sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))[-1]).read_bytes())
        study, ot_trials = searcher["_ot_study"], searcher["_ot_trials"]
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        assert len(states) == NUM_TRIALS and "RUNNING" not in states, states
        assert set(ot_trials) == set(trial_ids)
        frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
        assert len({ot_trials[tid].number for tid in trial_ids}) == NUM_TRIALS
        for tid in trial_ids:
            ft, run = frozen[ot_trials[tid].number], by_tid[tid]
            method = run.data.params["method"]
            assert ft.params["method"] == method
            assert ft.params["prune_ratio"] == pytest.approx(float(run.data.params["prune_ratio"]))
            assert ft.state.name == "COMPLETE"
            # Optuna was told exactly what MLflow recorded, also for a trial that finished after Tune's
            # last snapshot and so ran its last epochs again from an older checkpoint: a resumed trial
            # reproduces the uninterrupted one (trainables/trial.py), and MLflow kept the first record.
            assert ft.values == [run.data.metrics["accuracy"], run.data.metrics["macs"]], (tid, tid in done_before)
    finally:
        for proc in (driver, resume):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log_run.close()
        time.sleep(1)
        _kill_by_pid(_session_processes(driver.pid, mark) + (_session_processes(resume.pid, mark) if resume else []))


def _trial(tid: str, status: str = "RUNNING", method: str = "l1_norm"):
    return SimpleNamespace(trial_id=tid, status=status, config={"method": method, f"{method}.prune_ratio": 0.5},
                           last_result={"epoch": 2, "accuracy": 0.5, "macs": 10.0, "test_accuracy": 0.5},
                           checkpoint=None, error_msg="worker died")


def _epoch(epoch: int, accuracy: float) -> dict:
    return {"epoch": epoch, "stage": "finetune", "accuracy": accuracy, "macs": 10.0, "loss": 1.0 / epoch}


def test_logger_reconciles_children_with_restored_trials(tmp_path):
    """What the driver's MLflow logger does on a restore, with the lags a snapshot can have: a
    trial Tune never snapshotted (its run is deleted), a trial restarted from an older checkpoint
    (epochs it re-reports are not logged twice), a trial Tune has as finished whose run was still
    open (closed now), and a finished trial that is left alone."""
    from search import model_logs
    from search.tracking import MLflowTrialLogger, open_parent_run

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = open_parent_run(client, "reconcile", None, {}, {})
    first = MLflowTrialLogger(client.tracking_uri, parent)
    done, restarted, orphan, closed = _trial("done"), _trial("restarted"), _trial("orphan"), _trial("closed")
    first.on_step_begin(iteration=0, trials=[])
    for t in (done, restarted, orphan, closed):
        first.on_trial_start(iteration=0, trials=[], trial=t)
    for epoch in (1, 2):
        first.on_trial_result(iteration=0, trials=[], trial=done, result=_epoch(epoch, 0.5 + epoch / 10))
        first.on_trial_result(iteration=0, trials=[], trial=closed, result=_epoch(epoch, 0.5))
    first.on_trial_complete(iteration=0, trials=[], trial=done)
    model_logs.drain()  # its run is closed in the model-logging thread; done before the driver dies here
    for epoch in (1, 2, 3):  # checkpoints after epochs 1 and 2: those epochs are in MLflow then, 3 not yet
        first.on_trial_result(iteration=0, trials=[], trial=restarted, result=_epoch(epoch, 0.1 * epoch))
        if epoch < 3:
            first.on_checkpoint(iteration=0, trials=[], trial=restarted, checkpoint=None)
    runs = {r.data.tags[TRIAL_TAG]: r for r in child_runs(client, parent)}
    done_end = runs["done"].info.end_time

    # The driver dies (what the logger had not sent yet is lost); Tune restores the logger from its
    # pickle and the trials from a snapshot taken when "restarted" had checkpointed epoch 1 only
    # and "closed" had just finished.
    second = pickle.loads(pickle.dumps(first))
    restored = [_trial("done", "TERMINATED"), _trial("restarted", "PENDING"), _trial("closed", "TERMINATED")]
    second.on_step_begin(iteration=0, trials=restored)
    second.on_step_begin(iteration=1, trials=restored)  # once only
    for epoch in (2, 3, 4):
        second.on_trial_result(iteration=1, trials=restored, trial=restored[1], result=_epoch(epoch, 0.9))
    second.on_trial_complete(iteration=1, trials=restored, trial=restored[1])
    second.on_trial_complete(iteration=1, trials=restored, trial=restored[0])  # e.g. re-reported
    second.on_experiment_end(trials=restored)  # waits for the model-logging thread

    after = {r.data.tags[TRIAL_TAG]: r for r in child_runs(client, parent)}
    assert set(after) == {"done", "restarted", "closed"}
    assert client.get_run(runs["orphan"].info.run_id).info.lifecycle_stage == "deleted"
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert after["done"].info.end_time == done_end
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs["restarted"].info.run_id, "accuracy"))
    # Epoch 2 was in MLflow: its first record stays; epoch 3 was not sent before the kill: logged now.
    assert history == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, 0.9), (4, 0.9)]
    for tid in after:
        for key in ("accuracy", "macs", "loss"):
            steps = [m.step for m in client.get_metric_history(after[tid].info.run_id, key)]
            assert len(steps) == len(set(steps)), (tid, key, steps)


def test_resume_before_tune_started_runs_the_sweep_in_the_same_dir(ray_local, tmp_path):
    """A driver killed before Tune wrote anything (e.g. while training the dense base) leaves only
    prunetune_sweep.json: resume starts Tune there, under the same parent run."""
    from search.config import load_config
    from search.sweep import _flatten, resume_sweep
    from search.tracking import open_parent_run

    cfg = load_config("configs/quickstart.yaml", [
        "methods=[l1_norm]", "space={prune_ratio: [0.2, 0.8]}", "num_trials=1", "base.epochs=1",
        "finetune.epochs=1", "name=early",
        f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray"])
    client = MlflowClient(cfg.tracking_uri)
    parent = open_parent_run(client, cfg.name, None, _flatten(cfg.to_dict()), {})
    exp_dir = tmp_path / "ray" / "early-20260101-000000"
    exp_dir.mkdir(parents=True)
    (exp_dir / STATE_FILE).write_text(json.dumps({"parent_run_id": parent, "tracking_uri": cfg.tracking_uri,
                                                  "config": cfg.to_dict()}))
    result = resume_sweep(exp_dir)
    assert result.parent_run_id == parent and result.finished == 1
    assert client.get_run(parent).info.status == "FINISHED"
    (child,) = child_runs(client, parent)
    assert child.info.status == "FINISHED"
    assert glob.glob(str(exp_dir / "experiment_state-*.json"))
