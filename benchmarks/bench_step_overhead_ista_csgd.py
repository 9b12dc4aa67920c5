"""Step-time overhead of the ista and csgd training phases against a plain SGD step.

Same model (resnet20, 10 classes), same batch, and the trials' own step,
``trainables.train.train_step`` (forward, cross-entropy, backward, the method's hooks, optimizer step). The configurations are
measured side by side: each repeat times ``--steps`` steps of every configuration in turn (order
rotated per repeat), and the reported overhead is the median over repeats of (method / plain).
Goal: <= 1.15x. Also prints the method hooks' own time per step (``after_backward`` +
``after_step``, timed alone), which does not depend on how busy the machine is.

    python benchmarks/bench_step_overhead_ista_csgd.py [--repeats 15] [--steps 5] [--threads 1]

``--threads`` defaults to 1: on a shared 2-core machine two intra-op threads per process are
oversubscribed as soon as anything else runs, and the step time then measures the contention.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from methods import PruneContext, create_method
from trainables.models import create_model
from trainables.train import train_step

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def make_runner(name, dense, inputs, targets):
    model = copy.deepcopy(dense).train()
    if name == "plain":
        method = None
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        method_name, _, variant = name.partition(":")
        kwargs = {"scope": "all"} if variant == "residual" else {}
        method = create_method(method_name, **kwargs)
        model = method.prepare(model, PruneContext(tuple(inputs.shape[1:])))
        optimizer = method.make_optimizer(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step():
        train_step(model, inputs, targets, optimizer, method=method)

    def hooks():
        if method is not None:
            method.after_backward(model)
            method.after_step(model)

    return step, hooks


def bench(shape, batch, configs, repeats, steps):
    torch.manual_seed(0)
    dense = create_model("resnet20", 10, in_channels=shape[0])
    inputs = torch.randn(batch, *shape)
    targets = torch.randint(0, 10, (batch,))
    runners, hooks = {}, {}
    for name in configs:
        runners[name], hooks[name] = make_runner(name, dense, inputs, targets)
    for run in runners.values():  # warm-up (ista measures its layer sizes on the first step)
        for _ in range(2):
            run()
    hook_ms = {}
    for name in configs:  # the hooks alone, on the gradients the last step left
        samples = []
        for _ in range(20):
            t0 = time.perf_counter()
            hooks[name]()
            samples.append(time.perf_counter() - t0)
        hook_ms[name] = statistics.median(samples) * 1e3
    times = {name: [] for name in configs}
    for r in range(repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                runners[name]()
            times[name].append((time.perf_counter() - t0) / steps)
    rows = []
    for name in configs:
        ratios = [m / p for m, p in zip(times[name], times["plain"])]
        rows.append((name, statistics.median(times[name]) * 1e3, statistics.median(ratios), hook_ms[name]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = ["plain", "ista", "csgd", "csgd:residual"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats x {args.steps} steps")
    print(f"{'input':<14}{'config':<16}{'median ms/step':>16}{'median ratio':>14}{'hooks ms':>10}")
    for label, shape in (("1x8x8 b64", (1, 8, 8)), ("3x32x32 b64", (3, 32, 32))):
        for name, ms, ratio, hook in bench(shape, 64, configs, args.repeats, args.steps):
            print(f"{label:<14}{name:<16}{ms:>16.2f}{ratio:>13.3f}x{hook:>10.2f}")


if __name__ == "__main__":
    main()
