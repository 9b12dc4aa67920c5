"""Shared plumbing for methods that score channels: pick the groups in scope, allocate widths that
remove ``prune_ratio`` of the dense MACs (``methods.budget``), keep the best-scored channels."""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .base import PruneContext
from .budget import Allocation, MacsModel, allocate, keep_top
from .graph import ChannelGroup, DependencyGraph
from .importance import Score
from .surgery import prune_group

__all__ = ["prune_by_scores", "plan_widths", "MIN_CHANNELS"]

log = logging.getLogger(__name__)

#: No group is ever pruned below this many channels.
MIN_CHANNELS = 1


def plan_widths(model: nn.Module, graph: DependencyGraph, groups: Sequence[ChannelGroup], context: PruneContext,
                hparams: Mapping[str, Any], scores: Sequence[torch.Tensor] | None = None, *,
                owner: str = "", normalise: bool = True) -> Allocation:
    """Widths for ``groups`` that remove ``hparams["prune_ratio"]`` of the dense MACs
    (``context.reference_macs``), by the method's ``allocation`` and ``round_to`` (defaults:
    uniform, 1); ``normalise=False`` for scores already on one scale across groups. Logs what was
    reached."""
    macs_model = MacsModel(model, graph, groups, context.input_shape)
    target = hparams["prune_ratio"]
    result = allocate(macs_model, scores, target, reference=context.reference_macs,
                      allocation=hparams.get("allocation", "uniform"), round_to=hparams.get("round_to", 1),
                      min_channels=MIN_CHANNELS, normalise=normalise)
    log.info("%s: %d groups (scope %s, %s, round_to %s): MACs reduction %.4f for target %.4f",
             owner or "prune", len(groups), hparams.get("scope", "internal"), hparams.get("allocation", "uniform"),
             hparams.get("round_to", 1), result.reduction, target)
    return result


def prune_by_scores(model: nn.Module, context: PruneContext, hparams: Mapping[str, Any], score: Score, *,
                    owner: str = "", normalise: bool = True) -> nn.Module:
    """Copy ``model``; in every group in ``hparams["scope"]`` keep the highest-scoring channels, as
    many as the MACs target allocates to it (``normalise``: see :func:`plan_widths`)."""
    model = copy.deepcopy(model)
    graph = DependencyGraph(model)
    groups = graph.prunable_groups(scope=hparams.get("scope", "internal"))
    scores = [score(graph, g) for g in groups]
    plan = plan_widths(model, graph, groups, context, hparams, scores, owner=owner, normalise=normalise)
    for group, s, kept in zip(groups, scores, plan.kept):
        if kept < group.size:
            prune_group(graph, group, keep_top(s, kept))
    return model
