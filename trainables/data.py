"""Data sets for training, searching and testing: ``load(name, ...) -> DataSplits``.

Every data set comes back as three splits of the same shape, each a ``torch.utils.data.Dataset``
yielding ``(image, label)`` with ``image`` a float tensor ``C x H x W`` (already normalised) and
``label`` a Python ``int``:

``train``
    what the model is trained (and fine-tuned) on; augmented when ``augment`` and the data set has
    augmentation.
``val``
    held out of the official training data with a seeded split (``val_fraction`` of it, stratified
    by class where every class has enough images); never augmented. This is the split the search
    optimises (the trial metric ``accuracy``), so the official test set is never used for choosing.
``test``
    the official test set (the trial metric ``test_accuracy``), never augmented.

Names (``list_datasets()``):

``digits``
    scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1797 images,
    10 classes, grey levels 0..16; nothing is downloaded). Scaled to [0, 1], optionally resized
    (``image_size=N``: bilinear to N x N; ``vgg16_cifar`` needs 32), then normalised with the
    TRAINING split's mean and std. Split stratified and seeded: 20 % test, then ``val_fraction`` of
    the remaining pool for validation (default 0.25, so 60/20/20 overall). Held in memory as
    tensors; no augmentation.
``cifar10`` / ``cifar100``
    ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` under ``data_dir`` (the folder that holds
    ``cifar-10-batches-py/`` or ``cifar-100-python/``); downloaded only when ``download=True``.
    torchvision's md5 check of the files is left as it is. Normalised with the per-data-set channel
    mean/std; training augmentation ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``.
    ``image_size`` other than 32 appends a resize. Default ``val_fraction`` 0.1 (5000 images).
``imagefolder``
    an ImageNet-style tree ``data_dir/train/<class>/*.jpg|png...`` and ``data_dir/val/<class>/...``;
    ``val/`` (the official validation set in ImageNet's layout) serves as our ``test`` split, and
    our ``val`` split is held out of ``train/``. Class indices come from the sorted folder names of
    ``train/``; ``val/`` must have the same classes. Images are converted to RGB; training:
    ``RandomResizedCrop(image_size)`` + flip when ``augment`` (else the eval transform); eval:
    ``Resize(int(image_size * 256 / 224))`` + ``CenterCrop(image_size)``. ImageNet mean/std.
    Default ``image_size`` 224, default ``val_fraction`` 0.1.

Each training-derived pair (``train`` / ``val``) reads the files ONCE: one underlying data set
without a transform, two ``Subset``-like views of disjoint seeded index sets, each applying its
own transform. Problems with names, paths and files raise :class:`DataError` (a ``ValueError``)
with one line that names the field or path.

``make_loader`` builds a ``DataLoader`` whose shuffling (and the seeds of its worker processes)
come from a generator seeded with ``seed``. With ``num_workers=0`` the random augmentations draw
from torch's global generator; seed it (``torch.manual_seed``) for bit-identical epochs.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from methods.errors import ArgumentError, PruneTuneError

__all__ = ["DataError", "DataSplits", "load", "list_datasets", "default_val_fraction", "make_loader"]

log = logging.getLogger(__name__)

_DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DIGITS_TEST_FRACTION = 0.2
_DEFAULT_VAL_FRACTION = {"digits": 0.25, "cifar10": 0.1, "cifar100": 0.1, "imagefolder": 0.1}


class DataError(PruneTuneError, ValueError):
    """A data set cannot be loaded as asked: bad name or field, missing or corrupt files."""


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one data set and what a model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) as the model sees it
    name: str


def list_datasets() -> list[str]:
    """The names ``load`` accepts, sorted."""
    return list(_DATASETS)


def default_val_fraction(name: str) -> float:
    """The validation share ``load`` takes for data set ``name`` when given ``val_fraction=None``."""
    return _DEFAULT_VAL_FRACTION[name]


def load(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    augment: bool = True,
) -> DataSplits:
    """Load data set ``name`` as train/val/test splits (see the module docstring).

    ``val_fraction`` is the share of the training pool held out for validation; ``None`` takes the
    data set's default (0.25 for ``digits``, i.e. 60/20/20 overall; 0.1 for the others).
    """
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(_DATASETS)}")
    if val_fraction is None:
        val_fraction = _DEFAULT_VAL_FRACTION[name]
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")

    if name == "digits":
        splits = _load_digits(image_size=image_size, val_fraction=val_fraction, seed=seed)
    else:
        root = _require_dir(name, data_dir, must_exist=not (download and name.startswith("cifar")))
        if name in ("cifar10", "cifar100"):
            splits = _load_cifar(name, root, download=download, image_size=image_size,
                                 val_fraction=val_fraction, seed=seed, augment=augment)
        else:
            splits = _load_imagefolder(root, image_size=image_size or 224, val_fraction=val_fraction,
                                       seed=seed, augment=augment)
    log.info("loaded %s: %d train, %d val, %d test, %d classes, input %s", name, len(splits.train),
             len(splits.val), len(splits.test), splits.num_classes, splits.input_shape)
    return splits


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` whose order (and worker seeds) come from a generator seeded with ``seed``."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size!r}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


# --------------------------------------------------------------------------------------------
# Dataset views


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` float and labels ``(N,)`` int64; yields ``(x, int(y))``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.ndim != 4 or targets.ndim != 1 or len(images) != len(targets):
            raise ArgumentError(f"images must be (N,C,H,W) and targets (N,), got {tuple(images.shape)} and {tuple(targets.shape)}")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def device_arrays(self):
        """The split as tensors for ``trainables.device_data.DeviceLoader`` (already normalised)."""
        from .device_data import DeviceArrays

        return DeviceArrays(self.images, self.targets)


class TransformedSubset(Dataset):
    """The items ``indices`` of ``base`` (which yields ``(PIL image, label)``) with ``transform``."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[index]]
        return self.transform(image), int(label)

    @property
    def targets(self) -> list[int]:
        base_targets = self.base.targets  # type: ignore[attr-defined]
        return [int(base_targets[i]) for i in self.indices]


