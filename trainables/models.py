"""Model zoo: ``create_model(name, num_classes, **kw)``.

CIFAR-style ``resnet20/56/110`` and ``vgg16_cifar`` (32x32 inputs; any size that survives their
downsampling works), and torchvision ``resnet18``, ``resnet34``, ``resnet50``, ``vgg16``,
``mobilenet_v2`` (random init: nothing is downloaded; pass ``weights=PATH`` to load a local state
dict, read with ``torch.load(weights_only=True)``). Builders never move the model to a device.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from methods.errors import ArgumentError, MissingFileError

from .cifar_models import CifarResNet, VGGCifar

__all__ = ["create_model", "list_models", "default_input_size"]

log = logging.getLogger(__name__)


def _torchvision(builder_name: str) -> Callable[..., nn.Module]:
    """A builder of torchvision's ``builder_name``. ``width_mult``: mobilenet_v2's own (it rounds
    widths to multiples of 8); for the others every channel width is scaled by it after building
    (``trainables.widen``: residual-joined channels share one width, the classifier's inputs follow,
    the number of classes stays) and the weights are drawn afresh as torchvision draws them."""
    def build(num_classes: int, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
        import torchvision.models as tvm

        from .widen import widen

        native = builder_name == "mobilenet_v2"
        kwargs = {"width_mult": width_mult} if native and width_mult != 1.0 else {}
        model = getattr(tvm, builder_name)(weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            _replace_stem(model, in_channels)
        if width_mult != 1.0 and not native:
            widen(model, width_mult, linear_std=0.01 if builder_name.startswith("vgg") else None)
        return model

    return build


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv for one with ``in_channels`` inputs (same geometry)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, bias=module.bias is not None)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda num_classes, **kw: CifarResNet(20, num_classes, **kw),
    "resnet56": lambda num_classes, **kw: CifarResNet(56, num_classes, **kw),
    "resnet110": lambda num_classes, **kw: CifarResNet(110, num_classes, **kw),
    "vgg16_cifar": lambda num_classes, **kw: VGGCifar(num_classes, **kw),
    "resnet18": _torchvision("resnet18"),
    "resnet34": _torchvision("resnet34"),
    "resnet50": _torchvision("resnet50"),
    "vgg16": _torchvision("vgg16"),
    "mobilenet_v2": _torchvision("mobilenet_v2"),
}

_INPUT_SIZE = {"resnet20": 32, "resnet56": 32, "resnet110": 32, "vgg16_cifar": 32}


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def default_input_size(name: str) -> int:
    """The side length the model's published cost is quoted at (32 for CIFAR nets, 224 otherwise)."""
    return _INPUT_SIZE.get(name, 224)


def create_model(name: str, num_classes: int = 10, *, in_channels: int = 3, width_mult: float = 1.0,
                 weights: str | Path | None = None) -> nn.Module:
    """Build a model by name. Unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _BUILDERS:
        raise ArgumentError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    if num_classes < 1:
        raise ArgumentError(f"num_classes must be >= 1, got {num_classes}")
    if width_mult <= 0:
        raise ArgumentError(f"width_mult must be > 0, got {width_mult}")
    model = _BUILDERS[name](num_classes, in_channels=in_channels, width_mult=width_mult)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise MissingFileError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        log.info("loaded weights for %s from %s", name, path)
    return model
