"""Real CPU speedup of a physically pruned ResNet-56 against the dense model and a masked copy.

    python benchmarks/bench_pruned_speedup.py [--batch 64] [--ratio 0.5] [--rounds 7]

The three models are timed interleaved (dense, masked, pruned, dense, ...) in one process, so
machine noise hits all three alike; each round takes the median of several forward passes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from methods import PruneContext, create_method
from methods.cost import profile
from trainables.models import create_model


def masked_copy(dense, pruned_channels_fn):
    """Same shapes as dense, pruned channels zeroed: what mask-based pruning runs."""
    import copy

    masked = copy.deepcopy(dense)
    pruned_channels_fn(masked)
    return masked


def time_forward(model, x, repeats):
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    dense = create_model("resnet56", 10).eval()
    pruned = create_method("l1_norm", prune_ratio=args.ratio).prune(dense, PruneContext((3, 32, 32))).eval()

    def zero_smallest(model):
        # The mask baseline: zero the same number of filters in place; shapes stay dense.
        for name, m in model.named_modules():
            if name.endswith("conv1") and name.startswith("layer"):
                k = int(round(m.out_channels * args.ratio))
                idx = m.weight.abs().flatten(1).sum(1).argsort()[:k]
                m.weight.data[idx] = 0

    masked = masked_copy(dense, zero_smallest)
    dense_cost, pruned_cost = profile(dense, (3, 32, 32)), profile(pruned, (3, 32, 32))
    x = torch.randn(args.batch, 3, 32, 32)
    for m in (dense, masked, pruned):  # warm-up
        time_forward(m, x, 2)
    rounds = {"dense": [], "masked": [], "pruned": []}
    for _ in range(args.rounds):
        for name, m in (("dense", dense), ("masked", masked), ("pruned", pruned)):
            rounds[name].append(time_forward(m, x, args.repeats))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"resnet56, 3x32x32, batch {args.batch}, torch threads {torch.get_num_threads()}, l1_norm prune_ratio {args.ratio}")
    print(f"MACs dense {dense_cost.macs/1e6:.2f} M -> pruned {pruned_cost.macs/1e6:.2f} M "
          f"({1 - pruned_cost.macs/dense_cost.macs:.1%} removed, MACs ratio {dense_cost.macs/pruned_cost.macs:.2f}x)")
    print(f"params dense {dense_cost.params/1e6:.3f} M -> pruned {pruned_cost.params/1e6:.3f} M")
    print(f"{'model':<8} {'median ms/batch':>16} {'speedup vs dense':>17}")
    for k in ("dense", "masked", "pruned"):
        print(f"{k:<8} {med[k]*1000:>16.2f} {med['dense']/med[k]:>16.2f}x")


if __name__ == "__main__":
    main()
