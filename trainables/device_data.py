"""Data held on the trial's device: no loader processes, no per-sample Python, no host copies.

Data sets that fit in device memory (digits, CIFAR) expose their split as :class:`DeviceArrays`:
images as stored (CIFAR: ``uint8`` NHWC as in its files; digits: normalised ``float32``), labels,
the normalisation, and the augmentation the split gets (CIFAR training: random crop with 4 pixels
of zero padding + horizontal flip, as ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``).
:class:`DeviceLoader` copies them to the device once and yields normalised float batches, cropping
and flipping a whole batch at once there (airbench's recipe). Shuffle order and augmentation draws
come from ``generator`` (a CPU generator, reseeded per epoch by the trial exactly like a
``DataLoader``'s), so a CPU epoch is reproducible bit for bit.

``trial_loader`` picks this path when the split has arrays and they fit, else a ``DataLoader``
(ImageFolder: worker processes sized to the trial's CPUs, pinned memory, persistent workers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .data import make_loader

__all__ = ["DeviceArrays", "DeviceLoader", "trial_loader", "DEVICE_MEMORY_FRACTION"]

log = logging.getLogger(__name__)

#: The device-resident path takes at most this share of the device's free memory.
DEVICE_MEMORY_FRACTION = 0.25


@dataclass(frozen=True)
class DeviceArrays:
    """One split as tensors: ``images`` (N, C, H, W) float32 normalised, or (N, H, W, C) uint8 to be
    scaled by 1/255 and normalised with ``mean``/``std``; ``targets`` (N,) int64; ``pad_crop`` > 0:
    random crops of the original size from a zero-padded image; ``flip``: random horizontal flips."""

    images: torch.Tensor
    targets: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pad_crop: int = 0
    flip: bool = False

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.targets.numel() * 8


class DeviceLoader:
    """Batches of a :class:`DeviceArrays` split, produced on ``device`` (see the module docstring).
    Iterating it yields ``(inputs, targets)`` like a ``DataLoader``; ``len`` is the batch count."""

    def __init__(self, arrays: DeviceArrays, batch_size: int, *, shuffle: bool, seed: int = 0,
                 device: torch.device | str = "cpu", drop_last: bool = False):
        self.device = torch.device(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.arrays = arrays
        self.images = arrays.images.to(self.device)
        self.targets = arrays.targets.to(self.device)
        self.generator = torch.Generator().manual_seed(seed)
        if arrays.images.dtype == torch.uint8:
            c = self.images.shape[-1]
            self._mean = torch.tensor(arrays.mean, device=self.device).view(1, c, 1, 1)
            self._std = torch.tensor(arrays.std, device=self.device).view(1, c, 1, 1)

    def __len__(self) -> int:
        n = self.targets.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.batch_indices():
            yield self.batch(index, self.draw(index.numel()))

    def batch_indices(self) -> Iterator[torch.Tensor]:
        """The sample indices of each batch of one pass (the pass's order drawn from ``generator``)."""
        n = self.targets.numel()
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = self._to_device(order)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            if self.drop_last and index.numel() < self.batch_size:
                return
            yield index

    def draw(self, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The augmentation draws of a batch of ``b`` images, per image: (crop rows, crop columns,
        flip), None where the split does not get that augmentation."""
        p, dy, dx, flip = self.arrays.pad_crop, None, None, None
        if p:
            dy = self._to_device(torch.randint(0, 2 * p + 1, (b,), generator=self.generator))
            dx = self._to_device(torch.randint(0, 2 * p + 1, (b,), generator=self.generator))
        if self.arrays.flip:
            flip = self._to_device(torch.rand(b, generator=self.generator) < 0.5)
        return dy, dx, flip

    def batch(self, index: torch.Tensor, draws) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of the samples ``index`` with the per-image ``draws`` (see ``draw``)."""
        return self._augment(self._normalised(self.images.index_select(0, index)), draws), \
            self.targets.index_select(0, index)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU draw moved to the device without blocking the host (pinned, asynchronous copy)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return x.sub_(self._mean).div_(self._std)

    def _augment(self, x: torch.Tensor, draws) -> torch.Tensor:
        (dy, dx, flip), p, b = draws, self.arrays.pad_crop, x.shape[0]
        if p:
            # Zero padding AFTER normalisation: torchvision pads the raw image with 0, which
            # normalises to -mean/std; pad with that value per channel to match it exactly.
            fill = (-self._mean / self._std) if self.images.dtype == torch.uint8 else torch.zeros(1, device=x.device)
            h, w = x.shape[-2:]
            padded = F.pad(x - fill, (p, p, p, p)) + fill
            rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
            cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
            batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
            chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
            x = padded[batch, chan, rows, cols]
        if flip is not None:
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        return x


def trial_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, device: torch.device | str = "cpu",
                 num_workers: int = 0):
    """The fastest loader for ``dataset`` on ``device``: a :class:`DeviceLoader` when the split
    exposes ``device_arrays()`` and they fit in ``DEVICE_MEMORY_FRACTION`` of the free device memory,
    else a seeded ``DataLoader`` (``num_workers`` processes, pinned memory for CUDA)."""
    device = torch.device(device)
    arrays = dataset.device_arrays() if hasattr(dataset, "device_arrays") else None
    if arrays is not None and _fits(arrays, device):
        return DeviceLoader(arrays, batch_size, shuffle=shuffle, seed=seed, device=device)
    return make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
                       pin_memory=device.type == "cuda")


def _fits(arrays: DeviceArrays, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    if arrays.nbytes > DEVICE_MEMORY_FRACTION * free:
        log.info("data (%.1f GB) does not fit in %.0f%% of the free device memory; using a DataLoader",
                 arrays.nbytes / 1e9, 100 * DEVICE_MEMORY_FRACTION)
        return False
    return True
