"""Where the pruned model's CPU time goes, per kind of op, against the dense model's.

    python benchmarks/profile_pruned_ops.py --threads 1
    python benchmarks/profile_pruned_ops.py --threads 2 --configs all:8:0.7 --variants folded_cl
    python benchmarks/profile_pruned_ops.py --clock profiler      # torch.profiler's per-op times

For the dense ResNet-56 and each ``--configs`` entry (``scope:round_to:prune_ratio``, l1_norm,
``allocation: uniform``), prepared as each ``--variants`` entry (see bench_pruned_speedup.py), the
script measures ``--passes`` forward passes at batch ``--batch`` after warm-up, dense and pruned
alternately for ``--rounds`` rounds, and splits each pass's time into categories: convolutions by
input resolution (32x32, 16x16, 8x8: the three stages; a stage's first, strided conv counts with
the resolution it reads), batch norm, ReLU, residual add, the option-A pad shortcut, and the rest
(stem pooling, classifier, Python). Per category: the median over passes, then over rounds.

Clocks: ``--clock cpu`` (default) reads this process's CPU time (``time.process_time``) around every
module with forward hooks; with one thread that is the work each op did, whatever else the shared
machine runs (a block's own time beyond its submodules is its residual add). ``--clock profiler``
uses torch.profiler's per-op self times instead, which are wall-clock and inflated by preemption
on a loaded machine (the pad shortcut is then its slice / zeros / cat / index_select ops).

Attribution of the gap: if every category shrank by the model's MACs ratio R, the pruned pass would
take dense / R. Each category's ``excess`` = pruned ms - dense ms / R; the excesses add up to the
whole gap (pruned - dense / R), so they say which ops keep the real speedup below the MACs ratio.
Conv rows also print their own MACs ratio (a stage's convs may shrink more or less than the model).

Runs in a child process with the allocator settings of bench_pruned_speedup.py (glibc's malloc
would otherwise return and re-zero the activations every pass) and ``--threads`` torch/OpenMP
threads (with more than one, CPU time also counts OpenMP's spin-waiting).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pruned_speedup import VARIANTS, prepare, variant_input  # noqa: E402
from malloc_child import CHILD_ENV, in_child, rerun_in_child  # noqa: E402

SHORTCUT_OPS = {"aten::cat", "aten::index_select", "aten::zeros_like", "aten::where", "aten::full_like",
                "aten::zero_", "aten::fill_", "aten::slice"}
CATEGORY = {"aten::mkldnn_convolution": "conv", "aten::native_batch_norm": "batch norm",
            "aten::_native_batch_norm_legit_no_training": "batch norm", "aten::clamp_min_": "relu",
            "aten::relu_": "relu", "aten::add": "residual add", "aten::add_": "residual add"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["internal:1:0.5", "internal:8:0.7", "all:1:0.7", "all:8:0.7"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="cpu", choices=("cpu", "profiler"),
                    help="cpu: process CPU time per module (forward hooks), median over passes; profiler: "
                         "torch.profiler's per-op self time (wall-clock, inflated by preemption on a loaded machine)")
    ap.add_argument("--rounds", type=int, default=3, help="dense and pruned profiled alternately this many times; "
                    "per category the median over rounds")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def category(key: str, shapes) -> str | None:
    if key in CATEGORY:
        name = CATEGORY[key]
        if name == "conv" and shapes and len(shapes[0]) == 4:
            return f"conv @{shapes[0][2]}x{shapes[0][3]}"
        return name
    return "pad shortcut" if key in SHORTCUT_OPS else "other"


def op_ms(model, x, passes: int, warmup: int, clock: str) -> dict[str, float]:
    """Ms per pass by category: median over ``passes`` of each category's CPU time (``clock cpu``)
    or the profiler's mean self time (``clock profiler``)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        return _hook_ms(model, x, passes) if clock == "cpu" else _profiler_ms(model, x, passes)


