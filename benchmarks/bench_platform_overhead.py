"""Platform overhead: the same N trials run by the sweep (Ray Tune + Optuna + MLflow) and by a
plain pool of Python processes calling the same trial function, side by side, repeated.

    python benchmarks/bench_platform_overhead.py [--trials 6] [--epochs 20] [--concurrency 2] [--repeats 3]
        [--compare-with OTHER_CHECKOUT] [--without-models]

Every trial is identical (l1_norm, prune_ratio fixed at 0.5) so both sides do the same work. The
dense base model is trained once beforehand and shared by both (its training is in neither number).
Each repeat runs the plain pool, then the sweep in a fresh driver process (``python this --child``:
its imports count, as they do for ``prunetune run``) with a fresh MLflow SQLite database.

Per side: wall time; per-trial cost = the median trial time once a worker is warm (the sweep's
trials from their MLflow runs' start/end, leaving out the first ``concurrency`` trials, which each
start a worker); fixed cost = wall - waves x per-trial cost (waves = ceil(trials / concurrency)).
The sweep's fixed cost is split into its parts: driver imports (before ``run_sweep``), the MLflow
database and parent run, Ray start (in a thread, overlapping the rest) and what the driver waited
for it, the dense base check, Tune beyond waves x per-trial (worker start-up, scheduling), the front,
Ray stop (where the sweep reports ``ray_stop_wait``, Ray stops beside the front and only the wait
counts), and the rest (interpreter start, preflight, exit). Min / median / max over repeats, and
the load average before and after (the machine is shared).

``--without-models`` also runs, in each repeat, the same sweep with its per-trial pt2 MLflow model
logging off (the child replaces ``search.sweep._input_example`` by ``None``; the weights + spec
artifacts are still logged): what the driver's ``torch.export`` of every finished trial costs the
trials running beside it (an attribution, not a configuration users have).

CPU seconds by process over the whole run (``/proc``, sampled every 0.1 s while the sweep's driver
runs, counting only user processes started after it): the pool's trials against the sweep's trial
processes (Tune's actors, ``ray::ImplicitFunc``, with each worker's start-up), the driver, and
Ray's own processes (GCS, raylet, agents, log monitor, idle workers, the driver's reaper). On a
machine whose cores the trials fill, the driver's and Ray's CPU is what the trials lose;
``--concurrency 1`` on 2 cores leaves them a core. A process that exits loses its last <= 0.1 s.

``--compare-with DIR`` also runs, in each repeat right after this checkout's sweep, the same sweep
with ``PYTHONPATH=DIR`` (e.g. ``git worktree add /tmp/old <commit>``), so a change to the platform
is measured before/after side by side under the same load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
T_PROCESS = time.perf_counter()
NO_MODELS_ENV = "PRUNETUNE_BENCH_NO_PT2"


def _plain_trial(settings):
    import torch

    torch.set_num_threads(1)  # what a 1-CPU Tune trial gets
    from trainables.trial import run_trial

    t0, c0 = time.perf_counter(), time.process_time()
    run_trial(settings, "l1_norm", {"prune_ratio": 0.5}, lambda metrics, save: None)
    return time.perf_counter() - t0, time.process_time() - c0


def _overrides(args, root: Path, repeat: int, tag: str = "") -> list[str]:
    return ["methods=[l1_norm]", "space.prune_ratio=0.5", f"num_trials={args.trials}",
            f"max_concurrent_trials={args.concurrency}", f"finetune.epochs={args.epochs}", "early_stopping.type=none",
            "sampler=random", f"tracking_uri=sqlite:///{root}/mlflow-{tag}{repeat}.db",
            f"storage_path={root}/ray_results", f"name=overhead{tag}{repeat}"]


def child(overrides: list[str], out: str) -> None:
    """The sweep side: a fresh driver, timed from its first line."""
    from search.config import load_config
    from search.sweep import run_sweep

    imports = time.perf_counter() - T_PROCESS
    if os.environ.get(NO_MODELS_ENV):
        import search.sweep

        search.sweep._input_example = lambda data, n=4: None  # no pt2 model per trial (see --without-models)
    cfg = load_config("configs/quickstart.yaml", overrides)
    result = run_sweep(cfg)
    from mlflow.tracking import MlflowClient

    from search.tracking import child_runs

    runs = sorted(child_runs(MlflowClient(cfg.tracking_uri), result.parent_run_id), key=lambda r: r.info.start_time)
    trials = [((r.info.end_time or 0) - r.info.start_time) / 1000 for r in runs]
    Path(out).write_text(json.dumps({"imports": imports, "timings": getattr(result, "timings", {}), "trials": trials,
                                     "finished": result.finished}))
    try:  # what `prunetune run` does before it exits (absent from older checkouts)
        from search.cli import freeze_for_exit
    except ImportError:
        return
    freeze_for_exit()


def _steady(times: list[float], concurrency: int) -> float:
    later = times[concurrency:] or times
    return statistics.median(later)


def _sweep_child(args, root: Path, repeat: int, pythonpath: str | None, tag: str,
                 no_models: bool = False) -> tuple[float, dict]:
    out = root / f"child-{tag}{repeat}.json"
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    if no_models:
        env[NO_MODELS_ENV] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(out), *_overrides(args, root, repeat, tag)],
                            env=env)
    cpu = _cpu_by_role(proc)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    rec = json.loads(out.read_text())
    rec["cpu"] = cpu
    return time.perf_counter() - t0, rec


_TICK = os.sysconf("SC_CLK_TCK")
#: Ray's own processes, by what their command lines hold (the trial actors are ``ray::ImplicitFunc``).
_RAY_OWN = ("gcs_server", "raylet", "dashboard", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "log_monitor",
            "ray/_private", "ray::IDLE", "search.reaper")


def _proc_stat(pid: str) -> tuple[float, int, str] | None:
    """(CPU seconds, start time in ticks, command line) of process ``pid``, or None if it is gone
    or a kernel thread (their I/O work for everyone's files is not the sweep's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if fields[1] in ("0", "2"):  # parent: kthreadd
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[19]), cmd


