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

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

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


@dataclass
class _Cut:
    """One group's cut, as every per-layer cutter sees it."""

    size: int
    keep: torch.Tensor       # kept channels, in their new order
    removed: torch.Tensor    # removed channels
    new_pos: torch.Tensor    # old channel -> new position (-1: removed; merged: its cluster's)
    constants: torch.Tensor | Mapping[str, torch.Tensor] | None
    merge: bool              # consumers sum each cluster's slices (C-SGD)
    scale: torch.Tensor | None

    def constants_for(self, consumer: str) -> torch.Tensor | None:
        if isinstance(self.constants, Mapping):
            return self.constants.get(consumer)
        return self.constants


@torch.no_grad()
def prune_group(graph: DependencyGraph, group: ChannelGroup, keep: Sequence[int] | torch.Tensor | None = None, *,
                constants: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                clusters: Sequence[Sequence[int]] | None = None,
                scale: torch.Tensor | None = None) -> list[int]:
    """Cut ``group`` down to the channels in ``keep`` (or to the first of each cluster). In place.

    ``constants`` is one tensor for every consumer, or a mapping consumer name -> tensor (a
    residual group's consumers each see a different constant). Returns the kept channel indices in
    their new order.
    """
    if not group.prunable:
        raise SurgeryError(f"group {group.name} is not prunable: {group.reason}")
    cut = _make_cut(graph, group, keep, constants, clusters, scale)
    model = graph.model
    for name, per_channel in group.consumers:
        m = model.get_submodule(name)
        _cutter(_CONSUMER_CUTTERS, m, name, "consumer")(graph, name, m, cut, per_channel)
    for name in group.producers:
        m = model.get_submodule(name)
        _cutter(_PRODUCER_CUTTERS, m, name, "producer")(m, cut.keep)
    for name in group.followers:
        m = model.get_submodule(name)
        _cutter(_FOLLOWER_CUTTERS, m, name, "follower")(m, cut.keep)
    group.size = cut.keep.numel()
    return cut.keep.tolist()


def _make_cut(graph, group, keep, constants, clusters, scale) -> _Cut:
    size = group_size(graph, group)
    if clusters is not None:
        if keep is not None:
            raise SurgeryError("pass keep or clusters, not both")
        members = sorted(c for cl in clusters for c in cl)
        if members != list(range(size)) or any(len(cl) == 0 for cl in clusters):
            raise SurgeryError(f"clusters of {group.name} must partition its {size} channels")
        keep = [int(cl[0]) for cl in clusters]
    # Index tensors live where the weights do (index_select and index_add_ refuse a CPU index on CUDA).
    device = next((t.device for t in graph.model.parameters()), torch.device("cpu"))
    keep_t = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep,
                             dtype=torch.long).flatten().to(device)
    if keep_t.numel() == 0:
        raise SurgeryError(f"cannot remove every channel of {group.name}")
    if keep_t.unique().numel() != keep_t.numel() or keep_t.min() < 0 or keep_t.max() >= size:
        raise SurgeryError(f"keep indices for {group.name} must be distinct and in [0, {size})")
    removed = torch.tensor(sorted(set(range(size)) - set(keep_t.tolist())), dtype=torch.long, device=device)
    new_pos = torch.full((size,), -1, dtype=torch.long, device=device)
    new_pos[keep_t] = torch.arange(keep_t.numel(), device=device)
    if clusters is not None:
        for i, cl in enumerate(clusters):
            new_pos[torch.as_tensor(list(cl), device=device)] = i
    return _Cut(size, keep_t, removed, new_pos, constants, clusters is not None, scale)


def _cutter(table: dict[type, Callable], m: nn.Module, name: str, role: str) -> Callable:
    for cls in type(m).__mro__:
        if cls in table:
            return table[cls]
    raise SurgeryError(f"don't know how to cut {role} {name} ({type(m).__name__})")


