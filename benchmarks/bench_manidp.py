"""ManiDP on CPU: batch-1 latency of the channel-skipping path against the dense model, and the
cost of a ManiDP training step against a plain SGD step.

    python benchmarks/bench_manidp.py [--model resnet56] [--eta 0.5] [--repeats 50] [--threads N]

Latency: a CIFAR ResNet at 3x32x32 (random weights, BN statistics calibrated on random images),
gated, with input-dependent gates and per-layer thresholds at the (1 - eta) keep rate of the mean
saliency, so about eta of each layer's channels are off per input. Three variants are timed side
by side, interleaved (one call of each in turn, on the same random image each round), medians
reported: the dense model, the masked gated model (what is exported), and ``skipping_forward``
(computes only active filters). MACs are per sample: dense from ``profile``, dynamic from
``average_macs`` over the timed images.

Training step: forward + loss + backward + SGD step on a batch of random CIFAR-sized images, the
dense model with plain cross-entropy against the gated model with ManiDP's extra loss (sparsity and
similarity terms), interleaved, medians.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from methods import create_method  # noqa: E402
from methods.cost import profile  # noqa: E402
from methods.manidp import (  # noqa: E402
    SkippingView, average_macs, mean_saliency, skipping_forward, thresholds_from_saliency,
)
from methods.manidp_gates import gate_model, named_gates, set_thresholds  # noqa: E402
from trainables.models import create_model  # noqa: E402
from helpers import calibrate_bn  # noqa: E402


def calibrated(name: str, shape: tuple[int, ...], n: int = 64) -> torch.nn.Module:
    return calibrate_bn(create_model(name, 10, in_channels=shape[0]), shape, n)


def gated_at(dense: torch.nn.Module, eta: float, shape: tuple[int, ...], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    gated = gate_model(copy.deepcopy(dense))
    for _, gate in named_gates(gated):  # input-dependent saliencies around 1
        torch.nn.init.normal_(gate.fc2.weight, std=0.1 / gate.fc2.in_features ** 0.5)
    gated.eval()
    calib = [torch.randn(32, *shape) for _ in range(2)]
    set_thresholds(gated, thresholds_from_saliency(mean_saliency(gated, calib), 1.0 - eta))
    return gated


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_latency(args) -> None:
    shape = (3, args.size, args.size)
    dense = calibrated(args.model, shape)
    gated = gated_at(dense, args.eta, shape, args.seed)
    images = [torch.randn(1, *shape) for _ in range(args.repeats)]
    view = SkippingView(gated)
    variants = {
        "dense": lambda x: dense(x),
        "masked (gated, exported form)": lambda x: gated(x),
        "skipping_forward": lambda x: skipping_forward(gated, x),
        "SkippingView (BN folded)": lambda x: view(x),
    }
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for x in images[: args.warmup]:
            for fn in variants.values():
                fn(x)
        for x in images:
            for name, fn in variants.items():
                times[name].append(timed(lambda: fn(x)))
    with torch.no_grad():
        check = images[0]
        err = max((skipping_forward(gated, check) - gated(check)).abs().max().item(),
                  (view(check) - gated(check)).abs().max().item())
    dense_macs = profile(dense, shape).macs
    dyn_macs = average_macs(gated, [torch.cat(images)], shape)
    macs = {name: dyn_macs for name in variants}
    macs["dense"] = dense_macs
    base = statistics.median(times["dense"])
    print(f"\nBatch-1 CPU latency: {args.model} 3x{args.size}x{args.size}, eta={args.eta}, threads={torch.get_num_threads()}, "
          f"{args.repeats} interleaved rounds (+{args.warmup} warm-up); max |skip - masked| = {err:.2e}")
    print(f"{'variant':32s} {'median ms':>10s} {'p25 ms':>8s} {'p75 ms':>8s} {'vs dense':>9s} {'MACs/sample':>13s} {'MACs vs dense':>13s}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"{name:32s} {med * 1e3:10.3f} {q[0] * 1e3:8.3f} {q[2] * 1e3:8.3f} {med / base:9.2f}x "
              f"{macs[name] / 1e6:12.2f}M {macs[name] / dense_macs:13.2f}")


def bench_training(args) -> None:
    shape = (3, 32, 32)
    dense = calibrated(args.train_model, shape)
    method = create_method("manidp", prune_ratio=args.eta)
    gated = method.prepare(copy.deepcopy(dense))
    plain = copy.deepcopy(dense)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt_gated = method.make_optimizer(gated, lr=0.01, momentum=0.9, weight_decay=5e-4)
    plain.train()
    gated.train()
    batches = [(torch.randn(args.train_batch, *shape), torch.randint(0, 10, (args.train_batch,)))
               for _ in range(4)]

    def step_plain(x, y):
        loss = F.cross_entropy(plain(x), y)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    def step_gated(x, y):
        logits = gated(x)
        loss = F.cross_entropy(logits, y) + method.extra_loss(gated, x, logits, y)
        opt_gated.zero_grad(set_to_none=True)
        loss.backward()
        opt_gated.step()

    times = {"plain SGD (dense)": [], "ManiDP phase step": []}
    steps = {"plain SGD (dense)": step_plain, "ManiDP phase step": step_gated}
    for i in range(args.train_warmup + args.train_repeats):
        x, y = batches[i % len(batches)]
        for name, fn in steps.items():
            t = timed(lambda: fn(x, y))
            if i >= args.train_warmup:
                times[name].append(t)
    base = statistics.median(times["plain SGD (dense)"])
    print(f"\nTraining step: {args.train_model} 3x32x32, batch {args.train_batch}, threads={torch.get_num_threads()}, "
          f"{args.train_repeats} interleaved steps (+{args.train_warmup} warm-up)")
    print(f"{'variant':24s} {'median ms':>10s} {'p25 ms':>8s} {'p75 ms':>8s} {'vs plain':>9s}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"{name:24s} {med * 1e3:10.1f} {q[0] * 1e3:8.1f} {q[2] * 1e3:8.1f} {med / base:9.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--size", type=int, default=32, help="input side length for the latency part")
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-model", default="resnet56")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-repeats", type=int, default=10)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_latency(args)
    if not args.skip_training:
        bench_training(args)


if __name__ == "__main__":
    main()
