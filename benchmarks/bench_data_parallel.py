"""Data-parallel scaling of one trial's fine-tune: images per second with N ranks (Ray Train,
DistributedDataParallel) against the one-process trial, on the same global batch, side by side.

    python benchmarks/bench_data_parallel.py                    # CPU, gloo, 2 ranks x 1 thread vs 1 process x 1 thread
    python benchmarks/bench_data_parallel.py --workers 4 --gpu  # a machine with 4 GPUs: nccl, 1 GPU per rank vs 1 GPU

The trial: ResNet-20 on digits upsampled to ``--image-size`` (32: CIFAR-sized activations), an
l1_norm cut of the dense base, then ``--epochs`` fine-tune epochs at global batch ``--batch``. Each
repeat runs the one-process trial (``trainables.trial.run_trial``, one thread or one GPU) and the
data-parallel trial (``trainables.distributed.fit_data_parallel``: ``--workers`` ranks of one thread
or one GPU each), alternating; images/s of an epoch = training images / the epoch's training
seconds as the trial reports them (rank 0's for the data-parallel trial: every rank takes its part
of every global batch). The first fine-tune epoch of each trial is a warm-up, not counted. The
table gives min / median / max over the counted epochs of every repeat and the ratio of medians.
The Ray Train start-up (worker group, process group) is not in the figure: it is paid once a trial.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="one GPU per rank (nccl) and for the one-process trial")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128, help="global batch (per rank: batch / workers)")
    ap.add_argument("--epochs", type=int, default=4, help="fine-tune epochs per trial (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    return ap.parse_args(argv)


def settings(args, base_dir: str):
    from trainables.settings import TrainSettings, TrialSettings

    return TrialSettings(model="resnet20", dataset="digits", image_size=args.image_size, seed=0, use_gpu=args.gpu,
                         base=TrainSettings(epochs=1, lr=0.1, batch_size=args.batch),
                         finetune=TrainSettings(epochs=args.epochs, lr=0.01, batch_size=args.batch // args.workers),
                         calibration_batches=2, base_dir=base_dir)


def one_process(s, args, images: int) -> list[float]:
    from trainables.data_parallel import global_batch
    from trainables.trial import run_trial

    seconds: list[float] = []
    run_trial(global_batch(s, args.workers, "l1_norm"), "l1_norm", {"prune_ratio": 0.3},
              lambda m, save: seconds.append(m["epoch_seconds"]))
    return [images / t for t in seconds[1:]]


def data_parallel(s, args, images: int) -> list[float]:
    from trainables.distributed import DataParallel, fit_data_parallel

    seconds: list[float] = []
    parallel = DataParallel(args.workers, cpu=1, gpu=1 if args.gpu else 0, backend="nccl" if args.gpu else "gloo")
    fit_data_parallel(s, "l1_norm", {"prune_ratio": 0.3}, parallel, lambda m, c: seconds.append(m["epoch_seconds"]))
    return [images / t for t in seconds[1:]]


def main(argv=None) -> None:
    args = parse_args(argv)
    import ray
    import torch

    from trainables.base_model import ensure_base_model
    from trainables.workspace import load_data

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        s = settings(args, tmp)
        ensure_base_model(s)
        images = len(load_data(s).train)
        ray.init(address="local", num_cpus=max(args.workers, 1), num_gpus=args.workers if args.gpu else 0,
                 include_dashboard=False, log_to_driver=False)
        try:
            rates: dict[str, list[float]] = {"1 process": [], f"{args.workers} ranks": []}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                rates["1 process"] += one_process(s, args, images)
                rates[f"{args.workers} ranks"] += data_parallel(s, args, images)
                print(f"repeat done in {time.perf_counter() - t0:.0f}s", flush=True)
        finally:
            ray.shutdown()
    report(args, rates)


def report(args, rates: dict[str, list[float]]) -> None:
    device = "1 GPU each (nccl)" if args.gpu else "1 thread each (gloo)"
    print(f"\nResNet-20 fine-tune, digits at {args.image_size}px, global batch {args.batch}, {device}; "
          f"{len(next(iter(rates.values())))} epochs counted per side")
    print(f"{'':>12} {'min':>9} {'median':>9} {'max':>9}  images/s")
    for name, values in rates.items():
        print(f"{name:>12} {min(values):9.1f} {statistics.median(values):9.1f} {max(values):9.1f}")
    one, many = (statistics.median(v) for v in rates.values())
    print(f"scaling ({args.workers} ranks / 1 process, medians): {many / one:.2f}x")


if __name__ == "__main__":
    main()