def _role(pid: str, driver: int, cmd: str) -> str:
    """``driver``, ``trials``, ``ray`` (Ray's own) or ``other``, for process ``pid`` running ``cmd``."""
    if int(pid) == driver:
        return "driver"
    if cmd.startswith("ray::ImplicitFunc"):
        return "trials"
    return "ray" if any(k in cmd for k in _RAY_OWN) else "other"


def _cpu_by_role(proc: subprocess.Popen) -> dict[str, float]:
    """Wait for ``proc`` (the sweep's driver); CPU seconds of the processes started since, by role."""
    first = _proc_stat(str(proc.pid))
    since = first[1] if first else 0
    last: dict[str, tuple[str, float]] = {}  # pid -> (role, CPU seconds at its last reading)
    while proc.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            stat = _proc_stat(pid)
            if stat is None or stat[1] < since:
                continue
            # a worker's command line turns into ray::ImplicitFunc once it holds a trial: a trial
            # process from then on, its start-up included; an exiting one's reads empty
            seen = last.get(pid)
            keep = seen is not None and (seen[0] == "trials" or not stat[2])
            role = seen[0] if keep else _role(pid, proc.pid, stat[2])
            last[pid] = (role, stat[0])
        time.sleep(0.1)
    totals = {"driver": 0.0, "trials": 0.0, "ray": 0.0, "other": 0.0}
    for role, cpu in last.values():
        totals[role] += cpu
    return totals


def one_repeat(args, settings, root: Path, repeat: int) -> dict:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.concurrency) as pool:
        pool_runs = list(pool.map(_plain_trial, [settings] * args.trials))
    plain = time.perf_counter() - t0
    # The pool's trial times leave out its workers' imports (counted in its wall, i.e. its fixed cost).
    pool_trial = statistics.median(w for w, _ in pool_runs)
    pool_cpu = sum(c for _, c in pool_runs)
    out = _measure(args, plain, pool_trial, *_sweep_child(args, root, repeat, None, ""))
    if args.without_models:
        out["no_models"] = _measure(args, plain, pool_trial, *_sweep_child(args, root, repeat, None, "nomodels", True))
    if args.compare_with:
        out["other"] = _measure(args, plain, pool_trial, *_sweep_child(args, root, repeat, args.compare_with, "other"))
    out["pool_trials_cpu"] = pool_cpu
    return out


def _measure(args, plain: float, pool_trial: float, sweep: float, rec: dict) -> dict:
    waves = math.ceil(args.trials / args.concurrency)
    sweep_trial = _steady(rec["trials"], args.concurrency)
    t = rec["timings"]  # empty for a checkout whose sweep does not time its parts
    parts = {"imports": rec["imports"]}
    if t:
        parts.update({"mlflow": t.get("tracking", 0.0), "ray_start": t.get("ray_start", 0.0),
                      "ray_wait": t.get("ray_wait", 0.0), "base": t.get("base", 0.0),
                      "tune_extra": t.get("tune", 0.0) - waves * sweep_trial, "front": t.get("front", 0.0),
                      "ray_stop": t.get("ray_stop", 0.0)})
        if "ray_stop_wait" in t:  # Ray stops in its thread beside the front; the driver waits for the rest
            parts["ray_stop_wait"] = t["ray_stop_wait"]
    overlapping = {"ray_start", "ray_stop"} if "ray_stop_wait" in parts else {"ray_start"}
    fixed = sweep - waves * sweep_trial
    parts["rest"] = fixed - sum(v for k, v in parts.items() if k not in overlapping)
    return {"cpu": rec["cpu"], "plain": plain, "sweep": sweep, "ratio": sweep / plain, "pool_trial": pool_trial,
            "sweep_trial": sweep_trial, "trial_ratio": sweep_trial / pool_trial,
            "pool_fixed": plain - waves * pool_trial, "fixed": fixed, "parts": parts,
            "first_trials": rec["trials"][:args.concurrency], "finished": rec["finished"]}