def _profiler_ms(model, x, passes: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(passes):
            model(x)
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        if e.self_cpu_time_total > 0:
            out[category(e.key, e.input_shapes)] += e.self_cpu_time_total / passes / 1e3
    return dict(out)


def module_category(m, args) -> str | None:
    import torch

    from methods.layers import ChannelPadShortcut

    if isinstance(m, torch.nn.Conv2d):
        return f"conv @{args[0].shape[2]}x{args[0].shape[3]}"
    if isinstance(m, torch.nn.BatchNorm2d):
        return "batch norm"
    if isinstance(m, torch.nn.ReLU):
        return "relu"
    if isinstance(m, ChannelPadShortcut):
        return "pad shortcut"
    if type(m).__name__ == "BasicBlock":
        return "residual add"  # the block's own time beyond its submodules: the add
    return None


def _hook_ms(model, x, passes: int) -> dict[str, float]:
    """Process CPU time (``time.process_time``) spent in each leaf module, by category; a block's
    own time (its forward minus its submodules') is its residual add; ``other`` is the rest of the
    pass (stem pooling, classifier, Python)."""
    stack: list[list[float]] = []  # [start, time taken by children]
    per_pass: list[dict[str, float]] = []
    acc: dict[str, float] = defaultdict(float)

    def pre(m, args):
        stack.append([time.process_time(), 0.0])

    def post(m, args, out):
        start, children = stack.pop()
        took = time.process_time() - start
        if stack:
            stack[-1][1] += took
        c = module_category(m, args)
        if c is not None:
            acc[c] += (took - children) * 1e3

    handles = []
    for m in model.modules():
        if module_category_known(m):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        for _ in range(passes):
            acc.clear()
            t0 = time.process_time()
            model(x)
            total = (time.process_time() - t0) * 1e3
            acc["other"] = total - sum(acc.values())
            per_pass.append(dict(acc))
    finally:
        for h in handles:
            h.remove()
    return {c: statistics.median(p.get(c, 0.0) for p in per_pass) for c in per_pass[0]}


def module_category_known(m) -> bool:
    import torch

    from methods.layers import ChannelPadShortcut

    return isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, ChannelPadShortcut)) \
        or type(m).__name__ == "BasicBlock"


def conv_macs_by_resolution(model, shape) -> dict[str, int]:
    import torch

    macs: dict[str, int] = defaultdict(int)

    def hook(mod, args, out):
        h, w = args[0].shape[2:]
        macs[f"conv @{h}x{w}"] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return dict(macs)


def child(args) -> None:
    import torch

    from methods import PruneContext, create_method
    from methods.cost import profile
    from trainables.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = (3, 32, 32)
    dense = create_model("resnet56", 10).eval()
    pruned = {}
    for cfg in args.configs:
        scope, round_to, ratio = cfg.split(":")
        hp = {"prune_ratio": float(ratio), "scope": scope, "allocation": "uniform", "round_to": int(round_to)}
        pruned[cfg] = create_method("l1_norm", **hp).prune(copy.deepcopy(dense), PruneContext(shape)).eval()
    x = torch.randn(args.batch, *shape)
    dense_macs, dense_conv = profile(dense, shape).macs, conv_macs_by_resolution(dense, shape)
    print(f"resnet56 batch {args.batch}, torch threads {torch.get_num_threads()}, clock {args.clock}, {args.rounds} "
          f"rounds x {args.passes} passes, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, allocator "
          f"{os.environ[CHILD_ENV]}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for v in args.variants:
        xv = variant_input(x, v)
        dv = prepare(dense, v)
        for cfg, model in pruned.items():
            pv = prepare(model, v)
            d_runs, p_runs = [], []
            for _ in range(args.rounds):  # interleaved, so load changes hit both alike
                d_runs.append(op_ms(dv, xv, args.passes, args.warmup, args.clock))
                p_runs.append(op_ms(pv, xv, args.passes, args.warmup, args.clock))
            d_ms, p_ms = median_ms(d_runs), median_ms(p_runs)
            print_attribution(v, cfg, d_ms, p_ms, dense_macs / profile(model, shape).macs,
                              dense_conv, conv_macs_by_resolution(model, shape))


def median_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*runs)
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def print_attribution(variant, cfg, d_ms, p_ms, ratio, dense_conv, pruned_conv) -> None:
    d_tot, p_tot = sum(d_ms.values()), sum(p_ms.values())
    gap = p_tot - d_tot / ratio
    print(f"\n[{variant}] {cfg}: MACs x {ratio:.2f}; dense {d_tot:.1f} ms, pruned {p_tot:.1f} ms, speedup "
          f"{d_tot / p_tot:.2f}x, efficiency {d_tot / p_tot / ratio:.2f}; gap to the MACs ratio {gap:.1f} ms")
    print(f"  {'category':<14} {'dense ms':>8} {'share':>6} {'pruned ms':>9} {'speedup':>7} {'MACs x':>6} "
          f"{'excess ms':>9} {'of gap':>6}")
    for c in sorted(set(d_ms) | set(p_ms), key=lambda c: -d_ms.get(c, 0)):
        d, p = d_ms.get(c, 0.0), p_ms.get(c, 0.0)
        macs_x = f"{dense_conv[c] / pruned_conv[c]:.2f}" if c in dense_conv and pruned_conv.get(c) else ""
        excess = p - d / ratio
        print(f"  {c:<14} {d:>8.2f} {d / d_tot:>6.1%} {p:>9.2f} {d / p if p else float('nan'):>6.2f}x {macs_x:>6} "
              f"{excess:>9.2f} {excess / gap if gap else float('nan'):>6.1%}")


def main(argv=None):
    args = parse_args(argv)
    if not in_child():
        rerun_in_child("fixed", args.threads)
    child(args)


if __name__ == "__main__":
    main()
