"""Driver-side faults on real processes (issue 15): a fresh SQLite database first used by several
processes at once; SIGINT and SIGTERM to a running sweep (exit 130/143, parent KILLED, then resume
finishes the budget); resume, fronts and promote from another directory than the launch one;
promote on a sweep that is not finished; bad input that used to pass preflight; nothing of an
embedded sweep listening beyond loopback. Each ran wrong before the fix (see the issue)."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import prunetune_cli
from loopback_cluster import proc_info, tune_state
from search.sweep import STATE_FILE
from search.tracking import TRIAL_TAG, child_runs

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MARK = "PRUNETUNE_TEST_FAULTS_MARK"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def _env(mark: str = "") -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if mark:
        env[MARK] = mark  # inherited by every process the driver starts
    return env


def _errors(stderr: str) -> list[str]:
    """What the CLI itself printed on stderr: not log records, not Ray's or Tune's banners."""
    return [line for line in stderr.splitlines() if line.startswith(("prunetune:", "interrupted"))]


def _sweep_args(*overrides: str) -> list[str]:
    # Every trial runs its whole budget and checkpoints every epoch, so Tune's state shows it running:
    # a snapshot is forced by every 3rd checkpoint (num_to_keep=3), so a trial needs > 3 epochs.
    overrides = ("early_stopping.type=none", "checkpoint_period_s=0") + overrides
    return ["run", str(QUICKSTART)] + [a for o in overrides for a in ("--set", o)]


def _marked(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        info = proc_info(int(entry.name)) if entry.name.isdigit() else None
        if info and f"{MARK}={mark}".encode() in info[2].split(b"\0"):
            found.append(int(entry.name))
    return found


def _assert_all_gone(mark: str, timeout_s: float = 10.0) -> None:
    """Every process carrying ``mark`` ends within ``timeout_s`` (nothing outlives the driver)."""
    left, deadline = _marked(mark), time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _marked(mark)
    assert not left, [(p, (proc_info(p) or (0, b""))[1][:40]) for p in left]


def _kill_marked(mark: str) -> None:
    for pid in _marked(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _end(driver, mark: str) -> None:
    """Kill the driver if it still runs, then every process carrying its marker."""
    if driver.poll() is None:
        driver.kill()
        driver.wait()
    time.sleep(1)
    _kill_marked(mark)


def _wait_running_trial(storage: Path, name: str, driver, timeout: float) -> Path:
    """The sweep dir once Tune's state has a RUNNING trial past its first epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        for state in glob.glob(str(storage / f"{name}-*" / STATE_FILE)):
            exp_dir = Path(state).parent
            snapshot = tune_state(exp_dir) or {}
            if any(t["status"] == "RUNNING" and t["epoch"] >= 1 for t in snapshot.values()):
                return exp_dir
        time.sleep(0.2)
    raise AssertionError(f"no running trial within {timeout} s (driver exit {driver.poll()})")


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket the given processes hold (/proc/net/tcp*)."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m:
                    owner[m.group(1)] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                found.append((fields[1].split(":")[0], owner[fields[9]]))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


# ---- 1. one fresh database, several first writers -------------------------------------------------------
RACER = """
import os, sys, time
from search.store import open_client
db, go = sys.argv[1], sys.argv[2]
open(go + ".%d" % os.getpid(), "w").close()  # imported, at the line
while not os.path.exists(go):
    time.sleep(0.002)
client = open_client("sqlite:///" + db)
client.create_experiment("e%d" % os.getpid())
"""


def test_concurrent_first_use_of_a_fresh_database(tmp_path):
    """Two processes create and migrate one new SQLite database at the same instant (without the
    lock: `table ... already exists` / `duplicate column name`, and a broken database for good);
    then a third process uses it."""
    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(db), str(go)], env=_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(glob.glob(f"{go}.*")) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] for o in outs)
    client = MlflowClient(f"sqlite:///{db}")
    assert {f"e{p.pid}" for p in procs} <= {e.name for e in client.search_experiments()}


