"""Time a sweep loses to one killed worker, measured side by side in one run (issue #7).

    python benchmarks/bench_lost_worker.py [--trials 4] [--epochs 8] [--repeats 1]

Each scenario runs the same sweep (same seed, random sampler, so the same trials) on a fresh
two-node Ray cluster on loopback (head + worker node, 1 CPU each; ``tests/loopback_cluster.py``):

* ``baseline``: no fault.
* ``worker``: the Ray worker process running a trial on the worker node is SIGKILLed half an
  epoch after that trial's second epoch; the node lives on. Tune retries the trial from its last
  checkpoint (``max_failures``).
* ``node``: the worker node's raylet is SIGKILLed at the same point (the node and every worker on
  it die), and a replacement node joins at once, as a spot-instance group replaces a lost machine.

It prints each sweep's wall time (driver start to exit), the time lost against the baseline and
that loss in units of one trial's duration (the goal: under one trial). The dense base model is
trained once beforehand and shared, so no scenario pays for it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from loopback_cluster import LoopbackCluster, live_trial_results, proc_info, trial_results  # noqa: E402

DRIVER = """
import json, sys
from search.config import load_config
from search.sweep import run_sweep
res = run_sweep(load_config(sys.argv[1], json.loads(sys.argv[2])))
print("RESULT " + json.dumps({"exp_dir": str(res.experiment_dir), "finished": res.finished}), flush=True)
"""


def overrides(args, name: str, root: Path, address: str | None) -> list[str]:
    out = ["methods=[l1_norm]", "space={prune_ratio: [0.3, 0.6]}", f"num_trials={args.trials}", "sampler=random",
           "max_concurrent_trials=2", "base.epochs=2", f"finetune.epochs={args.epochs}", "early_stopping.type=none", "checkpoint_period_s=0", "max_failures=2",
           f"name={name}", f"tracking_uri=sqlite:///{root}/{name}.db", f"storage_path={root}/ray", "seed=0"]
    return out + ([f"address={address}"] if address else [])


def run_scenario(args, scenario: str, root: Path, rep: int) -> dict:
    name = f"lost-{scenario}-{rep}"
    work = root / name
    work.mkdir()
    with open(work / "driver.log", "wb") as log, LoopbackCluster(work) as cluster:
        cluster.start_head()
        node = cluster.add_worker()
        raylet = cluster.raylet_pid(node)
        cmd = [sys.executable, "-c", DRIVER, str(ROOT / "configs" / "quickstart.yaml"),
               json.dumps(overrides(args, name, root, cluster.address))]
        t0 = time.perf_counter()
        driver = cluster.spawn(cmd, log)
        victim = None
        while scenario != "baseline" and victim is None and driver.poll() is None:
            for tid, rows in live_trial_results(cluster, root / "ray", name).items():
                info = proc_info(rows[-1]["pid"])
                if info and info[0] == raylet and rows[-1]["epoch"] == 2:
                    victim, pid = tid, rows[-1]["pid"]
                    time.sleep(rows[-1]["epoch_seconds"] / 2)  # mid-epoch: half an epoch's work is lost
                    os.kill(raylet if scenario == "node" else pid, signal.SIGKILL)
                    killed_at = time.perf_counter() - t0
                    if scenario == "node":
                        cluster.add_worker()  # the replacement machine joins
                    break
            time.sleep(0.05)
        rc = driver.wait(timeout=1800)
        wall = time.perf_counter() - t0
        output = (work / "driver.log").read_text()
    if rc != 0:
        raise SystemExit(f"{scenario}: driver exited {rc}:\n{output[-3000:]}")
    exp_dir = Path(json.loads(output.split("RESULT ", 1)[1].splitlines()[0])["exp_dir"])
    results = trial_results(exp_dir)
    durations = [rows[-1]["time_total_s"] for rows in results.values()]
    rerun = sum(len(rows) - len({r["epoch"] for r in rows}) for rows in results.values())
    done = all(rows[-1]["epoch"] == args.epochs for rows in results.values()) and len(results) == args.trials
    row = {"scenario": scenario, "rep": rep, "wall_s": wall, "trial_s": sum(durations) / len(durations), "epochs_rerun": rerun,
           "complete": done, "killed_at_s": killed_at if victim else None}
    print(f"  {scenario}: {wall:.1f} s, {len(results)} trials complete={done}, epochs re-run {rerun}"
          + (f", killed at {killed_at:.1f} s" if victim else ""), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scenarios", default="baseline,worker,node")
    ap.add_argument("--workdir", help="keep the sweeps' logs, Tune dirs and MLflow DBs here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")

    from search.config import load_config
    from search.sweep import settings_from_config
    from trainables.base_model import ensure_base_model

    with tempfile.TemporaryDirectory(prefix="bench-lost-") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides(args, "warmup", root, None))
        ensure_base_model(settings_from_config(cfg))  # shared by every scenario: none pays for it
        rows = []
        for rep in range(args.repeats):
            for scenario in args.scenarios.split(","):
                rows.append(run_scenario(args, scenario, root, rep))
    print(f"\n{args.trials} l1_norm trials x {args.epochs} epochs, 2 at a time on 2 one-CPU nodes (digits)")
    print(f"{'scenario':<10}{'rep':>4}{'wall s':>9}{'lost s':>9}{'trial s':>9}{'lost/trial':>12}{'re-run':>8}")
    for rep in range(args.repeats):
        base = next((r for r in rows if r["rep"] == rep and r["scenario"] == "baseline"), None)
        if base is None:
            continue  # nothing to compare with (--scenarios without baseline): the lines above say it all
        for r in (r for r in rows if r["rep"] == rep):
            lost = r["wall_s"] - base["wall_s"]
            print(f"{r['scenario']:<10}{rep:>4}{r['wall_s']:>9.1f}{lost:>9.1f}{base['trial_s']:>9.1f}"
                  f"{lost / base['trial_s']:>11.2f}x{r['epochs_rerun']:>8}")


if __name__ == "__main__":
    main()
