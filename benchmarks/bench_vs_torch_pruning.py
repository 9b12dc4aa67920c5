"""prunetune against a hand-built Torch-Pruning + Optuna search, same task, same budget, same dense base.

    pip install -e '.[bench]'          # torch-pruning
    python benchmarks/bench_vs_torch_pruning.py [--seeds 0 1] [--config configs/quickstart.yaml]
    python benchmarks/bench_vs_torch_pruning.py --seeds 0 --set num_trials=4 --set finetune.epochs=1  # smoke run
    python benchmarks/bench_vs_torch_pruning.py --seeds 0 1 2 3 --matched-time   # + the peer given prunetune's wall time

For each seed, in a fresh temporary folder:

1. The dense base model is trained once (``ensure_base_model``, the sweep's own cache under
   ``storage_path/base_models/<hash>/``); its time is reported and is in neither side's wall time.
2. prunetune: ``prunetune run CONFIG --set seed=S --set storage_path=... --set tracking_uri=sqlite:///...``
   as a subprocess (it reuses that cached base); its finished trials (accuracy, MACs) are read from
   the sweep's MLflow records (``search.fronts.sweep_points``).
3. The peer (``benchmarks/tp_peer.py``): an Optuna multi-objective study (TPE, seeded; maximise val
   accuracy, minimise MACs) over Torch-Pruning's ``MetaPruner`` with importance
   {L1 (MagnitudeImportance p=1), BN scale, group L2, LAMP, random} x pruning ratio [0.2, 0.8] x
   global/local ranking, as many trials as the sweep's ``num_trials``. Each trial loads the same
   ``weights.pt`` the sweep's trials load (its SHA-256 is printed), prunes, fine-tunes with the config's
   ``finetune`` section (SGD, momentum, weight decay, cosine schedule, batch size, epochs) and
   evaluates on the same validation split (``trainables.workspace.load_data``). Our option-A
   ``ChannelPadShortcut`` is handled by a customized Torch-Pruning pruner (see tp_peer.py), not ignored;
   the script first checks that pruning through it gives exactly the dense model with those channels zeroed.

Both sides use both CPU cores: the sweep its ``max_concurrent_trials`` trials of one CPU each; the
peer as many worker processes (one torch thread each), asking Optuna for a new trial as one ends.
MACs come from the same counter (``methods.cost.profile``, batch 1) on both sides.

Printed per seed and side: hypervolume / dense MACs (reference: accuracy 0, dense MACs;
``search.pareto.hypervolume``), the cheapest model reached (fraction of dense MACs), the best val
accuracy at <= 10 / 20 / 30 % of dense MACs, wall time, trials that removed nothing, failed trials.

``--matched-time`` adds a third side, per second of compute: the peer again (same seed, same
base), asking for new trials until its wall time reaches prunetune's for that seed (the trials
running then finish), so both searches had the same machine for the same time.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parent.parent
BUDGETS = (0.10, 0.20, 0.30)
MATCHED = "peer (same time)"
PEER_SPACE = {"importance": ["l1", "bn_scale", "group_l2", "lamp", "random"], "ratio": (0.2, 0.8),
              "global": [False, True]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both sides (e.g. finetune.epochs=1); repeatable")
    ap.add_argument("--keep", action="store_true", help="keep each seed's temporary folder (its path is printed)")
    ap.add_argument("--matched-time", action="store_true",
                    help="also run the peer for as long as prunetune's sweep took (as many trials as fit)")
    return ap.parse_args(argv)


def overrides_for(seed: int, root: Path, extra) -> list[str]:
    return [f"seed={seed}", f"storage_path={root / 'ray_results'}", f"tracking_uri=sqlite:///{root / 'mlflow.db'}",
            *extra]


def summarise(points, dense_macs: float, failed: int, wall_s: float) -> dict:
    """``points``: [(accuracy, macs)] of the finished trials."""
    from search.pareto import hypervolume

    finite = [(a, m) for a, m in points if math.isfinite(a) and math.isfinite(m)]
    hv = hypervolume(finite, (0.0, dense_macs), ("max", "min")) / dense_macs if finite else 0.0
    best = {b: max((a for a, m in finite if m <= b * dense_macs), default=None) for b in BUDGETS}
    return {"finished": len(finite), "failed": failed, "hv": hv,
            "cheapest": min((m for _, m in finite), default=math.nan) / dense_macs, "best": best,
            "wall_s": wall_s, "removed_nothing": sum(m >= dense_macs for _, m in finite)}


class SweepResult(NamedTuple):
    points: list  # [(accuracy, macs)] of the finished trials
    failed: int
    wall_s: float
    rows: list  # [(method, accuracy, macs)]
    dense_macs: float  # the sweep's own count (its MLflow parent run)


def run_prunetune(config: str, overrides, root: Path, *, code: Path = REPO) -> SweepResult:
    """``prunetune run CONFIG`` with ``code``'s packages first on PYTHONPATH, its log in ``root``;
    its finished trials read back from its MLflow records."""
    from mlflow.tracking import MlflowClient

    from search.fronts import sweep_points

    cmd = [sys.executable, "-m", "search.cli", "run", config]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])))
    log = root / "prunetune.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        sys.exit(f"prunetune run exited {rc}; its log: {log}\n{text[-3000:]}")
    parent = re.search(r"MLflow parent run: (\w+)", text).group(1)
    failed = int(re.search(r"failed: (\d+)", text).group(1))
    tracking = next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking_uri="))
    client = MlflowClient(tracking)
    pts = sweep_points(client, parent)
    return SweepResult([(p.accuracy, p.macs) for p in pts], failed, wall, [(p.method, p.accuracy, p.macs) for p in pts],
                       float(client.get_run(parent).data.metrics["dense_macs"]))


def run_peer(base_dir: Path, settings, trials: int | None, workers: int, seed: int,
             seconds: float | None = None) -> tuple[list, int, float, list]:
    """The Optuna + Torch-Pruning study: ``trials`` trials, or (``trials`` None) new trials until
    ``seconds`` have passed; returns what ``run_prunetune`` does."""
    import optuna

    from tp_peer import run_peer_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=seed))
    rows, points, failed = [], [], 0
    import multiprocessing

    # spawn: a forked child of this torch-using process could inherit a busy OpenMP pool
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running, asked = {}, 0

        def more() -> bool:
            return asked < trials if trials is not None else time.perf_counter() - t0 < seconds

        while more() or running:
            while more() and len(running) < workers:
                trial = study.ask()
                params = {"importance": trial.suggest_categorical("importance", PEER_SPACE["importance"]),
                          "ratio": trial.suggest_float("ratio", *PEER_SPACE["ratio"]),
                          "global": trial.suggest_categorical("global", PEER_SPACE["global"])}
                running[pool.submit(run_peer_trial, str(base_dir), settings, params)] = (trial, params)
                asked += 1
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                trial, params = running.pop(fut)
                result = fut.result()
                label = f"{params['importance']} {'global' if params['global'] else 'local'} {params['ratio']:.2f}"
                if "failed" in result:
                    failed += 1
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    print(f"  peer trial {trial.number} ({label}) failed: {result['failed']}", flush=True)
                    continue
                study.tell(trial, [result["accuracy"], result["macs"]])
                points.append((result["accuracy"], result["macs"]))
                rows.append((label, result["accuracy"], result["macs"]))
    return points, failed, time.perf_counter() - t0, rows


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_seed(args, seed: int) -> dict:
    from methods.cost import profile
    from search.config import load_config
    from search.sweep import settings_from_config
    from trainables.base_model import base_model_dir, build_model, ensure_base_model
    from trainables.workspace import load_data

    root = Path(tempfile.mkdtemp(prefix=f"bench-vs-tp-seed{seed}-"))
    overrides = overrides_for(seed, root, args.set)
    cfg = load_config(args.config, overrides)
    settings = settings_from_config(cfg)
    t0 = time.perf_counter()
    ensure_base_model(settings)
    base_s = time.perf_counter() - t0
    base_dir = Path(base_model_dir(settings))
    weights_hash = sha256(base_dir / "weights.pt")
    shape = tuple(load_data(settings).input_shape)
    dense_macs = float(profile(build_model(settings), shape).macs)
    print(f"\n== seed {seed}: {cfg.model} on {cfg.dataset}, {cfg.num_trials} trials each, "
          f"{cfg.max_concurrent_trials} at a time; folder {root}", flush=True)
    print(f"dense base {base_dir.name}: weights.pt sha256 {weights_hash[:16]}..., trained in {base_s:.1f}s "
          f"(in neither wall time); dense MACs {dense_macs / 1e6:.2f} M", flush=True)

    pt_points, pt_failed, pt_wall, pt_rows, _ = run_prunetune(args.config, overrides, root)
    bases = sorted(p.name for p in (root / "ray_results" / "base_models").iterdir() if not p.name.startswith("."))
    if bases != [base_dir.name] or sha256(base_dir / "weights.pt") != weights_hash:
        sys.exit(f"the sweep did not reuse the one dense base: base_models holds {bases}")
    print(f"prunetune: {len(pt_points)} trials finished in {pt_wall:.1f}s (base reused: {bases})", flush=True)

    peer_points, peer_failed, peer_wall, peer_rows = run_peer(base_dir, settings, cfg.num_trials,
                                                              cfg.max_concurrent_trials, seed)
    print(f"peer: {len(peer_points)} trials finished in {peer_wall:.1f}s", flush=True)
    sides = {"prunetune": summarise(pt_points, dense_macs, pt_failed, pt_wall),
             "peer": summarise(peer_points, dense_macs, peer_failed, peer_wall)}
    listed_rows = [("prunetune", pt_rows), ("peer", peer_rows)]
    if args.matched_time:
        m_points, m_failed, m_wall, m_rows = run_peer(base_dir, settings, None, cfg.max_concurrent_trials, seed,
                                                      seconds=pt_wall)
        print(f"peer, prunetune's wall time: {len(m_points)} trials finished in {m_wall:.1f}s", flush=True)
        sides[MATCHED] = summarise(m_points, dense_macs, m_failed, m_wall)
        listed_rows.append((MATCHED, m_rows))
    for side, rows in listed_rows:
        listed = ", ".join(f"{name} {acc:.3f}@{macs / dense_macs:.1%}" for name, acc, macs in sorted(rows, key=lambda r: r[2]))
        print(f"  {side} trials (val accuracy @ MACs / dense): {listed}")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return sides


def print_table(results: dict) -> None:
    seeds = list(results)
    cols = [(s, side) for s in seeds for side in ("prunetune", "peer", MATCHED) if side in results[s]]

    def fmt_best(v):
        return "none" if v is None else f"{v:.3f}"

    print("\n" + " | ".join(["(reference: accuracy 0, dense MACs)"] + [f"{side} seed {s}" for s, side in cols]))
    lines = [("hypervolume / dense MACs", lambda r: f"{r['hv']:.3f}"),
             ("cheapest model reached", lambda r: f"{r['cheapest']:.1%} of dense MACs"),
             *[(f"best val accuracy at <= {b:.0%} MACs", (lambda b: lambda r: fmt_best(r["best"][b]))(b)) for b in BUDGETS],
             ("wall time (base excluded)", lambda r: f"{r['wall_s']:.0f} s"),
             ("trials finished / failed", lambda r: f"{r['finished']} / {r['failed']}"),
             ("trials that removed nothing", lambda r: str(r["removed_nothing"]))]
    for name, f in lines:
        print(" | ".join([name] + [f(results[s][side]) for s, side in cols]))
    hv_ok = all(results[s]["prunetune"]["hv"] >= results[s]["peer"]["hv"] for s in seeds)
    acc_ok = all((results[s]["peer"]["best"][b] is None) or (results[s]["prunetune"]["best"][b] or 0) >= results[s]["peer"]["best"][b]
                 for s in seeds for b in BUDGETS)
    print(f"goal: prunetune hypervolume >= peer's on every seed: {'met' if hv_ok else 'NOT met'}; "
          f"best accuracy at every budget >= peer's: {'met' if acc_ok else 'NOT met'}")
    matched = [s for s in seeds if MATCHED in results[s]]
    if matched:
        wins = sum(results[s]["prunetune"]["hv"] >= results[s][MATCHED]["hv"] for s in matched)
        print(f"per second of compute: prunetune hypervolume >= the time-matched peer's on {wins} of {len(matched)} seeds")


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tp_peer
    from tp_peer import check_shortcut_pruner

    print(f"self-check: Torch-Pruning through ChannelPadShortcut == zeroed dense model "
          f"(max output difference {check_shortcut_pruner():.1e})", flush=True)
    t0 = time.perf_counter()
    results = {}
    for seed in args.seeds:
        results[seed] = one_seed(args, seed)
        print_table({seed: results[seed]})  # so a seed's numbers are out even if a later one breaks
    if len(results) > 1:
        print_table(results)
    print(f"whole benchmark: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
