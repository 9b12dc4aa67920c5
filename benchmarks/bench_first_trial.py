"""The first trial on a fresh worker: CPU seconds from a new Python process to the trial's first
report, part by part, and the driver's preflight, this checkout against another side by side.

    python benchmarks/bench_first_trial.py [--repeats 5] [--compare-with OTHER_CHECKOUT] [--method l1_norm]

Each repeat starts, per checkout, a fresh process (``python this --child``, ``PYTHONPATH`` = the
checkout) that does what a Ray Tune trial actor's process does before its first report: imports Ray
and Ray Tune (the actor's class lives there; Ray Tune pulls in pandas), imports the trainable
(``trainables.tune_trainable``: torch), takes one torch thread (a 1-CPU trial), starts the trial
(``trainables.trial._Trial.start``: data, the reference model and its MACs, the dense base, the
method, the optimizer) and runs its cut and first epoch, up to the report. Ray's own worker start
(``default_worker.py``, its connection to the raylet) and the actor's calls are not in it.

Process CPU time (``time.process_time``, all threads) per part, robust to the shared machine's
load; wall time beside it. Min / median / max over repeats; the checkouts alternate which goes
first. The dense base is trained once beforehand (digits ResNet-20, one epoch: the first trial's
start-up does not depend on it) and shared; this checkout's driver-side data cache is written
beforehand, as a sweep's driver does before its trials start. The first report's metrics of the
two checkouts must be equal (the same trial, bit for bit), else the benchmark fails.

The driver's preflight: a fresh process imports what ``prunetune run`` imports before it
(``search.config``, ``search.sweep``) and runs ``search.preflight.preflight`` on
``configs/quickstart.yaml`` (all eight methods) with ``storage_path`` the benchmark's folder, where
this checkout's data cache is (as for every sweep after the first on one storage path).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_CPU, T_WALL = time.process_time(), time.perf_counter()  # the interpreter's own start is in T_CPU
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parents[1]
PARTS = ("interpreter", "ray + ray.tune", "trainable module", "trial start", "cut + first epoch")
WATCHED = ("sklearn", "scipy", "torch._dynamo", "pandas")


def _settings(base_dir: str):
    from trainables.settings import TrainSettings, TrialSettings

    return TrialSettings(model="resnet20", dataset="digits", seed=0, use_gpu=False,
                         base=TrainSettings(epochs=1, lr=0.1, batch_size=64),
                         finetune=TrainSettings(epochs=3, lr=0.01, batch_size=64), base_dir=base_dir)


def child(base_dir: str, method: str) -> None:
    marks = [("interpreter", T_CPU, 0.0)]
    c0, w0 = T_CPU, T_WALL

    def mark(part: str) -> None:
        nonlocal c0, w0
        c, w = time.process_time(), time.perf_counter()
        marks.append((part, c - c0, w - w0))
        c0, w0 = c, w

    import ray
    import ray.tune  # noqa: F401
    mark("ray + ray.tune")
    import trainables.tune_trainable  # noqa: F401
    mark("trainable module")
    import torch

    torch.set_num_threads(1)
    from trainables.trial import _Trial

    reports = []
    trial = _Trial.start(_settings(base_dir), method, {"prune_ratio": 0.5} if method != "scratch" else {},
                         lambda metrics, save: reports.append(metrics), None)
    mark("trial start")
    if not trial.pruned and trial.plan.phase_epochs == 0:
        trial.prune()
    while not reports:
        trial.run_epoch()
    mark("cut + first epoch")
    metrics = {k: v for k, v in reports[0].items() if isinstance(v, (int, float)) and k != "epoch_seconds"}
    print(json.dumps({"parts": {p: [c, w] for p, c, w in marks}, "metrics": metrics,
                      "imported": [m for m in WATCHED if m in sys.modules],
                      "trainables": str(Path(trainables.tune_trainable.__file__).resolve().parents[1])}))


def child_preflight(root: str) -> None:
    from search.config import load_config
    from search.preflight import preflight
    import search.sweep  # noqa: F401  (what `prunetune run` has imported by then)

    cfg = load_config("configs/quickstart.yaml", [f"storage_path={root}", f"tracking_uri=sqlite:///{root}/mlflow.db"])
    c, w = time.process_time(), time.perf_counter()
    preflight(cfg)
    c, w = time.process_time() - c, time.perf_counter() - w
    import search.preflight as module

    print(json.dumps({"cpu": c, "wall": w, "imported": [m for m in WATCHED if m in sys.modules],
                      "trainables": str(Path(module.__file__).resolve().parents[1])}))


def _run_child(tree: Path, base_dir: str, method: str, preflight: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = ["--child-preflight", str(Path(base_dir).parent)] if preflight else ["--child", base_dir, "--method", method]
    out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        sys.exit(f"child in {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(result["trainables"]) != tree:
        sys.exit(f"the child for {tree} ran the trainables of {result['trainables']}")
    return result


def _prepare(tree: Path, base_dir: str) -> None:
    """The dense base (once) and, where the checkout has it, the driver's data cache."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); from bench_first_trial import _settings; "
            "from trainables.base_model import ensure_base_model; s = _settings(sys.argv[1]); ensure_base_model(s)\n"
            "try:\n    from trainables.workspace import keep_data\nexcept ImportError:\n    pass\n"
            "else:\n    keep_data(s)\n")
    subprocess.run([sys.executable, "-c", code, base_dir], env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree,
                   check=True)


