"""Images per second of one trial's fine-tune loop against a plain hand-written PyTorch loop, side by
side in one run (issue 14's yardstick: >= 0.9x; on a GPU a ResNet-56 CIFAR epoch of 50k images in < 4 s).

    python benchmarks/bench_trial_throughput.py                          # CPU: ResNet-56, 2048 CIFAR images
    python benchmarks/bench_trial_throughput.py --device cuda --images 50000 --rounds 5
    python benchmarks/bench_trial_throughput.py --device cuda --compile  # both sides torch.compile'd
    python benchmarks/bench_trial_throughput.py --data imagefolder --model resnet50 --batch 16 --images 96

``--data imagefolder``: random JPEGs (320x256, quality 90) written as ``train/<class>/*.jpg`` and
``val/<class>/*.jpg``, read back by ``trainables.data.load("imagefolder")`` at 224 px; the trial's
loader is then a ``DataLoader`` with ``--workers`` processes (a trial uses its CPUs - 1), pinned
memory on CUDA, persistent workers; the plain loop uses torchvision's ``ImageFolder`` with the same
transform (RandomResizedCrop + flip) and a ``DataLoader`` of as many workers.

Data: random CIFAR-10 images written to a temporary folder in the official on-disk format (pickled
``data_batch_*``), read back by ``trainables.data.load("cifar10")`` (the md5 list is pointed at the
written files, as the tests do). Both loops train the same ResNet-56 at the same batch size and
precision (CUDA: bf16 autocast + channels_last; CPU: fp32), SGD with momentum, with the same
augmentation (4-pixel pad-crop + flip) on device-resident data:

* ``prunetune``: ``trainables.train.train_epoch`` over ``trainables.device_data.trial_loader`` (the
  trial's own path: seeded order, augmentation on the device, loss/accuracy accumulated on the
  device, non-finite check every 16 steps);
* ``plain``: the loop a user writes by hand: shuffle, index, augment, forward, backward, step.

Each round times one epoch of each, in alternating order, after one untimed warm-up epoch each;
the table gives images/s min / median / max over rounds and the ratio of medians. CPU runs happen in
a child process with glibc's allocator thresholds fixed (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``: otherwise freed activations go back to the kernel and come back zeroed
each pass) and ``--threads`` intra-op threads.
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from malloc_child import CHILD_ENV, in_child, rerun_in_child



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--images", type=int, default=2048, help="training images written (one epoch)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    ap.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    ap.add_argument("--data", default="cifar", choices=("cifar", "imagefolder"))
    ap.add_argument("--workers", type=int, default=None, help="imagefolder: loader processes (default threads - 1)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave cuDNN's algorithm search off (trials turn it on: trainables.train.pick_device)")
    return ap.parse_args(argv)


def write_cifar10(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` random training images (and 1000 test images) as CIFAR-10's python batches."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per = -(-n // 5)
    for i in range(5):
        count = max(0, min(per, n - i * per))
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {"data": rng.integers(0, 256, (1000, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 1000).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def load_written(root: Path):
    """``trainables.data.load("cifar10")`` on the written files (md5 list pointed at them)."""
    import hashlib

    import torchvision

    from trainables.data import load

    folder = root / "cifar-10-batches-py"
    cls = torchvision.datasets.CIFAR10

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls.train_list = [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)]
    cls.test_list = [["test_batch", md5("test_batch")]]
    cls.meta = {"filename": "batches.meta", "key": "label_names", "md5": md5("batches.meta")}
    return load("cifar10", data_dir=root, val_fraction=0.01)


def write_imagefolder(root: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """``n`` random 320x256 JPEG training images (and 2 per class for val) in ImageFolder's layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 2 * classes)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def plain_loader_epoch(model, loader, optimizer, device, autocast):
    """The hand-written loop over a DataLoader: copy, forward, backward, step."""
    import torch.nn.functional as F

    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())


