"""What ThiNet's per-layer recovery fine-tune costs and buys on the quickstart task.

    python benchmarks/bench_thinet_recovery.py --steps 0 10 25 50 --seeds 0 1 2 --ratios 0.9 0.7
    python benchmarks/bench_thinet_recovery.py --steps 50 --schedule every     # the schedule before issue 12

One whole trial (``trainables.trial.run_trial``: digits ResNet-20, dense base of 10 epochs per
seed, 3 fine-tune epochs, ``scope: all``, ``samples_per_layer`` 512) per seed x ``prune_ratio`` x
allocation (uniform, global) x ``finetune_steps``, one torch thread (as a trial with one CPU).
Prints one JSON line per trial (its process CPU seconds, wall seconds, validation and test
accuracy, MACs), then the mean per setting over the seeds. ``--schedule every`` runs a recovery
after every cut, as ThiNet did before issue 12; ``last-skipped`` (the default) none after the last.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time

import torch

from methods.thinet import ThiNet
from trainables.base_model import ensure_base_model
from trainables.settings import TrainSettings, TrialSettings
from trainables.trial import run_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 10, 25, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7])
    ap.add_argument("--schedule", default="last-skipped", choices=("last-skipped", "every"))
    ap.add_argument("--base-dir", default=None, help="cache of dense bases (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ThiNet.recover_after_last = args.schedule == "every"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            settings = TrialSettings(
                model="resnet20", dataset="digits", seed=seed, base_dir=args.base_dir or tmp, use_gpu=False,
                base=TrainSettings(epochs=10, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64),
                finetune=TrainSettings(epochs=3, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64))
            ensure_base_model(settings)
            for ratio in args.ratios:
                for allocation in ("uniform", "global"):
                    for steps in args.steps:
                        hp = dict(prune_ratio=ratio, scope="all", allocation=allocation, samples_per_layer=512,
                                  finetune_steps=steps)
                        c0, t0 = time.process_time(), time.perf_counter()
                        out = run_trial(settings, "thinet", hp, lambda m, save: None)
                        row = dict(schedule=args.schedule, seed=seed, ratio=ratio, allocation=allocation, steps=steps,
                                   cpu=round(time.process_time() - c0, 2), wall=round(time.perf_counter() - t0, 2),
                                   val=out["accuracy"], test=out["test_accuracy"], macs=out["macs"])
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["ratio"], r["allocation"], r["steps"])].append(r)
    print(f"\nmeans over seeds {args.seeds} (schedule {args.schedule}): ratio allocation steps | CPU s | val | test")
    for (ratio, allocation, steps), rs in sorted(groups.items()):
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("cpu", "val", "test")}
        print(f"{ratio} {allocation} {steps} | {mean['cpu']:.2f} | {mean['val']:.4f} | {mean['test']:.4f}")


if __name__ == "__main__":
    main()
