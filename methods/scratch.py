"""Pruning from Scratch (Wang et al., AAAI 2020): find the architecture with gates on a RANDOMLY
initialised network, then train that architecture from fresh random weights.

1. Gates: one vector per prunable group (the block-internal groups that feed a batch norm), init 1,
   multiplying that batch norm's output before the activation (a forward hook on the BN). Every
   weight stays frozen at its random initialisation (``requires_grad`` False; BN running statistics
   still update in train mode); only the gates train, with Adam(lr 0.01), clamped to [0, 1] after
   every step. Loss: ``CE + lambda * (mean over ALL gates of |g| - r)^2``.
2. Threshold: all gates ranked globally; the number of pruned channels (equivalently the pruned
   fraction p) is found by bisection so the pruned model's MACs reduction, measured against the
   UNEXPANDED original (``PruneContext.reference_macs``), is as close as possible to
   ``prune_ratio``; a layer always keeps its strongest channel.
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
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .base import PHASE_EPOCHS, PRUNE_RATIO, PruneContext, PruningMethod
from .cost import _conv2d_macs, _linear_macs, profile
from .errors import PruneTuneError
from .graph import ChannelGroup, DependencyGraph
from .hyperparameters import Hyperparameter
from .registry import register_method
from .surgery import prune_group

__all__ = ["Scratch", "MacsModel", "ThresholdResult", "gate_regulariser", "search_threshold", "reinitialise"]

log = logging.getLogger(__name__)

#: Relative tolerance on the MACs reduction target (METHODS.md: 0.1 %).
TARGET_RTOL = 1e-3


def gate_regulariser(gates: Sequence[torch.Tensor], lam: float, r: float) -> torch.Tensor:
    """``lambda * (mean over all gate entries of |g| - r)^2``: one global balance term."""
    flat = torch.cat([g.flatten() for g in gates])
    return lam * (flat.abs().mean() - r) ** 2


# ---- MACs as a function of the kept channel counts ----------------------------------------------------

class MacsModel:
    """Exact MACs (the ``methods.cost`` convention: Conv2d and Linear at batch 1) of ``model`` after
    cutting each of ``groups`` down to ``kept[i]`` channels, without doing the surgery.

    A Conv2d or Linear costs ``out_positions * (in/groups) * out * kernel``, linear in its input and
    in its output channel count, so each module's measured MACs are scaled by ``kept/size`` of the
    group it reads (consumer) and of the group it writes (producer); a depthwise follower scales once.
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, groups: Sequence[ChannelGroup],
                 input_shape: Sequence[int]):
        self.sizes = [g.size for g in groups]
        per_module: dict[str, int] = {}
        names = {m: n for n, m in model.named_modules()}

        def hook(mod, args, out):
            macs = _conv2d_macs(mod, out) if isinstance(mod, nn.Conv2d) else _linear_macs(mod, out)
            per_module[names[mod]] = per_module.get(names[mod], 0) + macs

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            self.total = profile(model, input_shape).macs
        finally:
            for h in handles:
                h.remove()
        # Per module: (MACs, group it reads or None, group it writes or None).
        reads: dict[str, int] = {}
        writes: dict[str, int] = {}
        for i, g in enumerate(groups):
            for name, _ in g.consumers:
                reads[name] = i
            for name in g.producers:
                writes[name] = i
            for name in g.followers:
                if isinstance(model.get_submodule(name), nn.Conv2d):
                    writes[name] = i  # depthwise: MACs scale once with the group
        terms = [(macs, reads.get(n), writes.get(n)) for n, macs in per_module.items()]
        self.terms = [t for t in terms if t[1] is not None or t[2] is not None]
        # Everything the gated groups do not touch (modules with their own macs_hook included).
        self.fixed = self.total - sum(t[0] for t in self.terms)

    def macs(self, kept: Sequence[int]) -> float:
        total = float(self.fixed)
        for macs, a, b in self.terms:
            f = float(macs)
            if a is not None:
                f *= kept[a] / self.sizes[a]
            if b is not None:
                f *= kept[b] / self.sizes[b]
            total += f
        return total


# ---- the global threshold ---------------------------------------------------------------------------

@dataclass
class ThresholdResult:
    keep: list[torch.Tensor]  # per group: sorted kept channel indices
    n_pruned: int             # channels below the global threshold (before the keep-one guard)
    reduction: float          # 1 - MACs / reference
    iterations: int           # MACs evaluations of the bisection