def _main(args: list[str], capfd) -> tuple[int, str]:
    """The CLI in this process (bad input never gets as far as Ray): (exit code, stderr)."""
    from search.cli import main

    capfd.readouterr()
    code = main(args)
    return code, capfd.readouterr().err


def test_a_broken_database_is_one_line_naming_it(tmp_path, capfd):
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    code, err = _main(_sweep_args("methods=[l1_norm]", "num_trials=1", "name=broken",
                                  f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray"),
                      capfd)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = _errors(err)
    assert line.startswith("prunetune: error: tracking_uri: the MLflow database ") and \
        str(tmp_path / "mlflow.db") in line, line


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_first_sweeps_on_one_fresh_database(tmp_path):
    """The repro of the issue: two `prunetune run` at once in an empty folder, then a third."""
    args = ["num_trials=1", "base.epochs=1", "finetune.epochs=1", "methods=[l1_norm]", "max_concurrent_trials=1"]
    procs = [subprocess.Popen(prunetune_cli() + _sweep_args(*args, f"name={n}"), cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in ("x", "y")]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    r = subprocess.run(prunetune_cli() + _sweep_args(*args, "name=z"), cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]


# ---- 2/3/5/6. SIGINT mid-sweep; fronts, promote and resume from elsewhere; loopback -------------------------
@pytest.mark.timeout(600)
def test_sigint_then_resume_promote_and_fronts_from_another_directory(ray_local, tmp_path, monkeypatch, capfd):
    from search.cli import main

    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    launch.mkdir()
    elsewhere.mkdir()
    mark = uuid.uuid4().hex
    # The config's default tracking_uri sqlite:///mlflow.db and storage_path ./ray_results: both relative.
    args = _sweep_args("methods=[l1_norm]", "num_trials=2", "max_concurrent_trials=1", "base.epochs=1",
                       "finetune.epochs=4", "sampler=random", "name=sig")
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen(prunetune_cli() + args, cwd=launch, env=_env(mark), stdout=log,
                                  stderr=subprocess.PIPE, text=True)
    try:
        exp_dir = _wait_running_trial(launch / "ray_results", "sig", driver, timeout=240)
        state = json.loads((exp_dir / STATE_FILE).read_text())
        assert state["tracking_uri"] == f"sqlite:///{launch / 'mlflow.db'}"  # recorded absolute
        # 6. Nothing of the embedded sweep listens beyond loopback.
        sockets = _listening([driver.pid] + _marked(mark))
        assert sockets and all(addr in LOOPBACK for addr, _ in sockets), sockets
        # 5. promote refuses a running sweep.
        code, err = _main(["promote", str(exp_dir), "--name", "sig-model"], capfd)
        assert code == 2 and _errors(err) == [
            f"prunetune: error: promote: sweep {exp_dir.name!r} is not finished (parent run {state['parent_run_id']} "
            "is RUNNING); wait for it or resume it, or pass --allow-running to promote from its front so far"], err

        # 2. SIGINT: Tune stops, exit 130, the parent KILLED, no front recorded, one last line.
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
    finally:
        _end(driver, mark)
    assert driver.returncode == 130, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == f"interrupted: continue with prunetune resume {exp_dir}"
    assert "Traceback" not in stderr, stderr[-3000:]
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "KILLED" and parent.data.tags["prunetune.interrupted"] == "SIGINT"
    children = child_runs(client, parent.info.run_id)
    assert children and all(r.info.status in ("FINISHED", "KILLED") for r in children), children
    assert not any("pareto" in r.data.tags for r in children) and "hypervolume" not in parent.data.metrics

    # 3. From another directory (this process, in there): fronts reads the sweep; promote refuses it
    # (KILLED); resume finishes the budget with the same parent; then promote registers its best model.
    monkeypatch.chdir(elsewhere)
    code, err = _main(["fronts", str(exp_dir), "--out", "f.png"], capfd)
    assert code == 0, err[-3000:]
    code, err = _main(["promote", str(exp_dir), "--name", "sig-model"], capfd)
    assert code == 2 and "is KILLED" in _errors(err)[0], err[-3000:]
    capfd.readouterr()
    assert main(["resume", str(exp_dir)]) == 0
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err, (out.out + out.err)[-4000:]
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and "prunetune.interrupted" not in parent.data.tags
    children = child_runs(client, parent.info.run_id)
    assert len(children) == 2 and len({r.data.tags[TRIAL_TAG] for r in children}) == 2
    assert all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
    code, err = _main(["promote", str(exp_dir), "--name", "sig-model"], capfd)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["f.png"]  # no stray mlflow.db or mlruns here


@pytest.mark.timeout(600)
def test_sigterm_then_resume_finishes(ray_local, tmp_path, capfd):
    mark = uuid.uuid4().hex
    args = _sweep_args("methods=[random]", "num_trials=1", "base.epochs=1", "finetune.epochs=5", "name=term",
                       f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray")
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen(prunetune_cli() + args, cwd=tmp_path, env=_env(mark), stdout=log,
                                  stderr=subprocess.PIPE, text=True)
    try:
        exp_dir = _wait_running_trial(tmp_path / "ray", "term", driver, timeout=240)
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=120)
    finally:
        _end(driver, mark)
    assert driver.returncode == 143, stderr[-3000:]  # not 134 (an abort with a C++ signal dump)
    assert stderr.rstrip().splitlines()[-1] == f"interrupted: continue with prunetune resume {exp_dir}"
    state = json.loads((exp_dir / STATE_FILE).read_text())
    client = MlflowClient(state["tracking_uri"])
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
    code, err = _main(["resume", str(exp_dir)], capfd)
    assert code == 0 and "Traceback" not in err, err[-4000:]
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    (child,) = child_runs(client, state["parent_run_id"])
    assert child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "accuracy")) == [1, 2, 3, 4, 5]


