"""The digits splits kept as ``.npy`` arrays on the sweep's storage, so a trial's worker process
loads them without scikit-learn: importing ``sklearn`` (which pulls in ``scipy.stats``) was ~1.1 s
of CPU in the first trial on every worker, and the driver's preflight paid it again each sweep.

One folder per recipe, ``<root>/digits-<key>/``: ``{train,val,test}_{images,targets}.npy`` (the
splits' tensors exactly as ``trainables.data`` builds them: normalised ``float32`` images, ``int64``
labels) and ``recipe.json``. The key hashes the recipe: data set, image size, validation share,
seed, this module's format, a hash of ``trainables/data.py`` itself (a change to how the splits are
built is a new recipe), the installed scikit-learn (the images and the seeded split), NumPy and
torch (resizing and normalisation) versions, and the CPU's vector instruction set torch uses (its
reductions may sum in another order on another one; the thread count does not change them,
``tests/test_data_cache.py``), so a node of another kind on a shared folder builds its own. A
folder is written into a temporary sibling and renamed, so a reader sees a whole one or none; a
reader checks the recipe file against its own and every array's dtype and shape, and anything that
does not match (another version's folder, a truncated file) is not used: the data set is then
built from scikit-learn as before. Nothing here raises: a cache that cannot be read or written
only costs the slow path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .data import DataSplits, TensorImageDataset

__all__ = ["recipe", "folder", "read", "write", "FORMAT"]

log = logging.getLogger(__name__)
#: Bump when what a folder holds changes (how the splits are built is in the key already).
FORMAT = 1
RECIPE_FILE = "recipe.json"
_SPLITS = ("train", "val", "test")
_NUM_CLASSES = 10


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _source_hash() -> str | None:
    """A hash of ``trainables/data.py``, what builds the splits."""
    from . import data

    try:
        return hashlib.sha256(Path(data.__file__).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def recipe(*, image_size: int | None, val_fraction: float, seed: int) -> dict[str, Any]:
    """Everything the digits splits depend on (``trainables.data.load``'s resolved arguments, its
    code and the versions of what it runs)."""
    return {"dataset": "digits", "format": FORMAT, "image_size": image_size, "val_fraction": float(val_fraction),
            "seed": int(seed), "code": _source_hash(), "scikit-learn": _version("scikit-learn"),
            "numpy": np.__version__, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def folder(root: str | os.PathLike, spec: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"digits-{key}"


def read(root: str | os.PathLike, spec: dict[str, Any]) -> DataSplits | None:
    """The cached splits of ``spec`` under ``root``, or None (absent, another recipe, unreadable)."""
    target = folder(root, spec)
    try:
        if json.loads((target / RECIPE_FILE).read_text()) != spec:
            log.info("data cache %s holds another recipe; not used", target)
            return None
        splits = {name: _split(target, name) for name in _SPLITS}
        if any(split is None for split in splits.values()):
            log.info("data cache %s not used: arrays of another dtype or shape", target)
            return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # a truncated or foreign file: np.load and json raise ValueError
        log.info("data cache %s not used: %s", target, exc)
        return None
    shapes = {tuple(s.images.shape[1:]) for s in splits.values()}
    if len(shapes) != 1:
        log.info("data cache %s not used: splits of different image shapes %s", target, sorted(shapes))
        return None
    return DataSplits(**splits, num_classes=_NUM_CLASSES, input_shape=shapes.pop(), name="digits")


def _split(target: Path, name: str) -> TensorImageDataset | None:
    """One split's arrays, or None where their dtype or shape is not what ``write`` saves."""
    images = np.load(target / f"{name}_images.npy", allow_pickle=False)
    targets = np.load(target / f"{name}_targets.npy", allow_pickle=False)
    if images.dtype != np.float32 or images.ndim != 4 or targets.dtype != np.int64 or targets.shape != images.shape[:1]:
        return None
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(targets))


def write(root: str | os.PathLike, spec: dict[str, Any], splits: DataSplits) -> bool:
    """Keep ``splits`` (built by ``trainables.data.load`` for ``spec``) under ``root`` unless a
    folder for ``spec`` is there already; whether the cache now holds them."""
    target = folder(root, spec)
    if (target / RECIPE_FILE).is_file():
        return True
    def fill(folder: Path) -> None:
        for name in _SPLITS:
            split = getattr(splits, name)
            np.save(folder / f"{name}_images.npy", split.images.numpy(), allow_pickle=False)
            np.save(folder / f"{name}_targets.npy", split.targets.numpy(), allow_pickle=False)
        (folder / RECIPE_FILE).write_text(json.dumps(spec, sort_keys=True))

    reason = None
    try:
        storage.publish_dir(target, fill)  # False: another process renamed its copy first
    except OSError as exc:  # a folder that cannot be written
        reason = exc
    if not (target / RECIPE_FILE).is_file():  # neither ours nor another process's
        log.info("data cache %s not written%s", target, f": {reason}" if reason else "")
        return False
    log.debug("data cache %s written", target)
    return True
