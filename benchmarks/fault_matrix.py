"""Every driver-side fault of issue 15 and round 1's (a SIGKILLed driver, a SIGKILLed trial worker)
on the same small sweep, one table (issue 15):

    python benchmarks/fault_matrix.py [--trials 3] [--epochs 4] [--cases all|case,case,...]

Each case runs real ``prunetune`` processes (embedded Ray, SQLite MLflow) in a fresh folder:

* ``baseline``: the sweep, no fault (its wall time is what ``seconds lost`` is measured against).
* ``driver_sigkill``, ``sigint``, ``sigterm``: the driver gets the signal once a trial is running
  past its first epoch; then ``prunetune resume DIR``.
* ``resume_elsewhere``: launched with relative ``tracking_uri``/``storage_path``, SIGKILLed, then
  resumed from another directory.
* ``worker_sigkill``: the Ray worker process running a trial is SIGKILLed mid-trial (Tune retries it).
* ``concurrent_first``: two sweeps at once on one fresh ``mlflow.db``, then a third.
* ``promote_running``: ``prunetune promote DIR`` as soon as the sweep's parent run exists (must
  refuse: exit 2), then the sweep ends.
* ``bad_*``: bad input that used to pass preflight (``storage_path=/proc/x``, a 200-character
  non-ASCII name, CIFAR-10 files that are garbage, ``num_trials: 1000000000000``).

Columns: exit codes of the processes in order (fault run -> resume), runs lost (trials of the
budget without a FINISHED MLflow run), runs doubled (MLflow runs beyond one per trial), the parent
run's final status (``-`` when none was created), seconds lost (wall time of all the case's
processes minus the baseline's; for ``concurrent_first``, the elapsed time of its three sweeps
minus three baselines; for bad input, the time to the error line).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from loopback_cluster import proc_info, tune_state  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MARK = "PRUNETUNE_FAULT_MATRIX_MARK"
CASES = ("baseline", "driver_sigkill", "worker_sigkill", "sigint", "sigterm", "resume_elsewhere", "concurrent_first",
         "promote_running", "bad_proc", "bad_long_name", "bad_cifar", "bad_num_trials")


def _env(mark: str) -> dict[str, str]:
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
                TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                **{MARK: mark})


def _cli() -> list[str]:
    return [sys.executable, "-m", "search.cli"]


def _sweep(args, name: str, *extra: str) -> list[str]:
    sets = ["methods=[l1_norm]", "space={prune_ratio: [0.2, 0.8]}", f"num_trials={args.trials}", "sampler=random",
            "max_concurrent_trials=2", "base.epochs=1", f"finetune.epochs={args.epochs}", "seed=0", f"name={name}",
            "early_stopping.type=none", "checkpoint_period_s=0", *extra]  # full budgets, per-epoch checkpoints
    return _cli() + ["run", str(QUICKSTART)] + [a for s in sets for a in ("--set", s)]


class Case:
    """The processes of one case, their exit codes and wall time."""

    def __init__(self, work: Path, baseline: float | None):
        self.work, self.mark, self.codes, self.wall = work, uuid.uuid4().hex, [], 0.0
        self.baseline = baseline or 0.0

    def start(self, cmd: list[str], cwd: Path | None = None, log: str = "run.log") -> subprocess.Popen:
        out = open(self.work / log, "ab")
        proc = subprocess.Popen(cmd, cwd=cwd or self.work, env=_env(self.mark), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.t0, proc.out = time.perf_counter(), out
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 1800) -> int:
        rc = proc.wait(timeout=timeout)
        proc.out.close()
        self.wall += time.perf_counter() - proc.t0
        self.codes.append(rc)
        return rc

    def run(self, cmd: list[str], cwd: Path | None = None, log: str = "run.log") -> int:
        return self.finish(self.start(cmd, cwd, log))

    def cleanup(self) -> None:
        time.sleep(1)
        for pid in _marked(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _marked(mark: str, name: bytes = b"") -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        info = proc_info(int(entry.name)) if entry.name.isdigit() else None
        if info and f"{MARK}={mark}".encode() in info[2].split(b"\0") and name in info[1]:
            pids.append(int(entry.name))
    return pids


def _wait_running(storage: Path, proc: subprocess.Popen, timeout: float = 600) -> Path | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for state in glob.glob(str(storage / "*" / "prunetune_sweep.json")):
            snapshot = tune_state(Path(state).parent) or {}
            if any(t["status"] == "RUNNING" and t["epoch"] >= 1 for t in snapshot.values()):
                return Path(state).parent
        time.sleep(0.2)
    return None


def _outcome(args, exp_dirs: list[Path]) -> tuple[int, int, str]:
    """(runs lost, runs doubled, parent statuses) over the sweeps of a case."""
    from mlflow.tracking import MlflowClient

    from search.tracking import TRIAL_TAG, child_runs

    lost = doubled = 0
    statuses = []
    for exp_dir in exp_dirs:
        state = json.loads((exp_dir / "prunetune_sweep.json").read_text())
        client = MlflowClient(state["tracking_uri"])
        statuses.append(client.get_run(state["parent_run_id"]).info.status)
        children = child_runs(client, state["parent_run_id"])
        tids = [r.data.tags.get(TRIAL_TAG) for r in children]
        finished = {r.data.tags.get(TRIAL_TAG) for r in children if r.info.status == "FINISHED"}
        lost += max(0, args.trials - len(finished))
        doubled += len(tids) - len(set(tids)) + max(0, len(set(tids)) - args.trials)
    return lost, doubled, ",".join(sorted(set(statuses))) or "-"


def _signal_case(args, case: Case, sig: int, elsewhere: bool = False) -> list[Path]:
    storage = case.work / "ray_results"
    extra = [] if elsewhere else [f"tracking_uri=sqlite:///{case.work}/mlflow.db", f"storage_path={storage}"]
    launch = case.work / "launch" if elsewhere else case.work
    launch.mkdir(exist_ok=True)
    storage = launch / "ray_results" if elsewhere else storage
    driver = case.start(_sweep(args, "m", *extra), cwd=launch)
    exp_dir = _wait_running(storage, driver)
    if exp_dir is None:
        raise SystemExit(f"no running trial (exit {driver.poll()}): {(case.work / 'run.log').read_text()[-2000:]}")
    os.kill(driver.pid, sig)  # the driver only: its Ray processes must end with it
    case.finish(driver)
    other = case.work / "elsewhere"
    other.mkdir()
    case.run(_cli() + ["resume", str(exp_dir)], cwd=other, log="resume.log")
    if "Traceback" in (case.work / "resume.log").read_text():
        print("  (resume printed a traceback)", flush=True)
    return [exp_dir]


def _worker_case(args, case: Case) -> list[Path]:
    storage = case.work / "ray"
    driver = case.start(_sweep(args, "m", f"tracking_uri=sqlite:///{case.work}/mlflow.db", f"storage_path={storage}",
                               "max_failures=2"))
    exp_dir = _wait_running(storage, driver)
    victims = _marked(case.mark, b"ImplicitFunc") if exp_dir else []
    if not victims:
        raise SystemExit(f"no trial worker found: {(case.work / 'run.log').read_text()[-2000:]}")
    os.kill(victims[0], signal.SIGKILL)
    case.finish(driver)
    return [exp_dir]


def _concurrent_case(args, case: Case) -> list[Path]:
    """Two first sweeps side by side on one fresh database, then a third. ``wall`` is the elapsed
    time (the pair's, then the third's) less what three sweeps cost one after another; ``run_case``
    takes one baseline off, so two more come off here."""
    t0 = time.perf_counter()
    procs = [case.start(_sweep(args, n), log=f"{n}.log") for n in ("x", "y")]
    for p in procs:
        case.finish(p)
    case.wall = time.perf_counter() - t0
    case.run(_sweep(args, "z"), log="z.log")
    case.wall -= 2 * case.baseline
    return [Path(p).parent for p in sorted(glob.glob(str(case.work / "ray_results" / "*" / "prunetune_sweep.json")))]


def _promote_case(args, case: Case) -> list[Path]:
    """``prunetune promote`` as soon as the sweep's parent run exists (the sweep then still trains
    its dense base, starts Ray and runs every trial), with twice the epochs so it is still running
    when promote asks; the parent's status at that moment is printed."""
    from mlflow.tracking import MlflowClient

    storage = case.work / "ray"
    driver = case.start(_sweep(args, "m", f"tracking_uri=sqlite:///{case.work}/mlflow.db", f"storage_path={storage}",
                               f"finetune.epochs={2 * args.epochs}"))
    while not glob.glob(str(storage / "*" / "prunetune_sweep.json")) and driver.poll() is None:
        time.sleep(0.1)
    exp_dir = Path(glob.glob(str(storage / "*" / "prunetune_sweep.json"))[0]).parent
    promote = subprocess.run(_cli() + ["promote", str(exp_dir), "--name", "m"], cwd=case.work, env=_env(case.mark),
                             capture_output=True, text=True)
    state = json.loads((exp_dir / "prunetune_sweep.json").read_text())
    status = MlflowClient(state["tracking_uri"]).get_run(state["parent_run_id"]).info.status
    case.finish(driver)
    case.codes.insert(0, promote.returncode)
    print(f"  promote while the parent was {status}: exit {promote.returncode}: "
          f"{promote.stderr.strip().splitlines()[-1]}", flush=True)
    return [exp_dir]


