"""Throughput of one 3x3 conv (C -> C channels, batch 64) against its width: what a pruned width costs.

    python benchmarks/bench_conv_widths.py            # one thread, NCHW and channels_last

For ResNet-56's three resolutions (32x32, 16x16, 8x8) and widths around the dense ones (16, 32,
64), the script times a stride-1 3x3 conv with bias (a BN-folded conv of a basic block), median
process CPU time of ``--passes`` passes after warm-up, and prints GMAC/s. A pruned conv whose MAC
throughput is lower than the dense width's cannot speed up by its MACs ratio: oneDNN computes
output channels in blocks of 8 (AVX2) or 16 (AVX-512) lanes, so a ragged width costs what the next
block multiple does, and a width of a single block or less leaves lanes idle. Runs in a child with
the allocator settings of bench_pruned_speedup.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from malloc_child import in_child, rerun_in_child  # noqa: E402

WIDTHS = {32: (4, 8, 9, 12, 16), 16: (8, 11, 16, 18, 24, 32), 8: (16, 24, 32, 35, 40, 48, 64)}


def median_cpu_s(fn, passes: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(passes):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return statistics.median(times)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'HxW':>5} {'C':>3} {'NCHW ms':>8} {'GMAC/s':>7} {'CL ms':>7} {'GMAC/s':>7}")
    with torch.inference_mode():
        for hw, widths in WIDTHS.items():
            for c in widths:
                conv = torch.nn.Conv2d(c, c, 3, 1, 1).eval()
                x = torch.randn(args.batch, c, hw, hw)
                macs = args.batch * hw * hw * 9 * c * c
                nchw = median_cpu_s(lambda: conv(x), args.passes)
                conv_cl = conv.to(memory_format=torch.channels_last)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                cl = median_cpu_s(lambda: conv_cl(x_cl), args.passes)
                print(f"{hw:>2}x{hw:<2} {c:>3} {nchw * 1e3:>8.3f} {macs / nchw / 1e9:>7.1f} {cl * 1e3:>7.3f} "
                      f"{macs / cl / 1e9:>7.1f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not in_child():
        rerun_in_child("fixed", args.threads)
    child(args)


if __name__ == "__main__":
    main()
