"""Pruning from Scratch (Wang et al., AAAI 2020): find the architecture with gates on a RANDOMLY
initialised network, then train that architecture from fresh random weights.

1. Gates: one vector per prunable group in ``scope`` that feeds a batch norm (``internal``: the
   block-internal groups, as the paper; ``all``: residual-coupled groups too, one gate shared by
   every batch norm of the group), init 1, multiplying the batch norm's output before the
   activation (a forward hook on the BN). Every
   weight stays frozen at its random initialisation (``requires_grad`` False; BN running statistics
   still update in train mode); only the gates train, with Adam(lr 0.01), clamped to [0, 1] after
   every step. Loss: ``CE + lambda * (mean over ALL gates of |g| - r)^2``.
2. Threshold: all gates ranked globally (``allocation: global``, the paper's; ``uniform`` ranks
   within each group); the number of pruned channels is found by bisection
   (``methods.budget.allocate``) so the pruned model's MACs reduction, measured against the
   UNEXPANDED original (``PruneContext.reference_macs``), is as close as possible to
   ``prune_ratio``; a layer always keeps its strongest channel; ``round_to`` rounds the widths.
3. Expansion: the trial builds the searched network ``expansion`` times wider
   (:meth:`Scratch.model_width_mult`); stage (residual) widths stay expanded, internal widths come
   from the gates.
4. The pruned architecture is re-initialised: convs with Kaiming-normal (fan_out, ReLU), as every
   model in the zoo initialises them; batch norms and linears with ``reset_parameters``.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .base import PHASE_EPOCHS, PRUNE_RATIO, ROUND_TO, SCOPE, PruneContext, PruningMethod, allocation_hp
from .budget import MacsModel, allocate, keep_top
from .cost import profile
from .errors import PruneTuneError
from .graph import ChannelGroup, DependencyGraph
from .hyperparameters import Hyperparameter
from .registry import register_method
from .selection import MIN_CHANNELS
from .surgery import prune_group

__all__ = ["Scratch", "MacsModel", "gate_regulariser", "reinitialise"]

log = logging.getLogger(__name__)

#: Relative tolerance on the MACs reduction target (METHODS.md: 0.1 %).
TARGET_RTOL = 1e-3


def gate_regulariser(gates: Sequence[torch.Tensor], lam: float, r: float) -> torch.Tensor:
    """``lambda * (mean over all gate entries of |g| - r)^2``: one global balance term."""
    flat = torch.cat([g.flatten() for g in gates])
    return lam * (flat.abs().mean() - r) ** 2


@torch.no_grad()
def reinitialise(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Fresh random weights: Kaiming-normal (fan_out, ReLU) convs with zero bias, as the model zoo
    initialises them; ``reset_parameters`` for batch norms (and their running stats) and linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):  # nn.Linear.reset_parameters, with our generator
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                bound = 1 / math.sqrt(m.in_features) if m.in_features else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_parameters()
    return model


# ---- the method -------------------------------------------------------------------------------------

@register_method("scratch")
class Scratch(PruningMethod):
    paper = "Wang et al., AAAI 2020"
    summary = "gates learned on a random network pick the architecture, trained from scratch"
    hyperparameters = (
        replace(PRUNE_RATIO, doc="target MACs reduction against the unexpanded original"),
        Hyperparameter("lambda", 0.5, 0.01, 1.0, log=True, doc="strength of the gate balance term"),
        Hyperparameter("r", 0.2, 0.1, 0.7, doc="target mean gate value"),
        Hyperparameter("expansion", 1.0, 1.0, 2.0, doc="width multiplier of the searched network"),
        PHASE_EPOCHS, SCOPE, allocation_hp("global"), ROUND_TO,
    )
    from_scratch = True

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self._gates: dict[str, torch.Tensor] = {}  # BN name -> gate vector
        self._handles: list = []
        self._pending: Mapping[str, Any] | None = None

    def model_width_mult(self) -> float:
        """Width multiplier the trial must build the searched (gated) network with."""
        return float(self.hparams["expansion"])

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        """The gate vectors, by the name of the batch norm they follow (in graph order)."""
        return self._gates

    # ---- the gate phase ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        self._remove_hooks()
        graph = DependencyGraph(model)
        self._gates = {}
        for group, bn_names in self._gated_groups(graph):
            bn = model.get_submodule(bn_names[0])
            dev = next(iter([*bn.parameters(), *bn.buffers()])).device
            self._gates[bn_names[0]] = torch.ones(bn.num_features, device=dev, requires_grad=True)
            for name in bn_names:  # a residual group: one gate shared by every batch norm of the group
                self._handles.append(model.get_submodule(name).register_forward_hook(self._gate_hook(bn_names[0])))
        if not self._gates:
            raise PruneTuneError(f"scratch: {type(model).__name__} has no prunable group followed by a batch norm")
        for p in model.parameters():
            p.requires_grad_(False)
        if self._pending is not None:
            self.load_state_dict(self._pending)
        log.info("scratch: %d gate vectors, %d gates", len(self._gates), sum(g.numel() for g in self._gates.values()))
        return model

    def _gated_groups(self, graph: DependencyGraph) -> list[tuple[ChannelGroup, list[str]]]:
        """(group, its batch norms) for every group in scope that has one; the gate is named after
        the first batch norm."""
        out = []
        for group in graph.prunable_groups(scope=self.hparams["scope"]):
            names = graph.batch_norm_names(group)
            if names:
                out.append((group, names))
        return out

    def _gate_hook(self, name: str):
        def hook(module, args, out):
            g = self._gates[name]
            if g.device != out.device:
                g = g.to(out.device)
            return out * g.view(1, -1, *([1] * (out.dim() - 2)))
        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def make_optimizer(self, model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        # The trial moves the model to its device after prepare; the gates follow it here.
        for name, g in self._gates.items():
            bn = model.get_submodule(name)
            dev = next(iter([*bn.parameters(), *bn.buffers()])).device
            if g.device != dev:
                self._gates[name] = g.detach().to(dev).requires_grad_(True)
        return torch.optim.Adam(list(self._gates.values()), lr=0.01)

    def extra_loss(self, model, inputs, logits, targets) -> torch.Tensor:
        return gate_regulariser(list(self._gates.values()), self.hparams["lambda"], self.hparams["r"])

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for g in self._gates.values():
            g.clamp_(0.0, 1.0)

    def on_epoch_end(self, model: nn.Module, epoch: int, mean_loss: float) -> None:
        flat = torch.cat([g.detach().flatten() for g in self._gates.values()])
        log.info("scratch epoch %d: loss %.4f, mean gate %.4f (r = %.2f), %.1f%% of gates below 0.01",
                 epoch, mean_loss, float(flat.mean()), self.hparams["r"], 100.0 * float((flat < 0.01).float().mean()))

    # ---- checkpointed state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self._gates and self._pending is not None:  # loaded, never prepared (resumed after the cut)
            return {"gates": {name: g.detach().cpu().clone() for name, g in self._pending.get("gates", {}).items()}}
        return {"gates": {name: g.detach().cpu().clone() for name, g in self._gates.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("gates", {})
        if not self._gates:  # loaded before prepare: apply once the gates exist
            self._pending = dict(state)
            return
        if set(saved) != set(self._gates):
            raise PruneTuneError(f"scratch: checkpointed gates {sorted(saved)} do not match the model's {sorted(self._gates)}")
        for name, g in self._gates.items():
            g.copy_(saved[name].to(g.device))
        self._pending = None

    # ---- the cut ----------------------------------------------------------------------------------
    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        if not self._gates:
            raise PruneTuneError("scratch: prune() before prepare(): no gates")
        self._remove_hooks()
        model = copy.deepcopy(model)
        graph = DependencyGraph(model)
        pairs = [(g, names[0]) for g, names in self._gated_groups(graph) if names[0] in self._gates]
        groups = [g for g, _ in pairs]
        gates = [self._gates[bn].detach().cpu().abs() for _, bn in pairs]
        macs_model = MacsModel(model, graph, groups, context.input_shape)
        reference = float(context.reference_macs) if context.reference_macs else float(macs_model.total)
        target = self.hparams["prune_ratio"]
        # The paper ranks the raw gates globally (all share the [0, 1] scale): no per-group normalisation.
        result = allocate(macs_model, gates, target, reference=reference, allocation=self.hparams["allocation"],
                          round_to=self.hparams["round_to"], min_channels=MIN_CHANNELS, normalise=False)
        self.threshold = result  # for inspection (tests, logs); not part of the checkpointed state
        if abs(result.reduction - target) > TARGET_RTOL * target:
            log.info("scratch: nearest achievable MACs reduction %.4f for target %.4f (%d of %d gates pruned)",
                     result.reduction, target, result.n, sum(g.numel() for g in gates))
        for group, gate, kept in zip(groups, gates, result.kept):
            if kept < group.size:
                prune_group(graph, group, keep_top(gate, kept))
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(context.seed)
        reinitialise(model, generator)
        for p in model.parameters():
            p.requires_grad_(True)
        macs = profile(model, context.input_shape).macs
        log.info("scratch: pruned to %d MACs, reduction %.4f vs reference %d (target %.4f, %d bisection steps)",
                 macs, 1.0 - macs / reference, int(reference), target, result.evaluations)
        return model