def _bad_case(args, case: Case, which: str) -> list[Path]:
    extra = {"bad_proc": ["storage_path=/proc/x"], "bad_long_name": [], "bad_num_trials": ["num_trials=1000000000000"]}
    if which == "bad_cifar":
        folder = case.work / "cifar" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for n in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                  "batches.meta"):
            (folder / n).write_bytes(os.urandom(256))
        extra["bad_cifar"] = ["dataset=cifar10", f"data_dir={folder.parent}"]
    cmd = _sweep(args, "é" * 200 if which == "bad_long_name" else "m", *extra[which])
    case.run(cmd)
    lines = [ln for ln in (case.work / "run.log").read_text().splitlines() if ln.startswith("prunetune")]
    print(f"  {lines[-1] if lines else '(no error line)'}", flush=True)
    return sorted(Path(p).parent for p in glob.glob(str(case.work / "**" / "prunetune_sweep.json"), recursive=True))


def run_case(args, name: str, root: Path, baseline: float | None) -> dict:
    work = root / name
    work.mkdir()
    case = Case(work, baseline)
    print(f"{name} ...", flush=True)
    try:
        if name == "baseline":
            storage = work / "ray"
            driver = case.start(_sweep(args, "m", f"tracking_uri=sqlite:///{work}/mlflow.db", f"storage_path={storage}"))
            case.finish(driver)
            exp_dirs = [Path(p).parent for p in glob.glob(str(storage / "*" / "prunetune_sweep.json"))]
        elif name in ("driver_sigkill", "sigint", "sigterm", "resume_elsewhere"):
            sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}.get(name, signal.SIGKILL)
            exp_dirs = _signal_case(args, case, sig, elsewhere=name == "resume_elsewhere")
        elif name == "worker_sigkill":
            exp_dirs = _worker_case(args, case)
        elif name == "concurrent_first":
            exp_dirs = _concurrent_case(args, case)
        elif name == "promote_running":
            exp_dirs = _promote_case(args, case)
        else:
            exp_dirs = _bad_case(args, case, name)
    finally:
        case.cleanup()
    lost, doubled, status = _outcome(args, exp_dirs) if exp_dirs else (0, 0, "-")
    if name.startswith("bad_"):
        lost = doubled = 0  # nothing was to run
    seconds = case.wall if name.startswith("bad_") or baseline is None else case.wall - baseline
    row = {"case": name, "exit": "->".join(map(str, case.codes)), "lost": lost, "doubled": doubled,
           "parent": status, "seconds_lost": seconds}
    print(f"  {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cases", default="all")
    args = parser.parse_args()
    names = CASES if args.cases == "all" else tuple(args.cases.split(","))
    rows, baseline = [], None
    with tempfile.TemporaryDirectory(prefix="prunetune-faults-") as tmp:
        for name in (("baseline",) if "baseline" not in names else ()) + names:
            row = run_case(args, name, Path(tmp), baseline)
            if name == "baseline":
                baseline = row["seconds_lost"]
                row["seconds_lost"] = 0.0
            if name in names:
                rows.append(row)
    print(f"\n{args.trials} trials x {args.epochs} fine-tune epochs, l1_norm on digits; baseline sweep "
          f"{baseline:.1f} s\n")
    print(f"| {'case':<17} | {'exit':<9} | runs lost | runs doubled | {'parent':<8} | seconds lost |")
    print(f"|{'-' * 19}|{'-' * 11}|-----------|--------------|{'-' * 10}|--------------|")
    for r in rows:
        print(f"| {r['case']:<17} | {r['exit']:<9} | {r['lost']:>9} | {r['doubled']:>12} | {r['parent']:<8} | "
              f"{r['seconds_lost']:>12.1f} |")


if __name__ == "__main__":
    main()