def plain_epoch(model, images, targets, mean, std, optimizer, batch, device, autocast):
    """The hand-written loop: device-resident uint8 data, pad-crop + flip, bf16 on CUDA."""
    import torch
    import torch.nn.functional as F

    model.train()
    n = targets.numel()
    order = torch.randperm(n, device=device)
    ar = torch.arange(32, device=device)
    for start in range(0, n, batch):
        idx = order[start:start + batch]
        x = images[idx].permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        b = x.shape[0]
        fill = -mean / std
        x = F.pad(x - fill, (4, 4, 4, 4)) + fill
        dy, dx = torch.randint(0, 9, (b, 1), device=device), torch.randint(0, 9, (b, 1), device=device)
        x = x[torch.arange(b, device=device).view(b, 1, 1, 1), torch.arange(3, device=device).view(1, 3, 1, 1),
              (dy + ar).view(b, 1, 32, 1), (dx + ar).view(b, 1, 1, 32)]
        x = torch.where(torch.rand(b, 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = F.cross_entropy(model(x).float(), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())  # one sync at the end, as train_epoch's read-back


def child(args) -> None:
    import torch

    from trainables.device_data import trial_loader
    from trainables.models import create_model
    from trainables.train import train_epoch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    workers = args.workers if args.workers is not None else max(0, args.threads - 1)
    tmp = tempfile.TemporaryDirectory(prefix="prunetune-throughput-")
    if args.data == "imagefolder":
        import torchvision

        from trainables.data import load

        root = write_imagefolder(Path(tmp.name), args.images)
        data = load("imagefolder", data_dir=root, val_fraction=0.05)
        loader = trial_loader(data.train, args.batch, shuffle=True, seed=0, device=device, num_workers=workers)
        plain_set = torch.utils.data.Subset(  # the same training images as the trial's split
            torchvision.datasets.ImageFolder(str(root / "train"), transform=data.train.transform), data.train.indices)
        plain_loader = torch.utils.data.DataLoader(plain_set, batch_size=args.batch, shuffle=True, num_workers=workers,
                                                   pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        classes = len(plain_set.dataset.classes)
    else:
        write_cifar10(Path(tmp.name), args.images)
        data = load_written(Path(tmp.name))
        loader = trial_loader(data.train, args.batch, shuffle=True, seed=0, device=device)
        arrays = data.train.device_arrays()
        classes = 10
        images, targets = arrays.images.to(device), arrays.targets.to(device)
        mean = torch.tensor(arrays.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(arrays.std, device=device).view(1, 3, 1, 1)
    n = len(data.train)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def fresh():
        torch.manual_seed(0)
        model = create_model(args.model, classes).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
        return step_model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    sides = {"prunetune": fresh(), "plain": fresh()}

    def run(name):
        model, opt = sides[name]
        if name == "prunetune":
            train_epoch(model, loader, opt, device=device)
        elif args.data == "imagefolder":
            plain_loader_epoch(model, plain_loader, opt, device, autocast)
        else:
            plain_epoch(model, images, targets, mean, std, opt, args.batch, device, autocast)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in sides:  # warm-up (and compilation)
        t0 = time.perf_counter()
        run(name)
        sync()
        print(f"warm-up epoch {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    rates = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            run(name)
            sync()
            rates[name].append(n / (time.perf_counter() - t0))
    print(f"{args.model} on {args.data}{f' ({workers} loader workers)' if args.data == 'imagefolder' else ''}, "
          f"batch {args.batch}, {n} images/epoch, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, threads {args.threads}, "
          f"compile {args.compile and args.compile_mode}, cudnn.benchmark {torch.backends.cudnn.benchmark}, rounds {args.rounds}, allocator env {os.environ.get(CHILD_ENV, '-')}")
    print(f"{'loop':<10} {'img/s min':>10} {'median':>10} {'max':>10} {'epoch s (median)':>17}")
    for name, v in rates.items():
        print(f"{name:<10} {min(v):>10.0f} {statistics.median(v):>10.0f} {max(v):>10.0f} {n / statistics.median(v):>17.2f}")
    print(f"ratio prunetune / plain (medians): {statistics.median(rates['prunetune']) / statistics.median(rates['plain']):.3f}")
    tmp.cleanup()  # the written data set (the image folder is read until the last epoch)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu" and not in_child():
        rerun_in_child("fixed", args.threads)
    child(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
