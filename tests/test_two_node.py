"""Node fault, end to end on a real two-node Ray cluster on loopback (issue #7).

The test starts a head node and a worker node with ``ray start`` (1 CPU each, a private temp dir,
an environment marker inherited by every Ray process), runs a sweep in a driver subprocess that
joins the cluster via ``address``, and SIGKILLs the worker node's raylet once a trial running on
that node has reported at least 2 epochs. The trial must be retried (``max_failures``) from its
last checkpoint on the surviving node; every trial finishes, and MLflow holds exactly one FINISHED
child run per trial with each epoch's metrics recorded once. Every process of the cluster is
killed by PID at the end.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.tracking import TRIAL_TAG, child_runs

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MARK = "PRUNETUNE_TEST_CLUSTER_MARK"
NUM_TRIALS, FINETUNE_EPOCHS = 3, 6  # l1_norm has no training phase: 6 epochs a trial

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> list[str]:
    exe = shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


def _proc_info(pid: int) -> tuple[int, bytes, bytes] | None:
    """(ppid, cmdline, environ) of a live, non-zombie process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            return None
        return int(fields[1]), Path(f"/proc/{pid}/cmdline").read_bytes(), Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError):
        return None


def _cluster_processes(mark: str, temp_dir: str, sids: set[int]) -> list[int]:
    """PIDs of this test's Ray cluster: those carrying its environment marker, those in the sessions
    of the ``ray start`` commands it ran, and those with a file open under its private temp dir
    (Ray's agents rewrite their title over /proc/PID/environ, so the marker alone misses them)."""
    token = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            ours = int(fields[3]) in sids or token in (entry / "environ").read_bytes().split(b"\0")
            if not ours:
                ours = any(_link(fd).startswith(temp_dir + "/") for fd in (entry / "fd").iterdir())
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if ours:
            found.append(int(entry.name))
    return found


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _raylet_pid(pids, node_manager_port: int) -> int | None:
    token = f"--node_manager_port={node_manager_port}".encode()
    for pid in pids:
        info = _proc_info(pid)
        if info and b"raylet" in info[1].split(b"\0")[0] and token in info[1].split(b"\0"):
            return pid
    return None


def _kill_all(find, timeout: float = 20) -> list[int]:
    """SIGTERM then SIGKILL every process ``find()`` lists; returns those still alive afterwards."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in find():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        until = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while find() and time.monotonic() < until:
            time.sleep(0.3)
    return find()


def _trial_results(exp_dir: Path) -> dict[str, list[dict]]:
    """Trial id -> the results Tune's driver wrote to the trial's result.json (complete lines only)."""
    out = {}
    for path in glob.glob(str(exp_dir / "*" / "result.json")):
        rows = []
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # being written
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trial_survives_worker_node_death(tmp_path):
    mark = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="pt2n-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, nm_port = _free_port(), _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", TUNE_GLOBAL_CHECKPOINT_S="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env[MARK] = mark
    # The GCS declares a node dead after failure_threshold missed health checks: a few seconds, not ~30 s.
    head_env = dict(env, RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                    RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]
    storage, db = tmp_path / "ray", tmp_path / "mlflow.db"
    tracking_uri = f"sqlite:///{db}"
    overrides = ["methods=[l1_norm]", "space={prune_ratio: [0.3, 0.6]}", f"num_trials={NUM_TRIALS}",
                 "max_concurrent_trials=2", "base.epochs=2", f"finetune.epochs={FINETUNE_EPOCHS}", "max_failures=2",
                 f"address=127.0.0.1:{port}", "name=twonode", f"tracking_uri={tracking_uri}",
                 f"storage_path={storage}"]
    driver, log, sids = None, open(tmp_path / "driver.log", "wb"), set()

    def cluster() -> list[int]:
        return _cluster_processes(mark, temp_dir, sids)

    def ray_start(args, start_env):
        proc = subprocess.Popen(_ray() + ["start"] + args + common, env=start_env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        sids.add(proc.pid)  # its daemons stay in its session
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()[-3000:]

    try:
        ray_start(["--head", "--port", str(port), "--include-dashboard=false"], head_env)
        ray_start(["--address", f"127.0.0.1:{port}", "--node-manager-port", str(nm_port)], env)
        worker_raylet = _raylet_pid(cluster(), nm_port)
        assert worker_raylet, "no raylet with the worker node's node-manager port"

        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(QUICKSTART), json.dumps(overrides)],
                                  env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sids.add(driver.pid)

        # 1. Wait for a trial whose worker process is a child of the worker node's raylet, at epoch >= 2.
        victim, deadline = None, time.monotonic() + 400
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            # Tune's driver writes result.json in its staging dir under the session dir, then syncs it.
            staging = glob.glob(os.path.join(temp_dir, "session_*", "artifacts", "*", "twonode-*", "driver_artifacts"))
            for exp_dir in map(Path, glob.glob(str(storage / "twonode-*")) + staging):
                for tid, rows in _trial_results(exp_dir).items():
                    info = _proc_info(rows[-1]["pid"])
                    if info and info[0] == worker_raylet and rows[-1]["epoch"] >= 2 and rows[-1]["epoch"] < FINETUNE_EPOCHS:
                        victim, victim_epoch = tid, rows[-1]["epoch"]
            time.sleep(0.1)
        if victim is None:
            log.flush()
            pytest.fail(f"no trial reached epoch 2 on the worker node (driver exit {driver.poll()}):\n"
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
        results = _trial_results(exp_dir)
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

        # 4. MLflow: one FINISHED child per trial, accuracy steps 1..6 each once.
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
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        log.close()
        strays = _kill_all(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not strays, f"processes of the test's Ray cluster survived SIGKILL: {strays}"