def _mmm(values) -> str:
    v = sorted(values)
    return f"{v[0]:6.2f} / {statistics.median(v):6.2f} / {v[-1]:6.2f}"


def report(args, results: list[dict], loads: tuple) -> None:
    print(f"\n{args.trials} identical trials, {args.concurrency} at a time, {args.epochs} fine-tune epochs each; "
          f"{len(results)} repeats; load average before {loads[0]}, after {loads[1]}")
    print("                                   min /  median /    max")
    rows = [("plain process pool wall (s)", "plain"), ("prunetune sweep wall (s)", "sweep"),
            ("ratio sweep/plain", "ratio"), ("per-trial, plain pool (s)", "pool_trial"),
            ("per-trial, sweep (s)", "sweep_trial"), ("per-trial ratio sweep/plain", "trial_ratio"),
            ("fixed cost, plain pool (s)", "pool_fixed"), ("fixed cost, sweep (s)", "fixed")]
    for label, key in rows:
        print(f"{label:32s} {_mmm([r[key] for r in results])}")
    print("sweep fixed cost by part (s; ray_start runs beside mlflow/base, ray_wait is what the driver waited; "
          "ray_stop runs beside the front where ray_stop_wait is given, what the driver waited for it then):")
    for part in results[0]["parts"]:
        print(f"  {part:30s} {_mmm([r['parts'][part] for r in results])}")
    print("CPU seconds, whole run (the sweep's trial processes include each worker's start-up; the pool's"
          " trials do not):")
    print(f"  {'plain pool: the trials':30s} {_mmm([r['pool_trials_cpu'] for r in results])}")
    for role, label in (("trials", "the trial processes"), ("driver", "the driver"), ("ray", "Ray's own processes"),
                        ("other", "other new processes")):
        print(f"  {'sweep: ' + label:30s} {_mmm([r['cpu'].get(role, 0.0) for r in results])}")
    print("first trial on each worker (s):", [[round(x, 1) for x in r["first_trials"]] for r in results])
    print("trials finished per sweep:", [r["finished"] for r in results])
    if "no_models" in results[0]:
        print("\nthe same sweep without a pt2 MLflow model per trial (run right after, each repeat):")
        for label, key in rows[1:3] + rows[4:6] + rows[7:]:
            print(f"{label:32s} {_mmm([r['no_models'][key] for r in results])}")
    if "other" in results[0]:
        print(f"\nthe same sweep from {args.compare_with} (run right after, each repeat):")
        for label, key in rows[1:3] + rows[4:6] + rows[7:]:
            print(f"{label:32s} {_mmm([r['other'][key] for r in results])}")
        for part in results[0]["other"]["parts"]:
            print(f"  {part:30s} {_mmm([r['other']['parts'][part] for r in results])}")
        print("this / other, sweep wall:      ", _mmm([r["sweep"] / r["other"]["sweep"] for r in results]))
        print("this - other, fixed cost (s):  ", _mmm([r["fixed"] - r["other"]["fixed"] for r in results]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=20, help="fine-tune epochs per trial (~0.7 s each on digits)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-with", metavar="DIR", help="another checkout whose sweep runs beside this one's")
    ap.add_argument("--without-models", action="store_true",
                    help="also run the sweep without its per-trial pt2 MLflow models (what they cost)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[1:], args.child[0])

    from search.config import load_config
    from search.sweep import settings_from_config
    from trainables.base_model import ensure_base_model

    root = Path(tempfile.mkdtemp(prefix="prunetune-bench-"))
    settings = settings_from_config(load_config("configs/quickstart.yaml", _overrides(args, root, 0)))
    ensure_base_model(settings)
    base_root = Path(settings.base_dir)
    bases_before = sorted(p.name for p in base_root.iterdir() if not p.name.startswith("."))
    load_before = os.getloadavg()
    results = []
    for r in range(args.repeats):
        results.append(one_repeat(args, settings, root, r))
        print(f"repeat {r}: load {os.getloadavg()[0]:.2f}, " + json.dumps(results[-1]), flush=True)
    loads = (tuple(round(x, 2) for x in load_before), tuple(round(x, 2) for x in os.getloadavg()))
    bases_after = sorted(p.name for p in base_root.iterdir() if not p.name.startswith("."))
    report(args, results, loads)
    print(f"base models trained by the sweeps: {len(bases_after) - len(bases_before)}")


if __name__ == "__main__":
    main()
