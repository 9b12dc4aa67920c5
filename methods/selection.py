"""Shared plumbing for methods that score channels and keep the best of each group."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .graph import ChannelGroup, DependencyGraph
from .surgery import prune_group

__all__ = ["keep_count", "prune_by_scores", "prunable_bns"]


def keep_count(size: int, prune_ratio: float) -> int:
    """Channels kept when ``prune_ratio`` of ``size`` are removed (at least one survives)."""
    return max(1, min(size, int(round(size * (1.0 - prune_ratio)))))


def prune_by_scores(model: nn.Module, prune_ratio: float,
                    score: Callable[[DependencyGraph, ChannelGroup], torch.Tensor], *,
                    include_residual: bool = False) -> nn.Module:
    """Copy ``model`` and, in every prunable group, keep the highest-scoring channels."""
    model = copy.deepcopy(model)
    graph = DependencyGraph(model)
    for group in graph.prunable_groups(include_residual=include_residual):
        scores = score(graph, group).detach().flatten()
        k = keep_count(scores.numel(), prune_ratio)
        keep = torch.topk(scores, k).indices.sort().values
        prune_group(graph, group, keep)
    return model


def prunable_bns(graph: DependencyGraph, *, include_residual: bool = False) -> list[tuple[ChannelGroup, nn.BatchNorm2d]]:
    """(group, its batch norm) for each prunable group whose producer feeds a batch norm."""
    out = []
    for group in graph.prunable_groups(include_residual=include_residual):
        bn = graph.bn_of(group)
        if bn is not None:
            out.append((group, bn))
    return out
