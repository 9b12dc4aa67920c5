"""trainables.data: digits, CIFAR-10/100 and ImageNet-style folders, on tiny fixtures written here.

Nothing is downloaded: the CIFAR fixtures are written in the on-disk format of the official
``cifar-10-batches-py`` / ``cifar-100-python`` folders, the image folders as real PNG/JPEG files.
"""
from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from trainables import data
from trainables.data import DataError, DataSplits, load, make_loader


def _labels(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


# ------------------------------------------------------------------------------------------
# API surface


def test_list_datasets_names_every_dataset():
    assert data.list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'.*cifar10, cifar100, digits, imagefolder"):
        load("mnist")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.1, 1.5, True])
def test_val_fraction_outside_open_unit_interval_is_rejected(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        load("digits", val_fraction=fraction)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagefolder"])
def test_data_dir_required(name):
    with pytest.raises(DataError, match=rf"{name}.*needs data_dir"):
        load(name)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagefolder"])
def test_missing_data_dir_names_the_path(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere") as info:
        load(name, data_dir=missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_sizes_and_classes():
    splits = load("digits")
    assert isinstance(splits, DataSplits)
    assert splits.name == "digits"
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 8, 8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    # 20 % test, then 25 % of the rest for validation: 60/20/20
    assert len(splits.test) == 360
    assert len(splits.val) == 359
    x, y = splits.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert isinstance(y, int)
    for split in (splits.train, splits.val, splits.test):
        assert sorted(set(_labels(split))) == list(range(10))


def test_digits_normalised_with_train_statistics():
    splits = load("digits")
    train = splits.train.images
    assert abs(train.mean().item()) < 1e-4
    assert abs(train.std().item() - 1.0) < 1e-3
    # the other splits use the train statistics, so they are near 0/1 but not exactly
    assert abs(splits.test.images.mean().item()) < 0.1


def test_digits_split_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = load("digits", seed=0), load("digits", seed=0), load("digits", seed=1)
    for name in ("train", "val", "test"):
        sa, sb, sc = getattr(a, name), getattr(b, name), getattr(c, name)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.targets, sb.targets)
        assert len(sa) == len(sc)
        assert not torch.equal(sa.images, sc.images)


def test_digits_splits_are_disjoint():
    splits = load("digits")
    keys = [{x.numpy().tobytes() for x in split.images} for split in (splits.train, splits.val, splits.test)]
    # the digits set has a handful of exact duplicate images; allow for those only
    assert len(keys[0] & keys[2]) < 5 and len(keys[0] & keys[1]) < 5 and len(keys[1] & keys[2]) < 5


def test_digits_val_fraction_sets_the_validation_share():
    splits = load("digits", val_fraction=0.1)
    assert len(splits.test) == 360
    assert len(splits.val) == round(1437 * 0.1)


def test_digits_image_size_resizes_bilinear():
    splits = load("digits", image_size=32)
    assert splits.input_shape == (1, 32, 32)
    for split in (splits.train, splits.val, splits.test):
        assert split[0][0].shape == (1, 32, 32)
    assert abs(splits.train.images.mean().item()) < 1e-4
    # same images, same order, same labels as at 8x8
    small = load("digits")
    assert torch.equal(small.test.targets, splits.test.targets)


# ------------------------------------------------------------------------------------------
# CIFAR fixtures


class _Py2Pickler(pickle._Pickler):
    """Pickle protocol 2 with ``bytes`` written as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING).

    The official CIFAR files were pickled by Python 2's cPickle: their dict keys (``'data'``,
    ``'labels'``, ...), the label names and numpy's raw array buffer are Python 2 byte strings, and
    torchvision reads them with ``pickle.load(f, encoding="latin1")``, which decodes them to str.
    Writing our ``b'data'`` keys the same way makes the fixture follow that exact read path.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows: 1024 red, then 1024 green, then 1024 blue values (row-major 32x32)."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root: Path, per_class_per_batch: int = 1, test_per_class: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        labels = [c for c in range(10) for _ in range(per_class_per_batch)]
        _write_py2_pickle(folder / f"data_batch_{b}", {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels,
            b"data": _images(rng, len(labels)),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(len(labels))],
        })
    labels = [c for c in range(10) for _ in range(test_per_class)]
    _write_py2_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": _images(rng, len(labels)),
        b"filenames": [f"test_{i}.png".encode() for i in range(len(labels))],
    })
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_py2_pickle(folder / "batches.meta", {
        b"num_cases_per_batch": 10 * per_class_per_batch, b"label_names": names, b"num_vis": 3072,
    })
    return folder


def _write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for c in range(100) for _ in range(per_class)]
        _write_py2_pickle(folder / split, {
            b"filenames": [f"{split}_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [c // 5 for c in fine],
            b"data": _images(rng, len(fine)),
        })
    _write_py2_pickle(folder / "meta", {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    })
    return folder


def _accept_fixture_md5s(monkeypatch, cls, folder: Path) -> None:
    """Point torchvision's md5 table for ``cls`` at OUR files (test-only, undone after the test).

    torchvision's CIFAR classes check every file against the md5 of the official release
    (``_check_integrity`` / ``_load_meta``), which a fake file can never match. data.py loads the
    stock torchvision classes untouched, so real data keeps its full check; here, and only for the
    duration of one test, the class-level ``train_list`` / ``test_list`` / ``meta`` tables are
    replaced by copies carrying the md5s of the fixture files. The check itself still runs: a file
    changed after this point fails it (see the corrupt-file tests).
    """
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cifar"
    folder = _write_cifar10(root)
    _accept_fixture_md5s(monkeypatch, torchvision.datasets.CIFAR10, folder)
    return root


@pytest.fixture
def cifar100_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cifar"
    folder = _write_cifar100(root)
    _accept_fixture_md5s(monkeypatch, torchvision.datasets.CIFAR100, folder)
    return root


def _raw_row(folder: Path, filename: str, row: int) -> np.ndarray:
    with open(folder / filename, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return entry["data"][row]


# ------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_shapes_sizes_and_labels(cifar10_dir):
    splits = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2)
    assert splits.name == "cifar10"
    assert splits.num_classes == 10
    assert splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    for split in (splits.train, splits.val, splits.test):
        x, y = split[0]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert isinstance(y, int)
        assert set(_labels(split)) <= set(range(10))
    # stratified: one validation image per class
    assert sorted(_labels(splits.val)) == list(range(10))
    assert sorted(_labels(splits.test)) == sorted(list(range(10)) * 2)
    # val is held out of the official training set, disjoint from train
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    assert sorted(splits.train.indices + splits.val.indices) == list(range(50))


def test_cifar10_eval_transform_is_plain_normalisation(cifar10_dir):
    splits = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2)
    mean = torch.tensor(data.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(3, 1, 1)
    # test item 3 is row 3 of test_batch: 1024 R, 1024 G, 1024 B values
    expected = torch.from_numpy(_raw_row(cifar10_dir / "cifar-10-batches-py", "test_batch", 3)).float()
    expected = (expected.view(3, 32, 32) / 255.0 - mean) / std
    assert torch.allclose(splits.test[3][0], expected, atol=1e-5)
    # validation is not augmented either: same item twice is identical
    assert torch.equal(splits.val[0][0], splits.val[0][0])


def test_cifar10_train_augmentation_on_and_off(cifar10_dir):
    augmented = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2, augment=True)
    torch.manual_seed(0)
    draws = [augmented.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop/flip differ
    plain = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])


def test_cifar10_val_split_seeded(cifar10_dir):
    a = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2, seed=0)
    b = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2, seed=0)
    c = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2, seed=1)
    assert a.val.indices == b.val.indices
    assert a.val.indices != c.val.indices


def test_cifar10_image_size_resizes(cifar10_dir):
    splits = load("cifar10", data_dir=cifar10_dir, val_fraction=0.2, image_size=40)
    assert splits.input_shape == (3, 40, 40)
    assert splits.train[0][0].shape == (3, 40, 40)
    assert splits.test[0][0].shape == (3, 40, 40)


def test_cifar_fixture_is_rejected_by_stock_md5s(tmp_path):
    """Without the test-only md5 table the fake files fail torchvision's real integrity check."""
    root = tmp_path / "cifar"
    folder = _write_cifar10(root)
    with pytest.raises(DataError) as info:
        load("cifar10", data_dir=root)
    message = str(info.value)
    assert str(folder) in message and "download=True" in message and "\n" not in message


def test_cifar10_corrupt_file_names_the_path(cifar10_dir):
    folder = cifar10_dir / "cifar-10-batches-py"
    batch = folder / "data_batch_3"
    raw = bytearray(batch.read_bytes())
    raw[-10] ^= 0xFF
    batch.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="missing or corrupt") as info:
        load("cifar10", data_dir=cifar10_dir)
    assert str(folder) in str(info.value) and "download=True" in str(info.value)


def test_cifar10_missing_file_names_the_path(cifar10_dir):
    folder = cifar10_dir / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing or corrupt") as info:
        load("cifar10", data_dir=cifar10_dir)
    assert str(folder) in str(info.value)


def test_cifar10_empty_data_dir_names_the_path(tmp_path):
    with pytest.raises(DataError, match="missing or corrupt") as info:
        load("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


# ------------------------------------------------------------------------------------------
# CIFAR-100


def test_cifar100_shapes_sizes_and_labels(cifar100_dir):
    splits = load("cifar100", data_dir=cifar100_dir)
    assert splits.name == "cifar100"
    assert splits.num_classes == 100
    assert splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 100)
    for split in (splits.train, splits.val, splits.test):
        x, _ = split[0]
        assert x.shape == (3, 32, 32)
        assert set(_labels(split)) <= set(range(100))
    assert sorted(_labels(splits.test)) == list(range(100))  # fine labels, not coarse
    mean = torch.tensor(data.CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CIFAR100_STD).view(3, 1, 1)
    expected = torch.from_numpy(_raw_row(cifar100_dir / "cifar-100-python", "test", 7)).float()
    expected = (expected.view(3, 32, 32) / 255.0 - mean) / std
    assert torch.allclose(splits.test[7][0], expected, atol=1e-5)


def test_cifar100_corrupt_meta_names_the_path(cifar100_dir):
    folder = cifar100_dir / "cifar-100-python"
    (folder / "meta").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="missing or corrupt") as info:
        load("cifar100", data_dir=cifar100_dir)
    assert str(folder) in str(info.value)


