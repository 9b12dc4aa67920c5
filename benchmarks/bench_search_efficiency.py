"""Search efficiency: hypervolume against wall-clock time (the anytime curve) on the quickstart task,
full-budget TPE against TPE + multi-objective early stopping, several seeds, in one run.

    python benchmarks/bench_search_efficiency.py [--seeds 0 1 2] [--trials 16] [--es-trials N]
                                                 [--set KEY=VALUE ...] [--out DIR]

Both arms run the quickstart config (every method, TPE, 2 concurrent trials) with the same seed and
number of trials (unless ``--es-trials`` gives the early-stopping arm more: the time it saves,
spent on trials); ``--set`` overrides the quickstart for both arms (e.g. ``finetune.epochs=9``).
The other difference is ``early_stopping.type`` (``none`` vs
``successive_halving``, grace 1, reduction factor 2). The arms alternate (seed 0 full, seed 0 ES,
seed 1 full, ...) so machine load hits both alike; the dense base model is trained once before and
shared (its time is in neither number). Per sweep the clock starts when its first trial starts
(MLflow run start times) and the curve is the hypervolume of the trials FINISHED so far (a stopped
trial adds nothing) against one fixed reference: accuracy 0 and the dense model's MACs.

Printed per seed and as min/median/max over seeds:

* ``T_full``, ``T_es``: wall time of each arm's trials (first start to last end);
* ``HV_full``, ``HV_es``: final hypervolumes;
* ``reach``: the time ES needs to reach ``HV_full`` over ``T_full`` (goal <= 0.5; "never" if it does not);
* ``HV_es - HV_full(T_es)``: ES's final hypervolume minus the full arm's at the same elapsed time
  (goal >= 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def curve(client, parent_run_id: str, reference) -> tuple[list[tuple[float, float]], float]:
    """[(seconds since the first trial start, hypervolume of the trials finished by then)], and
    the span from the first start to the last end."""
    from search.pareto import hypervolume
    from search.tracking import child_runs

    runs = child_runs(client, parent_run_id)
    t0 = min(r.info.start_time for r in runs)
    t_end = max((r.info.end_time or r.info.start_time) for r in runs)
    done = sorted((r for r in runs if r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics),
                  key=lambda r: r.info.end_time)
    points, out = [], [(0.0, 0.0)]
    for r in done:
        points.append((r.data.metrics["accuracy"], r.data.metrics["macs"]))
        out.append(((r.info.end_time - t0) / 1000.0, hypervolume(points, reference, ("max", "min"))))
    return out, (t_end - t0) / 1000.0


def hv_at(points: list[tuple[float, float]], t: float) -> float:
    return max((hv for s, hv in points if s <= t), default=0.0)


def time_to(points: list[tuple[float, float]], target: float) -> float:
    return next((s for s, hv in points if hv >= target * (1 - 1e-12)), math.inf)


def _stats(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    tail = f" ({len(values) - len(finite)} never)" if len(finite) < len(values) else ""
    return f"min {min(finite):.3g}  median {statistics.median(finite):.3g}  max {max(finite):.3g}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--es-trials", type=int, default=None, help="trials of the early-stopping arm (default: --trials)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="quickstart override, both arms")
    ap.add_argument("--out", default=None, help="folder for the sweeps and curves.json (default: a temp dir)")
    args = ap.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from methods.cost import profile
    from search.config import load_config
    from search.sweep import run_sweep, settings_from_config
    from trainables.base_model import build_model, ensure_base_model
    from trainables.workspace import load_data

    root = Path(args.out or tempfile.mkdtemp(prefix="prunetune-efficiency-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    common = [f"tracking_uri=sqlite:///{root}/mlflow.db", f"storage_path={root}/ray_results", *args.set]
    trials = {"full": args.trials, "es": args.es_trials or args.trials}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = settings_from_config(load_config("configs/quickstart.yaml", common))
        ensure_base_model(settings)
        reference = (0.0, float(profile(build_model(settings), tuple(load_data(settings).input_shape)).macs))
        client = MlflowClient(f"sqlite:///{root}/mlflow.db")
        rows, curves = [], {}
        for seed in args.seeds:
            row = {"seed": seed}
            for arm, es in (("full", "none"), ("es", "successive_halving")):
                cfg = load_config("configs/quickstart.yaml", common + [
                    f"seed={seed}", f"name=eff-{arm}-{seed}", f"early_stopping.type={es}", f"num_trials={trials[arm]}"])
                t0 = time.perf_counter()
                result = run_sweep(cfg)
                row[f"sweep_s_{arm}"] = time.perf_counter() - t0
                points, span = curve(client, result.parent_run_id, reference)
                curves[f"{arm}-{seed}"] = points
                row[f"T_{arm}"], row[f"HV_{arm}"] = span, points[-1][1]
                row[f"stopped_{arm}"] = result.stopped
            row["reach"] = time_to(curves[f"es-{seed}"], row["HV_full"]) / row["T_full"]
            row["hv_gap_equal_time"] = row["HV_es"] - hv_at(curves[f"full-{seed}"], row["T_es"])
            rows.append(row)
            print(f"seed {seed}: T_full {row['T_full']:.1f}s T_es {row['T_es']:.1f}s (stopped {row['stopped_es']}) "
                  f"HV_full {row['HV_full']:.5g} HV_es {row['HV_es']:.5g} reach {row['reach']:.3g} "
                  f"HV_es - HV_full(T_es) {row['hv_gap_equal_time']:.4g}", flush=True)
    finally:
        ray.shutdown()
    (root / "curves.json").write_text(json.dumps({"reference": reference, "rows": rows, "curves": curves}, indent=1))
    print(f"\nreference: accuracy 0, dense MACs {reference[1]:,.0f}; trials {trials}; overrides {args.set}; "
          f"seeds {args.seeds}")
    print(f"T_es / T_full:              {_stats([r['T_es'] / r['T_full'] for r in rows])}")
    print(f"HV_es / HV_full:            {_stats([r['HV_es'] / r['HV_full'] for r in rows])}")
    print(f"reach (time to HV_full / T_full, goal <= 0.5): {_stats([r['reach'] for r in rows])}")
    print(f"HV_es - HV_full(T_es) / HV_full (goal >= 0): "
          f"{_stats([r['hv_gap_equal_time'] / r['HV_full'] for r in rows])}")
    print(f"curves and rows: {root / 'curves.json'}")


if __name__ == "__main__":
    main()
