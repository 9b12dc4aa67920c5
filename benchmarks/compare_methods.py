"""Accuracy of the seed methods against l1_norm and random at the same MACs, on digits ResNet-20.

    python benchmarks/compare_methods.py [--methods ista csgd thinet scratch] [--seeds 0 1 2]
        [--base-epochs 15] [--finetune-epochs 5] [--set ista.rho=0.003 ...]

Each seed method runs a full trial (its phase, surgery, the same fine-tune budget). Its MACs
reduction is then matched by l1_norm and random: their prune_ratio is bisected on the real pruned
model until the MACs agree within 1%, and they run the same trial. ``scratch`` trains its pruned
net from fresh weights for base+finetune epochs (its paper's protocol), the others fine-tune.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from collections import defaultdict

import yaml

from methods import PruneContext, create_method
from methods.cost import profile
from trainables.base_model import base_model_dir, ensure_base_model
from trainables.model_io import load_model
from trainables.settings import TrainSettings, TrialSettings
from trainables.trial import run_trial

# Hyperparameters aimed at ~50% MACs removed on digits ResNet-20 (override with --set).
DEFAULTS = {
    "ista": {"phase_epochs": 5},
    "csgd": {"prune_ratio": 0.5, "phase_epochs": 5},
    "thinet": {"prune_ratio": 0.5},
    "scratch": {"prune_ratio": 0.5, "phase_epochs": 2},
    "manidp": {"prune_ratio": 0.5, "phase_epochs": 5},
}


def matching_ratio(method: str, dense, target_reduction: float, input_shape) -> float:
    dense_macs = profile(dense, input_shape).macs
    lo, hi = 0.0, 0.95
    for _ in range(20):
        mid = (lo + hi) / 2
        pruned = create_method(method, prune_ratio=max(mid, 0.05)).prune(dense, PruneContext(input_shape))
        reduction = 1 - profile(pruned, input_shape).macs / dense_macs
        if abs(reduction - target_reduction) < 0.01:
            return max(mid, 0.05)
        lo, hi = (mid, hi) if reduction < target_reduction else (lo, mid)
    return max((lo + hi) / 2, 0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["ista", "csgd", "thinet", "scratch"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hparams = {m: dict(DEFAULTS.get(m, {})) for m in args.methods}
    for item in args.set:
        key, value = item.split("=", 1)
        m, p = key.split(".", 1)
        hparams.setdefault(m, {})[p] = yaml.safe_load(value)

    rows = defaultdict(list)
    root = tempfile.mkdtemp(prefix="prunetune-compare-")
    for seed in args.seeds:
        settings = TrialSettings(seed=seed, base=TrainSettings(epochs=args.base_epochs),
                                 finetune=TrainSettings(epochs=args.finetune_epochs, lr=0.01), base_dir=root)
        ensure_base_model(settings)
        dense, _ = load_model(base_model_dir(settings))
        for m in args.methods:
            out = run_trial(settings, m, hparams[m], lambda metrics, save: None)
            reduction = 1 - out["macs"] / out["dense_macs"]
            rows[m].append((reduction, out["accuracy"], out["test_accuracy"]))
            ratio = matching_ratio("l1_norm", dense, reduction, (1, 8, 8))
            for baseline in ("l1_norm", "random"):
                b = run_trial(settings, baseline, {"prune_ratio": ratio}, lambda metrics, save: None)
                rows[f"{baseline} @ {m}"].append((1 - b["macs"] / b["dense_macs"], b["accuracy"], b["test_accuracy"]))
            print(f"seed {seed} {m}: done", flush=True)

    print(f"\ndigits ResNet-20, base {args.base_epochs} epochs, fine-tune {args.finetune_epochs} epochs, "
          f"seeds {args.seeds}; hyperparameters {hparams}")
    print(f"{'method':<20} {'MACs removed':>12} {'val acc':>8} {'test acc':>9}")
    for name, vals in rows.items():
        red = statistics.mean(v[0] for v in vals)
        acc = statistics.mean(v[1] for v in vals)
        test = statistics.mean(v[2] for v in vals)
        print(f"{name:<20} {red:>12.1%} {acc:>8.4f} {test:>9.4f}")


if __name__ == "__main__":
    main()
