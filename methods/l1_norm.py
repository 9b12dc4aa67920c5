"""L1-norm filter pruning (Li et al., ICLR 2017): drop the filters with the smallest sum |W|."""
from __future__ import annotations

from torch import nn

from .base import PRUNE_RATIO, PruneContext, PruningMethod
from .registry import register_method
from .selection import prune_by_scores

__all__ = ["L1Norm"]


@register_method("l1_norm")
class L1Norm(PruningMethod):
    hyperparameters = (PRUNE_RATIO,)  # no training phase

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        def l1(graph, group):
            conv = graph.model.get_submodule(group.producers[0])
            return conv.weight.abs().flatten(1).sum(1)

        return prune_by_scores(model, self.hparams["prune_ratio"], l1)
