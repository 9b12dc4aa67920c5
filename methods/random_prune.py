"""Random channel pruning at the same per-layer ratio: the baseline a search must beat
("Rethinking the Value of Network Pruning", Liu et al., ICLR 2019)."""
from __future__ import annotations

import torch
from torch import nn

from .base import PRUNE_RATIO, PruneContext, PruningMethod
from .registry import register_method
from .selection import prune_by_scores

__all__ = ["RandomPrune"]


@register_method("random")
class RandomPrune(PruningMethod):
    hyperparameters = (PRUNE_RATIO,)  # no training phase

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        generator = torch.Generator().manual_seed(context.seed)

        def random_scores(graph, group):
            return torch.rand(group.size, generator=generator)

        return prune_by_scores(model, self.hparams["prune_ratio"], random_scores)
