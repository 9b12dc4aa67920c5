"""Per-process caches: a Ray worker reused across trials (``reuse_actors``) loads its data once."""
from __future__ import annotations

from functools import lru_cache

from .data import DataSplits, load
from .settings import TrialSettings

__all__ = ["load_data"]


@lru_cache(maxsize=4)
def _load(dataset: str, data_dir: str | None, download: bool, image_size: int | None, seed: int) -> DataSplits:
    return load(dataset, data_dir=data_dir, download=download, image_size=image_size, seed=seed)


def load_data(settings: TrialSettings) -> DataSplits:
    return _load(settings.dataset, settings.data_dir, settings.download, settings.image_size, settings.seed)