# ---- 4. bad input that used to pass preflight ---------------------------------------------------------------
def _garbage_cifar(root: Path) -> Path:
    folder = root / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(os.urandom(256))
    return folder.parent


def _bad_input(case: str, tmp_path: Path) -> tuple[list[str], str]:
    """(overrides, the start of the one error line expected) of each bad input of the issue."""
    if case == "proc":  # writable to os.access as root, refuses every write
        return ["storage_path=/proc/prunetune-x"], "prunetune: error: storage_path: cannot write in folder /proc"
    if case == "long_name":  # 400 bytes: `OSError: File name too long` once the sweep began
        return ["name=" + "é" * 200], "prunetune: error: name: at most 239 bytes in UTF-8"
    if case == "garbage_cifar":  # a DataError traceback after Ray started
        return ["dataset=cifar10", f"data_dir={_garbage_cifar(tmp_path)}"], \
            "prunetune: error: data_dir: cifar10 does not load from"
    if case == "garbage_images":
        for split in ("train", "val"):
            (tmp_path / "imgs" / split / "cat").mkdir(parents=True)
            (tmp_path / "imgs" / split / "cat" / "0.jpg").write_bytes(os.urandom(512))
        return ["dataset=imagefolder", f"data_dir={tmp_path / 'imgs'}", "image_size=32"], \
            f"prunetune: error: data_dir: {tmp_path / 'imgs' / 'train' / 'cat' / '0.jpg'} does not decode"
    return ["num_trials=1000000000000"], "prunetune: error: num_trials: must be an integer <= 100_000"


