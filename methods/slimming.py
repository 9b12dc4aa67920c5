"""Network slimming (Liu et al., ICCV 2017): L1 on batch-norm gammas during training
(``gamma.grad += s * sign(gamma)``), then prune at one global |gamma| ranking (``allocation:
global``, the paper's) down to the MACs target. With ``scope: all`` the batch norms of
residual-coupled groups are penalised too and a group's channel is scored by the sum of its
gammas over the group."""
from __future__ import annotations

import torch
from torch import nn

from .base import PHASE_EPOCHS, PRUNE_RATIO, ROUND_TO, SCOPE, PruneContext, PruningMethod, allocation_hp
from .graph import DependencyGraph
from .hyperparameters import Hyperparameter
from .importance import batch_norms, bn_scale
from .registry import register_method
from .selection import prune_by_scores

__all__ = ["Slimming"]


@register_method("slimming")
class Slimming(PruningMethod):
    paper = "Liu et al., ICCV 2017"
    summary = "L1 on batch-norm gammas during a phase, prune by one global |gamma| ranking"
    hyperparameters = (
        PRUNE_RATIO,
        Hyperparameter("s", 1e-4, 1e-5, 1e-3, log=True, doc="L1 strength on batch-norm gammas"),
        PHASE_EPOCHS, SCOPE, allocation_hp("global"), ROUND_TO,
    )

    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        graph = DependencyGraph(model)
        self._gammas = [bn.weight for g in graph.prunable_groups(scope=self.hparams["scope"])
                        for bn in batch_norms(graph, g)]
        return model

    def after_backward(self, model: nn.Module) -> None:
        s = self.hparams["s"]
        for gamma in self._gammas:
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma.detach()), alpha=s)

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        # The paper's threshold is one percentile of the raw |gamma| (all on one scale): not normalised.
        return prune_by_scores(model, context, self.hparams, bn_scale, owner=self.name, normalise=False)
