"""Where a ThiNet trial's time goes, and what the layer-by-layer selection costs on ResNet-56.

    python benchmarks/bench_thinet_selection.py                       # both parts, 1 thread, 5 repeats
    python benchmarks/bench_thinet_selection.py --part trial --repeats 7
    python benchmarks/bench_thinet_selection.py --part resnet56 --samples 256 1024 4096 --naive

Part ``trial``: one whole quickstart trial (``trainables.trial.run_trial``: digits ResNet-20, dense
base of 10 epochs, 3 fine-tune epochs) with ThiNet at ``prune_ratio`` 0.9, ``scope: all``,
``samples_per_layer`` 512, ``finetune_steps`` 50, allocation uniform and global, split into
stages by timers wrapped around the functions ThiNet calls:

* capture: ``sample_contributions`` (forward passes over the calibration images, stopped at the
  consumers, plus gathering the sampled contributions), for the global ranking too;
* select: the greedy removal (``thinet_select``; ``greedy_scores`` for the global ranking);
* lstsq: the rescaling (``least_squares_scale``); cut: the surgery (``prune_group``);
* recovery: the per-layer fine-tune steps (``context.finetune``, i.e. ``train_steps``);
* rest: everything else in the trial (data, base model load, plan, the 3 fine-tune epochs,
  evaluation, latency timing).

Two schedules run side by side, alternating within every repeat: ``every`` (a recovery
fine-tune after every pruned group, the code before issue 12's ThiNet work) and ``last-skipped``
(the current default: no recovery after the last pruned group, whose fine-tune the trial's own
follows at once; every selection and every rescaled weight are identical, see
tests/test_thinet_schedule.py).

Part ``resnet56``: the full layer-by-layer selection over the 27 block-internal groups of a CIFAR
ResNet-56 (random weights, random 3x32x32 inputs: the cost does not depend on their values),
cutting each to 50% as it goes, no recovery, per ``--samples``: capture / select / lstsq / cut.
``--naive`` also runs the greedy as the formula reads (every candidate's error recomputed over all
samples) and checks it picks the same channels.

How the numbers are kept reproducible on a shared machine:

* Threads: ``torch.set_num_threads(--threads)`` (default 1, as a trial gets with one CPU), and
  ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` the same in the child's environment. This is what
  controls the capture figure: with 2 threads on a 2-core machine that other jobs also use,
  OpenMP's threads spin at every barrier waiting for a descheduled partner: the capture of part
  ``resnet56`` took 16x the CPU time and 12-32x the wall time of 1 thread in this session.
* Clocks: the process's CPU time (``time.process_time``: the work done, barely affected by other
  jobs at 1 thread) and wall time; min / median / max over ``--repeats``.
* Allocator: the script re-runs itself in a child process whose environment fixes glibc's
  ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (as ``bench_pruned_speedup.py`` does:
  glibc otherwise returns freed activations to the kernel and re-faults them zeroed);
  ``--malloc default`` runs it with glibc's defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from malloc_child import CHILD_ENV, MALLOC_KEYS, in_child, rerun_in_child

STAGES = ("capture", "select", "lstsq", "cut", "recovery")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="both", choices=("trial", "resnet56", "both"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--malloc", default="fixed", choices=("fixed", "default"))
    ap.add_argument("--ratio", type=float, default=0.9, help="part trial: prune_ratio")
    ap.add_argument("--finetune-steps", type=int, default=50, help="part trial: finetune_steps")
    ap.add_argument("--samples", type=int, nargs="+", default=[256, 1024], help="part resnet56: samples per layer")
    ap.add_argument("--batch", type=int, default=64, help="part resnet56: calibration batch size")
    ap.add_argument("--naive", action="store_true", help="part resnet56: also time and check the naive greedy")
    return ap.parse_args(argv)


class Clock:
    """Accumulates (CPU s, wall s) per stage; ``wrap`` times every call of a function."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.depth = 0

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.depth:  # nested (e.g. capture inside group_scores): counted once, by the outer stage
            yield
            return
        self.depth += 1
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[name] += time.process_time() - c0
            self.wall[name] += time.perf_counter() - t0
            self.depth -= 1

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            with self.stage(name):
                return fn(*a, **kw)
        return timed


def spread(values) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


# ---- part trial ---------------------------------------------------------------------------------------

def quickstart_settings(base_dir: str):
    from trainables.settings import TrainSettings, TrialSettings
    return TrialSettings(model="resnet20", dataset="digits", seed=0, base_dir=base_dir, use_gpu=False,
                         base=TrainSettings(epochs=10, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64),
                         finetune=TrainSettings(epochs=3, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64))


