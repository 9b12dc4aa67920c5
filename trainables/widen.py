"""A width multiplier for models that have none of their own (torchvision resnet18/34/50, vgg16):
scale every channel width of a built model by ``width_mult``, then re-initialise it.

The channel groups come from ``methods.graph.DependencyGraph``, which lists every group (prunable or
not) with the modules that write it (producers), are cut along it (batch norms, depthwise convs) and
read it (consumers). Each group gets one new width, ``max(1, round(size * width_mult))`` (the rule
of the CIFAR models), so channels joined by a residual add stay one width, and a classifier reading
a flattened map follows with ``width x features per channel`` inputs. The network input's channels
(no producer) and the network output (the number of classes) keep theirs. The widened shapes are
written as a ``methods.spec`` architecture spec and applied with ``apply_architecture``, the path a
saved pruned model is rebuilt by; the weights are then drawn afresh (:func:`init_like_torchvision`).
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from methods.errors import SurgeryError
from methods.graph import DependencyGraph
from methods.spec import apply_architecture, architecture_spec

from .cifar_models import scaled

__all__ = ["widened_spec", "widen", "init_like_torchvision"]

log = logging.getLogger(__name__)


def _resize(entry: dict[str, Any], name: str, role: str, width: int, per_channel: int = 1) -> None:
    kind = entry["type"]
    if role == "producer" and kind == "Conv2d":
        entry["out_channels"] = width
    elif role == "producer" and kind == "Linear":
        entry["out_features"] = width
    elif role == "follower" and kind in ("BatchNorm2d", "BatchNorm1d"):
        entry["num_features"] = width
    elif role == "follower" and kind == "Conv2d":  # depthwise: one filter per channel
        entry["in_channels"] = entry["out_channels"] = entry["groups"] = width
    elif role == "consumer" and kind == "Conv2d" and entry["groups"] == 1:
        entry["in_channels"] = width
    elif role == "consumer" and kind == "Linear":
        entry["in_features"] = width * per_channel
    else:
        raise SurgeryError(f"cannot widen {name}: {kind} as a {role} of a channel group")


def widened_spec(model: nn.Module, width_mult: float) -> dict[str, dict[str, Any]]:
    """``methods.spec.architecture_spec`` of ``model`` with every channel group scaled by ``width_mult``."""
    graph = DependencyGraph(model)
    spec = architecture_spec(model)
    for group in graph.groups:
        if not group.prunable:
            if group.reason == "network output":
                continue  # the logits: the number of classes stays
            raise SurgeryError(f"cannot widen {type(model).__name__}: channel group {group.name} is fixed "
                               f"({group.reason})")
        width = scaled(group.size, width_mult)
        for name in group.producers:
            _resize(spec[name], name, "producer", width)
        for name in group.followers:
            _resize(spec[name], name, "follower", width)
        for name, per_channel in group.consumers:
            _resize(spec[name], name, "consumer", width, per_channel)
    return spec


def widen(model: nn.Module, width_mult: float, *, linear_std: float | None = None) -> nn.Module:
    """Scale every channel width of ``model`` by ``width_mult`` in place and draw fresh weights
    (:func:`init_like_torchvision` with ``linear_std``). Raises ``SurgeryError`` for a model whose
    channel groups cannot all be resized (an op the dependency graph does not understand)."""
    apply_architecture(model, widened_spec(model, width_mult))
    init_like_torchvision(model, linear_std=linear_std)
    log.debug("widened %s by %g", type(model).__name__, width_mult)
    return model


def init_like_torchvision(model: nn.Module, *, linear_std: float | None = None) -> nn.Module:
    """torchvision's classification-model initialisation: convs Kaiming-normal (fan_out, ReLU) with
    zero bias, batch/group norms weight 1 and bias 0 (running statistics reset), linears with their
    default ``reset_parameters`` (ResNet) or, given ``linear_std``, N(0, linear_std) weights and
    zero bias (VGG: 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            if linear_std is None:
                m.reset_parameters()
            else:
                nn.init.normal_(m.weight, 0.0, linear_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model
