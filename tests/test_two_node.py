"""Node fault, end to end on a real two-node Ray cluster on loopback (issue #7).

The test starts a head node and a worker node with ``ray start`` (1 CPU each, a private temp dir;
``tests/loopback_cluster.py``), runs a sweep in a driver subprocess that joins the cluster via
``address``, and SIGKILLs the worker node's raylet once a trial running on that node has reported
an epoch (and so saved a checkpoint). The trial must be retried (``max_failures``) from its last
checkpoint on the surviving node; every trial finishes with all its epochs, and MLflow holds
exactly one FINISHED child run per trial with each epoch's metrics recorded once. Every process of
the cluster is killed by PID at the end. About 80 s on 2 cores; CI runs it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from loopback_cluster import LoopbackCluster, live_trial_results, proc_info, trial_results
from search.tracking import TRIAL_TAG, child_runs

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# l1_norm has no training phase: FINETUNE_EPOCHS epochs a trial. The victim is killed anywhere in
# epochs 1..FINETUNE_EPOCHS-1 of its run on the worker node: a window of several seconds.
NUM_TRIALS, FINETUNE_EPOCHS = 3, 8

DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from search.config import load_config
from search.sweep import run_sweep
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
res = run_sweep(cfg)
print("RESULT " + json.dumps({"exp_dir": str(res.experiment_dir), "parent": res.parent_run_id,
                              "finished": res.finished, "failed": res.failed}), flush=True)
"""


def driver_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", DRIVER, str(QUICKSTART), json.dumps(overrides)]


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_trial_survives_worker_node_death(tmp_path):
    storage, db = tmp_path / "ray", tmp_path / "mlflow.db"
    tracking_uri = f"sqlite:///{db}"
    with open(tmp_path / "driver.log", "wb") as log, LoopbackCluster(tmp_path) as cluster:
        cluster.start_head()
        worker_node = cluster.add_worker()
        worker_raylet = cluster.raylet_pid(worker_node)
        assert worker_raylet, "no raylet with the worker node's node-manager port"
        overrides = ["methods=[l1_norm]", "space={prune_ratio: [0.3, 0.6]}", f"num_trials={NUM_TRIALS}",
                     "max_concurrent_trials=2", "base.epochs=2", f"finetune.epochs={FINETUNE_EPOCHS}",
                     "max_failures=2", f"address={cluster.address}", "name=twonode", f"tracking_uri={tracking_uri}",
                     f"storage_path={storage}"]
        driver = cluster.spawn(driver_command(overrides), log)

        # 1. Wait for a trial whose worker process is a child of the worker node's raylet and that
        #    has reported (and checkpointed) at least one epoch but not its last.
        victim, deadline = None, time.monotonic() + 400
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            for tid, rows in live_trial_results(cluster, storage, "twonode").items():
                info = proc_info(rows[-1]["pid"])
                if info and info[0] == worker_raylet and 1 <= rows[-1]["epoch"] < FINETUNE_EPOCHS:
                    victim, victim_epoch = tid, rows[-1]["epoch"]
            time.sleep(0.05)
        if victim is None:
            log.flush()
            pytest.fail(f"no trial reported an epoch on the worker node (driver exit {driver.poll()}):\n"
                        + (tmp_path / "driver.log").read_text()[-4000:])

        # 2. The worker node dies: SIGKILL its raylet (its workers exit with it).
        os.kill(worker_raylet, signal.SIGKILL)
        print(f"killed the worker node's raylet {worker_raylet}: trial {victim} had reported epoch {victim_epoch}")

        rc = driver.wait(timeout=480)
        output = (tmp_path / "driver.log").read_text()
        assert rc == 0, output[-6000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    exp_dir = Path(result["exp_dir"])
    assert result["finished"] == NUM_TRIALS and result["failed"] == 0, result

    # 3. Tune: every trial TERMINATED with all its epochs; the victim continued from a checkpoint.
    results = trial_results(exp_dir)
    assert len(results) == NUM_TRIALS
    for tid, rows in results.items():
        epochs = [r["epoch"] for r in rows]
        assert set(epochs) == set(range(1, FINETUNE_EPOCHS + 1)), (tid, epochs)
        assert rows[-1]["epoch"] == FINETUNE_EPOCHS
    victim_rows = results[victim]
    epochs = [r["epoch"] for r in victim_rows]
    assert epochs.count(1) == 1, (victim, victim_epoch, epochs)  # resumed, not restarted from scratch
    pids = [r["pid"] for r in victim_rows]
    print("victim's results (epoch, worker pid):", [(r["epoch"], r["pid"]) for r in victim_rows])
    assert pids[0] != pids[-1], pids  # the end of the trial ran in another worker (on the head node)

    # 4. MLflow: one FINISHED child per trial, each epoch's metrics recorded once.
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result["parent"])
    assert parent.info.status == "FINISHED"
    children = child_runs(client, result["parent"])
    trial_ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert sorted(trial_ids) == sorted(results), trial_ids
    assert all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
    for run in children:
        for key in ("accuracy", "macs", "loss"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, FINETUNE_EPOCHS + 1)), (run.data.tags[TRIAL_TAG], key, steps)
