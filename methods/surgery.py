"""Channel surgery: physically remove the channels of one ``ChannelGroup``.

``prune_group`` cuts every producer, follower and consumer of the group so the result is a plain,
smaller ``nn.Module``. Three optional edits to the consumers make the cut exact for the methods:

* ``constants``: channels being removed output a known constant (ISTA: gamma == 0 leaves
  ``act(beta)``); its contribution is folded into each consumer's bias, or subtracted from the
  running mean of the batch norm that reads the consumer (exact for 1x1 or unpadded consumers).
* ``clusters``: channels in a cluster are identical (C-SGD); the first is kept and the consumers'
  input slices of the others are summed into it.
* ``scale``: per-channel factors on the kept consumer slices (ThiNet's least-squares rescaling).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import SurgeryError
from .graph import ChannelGroup, DependencyGraph
from .layers import ChannelPadShortcut

__all__ = ["prune_group", "group_size"]


def group_size(graph: DependencyGraph, group: ChannelGroup) -> int:
    m = graph.model.get_submodule(group.producers[0])
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.out_channels  # ChannelPadShortcut


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def prune_group(graph: DependencyGraph, group: ChannelGroup, keep: Sequence[int] | torch.Tensor | None = None, *,
                constants: torch.Tensor | None = None, clusters: Sequence[Sequence[int]] | None = None,
                scale: torch.Tensor | None = None) -> list[int]:
    """Cut ``group`` down to the channels in ``keep`` (or to the first of each cluster). In place.

    Returns the kept channel indices in their new order.
    """
    if not group.prunable:
        raise SurgeryError(f"group {group.name} is not prunable: {group.reason}")
    size = group_size(graph, group)
    model = graph.model
    if clusters is not None:
        if keep is not None:
            raise SurgeryError("pass keep or clusters, not both")
        members = sorted(c for cl in clusters for c in cl)
        if members != list(range(size)) or any(len(cl) == 0 for cl in clusters):
            raise SurgeryError(f"clusters of {group.name} must partition its {size} channels")
        keep = [int(cl[0]) for cl in clusters]
    # Index tensors live where the weights do (index_select and index_add_ refuse a CPU index on CUDA).
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    keep_t = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep,
                             dtype=torch.long).flatten().to(device)
    if keep_t.numel() == 0:
        raise SurgeryError(f"cannot remove every channel of {group.name}")
    if keep_t.unique().numel() != keep_t.numel() or keep_t.min() < 0 or keep_t.max() >= size:
        raise SurgeryError(f"keep indices for {group.name} must be distinct and in [0, {size})")
    removed = torch.tensor(sorted(set(range(size)) - set(keep_t.tolist())), dtype=torch.long, device=device)
    # Old channel -> new position; merged channels point to their cluster's kept channel.
    new_pos = torch.full((size,), -1, dtype=torch.long, device=device)
    new_pos[keep_t] = torch.arange(keep_t.numel(), device=device)
    if clusters is not None:
        for i, cl in enumerate(clusters):
            new_pos[torch.as_tensor(list(cl), device=device)] = i

    for name, per_channel in group.consumers:
        m = model.get_submodule(name)
        if isinstance(m, ChannelPadShortcut):
            if constants is not None and removed.numel() and bool((constants.to(device)[removed] != 0).any()):
                raise SurgeryError(f"cannot fold constant channels through shortcut {name}")
            src = m.source.to(device)
            m.source = torch.where(src >= 0, new_pos[src.clamp(min=0)], src).to(m.source.device)
            m.in_channels = keep_t.numel()
            continue
        w = m.weight
        # View the weight as (out, channels, per-channel features...) to treat conv and linear alike.
        if isinstance(m, nn.Conv2d):
            w3 = w.data
        else:
            w3 = w.data.view(w.shape[0], size, per_channel)
        if constants is not None and removed.numel():
            c = constants.to(w3)[removed]
            dims = tuple(range(2, w3.dim()))
            delta = (w3[:, removed].sum(dim=dims) * c).sum(dim=1)
            _fold_bias(graph, name, m, delta)
        if clusters is not None:
            merged = torch.zeros_like(w3.index_select(1, keep_t))
            merged.index_add_(1, new_pos, w3)  # new_pos covers every channel, so this sums clusters
            w3 = merged
        else:
            w3 = w3.index_select(1, keep_t)
        if scale is not None:
            s = scale.to(w3).view(1, -1, *([1] * (w3.dim() - 2)))
            w3 = w3 * s
        if isinstance(m, nn.Conv2d):
            m.weight = _param(w3, w)
            m.in_channels = keep_t.numel()
        else:
            m.weight = _param(w3.reshape(w.shape[0], -1), w)
            m.in_features = keep_t.numel() * per_channel

    for name in group.producers:
        m = model.get_submodule(name)
        if isinstance(m, ChannelPadShortcut):
            m.source = m.source[keep_t.to(m.source.device)]
            continue
        m.weight = _param(m.weight[keep_t], m.weight)
        if m.bias is not None:
            m.bias = _param(m.bias[keep_t], m.bias)
        if isinstance(m, nn.Conv2d):
            m.out_channels = keep_t.numel()
        else:
            m.out_features = keep_t.numel()

    for name in group.followers:
        m = model.get_submodule(name)
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if m.affine:
                m.weight = _param(m.weight[keep_t], m.weight)
                m.bias = _param(m.bias[keep_t], m.bias)
            if m.track_running_stats:
                m.running_mean = m.running_mean[keep_t].clone()
                m.running_var = m.running_var[keep_t].clone()
            m.num_features = keep_t.numel()
        elif isinstance(m, nn.Conv2d):  # depthwise: cut along both channel dims
            m.weight = _param(m.weight[keep_t], m.weight)
            if m.bias is not None:
                m.bias = _param(m.bias[keep_t], m.bias)
            m.in_channels = m.out_channels = m.groups = keep_t.numel()
        else:
            raise SurgeryError(f"don't know how to cut follower {name} ({type(m).__name__})")
    group.size = keep_t.numel()
    return keep_t.tolist()


def _fold_bias(graph: DependencyGraph, name: str, m: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` (one value per output channel of ``m``) to what ``m`` outputs."""
    if m.bias is not None:
        m.bias.data += delta
        return
    bn_name = graph.next_module.get(name)
    if bn_name is not None:
        # BN computes (x - mean)/std; shifting x by delta equals shifting the mean by -delta.
        graph.model.get_submodule(bn_name).running_mean -= delta
        return
    m.bias = nn.Parameter(delta.clone())