def timed_trial(settings, hparams: dict, recover_last: bool) -> tuple[dict, dict, dict]:
    """One ``run_trial`` with stage timers patched in; returns (cpu per stage, wall per stage, metrics)."""
    import methods.thinet as thinet
    import trainables.trial as trial

    clock = Clock()
    patched = {(thinet, "sample_contributions"): "capture", (thinet, "thinet_select"): "select",
               (thinet, "greedy_scores"): "select", (thinet, "least_squares_scale"): "lstsq",
               (thinet, "prune_group"): "cut", (trial, "train_steps"): "recovery"}
    saved = {key: getattr(*key) for key in patched}
    saved_flag = thinet.ThiNet.recover_after_last
    try:
        for (mod, name), stage in patched.items():
            setattr(mod, name, clock.wrap(stage, saved[(mod, name)]))
        thinet.ThiNet.recover_after_last = recover_last
        c0, t0 = time.process_time(), time.perf_counter()
        metrics = trial.run_trial(settings, "thinet", hparams, lambda m, save: None)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
        thinet.ThiNet.recover_after_last = saved_flag
    clock.cpu["trial"], clock.wall["trial"] = cpu, wall
    clock.cpu["rest"] = cpu - sum(clock.cpu[s] for s in STAGES)
    clock.wall["rest"] = wall - sum(clock.wall[s] for s in STAGES)
    return dict(clock.cpu), dict(clock.wall), metrics


def part_trial(args) -> None:
    from trainables.base_model import ensure_base_model
    with tempfile.TemporaryDirectory() as base_dir:
        settings = quickstart_settings(base_dir)
        ensure_base_model(settings)
        schedules = (("every", True), ("last-skipped", False))
        print(f"\nPart trial: digits ResNet-20, thinet prune_ratio {args.ratio}, scope all, samples_per_layer 512, "
              f"finetune_steps {args.finetune_steps}; CPU s then wall s per stage, min / median / max over "
              f"{args.repeats} repeats (schedules alternate within each repeat)")
        for allocation in ("uniform", "global"):
            hp = dict(prune_ratio=args.ratio, scope="all", allocation=allocation, samples_per_layer=512,
                      finetune_steps=args.finetune_steps)
            runs = defaultdict(list)
            timed_trial(settings, hp, True)  # warm-up: imports, data, first-touch allocations
            for r in range(args.repeats):
                for label, flag in (schedules if r % 2 == 0 else schedules[::-1]):
                    runs[label].append(timed_trial(settings, hp, flag))
            for label, _ in schedules:
                cpu = {s: [run[0][s] for run in runs[label]] for s in (*STAGES, "rest", "trial")}
                wall = [run[1]["trial"] for run in runs[label]]
                acc = runs[label][0][2]["accuracy"]
                print(f"  {allocation:8s} {label:13s} CPU s: " + ", ".join(f"{s} {spread(cpu[s])}" for s in cpu)
                      + f" | trial wall s {spread(wall)} | val accuracy {acc:.4f}")
            every = [run[0]["trial"] for run in runs["every"]]
            skipped = [run[0]["trial"] for run in runs["last-skipped"]]
            ratios = [a / b for a, b in zip(every, skipped)]
            print(f"  {allocation:8s} trial CPU time every / last-skipped: {spread(ratios)}")


# ---- part resnet56 ------------------------------------------------------------------------------------

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


def resnet56_once(model, inputs, samples: int, naive: bool) -> dict[str, float]:
    from methods import DependencyGraph, prune_group
    from methods.thinet import least_squares_scale, sample_contributions, thinet_select

    model = copy.deepcopy(model)
    graph = DependencyGraph(model)
    gen = torch.Generator().manual_seed(0)
    clock = Clock()
    for group in graph.prunable_groups():
        k = max(1, group.size // 2)
        with clock.stage("capture"):
            data = sample_contributions(model, group.consumers, group.size, inputs, samples, gen)
        with clock.stage("select"):
            keep = thinet_select(data.contrib, k)
        with clock.stage("lstsq"):
            w = least_squares_scale(data.contrib, keep)
        if naive:
            with clock.stage("naive"):
                assert naive_greedy(data.contrib, k) == keep.tolist()
        with clock.stage("cut"):
            prune_group(graph, group, keep, scale=w)
    return dict(clock.cpu), dict(clock.wall)


def part_resnet56(args) -> None:
    from methods.thinet import calibration_inputs
    from trainables.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet56", 10).eval()
    batches = [(torch.randn(args.batch, 3, 32, 32), torch.zeros(args.batch, dtype=torch.long))
               for _ in range(-(-max(args.samples) // 10 // args.batch))]
    print(f"\nPart resnet56: 27 block-internal groups cut to 50%, no recovery; CPU s (wall s) summed over the "
          f"layers, min / median / max over {args.repeats} repeats")
    for samples in args.samples:
        inputs = calibration_inputs(batches, samples, torch.device("cpu"))
        runs = [resnet56_once(model, inputs, samples, args.naive) for _ in range(args.repeats)]
        images = sum(int(x.shape[0]) for x in inputs)
        stages = ("capture", "select", "lstsq", "cut") + (("naive",) if args.naive else ())
        cells = [f"{s} {spread([r[0][s] for r in runs])} ({statistics.median(r[1][s] for r in runs):.2f})"
                 for s in stages]
        print(f"  samples {samples:5d}, {images:4d} images: " + ", ".join(cells))


def main(argv=None) -> None:
    args = parse_args(argv)
    if not in_child():
        rerun_in_child(args.malloc, args.threads)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    malloc = {k: os.environ.get(k) for k in MALLOC_KEYS}
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), allocator {os.environ[CHILD_ENV]} "
          f"{malloc}, load average {load[0]:.1f} at the start, {os.cpu_count()} cores")
    if args.part in ("trial", "both"):
        part_trial(args)
    if args.part in ("resnet56", "both"):
        part_resnet56(args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