# ---- consumers: cut along the input channels ----------------------------------------------------------
def _cut_weighted_input(graph: DependencyGraph, name: str, m: nn.Module, cut: _Cut, per_channel: int) -> None:
    """Conv2d or Linear reading the group: drop (or merge) input slices, fold constants, rescale."""
    w = m.weight
    # View the weight as (out, channels, per-channel features...) to treat conv and linear alike.
    w3 = w.data if isinstance(m, nn.Conv2d) else w.data.view(w.shape[0], cut.size, per_channel)
    constants = cut.constants_for(name)
    if constants is not None and cut.removed.numel():
        c = constants.to(w3)[cut.removed]
        dims = tuple(range(2, w3.dim()))
        delta = (w3[:, cut.removed].sum(dim=dims) * c).sum(dim=1)
        _fold_bias(graph, name, m, delta)
    if cut.merge:
        merged = torch.zeros_like(w3.index_select(1, cut.keep))
        merged.index_add_(1, cut.new_pos, w3)  # new_pos covers every channel, so this sums clusters
        w3 = merged
    else:
        w3 = w3.index_select(1, cut.keep)
    if cut.scale is not None:
        w3 = w3 * cut.scale.to(w3).view(1, -1, *([1] * (w3.dim() - 2)))
    if isinstance(m, nn.Conv2d):
        m.weight = _param(w3, w)
        m.in_channels = cut.keep.numel()
    else:
        m.weight = _param(w3.reshape(w.shape[0], -1), w)
        m.in_features = cut.keep.numel() * per_channel


def _cut_pad_input(graph: DependencyGraph, name: str, m: ChannelPadShortcut, cut: _Cut, per_channel: int) -> None:
    """A pad shortcut reading the group: remap its source (removed channels become zero padding)."""
    constants = cut.constants_for(name)
    if constants is not None and cut.removed.numel() and bool((constants.to(cut.keep.device)[cut.removed] != 0).any()):
        raise SurgeryError(f"cannot fold constant channels through shortcut {name}")
    src = m.source.to(cut.keep.device)
    m.source = torch.where(src >= 0, cut.new_pos[src.clamp(min=0)], src).to(m.source.device)
    m.in_channels = cut.keep.numel()


# ---- producers: cut along the output channels ---------------------------------------------------------
def _cut_weighted_output(m: nn.Module, keep: torch.Tensor) -> None:
    m.weight = _param(m.weight[keep], m.weight)
    if m.bias is not None:
        m.bias = _param(m.bias[keep], m.bias)
    if isinstance(m, nn.Conv2d):
        m.out_channels = keep.numel()
    else:
        m.out_features = keep.numel()


def _cut_pad_output(m: ChannelPadShortcut, keep: torch.Tensor) -> None:
    m.source = m.source[keep.to(m.source.device)]


# ---- followers: cut along every channel dimension -----------------------------------------------------
def _cut_batch_norm(m: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> None:
    if m.affine:
        m.weight = _param(m.weight[keep], m.weight)
        m.bias = _param(m.bias[keep], m.bias)
    if m.track_running_stats:
        m.running_mean = m.running_mean[keep].clone()
        m.running_var = m.running_var[keep].clone()
    m.num_features = keep.numel()


def _cut_depthwise(m: nn.Conv2d, keep: torch.Tensor) -> None:
    m.weight = _param(m.weight[keep], m.weight)
    if m.bias is not None:
        m.bias = _param(m.bias[keep], m.bias)
    m.in_channels = m.out_channels = m.groups = keep.numel()


#: One cutter per layer type and role: supporting a new layer type is one entry per role it plays.
_CONSUMER_CUTTERS: dict[type, Callable] = {
    nn.Conv2d: _cut_weighted_input, nn.Linear: _cut_weighted_input, ChannelPadShortcut: _cut_pad_input,
}
_PRODUCER_CUTTERS: dict[type, Callable] = {
    nn.Conv2d: _cut_weighted_output, nn.Linear: _cut_weighted_output, ChannelPadShortcut: _cut_pad_output,
}
_FOLLOWER_CUTTERS: dict[type, Callable] = {
    nn.modules.batchnorm._BatchNorm: _cut_batch_norm, nn.Conv2d: _cut_depthwise,
}


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
