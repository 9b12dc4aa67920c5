"""L1-norm filter pruning (Li et al., ICLR 2017): drop the filters with the smallest sum |W|."""
from __future__ import annotations

from torch import nn

from .base import PRUNE_RATIO, ROUND_TO, SCOPE, PruneContext, PruningMethod, allocation_hp
from .importance import l1_filter
from .registry import register_method
from .selection import prune_by_scores

__all__ = ["L1Norm"]


@register_method("l1_norm")
class L1Norm(PruningMethod):
    paper = "Li et al., ICLR 2017"
    summary = "drop the filters with the smallest sum |W|"
    # No training phase. The paper prunes each layer by its own ratio (uniform).
    hyperparameters = (PRUNE_RATIO, SCOPE, allocation_hp("uniform"), ROUND_TO)

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        return prune_by_scores(model, context, self.hparams, l1_filter, owner=self.name)
