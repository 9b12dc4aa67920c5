"""ThiNet's per-layer selection cost on CIFAR ResNet-56 and how it grows with the samples per layer.

For each ``samples_per_layer`` the full layer-by-layer schedule runs over the 27 block-internal
groups (cutting each to 50% as it goes, no fine-tune), timing per layer:

* capture: the forward passes over the calibration images (stopped at the consumer) plus the
  gathering of the sampled (image, position, filter) contributions,
* select: the greedy removal (Gram matrix + one O(C) update per removed channel),
* lstsq: the least-squares rescaling,
* cut: the surgery.

Random 3x32x32 inputs stand in for CIFAR images (the cost does not depend on their values).
The last column is the naive greedy (recomputing every candidate's error over all samples, as the
formula reads) on the same data, for comparison with the vectorised one.

    python benchmarks/bench_thinet_selection.py [--samples 256 1024 4096] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from methods import DependencyGraph, prune_group
from methods.selection import keep_count
from methods.thinet import calibration_inputs, least_squares_scale, sample_contributions, thinet_select
from trainables.models import create_model


def naive_greedy(contrib: torch.Tensor, n_keep: int) -> list[int]:
    x = contrib.double()
    removed: list[int] = []
    running = torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(x.shape[1] - n_keep):
        best, best_err = -1, float("inf")
        for c in range(x.shape[1]):
            if c in removed:
                continue
            err = float((running + x[:, c]).pow(2).sum())
            if err < best_err:
                best, best_err = c, err
        removed.append(best)
        running += x[:, best]
    return sorted(set(range(x.shape[1])) - set(removed))


def run_once(model, inputs, samples: int, naive: bool) -> dict[str, float]:
    model = copy.deepcopy(model)
    graph = DependencyGraph(model)
    gen = torch.Generator().manual_seed(0)
    t = {"capture": 0.0, "select": 0.0, "lstsq": 0.0, "cut": 0.0, "naive": 0.0, "layers": 0}
    for group in graph.prunable_groups():
        k = keep_count(group.size, 0.5)
        t0 = time.perf_counter()
        data = sample_contributions(model, group.consumers, group.size, inputs, samples, gen)
        t1 = time.perf_counter()
        keep = thinet_select(data.contrib, k)
        t2 = time.perf_counter()
        w = least_squares_scale(data.contrib, keep)
        t3 = time.perf_counter()
        if naive:
            assert naive_greedy(data.contrib, k) == keep.tolist()
        t4 = time.perf_counter()
        prune_group(graph, group, keep, scale=w)
        t5 = time.perf_counter()
        t["capture"] += t1 - t0
        t["select"] += t2 - t1
        t["lstsq"] += t3 - t2
        t["naive"] += t4 - t3
        t["cut"] += t5 - t4
        t["layers"] += 1
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive greedy column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("resnet56", 10).eval()
    need = max(args.samples)
    batches = [(torch.randn(args.batch, 3, 32, 32), torch.zeros(args.batch, dtype=torch.long))
               for _ in range(-(-need // 10 // args.batch))]
    print(f"ThiNet selection on resnet56 (27 internal groups, 50% kept), CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"{'samples':>8} {'images':>7} {'capture s':>10} {'select s':>9} {'lstsq s':>8} {'cut s':>7} "
          f"{'total s':>8} {'ms/layer':>9} {'naive greedy s':>15}")
    for samples in args.samples:
        inputs = calibration_inputs(batches, samples, torch.device("cpu"))
        runs = [run_once(model, inputs, samples, naive=not args.no_naive) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in ("capture", "select", "lstsq", "cut", "naive")}
        total = med["capture"] + med["select"] + med["lstsq"] + med["cut"]
        images = sum(int(x.shape[0]) for x in inputs)
        naive = "-" if args.no_naive else f"{med['naive']:.3f}"
        print(f"{samples:>8} {images:>7} {med['capture']:>10.3f} {med['select']:>9.3f} {med['lstsq']:>8.3f} "
              f"{med['cut']:>7.3f} {total:>8.3f} {1000 * total / runs[0]['layers']:>9.1f} {naive:>15}")


if __name__ == "__main__":
    main()
