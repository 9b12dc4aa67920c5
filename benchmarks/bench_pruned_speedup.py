"""Real speedup of physically pruned models against the dense one, per MACs ratio ("efficiency").

    python benchmarks/bench_pruned_speedup.py                      # CPU, ResNet-56, batch 64, the full grid
    python benchmarks/bench_pruned_speedup.py --ratios 0.5 --scopes internal --round-to 1
    python benchmarks/bench_pruned_speedup.py --device cuda [--model resnet50 --image-size 224 --classes 1000]

Grid (one run): l1_norm at every ``--ratios`` (``prune_ratio``: the fraction of the dense model's
MACs removed) x ``--scopes`` (``internal``: block-internal channels only; ``all``: residual-coupled
groups too) x ``--round-to`` (every kept width a multiple of it; 1 = no rounding), ``allocation``
``--allocation``. Weights are random (speed does not depend on their values). For each model the
script prints its MACs ratio (dense / pruned MACs), its measured speedup (dense / pruned time) as
min / median / max over rounds, and efficiency = median speedup / MACs ratio (goal >= 0.85), on two
clocks: wall-clock time, and this process's CPU time (``time.process_time``). On a shared machine
whose other jobs take the cores away mid-pass, wall-clock ratios scatter widely (0.1x-30x seen at
load average 8 on 2 cores); with ``--threads 1`` the CPU time of a pass is the work it did and barely
depends on the load, so the CPU-time column is the one to read there (with more threads it also
counts OpenMP's spin-waiting).

How it keeps the measurement stable:

* Allocator. glibc's malloc hands big freed blocks back to the kernel (mmap threshold, heap trim)
  and gets them back zeroed on the next forward pass: at batch 64 that is 20-35k page faults per
  forward, and the timings then depend on what the process did before. The script therefore
  re-runs itself in a child process whose environment fixes ``MALLOC_MMAP_THRESHOLD_`` and
  ``MALLOC_TRIM_THRESHOLD_`` (glibc reads them only at process start, so they cannot be set from
  inside); the child prints them and its page faults per forward pass. ``--malloc default`` runs
  the child with glibc's defaults instead, to see the difference.
* Threads: ``torch.set_num_threads(--threads)`` (default: every core), one inter-op thread, and
  ``OMP_NUM_THREADS`` set to the same in the child's environment.
* Warm-up: every model runs ``--warmup`` untimed forward passes before any timing.
* Interleaving: each round times, for every pruned model in a fresh random order, the dense model
  and the pruned one back to back (which goes first alternates by round); the round's speedup is
  the ratio of that adjacent pair (each the median of ``--repeats`` passes), so machine noise that
  drifts over the run hits both sides alike.

On CUDA the models run as the trials run them: channels_last inputs under bf16 autocast, timed
with a device synchronise around each forward pass (the allocator settings do not matter there).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

#: Marks the timing child; its value names the allocator setting it was started with.
CHILD_ENV = "PRUNETUNE_BENCH_SPEEDUP_CHILD"
#: 32 MiB: glibc's largest accepted mmap threshold on 64-bit (HEAP_MAX_SIZE / 2). Every activation
#: of ResNet-56 at batch 64 (at most 4 MiB) then comes from the heap, never a fresh mmap.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Never trim the heap top back to the kernel (1 TiB).
TRIM_THRESHOLD = 1 << 40


def malloc_env(mode: str) -> dict[str, str]:
    if mode == "fixed":
        return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    return {}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--scopes", nargs="+", default=["internal", "all"], choices=("internal", "all"))
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--allocation", default="uniform", choices=("uniform", "global"))
    ap.add_argument("--method", default="l1_norm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="forward passes per timing (their median is taken)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--malloc", default="fixed", choices=("fixed", "default"),
                    help="fixed: the child runs with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set; default: glibc's")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="resnet56", help="any trainables.models name, e.g. resnet50")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--compile", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                    help="time torch.compile'd models (mode; reduce-overhead adds CUDA graphs)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def spawn_child(args) -> int:
    """Run this script again with the allocator and thread settings in its environment from the start."""
    env = dict(os.environ)
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)
    env.update(malloc_env(args.malloc))
    env.update({CHILD_ENV: args.malloc, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    return subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)


class Timer:
    def __init__(self, x):
        import torch

        self.torch, self.x, self.cuda = torch, x, x.is_cuda

    def median(self, model, repeats: int) -> tuple[float, float]:
        """Medians of ``repeats`` forward passes: (wall-clock seconds, this process's CPU seconds)."""
        torch = self.torch
        walls, cpus = [], []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
        with torch.inference_mode(), autocast:
            for _ in range(repeats):
                if self.cuda:
                    torch.cuda.synchronize()
                c0, t0 = time.process_time(), time.perf_counter()
                model(self.x)
                if self.cuda:
                    torch.cuda.synchronize()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        return statistics.median(walls), statistics.median(cpus)


def minor_faults_per_pass(timer: Timer, model, passes: int = 3) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    timer.median(model, passes)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / passes


def build_pruned(args, dense, shape):
    """``[(label, hparams, model or None, error)]`` for the grid, in a fixed order."""
    from methods import PruneContext, create_method
    from methods.errors import PruneTuneError

    out = []
    for scope in args.scopes:
        for round_to in args.round_to:
            for ratio in args.ratios:
                hp = {"prune_ratio": ratio, "scope": scope, "allocation": args.allocation, "round_to": round_to}
                label = f"{scope:<8} round_to {round_to:<2} ratio {ratio:.2f}"
                try:
                    model = create_method(args.method, **hp).prune(copy.deepcopy(dense), PruneContext(shape)).eval()
                except (PruneTuneError, ValueError, TypeError) as exc:
                    out.append((label, hp, None, f"{type(exc).__name__}: {exc}"))
                    continue
                out.append((label, hp, model, None))
    return out


def widths_note(model) -> str:
    """How many conv output widths are not multiples of 8 (padded by AVX2 kernels)."""
    import torch

    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return f"{sum(w % 8 != 0 for w in widths)}/{len(widths)}"


def child(args) -> None:
    import torch

    from methods.cost import profile
    from trainables.models import create_model

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only possible before any parallel work)
        pass
    torch.manual_seed(args.seed)
    shape = (3, args.image_size, args.image_size)
    dense = create_model(args.model, args.classes).eval()
    t0 = time.perf_counter()
    grid = build_pruned(args, dense, shape)
    prune_s = time.perf_counter() - t0
    print(f"pruned {len(grid)} models in {prune_s:.0f}s", file=sys.stderr, flush=True)
    dense_macs = profile(dense, shape).macs
    x = torch.randn(args.batch, *shape)
    models = [m for _, _, m, _ in grid if m is not None]
    if args.device == "cuda":
        dense = dense.to("cuda", memory_format=torch.channels_last)
        models = [m.to("cuda", memory_format=torch.channels_last) for m in models]
        x = x.to("cuda").contiguous(memory_format=torch.channels_last)
    if args.compile:
        dense = torch.compile(dense, mode=args.compile)
        models = [torch.compile(m, mode=args.compile) for m in models]
    it = iter(models)
    grid = [(label, hp, next(it) if m is not None else None, err) for label, hp, m, err in grid]
    timer = Timer(x)
    for m in [dense, *models]:  # warm-up (and compilation, with --compile)
        timer.median(m, args.warmup)
    faults = minor_faults_per_pass(timer, dense)

    live = [i for i, (_, _, m, _) in enumerate(grid) if m is not None]
    wall = {i: [] for i in live}  # per round: dense / pruned wall-clock time of the adjacent pair
    cpu = {i: [] for i in live}  # the same pair's CPU-time ratio
    dense_ms, pruned_ms = {i: [] for i in live}, {i: [] for i in live}
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = live[:]
        rng.shuffle(order)
        for i in order:
            model = grid[i][2]
            if r % 2 == 0:
                td = timer.median(dense, args.repeats)
                tp = timer.median(model, args.repeats)
            else:
                tp = timer.median(model, args.repeats)
                td = timer.median(dense, args.repeats)
            wall[i].append(td[0] / tp[0])
            cpu[i].append(td[1] / tp[1])
            dense_ms[i].append(td[0] * 1e3)
            pruned_ms[i].append(tp[0] * 1e3)
        print(f"round {r + 1}/{args.rounds} done at {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    timed_s = time.perf_counter() - t0

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, bf16 autocast, channels_last"
    else:
        where = f"CPU, torch threads {torch.get_num_threads()} (interop 1), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    malloc = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"{args.model}, 3x{args.image_size}x{args.image_size}, batch {args.batch}, {where}"
          f"{', torch.compile ' + args.compile if args.compile else ', eager'}, torch {torch.__version__}")
    print(f"allocator: {os.environ[CHILD_ENV]} (timing child started with {malloc}); "
          f"dense forward pass after warm-up: {faults:.0f} minor page faults")
    print(f"method {args.method}, allocation {args.allocation}; {args.rounds} rounds x {args.repeats} passes per "
          f"timing, dense/pruned adjacent pairs in random order, first alternating; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; pruning {prune_s:.1f}s, timing {timed_s:.1f}s")
    all_dense = sum(dense_ms.values(), [])
    print(f"dense MACs {dense_macs / 1e6:.2f} M, dense median "
          f"{statistics.median(all_dense) if all_dense else float('nan'):.2f} ms/batch")
    print(f"{'config':<32} {'MACs M':>7} {'removed':>7} {'MACs x':>6} {'pruned ms':>9} "
          f"{'wall speedup min/med/max':>24} {'eff':>5} {'CPU-time speedup min/med/max':>28} {'eff':>5}  widths%8!=0")
    effs = {"wall": [], "cpu": []}
    for i, (label, hp, model, err) in enumerate(grid):
        if model is None:
            print(f"{label:<32} not run: {err}")
            continue
        macs = profile(_uncompiled(model), shape).macs
        ratio = dense_macs / macs
        cells = []
        for clock, s in (("wall", wall[i]), ("cpu", cpu[i])):
            eff = statistics.median(s) / ratio
            effs[clock].append(eff)
            cells.append(f"{min(s):>6.2f}x /{statistics.median(s):>5.2f}x /{max(s):>5.2f}x {eff:>5.2f}")
        print(f"{label:<32} {macs / 1e6:>7.2f} {1 - macs / dense_macs:>7.1%} {ratio:>5.2f}x "
              f"{statistics.median(pruned_ms[i]):>9.2f} {cells[0]:>30} {cells[1]:>34}  {widths_note(_uncompiled(model))}")
    if not effs["wall"]:
        sys.exit("no pruned model could be built (see the 'not run' lines)")
    for clock, name in (("wall", "wall-clock"), ("cpu", "CPU-time")):
        e = effs[clock]
        print(f"{name} efficiency (median speedup / MACs ratio) min {min(e):.2f}, median {statistics.median(e):.2f}, "
              f"max {max(e):.2f} (goal >= 0.85 at every ratio: {'met' if min(e) >= 0.85 else 'not met'})")


def _uncompiled(model):
    return getattr(model, "_orig_mod", model)


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get(CHILD_ENV) is None:
        print(f"timing in a child process started with {malloc_env(args.malloc) or 'glibc default malloc settings'}, "
              f"OMP_NUM_THREADS={args.threads}", flush=True)
        sys.exit(spawn_child(args))
    child(args)


if __name__ == "__main__":
    main()