@pytest.mark.parametrize("case", ["proc", "long_name", "garbage_cifar", "garbage_images", "huge_num_trials"])
def test_bad_input_is_one_line_before_any_run(tmp_path, case, capfd):
    overrides, expected = _bad_input(case, tmp_path)
    code, err = _main(_sweep_args("methods=[l1_norm]", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", *overrides),
                      capfd)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = _errors(err)
    assert line.startswith(expected), line
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow (and Ray) were touched


def test_failure_after_the_parent_run_exists_marks_it_failed(ray_local, tmp_path, capfd):
    """Input no preflight can see through (``base_models`` is a file): the parent ends FAILED with
    the reason, one line, exit 1."""
    storage = tmp_path / "ray"
    storage.mkdir()
    (storage / "base_models").write_text("not a folder")
    code, err = _main(_sweep_args("methods=[l1_norm]", "num_trials=1", "base.epochs=1", "name=late",
                                  f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={storage}"), capfd)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    (line,) = _errors(err)
    assert line.startswith("prunetune: internal error: ") and "base_models" in line, line
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("late").experiment_id])
    assert run.info.status == "FAILED" and "base_models" in run.data.tags["failure_reason"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("broken", ["ray", "ray+base"])
def test_ray_start_failing_beside_the_driver_is_its_own_line(tmp_path, broken):
    """Ray starts in a thread while the driver opens MLflow and the base model: a failing start
    (RAY_TMPDIR is a file) ends the sweep FAILED with its reason in one line; when the base model
    fails too (base_models is a file), that is the CLI's line and the Ray failure its own log line.
    Either way no process of the driver outlives it."""
    mark = uuid.uuid4().hex
    storage = tmp_path / "ray"
    storage.mkdir()
    (tmp_path / "not-a-dir").write_text("")
    if broken == "ray+base":
        (storage / "base_models").write_text("not a folder")
    env = dict(_env(mark), RAY_TMPDIR=str(tmp_path / "not-a-dir"))
    driver = subprocess.run(prunetune_cli() + _sweep_args(
        "methods=[l1_norm]", "num_trials=1", "base.epochs=1", "name=both", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"storage_path={storage}"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    try:
        assert driver.returncode == 1 and "Traceback" not in driver.stderr, driver.stderr[-3000:]
        (line,) = _errors(driver.stderr)
        ray_lines = [ln for ln in driver.stderr.splitlines() if "Ray start failed as well: NotADirectoryError" in ln]
        if broken == "ray":
            assert line.startswith("prunetune: internal error: NotADirectoryError: ") and "not-a-dir" in line, line
            assert not ray_lines
        else:
            assert line.startswith("prunetune: internal error: ") and "base_models" in line, line
            assert len(ray_lines) == 1 and LOG_LINE.match(ray_lines[0]), driver.stderr[-3000:]
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("both").experiment_id])
        reason = run.data.tags["failure_reason"]
        assert run.info.status == "FAILED" and ("base_models" in reason if broken == "ray+base" else
                                                reason.startswith("NotADirectoryError: ")), reason
        _assert_all_gone(mark)
    finally:
        _kill_marked(mark)


# ---- 6. NaN in a surgery's own fine-tune steps ----------------------------------------------------------------
def test_thinet_nan_in_its_per_layer_finetune_ends_the_trial_failed(tmp_path):
    """ThiNet fine-tunes after each pruned layer, inside the surgery: a NaN there ended in a raised
    NonFiniteLossError (Tune retried the trial) where every other method's NaN ends the trial as
    failed at once. Now the same: one report with the reason, the trial returns."""
    from trainables.base_model import ensure_base_model
    from trainables.settings import TrainSettings, TrialSettings
    from trainables.trial import run_trial

    settings = TrialSettings(base=TrainSettings(epochs=1), finetune=TrainSettings(epochs=2, lr=1e12),
                             base_dir=str(tmp_path / "base"), use_gpu=False)
    ensure_base_model(settings)
    reports = []
    metrics = run_trial(settings, "thinet", {"prune_ratio": 0.5, "finetune_steps": 5, "samples_per_layer": 64},
                        lambda m, save: reports.append(m))
    assert metrics["nonfinite"] == 1 and "training loss became" in metrics["failure_reason"]
    assert reports == [metrics]


# ---- 6. the embedded Ray ends with its driver ---------------------------------------------------------------
EMBEDDED_DRIVER = """
import sys, time
import ray
from search.config import load_config
from search.sweep import _init_ray
_init_ray(load_config(sys.argv[1], ["methods=[l1_norm]"]))
ray.get(ray.remote(lambda: 1).remote())  # a worker, and the agents fully up
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(180)
def test_embedded_ray_ends_with_a_sigkilled_driver(tmp_path):
    """SIGKILL to the driver alone (not its process group): Ray's GCS and raylet follow it, and
    (before the reaper) ray::DashboardAgent and ray::RuntimeEnvAgent lingered for about a minute."""
    mark = uuid.uuid4().hex
    driver = subprocess.Popen([sys.executable, "-c", EMBEDDED_DRIVER, str(QUICKSTART)], cwd=tmp_path, env=_env(mark),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert driver.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not [p for p in _marked(mark) if b"agent" in (proc_info(p) or (0, b""))[1].lower()]:
            assert time.monotonic() < deadline, "no Ray agents found"
            time.sleep(0.25)
        driver.kill()
        driver.wait(timeout=30)
        _assert_all_gone(mark)
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill_marked(mark)


@pytest.mark.timeout(400)
def test_an_embedded_sweep_stops_ray_beside_the_front_and_leaves_nothing(tmp_path):
    """A finished `prunetune run`: Ray is stopped in its own thread while the front is recorded
    (the `platform time:` line has both the stop and the driver's wait for it), the parent run is
    FINISHED with its front, and no process the driver started outlives it."""
    mark = uuid.uuid4().hex
    try:
        driver = subprocess.run(prunetune_cli() + _sweep_args(
            "methods=[l1_norm]", "num_trials=2", "base.epochs=1", "finetune.epochs=1", "name=quick",
            f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage_path={tmp_path}/ray"),
            cwd=tmp_path, env=_env(mark), capture_output=True, text=True, timeout=360)
        assert driver.returncode == 0, driver.stderr[-3000:]
        output = driver.stdout + driver.stderr  # Ray's helpers end without a word in the user's output
        assert "Traceback" not in output and "autoscaler failed" not in output, output[-3000:]
        (line,) = [ln for ln in driver.stderr.splitlines() if "platform time:" in ln]
        parts = dict(re.findall(r"(\w+) ([\d.]+)s", line))
        assert {"tracking", "ray_start", "ray_wait", "tune", "front", "ray_stop", "ray_stop_wait"} <= set(parts), line
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        (parent,) = client.search_runs([client.get_experiment_by_name("quick").experiment_id],
                                       filter_string="tags.`prunetune.sweep` = 'true'")
        assert parent.info.status == "FINISHED" and len(child_runs(client, parent.info.run_id)) == 2
        _assert_all_gone(mark)
    finally:
        _kill_marked(mark)


# ---- 3. a sweep directory whose database moved ---------------------------------------------------------------
@pytest.mark.parametrize("command", [["resume"], ["fronts"], ["promote", "--name", "m"]])
def test_a_moved_database_is_one_line_and_nothing_is_created(tmp_path, capfd, command):
    from search.config import load_config

    exp_dir, db = tmp_path / "ray" / "moved-20260101-000000", tmp_path / "gone" / "mlflow.db"
    exp_dir.mkdir(parents=True)
    cfg = load_config(QUICKSTART, ["methods=[l1_norm]", f"tracking_uri=sqlite:///{db}"])
    (exp_dir / STATE_FILE).write_text(json.dumps({"parent_run_id": "0" * 32, "tracking_uri": f"sqlite:///{db}",
                                                  "config": cfg.to_dict()}))
    code, err = _main(command[:1] + [str(exp_dir)] + command[1:], capfd)
    assert code == 2 and "Traceback" not in err, err
    (line,) = _errors(err)
    assert str(db) in line and "no longer exists" in line, line
    assert not db.parent.exists() and not (tmp_path / "mlflow.db").exists()
