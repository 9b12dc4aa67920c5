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

Variants (``--variants``, default all three, timed in the same run): ``eager`` times the models
as pruned; ``folded`` folds every batch norm into its conv first (``methods.fold.fold_batchnorm``,
what the trials' latency measurement does), ``folded_cl`` also puts weights and input in
channels_last. Dense and pruned are always prepared the same way, so each speedup compares like with
like; the dense model's own time per variant shows what the preparation buys in absolute terms.
Ragged widths are counted against 8 and 16 (oneDNN's channel blocks on AVX2 and AVX-512 CPUs).

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
* Interleaving: each round times, for every pruned model and variant in a fresh random order, the
  dense model and the pruned one (same variant) back to back (which goes first alternates by round); the round's speedup is
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
import sys
import time
from contextlib import nullcontext

from malloc_child import CHILD_ENV, MALLOC_KEYS, in_child, rerun_in_child

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
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="how both models are prepared: eager (as pruned), folded (batch norms folded into the "
                         "convs), folded_cl (folded, channels_last); each pruned model is timed against the dense "
                         "one prepared the same way")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


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
    """How many conv output widths are not multiples of 8 / of 16 (oneDNN's AVX2 / AVX-512 channel
    blocks: a ragged width is computed padded up to the next block)."""
    import torch

    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return f"{sum(w % 8 != 0 for w in widths)}/{sum(w % 16 != 0 for w in widths)}/{len(widths)}"


#: How a model is prepared for timing: ``eager`` as pruned (NCHW, batch norms separate);
#: ``folded``: every batch norm folded into its conv (``methods.fold.fold_batchnorm``);
#: ``folded_cl``: folded, weights and input in channels_last.
VARIANTS = ("eager", "folded", "folded_cl")


def prepare(model, variant: str):
    import torch

    from methods.fold import fold_batchnorm

    if variant == "eager":
        return model
    model = fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if variant == "folded_cl" else model


def variant_input(x, variant: str):
    import torch

    return x.contiguous(memory_format=torch.channels_last) if variant.endswith("_cl") or x.is_cuda else x


def setup_models(args, dense, grid, x):
    """``{variant: (dense, [pruned or None per grid row], input)}`` on the target device."""
    import torch

    out = {}
    for v in args.variants:
        d = prepare(dense, v)
        ms = [prepare(m, v) if m is not None else None for _, _, m, _ in grid]
        xv = variant_input(x, v)
        if args.device == "cuda":
            d = d.to("cuda", memory_format=torch.channels_last)
            ms = [m.to("cuda", memory_format=torch.channels_last) if m is not None else None for m in ms]
            xv = xv.to("cuda").contiguous(memory_format=torch.channels_last)
        if args.compile:
            d = torch.compile(d, mode=args.compile)
            ms = [torch.compile(m, mode=args.compile) if m is not None else None for m in ms]
        out[v] = (d, ms, xv)
    return out


def time_rounds(args, setups, live):
    """Per (row, variant): lists over rounds of the dense / pruned wall and CPU-time ratios and ms."""
    keys = [(i, v) for i in live for v in args.variants]
    res = {k: {"wall": [], "cpu": [], "dense_ms": [], "pruned_ms": []} for k in keys}
    timers = {v: Timer(setups[v][2]) for v in args.variants}
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = keys[:]
        rng.shuffle(order)
        for i, v in order:
            dense, models, _ = setups[v]
            timer = timers[v]
            if r % 2 == 0:
                td, tp = timer.median(dense, args.repeats), timer.median(models[i], args.repeats)
            else:
                tp = timer.median(models[i], args.repeats)
                td = timer.median(dense, args.repeats)
            cell = res[(i, v)]
            cell["wall"].append(td[0] / tp[0])
            cell["cpu"].append(td[1] / tp[1])
            cell["dense_ms"].append(td[1] * 1e3)
            cell["pruned_ms"].append(tp[1] * 1e3)
        print(f"round {r + 1}/{args.rounds} done at {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return res, time.perf_counter() - t0


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
    setups = setup_models(args, dense, grid, torch.randn(args.batch, *shape))
    for v in args.variants:  # warm-up (and compilation, with --compile)
        d, ms, xv = setups[v]
        for m in [d, *ms]:
            if m is not None:
                Timer(xv).median(m, args.warmup)
    faults = minor_faults_per_pass(Timer(setups[args.variants[0]][2]), setups[args.variants[0]][0])
    live = [i for i, (_, _, m, _) in enumerate(grid) if m is not None]
    res, timed_s = time_rounds(args, setups, live)
    report(args, torch, grid, res, dense_macs, shape, faults, prune_s, timed_s)


def report(args, torch, grid, res, dense_macs, shape, faults, prune_s, timed_s) -> None:
    from methods.cost import profile

    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, bf16 autocast, channels_last"
    else:
        where = f"CPU, torch threads {torch.get_num_threads()} (interop 1), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    malloc = {k: os.environ.get(k) for k in MALLOC_KEYS}
    print(f"{args.model}, 3x{args.image_size}x{args.image_size}, batch {args.batch}, {where}"
          f"{', torch.compile ' + args.compile if args.compile else ', eager'}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"allocator: {os.environ[CHILD_ENV]} (timing child started with {malloc}); "
          f"dense forward pass after warm-up: {faults:.0f} minor page faults")
    print(f"method {args.method}, allocation {args.allocation}; variants {', '.join(args.variants)}; {args.rounds} "
          f"rounds x {args.repeats} passes per timing, dense/pruned adjacent pairs (same variant) in random order, "
          f"first alternating; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; pruning "
          f"{prune_s:.1f}s, timing {timed_s:.1f}s")
    effs = {(v, c): [] for v in args.variants for c in ("wall", "cpu")}
    for v in args.variants:
        dense_ms = sum((res[k]["dense_ms"] for k in res if k[1] == v), [])
        print(f"\n[{v}] dense MACs {dense_macs / 1e6:.2f} M, dense median {statistics.median(dense_ms):.2f} CPU-ms/batch")
        print(f"{'config':<32} {'MACs M':>7} {'removed':>7} {'MACs x':>6} {'CPU ms':>9} "
              f"{'wall speedup min/med/max':>24} {'eff':>5} {'CPU-time speedup min/med/max':>28} {'eff':>5}  "
              f"widths %8/%16 ragged")
        for i, (label, hp, model, err) in enumerate(grid):
            if model is None:
                print(f"{label:<32} not run: {err}")
                continue
            macs = profile(model, shape).macs
            ratio = dense_macs / macs
            cell = res[(i, v)]
            cells = []
            for clock in ("wall", "cpu"):
                s = cell[clock]
                eff = statistics.median(s) / ratio
                effs[(v, clock)].append(eff)
                cells.append(f"{min(s):>6.2f}x /{statistics.median(s):>5.2f}x /{max(s):>5.2f}x {eff:>5.2f}")
            print(f"{label:<32} {macs / 1e6:>7.2f} {1 - macs / dense_macs:>7.1%} {ratio:>5.2f}x "
                  f"{statistics.median(cell['pruned_ms']):>9.2f} {cells[0]:>30} {cells[1]:>34}  {widths_note(model)}")
    if not effs[(args.variants[0], "wall")]:
        sys.exit("no pruned model could be built (see the 'not run' lines)")
    print()
    for v in args.variants:
        for clock, name in (("wall", "wall-clock"), ("cpu", "CPU-time")):
            e = effs[(v, clock)]
            print(f"[{v}] {name} efficiency (median speedup / MACs ratio) min {min(e):.2f}, median "
                  f"{statistics.median(e):.2f}, max {max(e):.2f} (goal >= 0.85 at every ratio: "
                  f"{'met' if min(e) >= 0.85 else 'not met'})")


def main(argv=None):
    args = parse_args(argv)
    if not in_child():
        rerun_in_child(args.malloc, args.threads)
    child(args)


if __name__ == "__main__":
    main()
