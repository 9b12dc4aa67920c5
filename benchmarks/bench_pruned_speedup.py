"""Real speedup of a physically pruned ResNet-56 against the dense model and a masked copy.

    python benchmarks/bench_pruned_speedup.py [--batch 64] [--ratio 0.5] [--rounds 7] [--device cuda]

On CUDA the models run as the trials run them: channels_last inputs under bf16 autocast, timed
with a device synchronise around each forward pass.

The three models are timed interleaved (dense, masked, pruned, dense, ...) in one process, so
machine noise hits all three alike; each round takes the median of several forward passes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

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
    cuda = x.is_cuda
    times = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="resnet56", help="any trainables.models name, e.g. resnet50")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--compile", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                    help="time torch.compile'd models (mode; reduce-overhead adds CUDA graphs)")
    args = ap.parse_args()

    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    dense = create_model(args.model, args.classes).eval()
    pruned = create_method("l1_norm", prune_ratio=args.ratio).prune(dense, PruneContext(shape)).eval()

    def zero_smallest(model):
        # The mask baseline: zero the same number of filters in place; shapes stay dense.
        for name, m in model.named_modules():
            if name.endswith("conv1") and name.startswith("layer"):
                k = int(round(m.out_channels * args.ratio))
                idx = m.weight.abs().flatten(1).sum(1).argsort()[:k]
                m.weight.data[idx] = 0

    masked = masked_copy(dense, zero_smallest)
    dense_cost, pruned_cost = profile(dense, shape), profile(pruned, shape)
    x = torch.randn(args.batch, *shape)
    if args.device == "cuda":
        dense, masked, pruned = (m.to("cuda", memory_format=torch.channels_last) for m in (dense, masked, pruned))
        x = x.to("cuda").contiguous(memory_format=torch.channels_last)
    if args.compile:
        dense, masked, pruned = (torch.compile(m, mode=args.compile) for m in (dense, masked, pruned))
    for m in (dense, masked, pruned):  # warm-up (and compilation, with --compile)
        time_forward(m, x, 3)
    rounds = {"dense": [], "masked": [], "pruned": []}
    for _ in range(args.rounds):
        for name, m in (("dense", dense), ("masked", masked), ("pruned", pruned)):
            rounds[name].append(time_forward(m, x, args.repeats))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    where = torch.cuda.get_device_name() + ", bf16 autocast" if args.device == "cuda" else f"CPU, torch threads {torch.get_num_threads()}"
    mode = f", torch.compile {args.compile}" if args.compile else ", eager"
    print(f"{args.model}, 3x{args.image_size}x{args.image_size}, batch {args.batch}, {where}{mode}, l1_norm prune_ratio {args.ratio}")
    print(f"MACs dense {dense_cost.macs/1e6:.2f} M -> pruned {pruned_cost.macs/1e6:.2f} M "
          f"({1 - pruned_cost.macs/dense_cost.macs:.1%} removed, MACs ratio {dense_cost.macs/pruned_cost.macs:.2f}x)")
    print(f"params dense {dense_cost.params/1e6:.3f} M -> pruned {pruned_cost.params/1e6:.3f} M")
    print(f"{'model':<8} {'median ms/batch':>16} {'speedup vs dense':>17}")
    for k in ("dense", "masked", "pruned"):
        print(f"{k:<8} {med[k]*1000:>16.2f} {med['dense']/med[k]:>16.2f}x")


if __name__ == "__main__":
    main()
