"""Per-process caches: a Ray worker reused across trials (``reuse_actors``) loads its data once.

The digits splits also come from a file cache on the sweep's storage (``<base_dir>/.data/``, see
``trainables.data_cache``) when ``base_dir`` is a local or NFS folder: the driver writes it
(:func:`keep_data`) before the trials start, so no trial's worker imports scikit-learn.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from . import data_cache, storage
from .data import DataSplits, default_val_fraction, load
from .settings import TrialSettings

__all__ = ["load_data", "keep_data", "data_cache_root"]

#: The folder under ``base_dir`` that holds the cached data sets (hidden: everything else there is a
#: base model, and what lists them skips dot-names, like the half-written ``.tmp-`` ones).
DATA_FOLDER = ".data"


@lru_cache(maxsize=4)
def _load(dataset: str, data_dir: str | None, download: bool, image_size: int | None, seed: int,
          cache_root: Path | None) -> DataSplits:
    if cache_root is not None:
        cached = data_cache.read(cache_root, _recipe(image_size, seed))
        if cached is not None:
            return cached
    return load(dataset, data_dir=data_dir, download=download, image_size=image_size, seed=seed)


def _recipe(image_size: int | None, seed: int) -> dict:
    return data_cache.recipe(image_size=image_size, val_fraction=default_val_fraction("digits"), seed=seed)


def data_cache_root(settings: TrialSettings) -> Path | None:
    """Where the data of ``settings`` is cached as arrays: digits only, and only when ``base_dir`` is
    a folder path (an object store's round trips would cost what the cache saves, and resolving
    its URI is no business of loading data)."""
    if settings.dataset != "digits" or storage.is_uri(settings.base_dir):
        return None
    return storage.local_path(storage.join(settings.base_dir, DATA_FOLDER))


def load_data(settings: TrialSettings) -> DataSplits:
    return _load(settings.dataset, settings.data_dir, settings.download, settings.image_size, settings.seed,
                 data_cache_root(settings))


def keep_data(settings: TrialSettings) -> bool:
    """Write the data of ``settings`` into its file cache unless it is there; whether it is now."""
    root = data_cache_root(settings)
    if root is None:
        return False
    return data_cache.write(root, _recipe(settings.image_size, settings.seed), load_data(settings))
