"""The quickstart sweep's front for several seeds, with this checkout's code or another's (``--code``),
to compare two versions of the search (sampler, methods) on the same task.

    python benchmarks/bench_sweep_fronts.py --seeds 0 1 2 3 [--code DIR] [--set KEY=VALUE ...]

For each seed: ``prunetune run configs/quickstart.yaml --set seed=S`` as a subprocess with
``PYTHONPATH=CODE`` (default: this checkout), in a temporary folder whose dense base every seed
reuses (trained by the first sweep); prints the hypervolume / dense MACs (reference: accuracy 0,
dense MACs), the wall time, and every finished trial as ``method accuracy@MACs fraction``, cheapest
first. Hypervolumes do not depend on the machine's load, but a trial that finishes in another order
changes TPE's later suggestions, so a loaded run may differ from a quiet one after the start-up.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
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
    env = dict(os.environ, PYTHONPATH=str(code), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    sys.path.insert(0, str(code))
    from mlflow.tracking import MlflowClient

    from search.fronts import sweep_points

    hvs = []
    for seed in args.seeds:
        db = root / f"seed{seed}.db"
        cmd = [sys.executable, "-m", "search.cli", "run", str(code / "configs" / "quickstart.yaml"), "--set", f"seed={seed}",
               "--set", f"storage_path={root / 'ray_results'}", "--set", f"tracking_uri=sqlite:///{db}"]
        for o in args.set:
            cmd += ["--set", o]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"seed {seed}: prunetune run exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
        parent = re.search(r"MLflow parent run: (\w+)", out.stdout).group(1)
        client = MlflowClient(f"sqlite:///{db}")
        dense = client.get_run(parent).data.metrics["dense_macs"]
        hv = float(re.search(r"hypervolume: ([\d.e+]+)", out.stdout).group(1)) / dense
        hvs.append(hv)
        points = sorted(sweep_points(client, parent), key=lambda p: p.macs)
        listed = ", ".join(f"{p.method} {p.accuracy:.3f}@{p.macs / dense:.1%}" for p in points)
        print(f"seed {seed}: hypervolume / dense MACs {hv:.3f}, wall {time.perf_counter() - t0:.0f} s :: {listed}", flush=True)
    print(f"code {code}: hypervolume / dense MACs min / median / max / mean {min(hvs):.3f} / "
          f"{statistics.median(hvs):.3f} / {max(hvs):.3f} / {statistics.mean(hvs):.3f}")


if __name__ == "__main__":
    main()
