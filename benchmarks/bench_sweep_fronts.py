"""The quickstart sweep's front for several seeds, with this checkout's code or another's (``--code``),
to compare two versions of the search (sampler, methods) on the same task.

    python benchmarks/bench_sweep_fronts.py --seeds 0 1 2 3 [--code DIR] [--set KEY=VALUE ...]

For each seed: ``prunetune run configs/quickstart.yaml --set seed=S`` as a subprocess with
``PYTHONPATH=CODE`` (default: this checkout), in a temporary folder whose dense base every seed
reuses (trained by the first sweep); prints the hypervolume / dense MACs (reference: accuracy 0,
dense MACs), the best val accuracy at <= 10 / 20 / 30% of the dense MACs, the wall time, and every
finished trial as ``method accuracy@MACs fraction``, cheapest first. Hypervolumes do not depend on
the machine's load, but a trial that finishes in another order changes TPE's later suggestions, so
a loaded run may differ from a quiet one after the start-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--code", default=str(REPO), help="a checkout whose search/, methods/, trainables/ run the sweep")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    code = Path(args.code).resolve()
    root = Path(tempfile.mkdtemp(prefix="bench-fronts-"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(code))
    sys.path.insert(1, str(REPO / "benchmarks"))
    from bench_vs_torch_pruning import run_prunetune, summarise

    hvs = []
    for seed in args.seeds:
        seed_root = root / f"seed{seed}"
        seed_root.mkdir()
        overrides = [f"seed={seed}", f"storage_path={root / 'ray_results'}",
                     f"tracking_uri=sqlite:///{seed_root / 'mlflow.db'}", *args.set]
        sweep = run_prunetune(str(code / "configs" / "quickstart.yaml"), overrides, seed_root, code=code)
        summary = summarise(sweep.points, sweep.dense_macs, sweep.failed, sweep.wall_s)
        hvs.append(summary["hv"])
        best = ", ".join(f"<= {b:.0%}: {'none' if a is None else f'{a:.3f}'}" for b, a in summary["best"].items())
        listed = ", ".join(f"{m} {a:.3f}@{c / sweep.dense_macs:.1%}" for m, a, c in sorted(sweep.rows, key=lambda r: r[2]))
        print(f"seed {seed}: hypervolume / dense MACs {summary['hv']:.3f}, best val accuracy at {best}, "
              f"wall {sweep.wall_s:.0f} s :: {listed}", flush=True)
    print(f"code {code}: hypervolume / dense MACs min / median / max / mean {min(hvs):.3f} / "
          f"{statistics.median(hvs):.3f} / {max(hvs):.3f} / {statistics.mean(hvs):.3f}")


if __name__ == "__main__":
    main()
