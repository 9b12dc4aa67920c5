"""trainables.models: every model builds and runs, options work, weights load safely."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from methods.cost import profile
from trainables.models import create_model, default_input_size, list_models

CIFAR = {"resnet20", "resnet56", "resnet110", "vgg16_cifar"}


def _side(name: str) -> int:
    # CIFAR nets at their native 32x32; torchvision nets at 64x64 to keep the tests cheap.
    return 32 if name in CIFAR else 64


def test_list_models_has_documented_names():
    names = list_models()
    assert names == sorted(names)
    for name in ("resnet20", "resnet56", "resnet110", "vgg16_cifar", "resnet18", "resnet50", "vgg16", "mobilenet_v2"):
        assert name in names


def test_default_input_size():
    assert all(default_input_size(n) == 32 for n in CIFAR)
    assert default_input_size("resnet50") == 224


@pytest.mark.parametrize("name", list_models())
def test_builds_and_runs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    side = _side(name)
    with torch.no_grad():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "vgg16_cifar", "resnet18", "mobilenet_v2"])
def test_in_channels_one(name):
    model = create_model(name, num_classes=5, in_channels=1).eval()
    side = _side(name)
    with torch.no_grad():
        out = model(torch.randn(2, 1, side, side))
    assert out.shape == (2, 5)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


def test_resnet20_runs_on_digits_shape():
    # scikit-learn digits: 1x8x8 images, 10 classes.
    model = create_model("resnet20", num_classes=10, in_channels=1)
    model.train()
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_width_mult_quarters_macs():
    dense = profile(create_model("resnet20", 10), (3, 32, 32))
    half = profile(create_model("resnet20", 10, width_mult=0.5), (3, 32, 32))
    assert 0.2 <= half.macs / dense.macs <= 0.3
    assert 0.2 <= half.params / dense.params <= 0.3


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet9000", 10)
    message = str(info.value)
    assert "resnet9000" in message
    for name in list_models():
        assert name in message


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"width_mult": 0.0}])
def test_bad_arguments_rejected(kwargs):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError):
        create_model("resnet20", **kwargs)


def test_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet20", 10)
    # Make BN running stats non-trivial so buffers are part of the round trip.
    source.train()
    with torch.no_grad():
        source(torch.randn(8, 3, 32, 32))
    source.eval()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    torch.manual_seed(1)
    loaded = create_model("resnet20", 10, weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(create_model("resnet20", 10).eval()(x), source(x))  # different init
        assert torch.equal(loaded(x), source(x))
    # str paths work too
    loaded_str = create_model("resnet20", 10, weights=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded_str(x), source(x))


def test_missing_weights_file_names_path(tmp_path):
    path = tmp_path / "nope" / "weights.pt"
    with pytest.raises(FileNotFoundError, match="weights.pt") as info:
        create_model("resnet20", 10, weights=path)
    assert str(path) in str(info.value)


class _NotAStateDict:
    def __init__(self):
        self.payload = [1, 2, 3]


def test_weights_refuse_arbitrary_pickles(tmp_path):
    # Both an arbitrary object and a whole pickled module are refused by weights_only loading.
    for i, obj in enumerate([_NotAStateDict(), create_model("resnet20", 10)]):
        path = tmp_path / f"bad{i}.pt"
        torch.save(obj, path)
        with pytest.raises(pickle.UnpicklingError):
            create_model("resnet20", 10, weights=path)


def test_weights_for_wrong_architecture_rejected(tmp_path):
    path = tmp_path / "r56.pt"
    torch.save(create_model("resnet56", 10).state_dict(), path)
    with pytest.raises(RuntimeError):
        create_model("resnet20", 10, weights=path)
