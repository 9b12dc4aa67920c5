"""Channel importance: one scoring function per criterion, ``(graph, group) -> scores`` (one value
per channel of the group, higher = more important).

A group coupled by residual adds has several producers (every conv whose output is summed into it,
and option-A pad shortcuts, which carry no weights) and several batch norms; its score is the sum of
the members' scores, so a channel is judged by everything that writes it, as Torch-Pruning's group
importance does. Adding a criterion is adding one function here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .graph import ChannelGroup, DependencyGraph

__all__ = ["Score", "l1_filter", "bn_scale", "random_scores", "batch_norms"]

#: A scoring function.
Score = Callable[[DependencyGraph, ChannelGroup], torch.Tensor]


def _weighted_producers(graph: DependencyGraph, group: ChannelGroup) -> list[nn.Module]:
    mods = (graph.model.get_submodule(n) for n in group.producers)
    return [m for m in mods if isinstance(m, (nn.Conv2d, nn.Linear))]


def batch_norms(graph: DependencyGraph, group: ChannelGroup) -> list[nn.modules.batchnorm._BatchNorm]:
    """The affine batch norms that normalise the group's channels (one per weighted producer)."""
    return [graph.model.get_submodule(n) for n in graph.batch_norm_names(group)]


@torch.no_grad()
def l1_filter(graph: DependencyGraph, group: ChannelGroup) -> torch.Tensor:
    """Li et al.: ``sum |W|`` of each output filter, summed over the group's weighted producers."""
    total = torch.zeros(group.size)
    for m in _weighted_producers(graph, group):
        total += m.weight.detach().abs().flatten(1).sum(1).float().cpu()
    return total


@torch.no_grad()
def bn_scale(graph: DependencyGraph, group: ChannelGroup) -> torch.Tensor:
    """Network slimming: ``|gamma|`` of the channel's batch norms, summed over the group's batch
    norms (the L1 norm of the group's gamma vector); the L1 filter norm where there is none."""
    bns = batch_norms(graph, group)
    if not bns:
        return l1_filter(graph, group)
    return sum(bn.weight.detach().abs().float().cpu() for bn in bns)


def random_scores(generator: torch.Generator) -> Score:
    """Uniform random scores drawn from ``generator`` (the random baseline)."""
    def score(graph: DependencyGraph, group: ChannelGroup) -> torch.Tensor:
        return torch.rand(group.size, generator=generator)

    return score
