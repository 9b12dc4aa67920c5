"""Network slimming (Liu et al., ICCV 2017): L1 on batch-norm gammas during training
(``gamma.grad += s * sign(gamma)``), then prune at one global |gamma| percentile."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .base import PHASE_EPOCHS, PRUNE_RATIO, PruneContext, PruningMethod
from .graph import DependencyGraph
from .hyperparameters import Hyperparameter
from .registry import register_method
from .selection import prunable_bns
from .surgery import prune_group

__all__ = ["Slimming"]


@register_method("slimming")
class Slimming(PruningMethod):
    hyperparameters = (
        PRUNE_RATIO,
        Hyperparameter("s", 1e-4, 1e-5, 1e-3, log=True, doc="L1 strength on batch-norm gammas"),
        PHASE_EPOCHS,
    )

    def prepare(self, model: nn.Module) -> nn.Module:
        self._gammas = [bn.weight for _, bn in prunable_bns(DependencyGraph(model))]
        return model

    def after_backward(self, model: nn.Module) -> None:
        s = self.hparams["s"]
        for gamma in self._gammas:
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma.detach()), alpha=s)

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        model = copy.deepcopy(model)
        graph = DependencyGraph(model)
        pairs = prunable_bns(graph)
        gammas = [bn.weight.detach().abs() for _, bn in pairs]
        # One global ranking; a stable sort breaks ties (e.g. untouched gammas of 1) by position.
        order = torch.cat(gammas).argsort(stable=True)
        n_prune = int(round(order.numel() * self.hparams["prune_ratio"]))
        pruned = torch.zeros(order.numel(), dtype=torch.bool)
        pruned[order[:n_prune]] = True
        offset = 0
        for (group, _), g in zip(pairs, gammas):
            keep = (~pruned[offset : offset + g.numel()]).nonzero().flatten()
            offset += g.numel()
            if keep.numel() == 0:  # never empty a layer: keep its strongest channel
                keep = g.argmax().view(1)
            prune_group(graph, group, keep)
        return model