class CifarSubset(TransformedSubset):
    """A CIFAR split: ``TransformedSubset`` that can also hand its raw ``uint8`` images to a
    ``DeviceLoader`` (with the same normalisation and augmentation, done on the device)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Any], torch.Tensor], *,
                 mean: tuple[float, ...], std: tuple[float, ...], augment: bool, resized: bool) -> None:
        super().__init__(base, indices, transform)
        self.mean, self.std, self.augment, self.resized = mean, std, augment, resized

    def device_arrays(self):
        """The split's images as stored (N, 32, 32, 3 uint8), or None when a resize is asked (the
        device path does not resize)."""
        from .device_data import DeviceArrays

        if self.resized:
            return None
        images = torch.from_numpy(np.ascontiguousarray(self.base.data[self.indices]))  # type: ignore[attr-defined]
        targets = torch.as_tensor(self.targets, dtype=torch.int64)
        return DeviceArrays(images, targets, self.mean, self.std, pad_crop=4 if self.augment else 0, flip=self.augment)


# --------------------------------------------------------------------------------------------
# Helpers


def _require_dir(name: str, data_dir: str | Path | None, *, must_exist: bool) -> Path:
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs data_dir (got None)")
    root = Path(data_dir).expanduser()
    if must_exist and not root.is_dir():
        raise DataError(f"data_dir {str(root)!r} for dataset {name!r} does not exist or is not a directory")
    return root


def _split_indices(targets: Sequence[int], val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index arrays; stratified by class when every class allows it."""
    from sklearn.model_selection import train_test_split

    targets = np.asarray(targets)
    n = len(targets)
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"{what}: {n} training images cannot be split with val_fraction={val_fraction}")
    indices = np.arange(n)
    try:
        train_idx, val_idx = train_test_split(indices, test_size=n_val, random_state=seed, stratify=targets)
    except ValueError:  # some class too small to stratify (or fewer val images than classes)
        log.warning("%s: cannot stratify the validation split; using a plain seeded split", what)
        train_idx, val_idx = train_test_split(indices, test_size=n_val, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(*, image_size: int | None, val_fraction: float, seed: int) -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    targets = torch.as_tensor(bunch.target, dtype=torch.int64)
    if image_size is not None and image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)
    indices = np.arange(len(targets))
    pool, test_idx = train_test_split(indices, test_size=_DIGITS_TEST_FRACTION, random_state=seed,
                                      stratify=bunch.target)
    pool, test_idx = np.sort(pool), np.sort(test_idx)
    pool_train, pool_val = _split_indices(bunch.target[pool], val_fraction, seed, what="digits")
    train_idx, val_idx = pool[pool_train], pool[pool_val]
    train_images = images[torch.as_tensor(train_idx)]
    mean, std = train_images.mean(), train_images.std()

    def view(idx: np.ndarray) -> TensorImageDataset:
        t = torch.as_tensor(idx)
        return TensorImageDataset(((images[t] - mean) / std).contiguous(), targets[t].clone())

    return DataSplits(train=view(train_idx), val=view(val_idx), test=view(test_idx), num_classes=10,
                      input_shape=tuple(images.shape[1:]), name="digits")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# CIFAR


