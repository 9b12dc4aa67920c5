"""Architecture specs: the widths of every layer as plain JSON, so a pruned model is stored as
weights plus a spec (no pickled modules) and rebuilt by resizing a freshly built dense model."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .layers import ChannelPadShortcut

__all__ = ["architecture_spec", "apply_architecture"]


def architecture_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-module shape facts for every layer whose shape pruning can change."""
    spec: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            spec[name] = {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                          "groups": m.groups, "bias": m.bias is not None}
        elif isinstance(m, nn.Linear):
            spec[name] = {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None}
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            spec[name] = {"type": type(m).__name__, "num_features": m.num_features}
        elif isinstance(m, ChannelPadShortcut):
            spec[name] = {"type": "ChannelPadShortcut", "in_channels": m.in_channels, "source": m.source.tolist()}
    return spec


def apply_architecture(model: nn.Module, spec: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize ``model``'s layers in place to match ``spec`` (weights become uninitialised)."""
    modules = dict(model.named_modules())
    for name, s in spec.items():
        m = modules.get(name)
        if m is None or type(m).__name__ != s["type"]:
            raise SurgeryError(f"spec names {s['type']} {name!r}, which the model does not have")
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = s["in_channels"], s["out_channels"], s["groups"]
            kh, kw = m.kernel_size
            m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, kh, kw))
            m.bias = nn.Parameter(torch.empty(m.out_channels)) if s["bias"] else None
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = s["in_features"], s["out_features"]
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            m.bias = nn.Parameter(torch.empty(m.out_features)) if s["bias"] else None
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = s["num_features"]
            m.num_features = n
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
        elif isinstance(m, ChannelPadShortcut):
            m.in_channels = s["in_channels"]
            m.source = torch.tensor(s["source"], dtype=torch.long)
    return model
