"""Platform overhead: the same N trials run by the sweep (Ray Tune + Optuna + MLflow) and by a
plain pool of Python processes calling the same trial function, side by side in one run.

    python benchmarks/bench_platform_overhead.py [--trials 6] [--epochs 20] [--concurrency 2]

Every trial is identical (l1_norm, prune_ratio fixed at 0.5) so both sides do the same work. The
dense base model is trained once beforehand and shared by both (its time is not in either number);
the script also counts how many base models the sweep trained (expected: 0 new, it reuses).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _plain_trial(settings):
    import torch

    torch.set_num_threads(1)  # what a 1-CPU Tune trial gets
    from trainables.trial import run_trial

    t0 = time.perf_counter()
    run_trial(settings, "l1_norm", {"prune_ratio": 0.5}, lambda metrics, save: None)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=20, help="fine-tune epochs per trial (~1 s each on digits)")
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()

    from search.config import load_config
    from search.sweep import run_sweep, settings_from_config
    from trainables.base_model import ensure_base_model

    root = Path(tempfile.mkdtemp(prefix="prunetune-bench-"))
    cfg = load_config("configs/quickstart.yaml", [
        "methods=[l1_norm]", "space.prune_ratio=0.5", f"num_trials={args.trials}",
        f"max_concurrent_trials={args.concurrency}", f"finetune.epochs={args.epochs}", "early_stopping.type=none", "sampler=random",
        f"tracking_uri=sqlite:///{root}/mlflow.db", f"storage_path={root}/ray_results", "name=overhead"])
    settings = settings_from_config(cfg)
    ensure_base_model(settings)
    base_root = Path(settings.base_dir)
    bases_before = sorted(p.name for p in base_root.iterdir() if not p.name.startswith("."))

    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.concurrency) as pool:
        trial_times = list(pool.map(_plain_trial, [settings] * args.trials))
    plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = run_sweep(cfg)
    sweep = time.perf_counter() - t0
    bases_after = sorted(p.name for p in base_root.iterdir() if not p.name.startswith("."))

    mean_trial = sum(trial_times) / len(trial_times)
    print(f"\n{args.trials} identical trials, {args.concurrency} at a time, {args.epochs} fine-tune epochs each "
          f"(mean trial {mean_trial:.1f}s in the plain pool)")
    print(f"plain process pool : {plain:7.1f} s")
    print(f"prunetune sweep    : {sweep:7.1f} s  (includes Ray start, MLflow records, front)")
    print(f"ratio sweep/plain  : {sweep / plain:7.2f}x")
    print(f"trials finished in the sweep: {result.finished}; base models trained by the sweep: "
          f"{len(bases_after) - len(bases_before)} (reused: {bases_after == bases_before})")


if __name__ == "__main__":
    main()