def _load_cifar(name: str, root: Path, *, download: bool, image_size: int | None, val_fraction: float,
                seed: int, augment: bool) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    folder = root / cls.base_folder
    try:
        train_base = cls(str(root), train=True, transform=None, download=download)
        test_base = cls(str(root), train=False, transform=None, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted" (md5 check)
        reason = str(err).split(".")[0]
        hint = "" if download else "; pass download=True to fetch them"
        raise DataError(f"{name} files missing or corrupt under {str(folder)!r} (torchvision: {reason}){hint}") from err
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
        raise DataError(f"{name} files under {str(folder)!r} cannot be read: {type(err).__name__}: {err}") from err

    size = image_size or 32
    resize = [T.Resize(size)] if size != 32 else []
    tail = [*resize, T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose(tail)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *tail]) if augment else eval_tf

    train_idx, val_idx = _split_indices(train_base.targets, val_fraction, seed, what=f"{name} at {str(folder)!r}")
    num_classes = len(train_base.classes)

    def split(base, indices, transform, augmented):
        return CifarSubset(base, indices, transform, mean=mean, std=std, augment=augmented, resized=bool(resize))

    return DataSplits(
        train=split(train_base, train_idx, train_tf, augment),
        val=split(train_base, val_idx, eval_tf, False),
        test=split(test_base, range(len(test_base)), eval_tf, False),
        num_classes=num_classes,
        input_shape=(3, size, size),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# ImageNet-style folders


def _load_imagefolder(root: Path, *, image_size: int, val_fraction: float, seed: int, augment: bool) -> DataSplits:
    from torchvision import datasets
    from torchvision import transforms as T

    train_dir, test_dir = root / "train", root / "val"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"imagefolder: missing directory {str(d)!r} (expected {root}/train/<class>/ and {root}/val/<class>/)")
    train_base, test_base = _image_folder(datasets, train_dir), _image_folder(datasets, test_dir)
    if test_base.classes != train_base.classes:
        raise DataError(f"imagefolder: classes of {str(test_dir)!r} {test_base.classes} differ from those of "
                        f"{str(train_dir)!r} {train_base.classes}")

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), normalize])
    train_tf = (T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
                if augment else eval_tf)
    train_idx, val_idx = _split_indices(train_base.targets, val_fraction, seed, what=f"imagefolder {str(train_dir)!r}")
    return DataSplits(
        train=TransformedSubset(train_base, train_idx, train_tf),
        val=TransformedSubset(train_base, val_idx, eval_tf),
        test=TransformedSubset(test_base, range(len(test_base)), eval_tf),
        num_classes=len(train_base.classes),
        input_shape=(3, image_size, image_size),
        name="imagefolder",
    )


def _image_folder(datasets: Any, directory: Path) -> Any:
    try:
        return datasets.ImageFolder(str(directory))
    except FileNotFoundError as err:  # no class folders, or class folders without any image
        raise DataError(f"imagefolder: no images found under {str(directory)!r} ({err})") from err