def _keep_sets(gates: Sequence[torch.Tensor], order: torch.Tensor, n_pruned: int) -> list[torch.Tensor]:
    pruned = torch.zeros(order.numel(), dtype=torch.bool)
    pruned[order[:n_pruned]] = True
    out, offset = [], 0
    for g in gates:
        mask = ~pruned[offset: offset + g.numel()]
        offset += g.numel()
        keep = mask.nonzero().flatten()
        if keep.numel() == 0:  # never empty a layer: keep its strongest gate
            keep = g.detach().cpu().argmax().view(1)
        out.append(keep)
    return out


def search_threshold(gates: Sequence[torch.Tensor], macs_of: Callable[[list[int]], float], reference: float,
                     target: float) -> ThresholdResult:
    """Bisection on the number of globally lowest gates pruned, so that ``1 - macs / reference`` is
    as close to ``target`` as any global threshold allows.

    The reduction never decreases as more channels are pruned, so the smallest count reaching the
    target is found in ceil(log2(N + 1)) MACs evaluations (N gates: 9 for ResNet-20, 13 for
    VGG-16); it and the count just below are compared and the closer one is returned.
    """
    flat = torch.cat([g.detach().abs().flatten().cpu() for g in gates])
    order = flat.argsort(stable=True)  # ties (e.g. untouched gates of 1) broken by position
    evaluations = 0

    def reduction(n: int) -> float:
        nonlocal evaluations
        evaluations += 1
        return 1.0 - macs_of([k.numel() for k in _keep_sets(gates, order, n)]) / reference

    lo, hi = 0, flat.numel()  # invariant: answer in [lo, hi]; reduction(hi) may still miss the target
    while lo < hi:
        mid = (lo + hi) // 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best, best_red = lo, reduction(lo)
    if lo > 0:
        below = reduction(lo - 1)
        if abs(below - target) < abs(best_red - target):
            best, best_red = lo - 1, below
    return ThresholdResult(_keep_sets(gates, order, best), best, best_red, evaluations)


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
    hyperparameters = (
        replace(PRUNE_RATIO, doc="target MACs reduction against the unexpanded original"),
        Hyperparameter("lambda", 0.5, 0.01, 1.0, log=True, doc="strength of the gate balance term"),
        Hyperparameter("r", 0.2, 0.1, 0.7, doc="target mean gate value"),
        Hyperparameter("expansion", 1.0, 1.0, 2.0, doc="width multiplier of the searched network"),
        PHASE_EPOCHS,
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
    def prepare(self, model: nn.Module) -> nn.Module:
        self._remove_hooks()
        graph = DependencyGraph(model)
        self._gates = {}
        for group in graph.prunable_groups():
            bn_name = graph.next_module.get(group.producers[0])
            if bn_name is None:
                continue
            bn = model.get_submodule(bn_name)
            dev = next(iter([*bn.parameters(), *bn.buffers()])).device
            self._gates[bn_name] = torch.ones(bn.num_features, device=dev, requires_grad=True)
            self._handles.append(bn.register_forward_hook(self._gate_hook(bn_name)))
        if not self._gates:
            raise PruneTuneError(f"scratch: {type(model).__name__} has no prunable group followed by a batch norm")
        for p in model.parameters():
            p.requires_grad_(False)
        if self._pending is not None:
            self.load_state_dict(self._pending)
        log.info("scratch: %d gate vectors, %d gates", len(self._gates), sum(g.numel() for g in self._gates.values()))
        return model

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
        pairs = [(g, graph.next_module.get(g.producers[0])) for g in graph.prunable_groups()]
        pairs = [(g, bn) for g, bn in pairs if bn in self._gates]
        groups = [g for g, _ in pairs]
        gates = [self._gates[bn].detach().cpu() for _, bn in pairs]
        macs_model = MacsModel(model, graph, groups, context.input_shape)
        reference = float(context.reference_macs) if context.reference_macs else float(macs_model.total)
        target = self.hparams["prune_ratio"]
        result = search_threshold(gates, macs_model.macs, reference, target)
        self.threshold = result  # for inspection (tests, logs); not part of the checkpointed state
        if abs(result.reduction - target) > TARGET_RTOL * target:
            log.info("scratch: nearest achievable MACs reduction %.4f for target %.4f (%d of %d gates pruned)",
                     result.reduction, target, result.n_pruned, sum(g.numel() for g in gates))
        for group, keep in zip(groups, result.keep):
            if keep.numel() < group.size:
                prune_group(graph, group, keep)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(context.seed)
        reinitialise(model, generator)
        for p in model.parameters():
            p.requires_grad_(True)
        macs = profile(model, context.input_shape).macs
        log.info("scratch: pruned to %d MACs, reduction %.4f vs reference %d (target %.4f, %d bisection steps)",
                 macs, 1.0 - macs / reference, int(reference), target, result.iterations)
        return model
