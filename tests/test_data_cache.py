"""trainables.data_cache / workspace: the digits splits a trial reads from ``<base_dir>/.data`` are
bit for bit the ones scikit-learn builds, a process that finds them never imports scikit-learn,
and a cache of another recipe, versions or a damaged one is never used."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables import data_cache, workspace
from trainables.data import load
from trainables.settings import TrialSettings

SPLITS = ("train", "val", "test")


def _assert_same(a, b):
    assert (a.name, a.num_classes, a.input_shape) == (b.name, b.num_classes, b.input_shape)
    for name in SPLITS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.images.dtype == y.images.dtype == torch.float32 and x.targets.dtype == y.targets.dtype == torch.int64
        assert x.images.shape == y.images.shape and x.images.stride() == y.images.stride()
        assert x.images.numpy().tobytes() == y.images.numpy().tobytes()  # bits, not values (-0.0, NaN)
        assert torch.equal(x.targets, y.targets)
        assert x[7][0].numpy().tobytes() == y[7][0].numpy().tobytes() and x[7][1] == y[7][1]


def _digest(splits) -> str:
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(getattr(splits, name).images.numpy().tobytes())
        h.update(getattr(splits, name).targets.numpy().tobytes())
    return h.hexdigest()


def _settings(tmp_path, **kw) -> TrialSettings:
    return TrialSettings(base_dir=str(tmp_path / "base_models"), **kw)


@pytest.fixture(autouse=True)
def _fresh_process_cache():
    workspace._load.cache_clear()
    yield
    workspace._load.cache_clear()


@pytest.mark.parametrize("image_size, seed, val_fraction", [(None, 0, 0.25), (32, 1, 0.25), (None, 3, 0.1)])
def test_cached_splits_are_bit_identical_to_scikit_learns(tmp_path, image_size, seed, val_fraction):
    built = load("digits", image_size=image_size, seed=seed, val_fraction=val_fraction)
    spec = data_cache.recipe(image_size=image_size, val_fraction=val_fraction, seed=seed)
    assert data_cache.read(tmp_path, spec) is None  # nothing there yet
    assert data_cache.write(tmp_path, spec, built)
    _assert_same(data_cache.read(tmp_path, spec), built)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_the_digits_splits_do_not_depend_on_torchs_thread_count():
    """The driver writes the cache with its thread count, trials read it with theirs (one per CPU)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load("digits", image_size=32)
        torch.set_num_threads(4)
        four = load("digits", image_size=32)
    finally:
        torch.set_num_threads(threads)
    _assert_same(one, four)


def test_the_driver_keeps_the_data_and_a_fresh_process_reads_it_without_scikit_learn(tmp_path):
    settings = _settings(tmp_path)
    assert workspace.keep_data(settings)
    folders = list((tmp_path / "base_models" / workspace.DATA_FOLDER).iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("digits-")
    assert workspace.keep_data(settings)  # there already: kept as it is
    assert list((tmp_path / "base_models" / workspace.DATA_FOLDER).iterdir()) == folders
    code = ("import sys, json, hashlib; from trainables.settings import TrialSettings; "
            "from trainables.workspace import load_data; "
            f"d = load_data(TrialSettings(base_dir={settings.base_dir!r})); h = hashlib.sha256(); "
            "[h.update(getattr(d, n).images.numpy().tobytes()) or h.update(getattr(d, n).targets.numpy().tobytes()) "
            "for n in ('train', 'val', 'test')]; "
            "print(json.dumps([h.hexdigest(), 'sklearn' in sys.modules, 'scipy' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    digest, sklearn, scipy = json.loads(out.stdout.strip().splitlines()[-1])
    assert digest == _digest(load("digits"))
    assert not sklearn and not scipy


def test_load_data_reads_the_cache_and_builds_without_one(tmp_path):
    settings = _settings(tmp_path, image_size=16, seed=2)
    without = workspace.load_data(settings)  # nothing cached: scikit-learn
    assert workspace.keep_data(settings)
    workspace._load.cache_clear()
    cached = workspace.load_data(settings)
    assert cached is not without
    _assert_same(cached, without)
    _assert_same(cached, load("digits", image_size=16, seed=2))


def _only_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir()]
    return folder


def test_a_folder_of_another_recipe_is_not_used(tmp_path):
    spec = data_cache.recipe(image_size=None, val_fraction=0.25, seed=0)
    assert data_cache.write(tmp_path, spec, load("digits"))
    folder = _only_folder(tmp_path)
    for field, value in (("torch", "0.0.1"), ("scikit-learn", "0.1"), ("cpu", "NO AVX"), ("seed", 1),
                         ("format", data_cache.FORMAT + 1), ("code", "another data.py")):
        other = dict(spec, **{field: value})
        assert data_cache.folder(tmp_path, other) != folder  # another version or recipe: another folder
        assert data_cache.read(tmp_path, other) is None
    # a folder whose recorded recipe is not the one asked for (renamed, or written by another version)
    stale = dict(spec, torch="0.0.1")
    (folder / data_cache.RECIPE_FILE).write_text(json.dumps(stale, sort_keys=True))
    assert data_cache.read(tmp_path, spec) is None


def test_a_damaged_folder_is_not_used_and_load_data_builds_the_data(tmp_path):
    settings = _settings(tmp_path)
    assert workspace.keep_data(settings)
    folder = _only_folder(tmp_path / "base_models" / workspace.DATA_FOLDER)
    spec = json.loads((folder / data_cache.RECIPE_FILE).read_text())
    images = folder / "val_images.npy"
    good = images.read_bytes()
    images.write_bytes(good[: len(good) // 2])  # truncated
    assert data_cache.read(folder.parent, spec) is None
    _assert_same(workspace.load_data(settings), load("digits"))
    np.save(images, np.zeros((3, 1, 8, 8), dtype=np.float64))  # another dtype
    assert data_cache.read(folder.parent, spec) is None
    np.save(images, np.zeros((3, 1, 8, 8), dtype=np.float32))  # labels of another length
    assert data_cache.read(folder.parent, spec) is None
    (folder / data_cache.RECIPE_FILE).write_text("{not json")
    assert data_cache.read(folder.parent, spec) is None
    images.unlink()
    (folder / data_cache.RECIPE_FILE).write_text(json.dumps(spec, sort_keys=True))
    assert data_cache.read(folder.parent, spec) is None


def test_a_root_that_cannot_be_written_leaves_the_data_to_scikit_learn(tmp_path):
    blocker = tmp_path / "base_models"
    blocker.write_text("a file where the folder would be")
    settings = _settings(tmp_path)
    assert workspace.keep_data(settings) is False
    _assert_same(workspace.load_data(settings), load("digits"))


def test_only_digits_on_a_folder_is_cached(tmp_path):
    assert workspace.data_cache_root(_settings(tmp_path)) == tmp_path / "base_models" / ".data"
    assert workspace.data_cache_root(_settings(tmp_path, dataset="cifar10", data_dir=str(tmp_path))) is None
    uri = TrialSettings(base_dir="s3://bucket/base_models?endpoint_override=127.0.0.1:1")
    assert workspace.data_cache_root(uri) is None  # no client made, nothing cached
    assert workspace.keep_data(uri) is False