def _mmm(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def report(sides: dict[str, list[dict]], preflights: dict[str, list[dict]], loads) -> None:
    names = list(sides)
    print(f"\nload average before {loads[0]}, after {loads[1]}; {len(sides[names[0]])} repeats; "
          "CPU s, min / median / max")
    print("| part | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for part in (*PARTS, "total"):
        cells = []
        for name in names:
            runs = sides[name]
            cpu = [sum(r["parts"][p][0] for p in PARTS) if part == "total" else r["parts"][part][0] for r in runs]
            cells.append(_mmm(cpu))
        print(f"| {part} | " + " | ".join(cells) + " |")
    walls = [_mmm([sum(r["parts"][p][1] for p in PARTS[1:]) for r in sides[n]]) for n in names]
    print("| wall, import of Ray to first report | " + " | ".join(walls) + " |")
    print("| driver: preflight, CPU (quickstart config) | " +
          " | ".join(_mmm([r["cpu"] for r in preflights[n]]) for n in names) + " |")
    print("| driver: preflight, wall | " + " | ".join(_mmm([r["wall"] for r in preflights[n]]) for n in names) + " |")
    for name in names:
        print(f"{name}: the trial imported {sorted({m for r in sides[name] for m in r['imported']})}; the preflight "
              f"{sorted({m for r in preflights[name] for m in r['imported']})}")
    if len(names) == 2:
        a, b = ([sum(r["parts"][p][0] for p in PARTS) for r in sides[n]] for n in names)
        print(f"total CPU, {names[0]} / {names[1]}, median of per-repeat ratios: "
              f"{statistics.median(x / y for x, y in zip(a, b)):.3f}; difference of medians "
              f"{statistics.median(a) - statistics.median(b):+.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare-with", type=Path, help="another checkout, run side by side")
    parser.add_argument("--method", default="l1_norm")
    parser.add_argument("--child", metavar="BASE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--child-preflight", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.method)
    if args.child_preflight:
        return child_preflight(args.child_preflight)
    trees = {"this checkout": HERE}
    if args.compare_with:
        trees[f"other ({args.compare_with})"] = args.compare_with.resolve()
    base_dir = str(Path(tempfile.mkdtemp(prefix="prunetune-first-")) / "base_models")
    _prepare(HERE, base_dir)
    loads_before = tuple(round(x, 2) for x in os.getloadavg())
    sides: dict[str, list[dict]] = {name: [] for name in trees}
    preflights: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.repeats):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            sides[name].append(_run_child(trees[name], base_dir, args.method))
            preflights[name].append(_run_child(trees[name], base_dir, args.method, preflight=True))
        print(f"repeat {r}: load {os.getloadavg()[0]:.2f}; total CPU " + ", ".join(
            f"{n} {sum(sides[n][-1]['parts'][p][0] for p in PARTS):.2f}" for n in trees), flush=True)
    firsts = {json.dumps(runs[0]["metrics"], sort_keys=True) for runs in sides.values()}
    if len({json.dumps(r["metrics"], sort_keys=True) for runs in sides.values() for r in runs}) != 1:
        sys.exit(f"the first reports differ: {sorted(firsts)}")
    report(sides, preflights, (loads_before, tuple(round(x, 2) for x in os.getloadavg())))
    print(f"first report equal in every run: {next(iter(firsts))}")


if __name__ == "__main__":
    main()