# ------------------------------------------------------------------------------------------
# ImageNet-style folders


def _write_image_tree(root: Path, classes=("cat", "dog", "fox"), train_per_class=4, val_per_class=2) -> Path:
    rng = np.random.default_rng(2)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                if i % 2:
                    Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)
                else:  # a greyscale PNG: the loader must convert it to RGB
                    Image.fromarray(pixels[..., 0], mode="L").save(d / f"{i}.png")
    return root


def test_imagefolder_shapes_classes_and_splits(tmp_path):
    root = _write_image_tree(tmp_path / "tree")
    splits = load("imagefolder", data_dir=root, image_size=32, val_fraction=0.25)
    assert splits.name == "imagefolder"
    assert splits.num_classes == 3
    assert splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    for split in (splits.train, splits.val, splits.test):
        for i in range(len(split)):
            x, y = split[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
            assert y in (0, 1, 2)
    assert sorted(_labels(splits.val)) == [0, 1, 2]
    assert sorted(_labels(splits.test)) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_default_size_is_224(tmp_path):
    root = _write_image_tree(tmp_path / "tree", classes=("a", "b"), train_per_class=2, val_per_class=1)
    splits = load("imagefolder", data_dir=root, val_fraction=0.5, augment=False)
    assert splits.input_shape == (3, 224, 224)
    assert splits.test[0][0].shape == (3, 224, 224)
    assert torch.equal(splits.train[0][0], splits.train[0][0])  # augment=False: deterministic


def test_imagefolder_without_train_dir_names_the_path(tmp_path):
    root = tmp_path / "tree"
    (root / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="missing directory") as info:
        load("imagefolder", data_dir=root)
    assert str(root / "train") in str(info.value)


def test_imagefolder_without_images_names_the_path(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images") as info:
        load("imagefolder", data_dir=root)
    assert str(root / "train") in str(info.value)


def test_imagefolder_empty_train_dir_names_the_path(tmp_path):
    root = tmp_path / "tree"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    with pytest.raises(DataError, match="no images") as info:
        load("imagefolder", data_dir=root)
    assert str(root / "train") in str(info.value)


def test_imagefolder_val_classes_must_match_train(tmp_path):
    root = _write_image_tree(tmp_path / "tree")
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match="differ"):
        load("imagefolder", data_dir=root, image_size=32)


# ------------------------------------------------------------------------------------------
# make_loader


def _order(loader) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


def test_make_loader_seeded_shuffle_is_reproducible():
    train = load("digits").train
    a = _order(make_loader(train, 64, shuffle=True, seed=3))
    b = _order(make_loader(train, 64, shuffle=True, seed=3))
    c = _order(make_loader(train, 64, shuffle=True, seed=4))
    assert a == b
    assert a != c
    assert sorted(a) == sorted(_labels(train))


def test_make_loader_without_shuffle_keeps_order_and_drop_last():
    val = load("digits").val
    loader = make_loader(val, 100, shuffle=False, drop_last=True)
    assert _order(loader) == _labels(val)[: (len(val) // 100) * 100]
    x, y = next(iter(loader))
    assert x.shape == (100, 1, 8, 8) and y.dtype == torch.int64
