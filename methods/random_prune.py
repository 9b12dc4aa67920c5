"""Random channel pruning: the baseline a search must beat ("Rethinking the Value of Network
Pruning", Liu et al., ICLR 2019). Random scores, the same MACs target, scope, allocation and
rounding as the other methods."""
from __future__ import annotations

import torch
from torch import nn

from .base import PRUNE_RATIO, ROUND_TO, SCOPE, PruneContext, PruningMethod, allocation_hp
from .importance import random_scores
from .registry import register_method
from .selection import prune_by_scores

__all__ = ["RandomPrune"]


@register_method("random")
class RandomPrune(PruningMethod):
    paper = "baseline"
    summary = "random channels, same MACs target, scope and allocation as the others"
    hyperparameters = (PRUNE_RATIO, SCOPE, allocation_hp("uniform"), ROUND_TO)  # no training phase

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        generator = torch.Generator().manual_seed(context.seed)
        return prune_by_scores(model, context, self.hparams, random_scores(generator), owner=self.name)
