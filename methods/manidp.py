"""ManiDP (Tang et al., CVPR 2021, "Manifold Regularized Dynamic Network Pruning"): a dynamic
method. Every conv of every residual block gets a channel gate (``methods.manidp_gates``); each
input keeps only the channels whose saliency clears the layer's threshold. Nothing is removed: the
pruned model is the gated model with frozen thresholds, and its cost is the MACs averaged over the
evaluation set (``average_macs``).

Training phase (official code: huawei-noah/Pruning, ManiDP/main.py):

* loss = mean CE + lambda * L_s + gamma * L_sim, with, over the gated layers l,
  ``L_s = sum_l mean_i beta_i * mean_c pi_l(x_i)`` and
  ``beta_i = 1[l_i < C] * ((C - l_i) / C) ** kappa`` (a constant weight: computed from detached
  logits), ``C = 0.5 * mean training CE of the previous epoch``. For the FIRST epoch there is no
  previous one (the official code makes a full pass over the training set before training; our
  hooks get no data before the first step), so C is 0.5 x the running mean CE of the batches seen
  so far in that epoch, the current one included.
  ``L_sim = sum_l ||T_l - R_l||_F^2 / B^2``, T the cosine Gram matrix of the layer's pooled
  features (GAP of the layer output before masking, as in the official code), R that of the
  saliencies pi_l.
* thresholds: after each phase epoch, ``xi_l`` = the ``ceil(rho_e * C_l)``-th largest epoch-mean
  saliency of layer l, with the keep rate ``rho_e = eta/2 * cos(pi * (e+1)/E) + 1 - eta/2``
  (cosine from 1 to 1 - eta over the E phase epochs; the official ``adjust_remain_rate``).
  ``prune_ratio`` is the fraction of the dense MACs removed on average, as for every method: eta is
  derived from it once the input shape is known (:func:`eta_for_target`, ``prepare`` with a
  context), the keep rate whose average MACs, gate overhead included, hit the target; per-input
  skipping makes the measured average land near it, not on it.
  ``prune`` sets the final thresholds at keep rate 1 - eta from the last epoch's mean saliency.
* gate parameters carry no weight decay (official ``--decay_branch 0``).

The cheap end (beyond the paper, which has one eta for every layer and no floor; measured reasons
in ``KeepPlan``, ``calibrate_thresholds`` and ``ManiDP.prune``): where one keep rate would leave a
gate under ``min_channels`` (2) channels, each gate's own rate is held at that floor and the rest
re-solved for the target (:func:`plan_keep_rates`); a target beyond what gating block-internal
channels can remove (``KeepPlan.reach``, ~93% on ResNet-20 at 8x8) is clipped there with one
warning line; and where the paper's thresholds leave a gate under the floor, ``prune`` recalibrates
them per input on the calibration batches and sets the floor in every gate
(``ChannelGate.min_active``). At moderate targets none of this binds and the method is the paper's,
bit for bit.

Cost and inference: ``ManiDP.measure_macs`` / ``average_macs(model, batches, input_shape)`` give the
MACs per sample averaged over real inputs; ``skipping_forward`` / ``SkippingView`` run the batch-1
path that computes only active filters (for measured latency). The exported model is the masked one.

Pure PyTorch; nothing here knows it is being tuned.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import PHASE_EPOCHS, PRUNE_RATIO, PruneContext, PruningMethod
from .cost import _conv2d_macs, _eval_mode, _first_tensor, _linear_macs, count_macs, module_macs
from .errors import ArgumentError, PruneTuneError
from .hyperparameters import Hyperparameter
from .manidp_gates import (
    DEFAULT_CLAMP_MAX, DEFAULT_SQUEEZE_RATE, ChannelGate, _is_block, _SkipState, fold_batchnorm, gate_model,
    gated_blocks, hidden_width, named_gates, set_thresholds,
)
from .registry import register_method

__all__ = ["ManiDP", "average_macs", "skipping_forward", "SkippingView", "complexity_weights",
           "sparsity_loss", "similarity_loss", "keep_rate", "thresholds_from_saliency", "KeepPlan", "plan_keep_rates",
           "calibrate_thresholds", "active_channels", "MIN_CHANNELS"]

log = logging.getLogger(__name__)

C_FACTOR = 0.5  # C = 0.5 x mean CE (official --thre_cls 0.5)
MAX_ETA = 0.99  # every gated layer keeps at least one channel on average
MIN_CHANNELS = 2  # the cheap end's floor: channels every gate keeps per input (see KeepPlan)


# ---- the losses --------------------------------------------------------------------------------------
def complexity_weights(ce: torch.Tensor, C: float, kappa: float) -> torch.Tensor:
    """``beta_i = 1[l_i < C] * ((C - l_i)/C) ** kappa`` from per-sample losses ``ce``; detached."""
    ce = ce.detach()
    if not C > 0:
        return torch.zeros_like(ce)
    easy = (ce < C).to(ce.dtype)
    return easy * ((C - ce) / C).clamp(min=1e-10).pow(kappa)


def sparsity_loss(saliencies: Sequence[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """``sum_l mean_i beta_i * mean_c pi_l(x_i)``; ``beta`` is used as a constant."""
    beta = beta.detach()
    return sum((beta * pi.mean(dim=1)).mean() for pi in saliencies)


def _cosine_gram(v: torch.Tensor) -> torch.Tensor:
    v = F.normalize(v.flatten(1), dim=1)
    return v @ v.t()


def similarity_loss(features: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """``||T - R||_F^2 / B^2``: T, R the cosine Gram matrices of pooled features and saliencies."""
    b = features.shape[0]
    diff = _cosine_gram(features) - _cosine_gram(saliency)
    return (diff * diff).sum() / (b * b)


# ---- the threshold schedule ----------------------------------------------------------------------------
def keep_rate(epoch: int, phase_epochs: int, eta: float) -> float:
    """Cosine keep rate after phase epoch ``epoch`` (0-based): from 1 towards ``1 - eta``, reaching
    it after the last phase epoch."""
    total = max(1, phase_epochs)
    progress = min(epoch + 1, total) / total
    return eta / 2 * math.cos(math.pi * progress) + 1 - eta / 2


def thresholds_from_saliency(mean_saliency: Mapping[str, torch.Tensor], rate: float) -> dict[str, float]:
    """Per layer, the ``ceil(rate * C_l)``-th largest mean saliency (at least 1, at most C_l)."""
    out = {}
    for name, sal in mean_saliency.items():
        n = sal.numel()
        k = min(n, max(1, math.ceil(rate * n - 1e-9)))
        out[name] = float(torch.topk(sal.float(), k).values[-1])
    return out


# ---- the MACs target ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GateCosts:
    """The cost model of a gated network: ``fixed`` (ungated layers + the gates' fc layers) and,
    per residual block, its gate names, its convs' dense MACs and output widths. A block's first
    conv costs its dense MACs x its keep rate (its input is the ungated block input), every later
    conv its dense MACs x the keep rates of its input and of its output."""

    total: int
    fixed: float
    blocks: tuple[tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]], ...]

    def cost(self, rates: Mapping[str, float]) -> float:
        out = self.fixed
        for gates, macs, _ in self.blocks:
            prev = 1.0
            for g, m in zip(gates, macs):
                out += m * prev * rates[g]
                prev = rates[g]
        return out


def _gate_costs(model: nn.Module, input_shape: Sequence[int], squeeze_rate: int) -> _GateCosts:
    """``model`` is the UNGATED network; gate names are those ``gate_model`` will give it."""
    per_module, total = module_macs(model, input_shape)
    blocks, gated, overhead = [], 0, 0
    for name, block in model.named_modules():
        if not name or not _is_block(block):
            continue
        idx = [i for i in range(1, 4) if hasattr(block, f"conv{i}")]
        convs = [getattr(block, f"conv{i}") for i in idx]
        macs = tuple(per_module.get(f"{name}.conv{i}", 0) for i in idx)
        blocks.append((tuple(f"{name}.gate{i}" for i in idx), macs, tuple(c.out_channels for c in convs)))
        gated += sum(macs)
        for conv in convs:
            hidden = hidden_width(conv.out_channels, squeeze_rate)
            overhead += conv.in_channels * hidden + hidden * conv.out_channels
    return _GateCosts(total, float(total + overhead - gated), tuple(blocks))


def _bisect_keep(reduction, target: float) -> float:
    """The largest keep rate in [0, 1] whose ``reduction`` is still >= ``target`` (reduction falls
    as the keep rate grows)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if reduction(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def eta_for_target(model: nn.Module, input_shape: Sequence[int], target: float, reference: float | None = None, *,
                   squeeze_rate: int = DEFAULT_SQUEEZE_RATE) -> float:
    """The channel prune rate ``eta`` whose final keep rate ``k = 1 - eta`` (the same in every gated
    layer: the paper's rule) removes ``target`` of the dense MACs (``reference``; default:
    ``model``'s own) on average, with the gates' own fc layers counted: a block's first conv costs
    ``k`` of its dense MACs (its input is the ungated block input), every later conv ``k^2``.
    Thresholds are set per layer from mean saliencies, so what a real input uses varies around
    this; it is what the schedule aims at. ``model`` is the UNGATED network."""
    costs = _gate_costs(model, input_shape, squeeze_rate)
    reference = float(reference or costs.total)
    first = float(sum(macs[0] for _, macs, _ in costs.blocks))
    later = float(sum(sum(macs[1:]) for _, macs, _ in costs.blocks))
    k = _bisect_keep(lambda k: 1.0 - (costs.fixed + first * k + later * k * k) / reference, target)
    return min(MAX_ETA, max(0.0, 1.0 - k))


@dataclass(frozen=True)
class KeepPlan:
    """Where the keep-rate schedule of every gate ends (``etas``: gate name -> prune rate, the
    paper's ``eta`` per layer) and what that aims at.

    Beyond the paper (which speaks of one ``eta`` for every layer and of no floor): at targets where
    the one keep rate ``1 - eta`` leaves a gate under ``min_channels`` channels on average, each
    gate keeps ``max(k, min_channels / C_l)`` instead, with the common ``k`` solved again so the
    average MACs still hit the target; the thinner layers are the ones held at the floor. Measured
    on the quickstart (ResNet-20, digits): one rate for every layer left 1-3 of 16/32/64 channels per
    gate at 95% removed, most gates off for every input, and 0.26-0.33 accuracy. Where the floor
    does not bind (every moderate target) ``etas`` is the paper's one ``eta`` everywhere, exactly.

    ``reach`` is the most the method can remove with every gate at its floor: the stem, the
    shortcuts, the classifier and the gates' own fc layers are never gated. A target beyond it is
    clipped (``target`` < ``requested``); the trial then reports the MACs it really reached.
    """

    etas: dict[str, float]
    requested: float
    target: float
    reach: float
    floored: bool


def plan_keep_rates(model: nn.Module, input_shape: Sequence[int], target: float, reference: float | None = None, *,
                    min_channels: int = MIN_CHANNELS, squeeze_rate: int = DEFAULT_SQUEEZE_RATE) -> KeepPlan:
    """The :class:`KeepPlan` for removing ``target`` of the dense MACs (``reference``; default:
    ``model``'s own) from the UNGATED ``model``."""
    costs = _gate_costs(model, input_shape, squeeze_rate)
    reference = float(reference or costs.total)
    eta = eta_for_target(model, input_shape, target, reference, squeeze_rate=squeeze_rate)
    widths = {g: c for gates, _, cs in costs.blocks for g, c in zip(gates, cs)}

    def rates(k: float) -> dict[str, float]:
        return {g: min(1.0, max(k, min_channels / c)) for g, c in widths.items()}

    def reduction(k: float) -> float:
        return 1.0 - costs.cost(rates(k)) / reference

    reach = reduction(0.0)
    if all((1.0 - eta) * c >= min_channels for c in widths.values()):
        return KeepPlan({g: eta for g in widths}, target, target, reach, floored=False)
    goal = min(target, reach)
    k = _bisect_keep(reduction, goal) if goal < reach else 0.0
    return KeepPlan({g: 1.0 - r for g, r in rates(k).items()}, target, goal, reach, floored=True)


def active_channels(model: nn.Module, batches: Iterable[Any]) -> dict[str, tuple[float, int]]:
    """Per gate: the mean and the least number of active channels per input (eval mode, no_grad;
    each module's train/eval flag is restored)."""
    stats: dict[str, list[float]] = {}
    handles = []
    for name, gate in named_gates(model):
        def hook(module, inputs, output, name=name):
            n = (output[1] > 0).sum(dim=1)
            s = stats.setdefault(name, [0.0, 0, math.inf])
            s[0] += float(n.sum())
            s[1] += n.numel()
            s[2] = min(s[2], int(n.min()))
        handles.append(gate.register_forward_hook(hook))
    ref = next(model.parameters())
    try:
        with _eval_mode(model), torch.no_grad():
            for x in _batches(batches):
                model(x.to(device=ref.device, dtype=ref.dtype))
    finally:
        for h in handles:
            h.remove()
    return {name: (s[0] / max(1, s[1]), int(s[2])) for name, s in stats.items()}


def calibrate_thresholds(model: nn.Module, batches: Iterable[Any], keep: Mapping[str, float]) -> dict[str, float]:
    """Set every gate's threshold (in place) so that on the inputs of ``batches`` the gate passes
    ``keep[name]`` of its channels on average: the threshold is the ``ceil(keep * N * C)``-th
    largest of the N x C saliencies the gate computes over the N inputs. Gates are calibrated in
    forward order within one pass over all the inputs at once (eval mode, no_grad), so each sees
    its inputs under the masks (thresholds and ``min_active`` floors) of the gates before it.
    Returns the thresholds.

    Beyond the paper, whose ``xi_l`` is the ``ceil(k * C)``-th largest *epoch-mean* saliency from
    the training phase: at keep rates of a few channels that statistic goes stale (gates moved
    during the epoch, and every upstream layer's mask changes at the last epoch end); measured on
    the quickstart at 90% removed it left gates with no active channel for any input."""
    inputs = [x for x in _batches(batches)]
    if not inputs:
        raise ArgumentError("calibrate_thresholds: no inputs (the calibration batches were empty)")
    ref = next(model.parameters())
    xs = torch.cat(inputs).to(device=ref.device, dtype=ref.dtype)
    out: dict[str, float] = {}
    handles = []
    for name, gate in named_gates(model):
        def pre(module, args, name=name):
            pi = module.saliency(args[0]).float().flatten()
            k = min(pi.numel(), max(1, math.ceil(keep[name] * pi.numel() - 1e-9)))
            out[name] = float(torch.topk(pi, k).values[-1])
            module.threshold.fill_(out[name])
        handles.append(gate.register_forward_pre_hook(pre))
    try:
        with _eval_mode(model), torch.no_grad():
            model(xs)
    finally:
        for h in handles:
            h.remove()
    return out


# ---- cost ------------------------------------------------------------------------------------------------
def _batches(loader_or_batches: Any) -> Iterable[torch.Tensor]:
    for item in loader_or_batches:
        yield item[0] if isinstance(item, (tuple, list)) else item


def average_macs(model: nn.Module, loader_or_batches: Any, input_shape: Sequence[int], *,
                 max_batches: int | None = None) -> float:
    """MACs per sample averaged over the inputs (``methods.cost``'s convention: Conv2d + Linear,
    modules with ``macs_hook`` report their own), for dynamic and static models alike.

    ``loader_or_batches`` yields input batches, or ``(inputs, targets)`` pairs (a DataLoader); each
    batch must have shape ``(B, *input_shape)``. Runs in eval mode under ``no_grad`` on the model's
    device; each module's train/eval flag is restored. For a static model this equals
    ``profile(model, input_shape).macs``; for a gated one, only active channels (and the gates'
    own fc layers) are counted, per sample.
    """
    shape = tuple(int(s) for s in input_shape)

    def checked():
        for i, x in enumerate(_batches(loader_or_batches)):
            if max_batches is not None and i >= max_batches:
                return
            if tuple(x.shape[1:]) != shape:
                raise ArgumentError(f"average_macs: batch of shape {tuple(x.shape)} does not match input_shape {shape}")
            yield x

    total, seen = count_macs(model, checked())
    if seen == 0:
        raise ArgumentError("average_macs: no inputs (the loader was empty)")
    return total / seen


# ---- the batch-1 skipping path --------------------------------------------------------------------------
def skipping_forward(model: nn.Module, x: torch.Tensor, *, return_macs: bool = False,
                     folded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None):
    """Inference that really skips masked channels: for each sample on its own (batch 1), every
    gated conv computes only its active filters, over only its active input channels, and adds
    them into the residual.

    Uses BN running statistics (inference only) and ``no_grad``. ``folded`` (from
    ``methods.manidp_gates.fold_batchnorm(model)``) replaces each gated conv + BN by one sliced conv
    with bias (fewer small ops; equal up to rounding). Returns the logits ``(B, ...)``, or
    ``(logits, macs)`` with ``macs`` a list of each sample's MACs counted from the shapes actually
    computed (sliced convs, ungated convs and linears, the gates' fc layers).
    """
    blocks = [m for _, m in gated_blocks(model)]
    if not blocks:
        raise PruneTuneError("skipping_forward needs a gated model (methods.manidp_gates.gate_model)")
    state = _SkipState(folded)
    plain = 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal plain
        out = _first_tensor(output)
        if isinstance(module, nn.Conv2d):
            plain += _conv2d_macs(module, out)
        else:
            plain += _linear_macs(module, out)

    handles = ([m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
               if return_macs else [])
    outputs, macs = [], []
    try:
        for b in blocks:
            b._skip = state
        with torch.no_grad():
            for i in range(x.shape[0]):
                state.macs, plain = 0, 0
                outputs.append(model(x[i : i + 1]))
                macs.append(state.macs + plain)
    finally:
        for b in blocks:
            b._skip = None
        for h in handles:
            h.remove()
    logits = torch.cat(outputs)
    return (logits, macs) if return_macs else logits


class SkippingView(nn.Module):
    """The skipping path as a module (``skipping_forward`` with BN folded into the gated convs once,
    at construction): hand it to ``methods.cost.latency`` to time it. An inference snapshot of
    ``model`` (whose weights it shares): not for export or training; rebuild after weights change."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._folded = fold_batchnorm(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skipping_forward(self.model, x, folded=self._folded)


def mean_saliency(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Each gate's saliency averaged over the inputs (model's current train/eval mode kept)."""
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    handles = []
    for name, gate in named_gates(model):
        def hook(module, inputs, output, name=name):
            pi = output[2].detach().float().sum(dim=0).cpu()
            sums[name] = sums[name] + pi if name in sums else pi
        handles.append(gate.register_forward_hook(hook))
    ref = next(model.parameters())
    try:
        with torch.no_grad():
            for i, x in enumerate(_batches(batches)):
                if max_batches is not None and i >= max_batches:
                    break
                model(x.to(device=ref.device, dtype=ref.dtype))
                seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {name: s / max(1, seen) for name, s in sums.items()}


# ---- the method --------------------------------------------------------------------------------------------
@register_method("manidp")
class ManiDP(PruningMethod):
    """Dynamic: ``prune`` returns the gated model with frozen thresholds (all weights kept)."""
    paper = "Tang et al., CVPR 2021"
    summary = "dynamic per-input channel gating; costed by average MACs"

    dynamic = True
    hyperparameters = (
        PRUNE_RATIO,
        Hyperparameter("lambda", 0.01, 1e-3, 1e-1, log=True, doc="weight of the complexity-weighted sparsity loss"),
        Hyperparameter("gamma", 1.0, 0.1, 2.0, log=True, doc="weight of the similarity-alignment loss"),
        Hyperparameter("kappa", 1.0, 0.5, 2.0, doc="exponent of the per-sample sparsity weight beta_i"),
        PHASE_EPOCHS,
    )
    clamp_max: float = DEFAULT_CLAMP_MAX
    squeeze_rate: int = DEFAULT_SQUEEZE_RATE
    #: The cheap end's floor (``KeepPlan``, ``prune``): channels every gate keeps per input there.
    min_channels: int = MIN_CHANNELS

    def measure_macs(self, model: nn.Module, input_shape: tuple[int, ...],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> float:
        """MACs per sample averaged over ``batches`` (the evaluation set), counting only the channels
        each input really uses plus the gates' own fc layers (``average_macs``)."""
        return average_macs(model, batches, input_shape)

    def inference_model(self, model: nn.Module, *, batch_size: int = 1) -> nn.Module:
        """At batch 1 the skipping path (``SkippingView``, BN folded once): it computes only the
        active filters of the input, which is ManiDP's real per-input cost. A batch's inputs need
        different filters, so batched inference runs the masked model (every filter): SkippingView
        loops over the samples, which on an H100 at batch 256 timed ~930x the dense model. A model
        without gates is returned as it is."""
        return SkippingView(model) if batch_size == 1 and gated_blocks(model) else model

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self._epoch = 0                       # phase epochs completed
        self._C: float | None = None          # 0.5 x last epoch's mean CE (None during the first)
        self._ce_sum, self._ce_count = 0.0, 0  # this epoch's per-sample CE
        self._sal_sum: dict[str, torch.Tensor] = {}
        self._sal_count = 0
        self._last_saliency: dict[str, torch.Tensor] = {}
        self._records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._gate_names: list[str] = []
        self._eta: float | None = None        # from the MACs target, once the input shape is known
        self._etas: dict[str, float] | None = None  # per gate (KeepPlan.etas); None: eta everywhere
        self._floored = False                 # the plan holds some gate at min_channels

    # ---- phase hooks ----------------------------------------------------------------------------
    @property
    def eta(self) -> float:
        """The channel prune rate the keep-rate schedule ends at (from the MACs target); at the
        cheap end, where each gate has its own (``gate_etas``), the largest of them."""
        return self._eta if self._eta is not None else self.hparams["prune_ratio"]

    def gate_etas(self, names: Iterable[str]) -> dict[str, float]:
        """The named gates' final prune rates (keep rate ``1 - eta_l``): the plan's, or ``eta`` everywhere."""
        return {n: self._etas[n] if self._etas is not None else self.eta for n in names}

    def _plan(self, model: nn.Module, context: PruneContext) -> None:
        target = self.hparams["prune_ratio"]
        plan = plan_keep_rates(model, context.input_shape, target, context.reference_macs,
                               min_channels=self.min_channels, squeeze_rate=self.squeeze_rate)
        if not plan.etas:  # no residual block to gate: gate_model refuses the model in one line
            return
        self._eta, self._etas, self._floored = max(plan.etas.values()), plan.etas, plan.floored
        if plan.target < plan.requested:
            log.warning("manidp: prune_ratio %.3f is beyond its reach on %s: with >= %d channels per gate it removes "
                        "at most %.3f of the dense MACs (the stem, shortcuts, classifier and the gates' own layers "
                        "are never gated); aiming at %.3f", plan.requested, type(model).__name__, self.min_channels,
                        plan.reach, plan.target)
        elif plan.floored:
            log.info("manidp: keep rates %.4f-%.4f per gated layer (>= %d channels per gate) aim at %.4f of the dense "
                     "MACs removed", 1.0 - self._eta, 1.0 - min(plan.etas.values()), self.min_channels, target)
        else:
            log.info("manidp: keep rate %.4f per gated layer aims at %.4f of the dense MACs removed",
                     1.0 - self._eta, target)

    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        if context is not None and self._eta is None and not gated_blocks(model):
            self._plan(model, context)
        elif context is None and self._eta is None:
            log.info("manidp: no input shape; prune_ratio taken as the channel prune rate eta")
        gate_model(model, clamp_max=self.clamp_max, squeeze_rate=self.squeeze_rate)
        self._remove_hooks()
        self._gate_names = []
        first = True
        for name, gate in named_gates(model):
            self._gate_names.append(name)
            self._handles.append(gate.register_forward_hook(self._recorder(name, count=first)))
            first = False
        return model

    def _recorder(self, name: str, *, count: bool):
        def hook(gate: ChannelGate, inputs: tuple, output: tuple) -> None:
            if not gate.training:
                return
            pi, y = output[2], inputs[1]
            self._records[name] = (pi, y.mean(dim=(2, 3)))
            s = pi.detach().float().sum(dim=0)
            self._sal_sum[name] = self._sal_sum[name] + s if name in self._sal_sum else s
            if count:
                self._sal_count += pi.shape[0]
        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records.clear()

    def make_optimizer(self, model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        gate_params = {id(p) for _, g in named_gates(model) for p in g.parameters()}
        main = [p for p in model.parameters() if id(p) not in gate_params]
        gates = [p for p in model.parameters() if id(p) in gate_params]
        return torch.optim.SGD([{"params": main, "weight_decay": weight_decay},
                                {"params": gates, "weight_decay": 0.0}], lr=lr, momentum=momentum)

    def make_finetune_optimizer(self, model: nn.Module, lr: float, momentum: float,
                                weight_decay: float) -> torch.optim.Optimizer:
        # The gated model keeps its gates through the fine-tune; as in the official code, they
        # carry no weight decay there either.
        return self.make_optimizer(model, lr, momentum, weight_decay)

    def extra_loss(self, model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        records = [self._records[n] for n in self._gate_names if n in self._records]
        self._records.clear()
        if not records:
            return None
        with torch.no_grad():
            ce = F.cross_entropy(logits.detach().float(), targets, reduction="none")
        self._ce_sum += float(ce.sum())
        self._ce_count += ce.numel()
        C = self._C if self._C is not None else C_FACTOR * self._ce_sum / self._ce_count
        beta = complexity_weights(ce, C, self.hparams["kappa"])
        l_s = sparsity_loss([pi for pi, _ in records], beta)
        l_sim = sum(similarity_loss(feat, pi) for pi, feat in records)
        return self.hparams["lambda"] * l_s + self.hparams["gamma"] * l_sim

    def on_epoch_end(self, model: nn.Module, epoch: int, mean_loss: float) -> None:
        mean_ce = self._ce_sum / self._ce_count if self._ce_count else float(mean_loss)
        self._C = C_FACTOR * mean_ce
        self._ce_sum, self._ce_count = 0.0, 0
        if self._sal_count:
            self._last_saliency = {n: (s / self._sal_count).cpu() for n, s in self._sal_sum.items()}
        self._sal_sum, self._sal_count = {}, 0
        self._epoch = epoch + 1
        if self._last_saliency:
            etas = self.gate_etas(self._last_saliency)
            rates = {n: keep_rate(epoch, self.phase_epochs, eta) for n, eta in etas.items()}
            set_thresholds(model, self._thresholds(self._last_saliency, rates.__getitem__))
            log.info("manidp epoch %d: C=%.4f, keep rate %.3f", epoch, self._C,
                     keep_rate(epoch, self.phase_epochs, self.eta))

    @staticmethod
    def _thresholds(saliency: Mapping[str, torch.Tensor], rate) -> dict[str, float]:
        """The paper's thresholds, gate by gate at keep rate ``rate(name)``."""
        return {n: thresholds_from_saliency({n: sal}, rate(n))[n] for n, sal in saliency.items()}

    # ---- checkpointed state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "C": self._C, "ce_sum": self._ce_sum, "ce_count": self._ce_count,
                "last_saliency": {n: s.tolist() for n, s in self._last_saliency.items()}, "eta": self._eta,
                "etas": self._etas, "floored": self._floored}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._C = None if state.get("C") is None else float(state["C"])
        self._ce_sum, self._ce_count = float(state.get("ce_sum", 0.0)), int(state.get("ce_count", 0))
        self._last_saliency = {n: torch.tensor(v) for n, v in state.get("last_saliency", {}).items()}
        self._eta = None if state.get("eta") is None else float(state["eta"])
        etas = state.get("etas")
        self._etas = None if etas is None else {n: float(v) for n, v in etas.items()}
        self._floored = bool(state.get("floored", False))

    # ---- the cut ----------------------------------------------------------------------------------------
    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        """A copy of the gated model with the final thresholds (keep rate ``1 - eta_l`` per gate).

        The paper's thresholds (from the last epoch's mean saliency) stand wherever they leave every
        gate at least ``min_channels`` active channels per input on average on the calibration
        batches, and the plan holds no gate at its floor: every moderate target. Otherwise (the
        cheap end; beyond the paper, see ``KeepPlan`` and ``calibrate_thresholds``) every gate
        keeps at least ``min_channels`` channels per input (``ChannelGate.min_active``) and its
        threshold is recalibrated on the calibration batches to keep ``1 - eta_l`` of its channels
        on average. The floor is the gate's, so it also holds through the fine-tune, where the
        gates keep training: without it a channel whose saliency sank under the frozen threshold got
        no gradient to come back, and gates emptied one channel at a time (measured)."""
        self._remove_hooks()
        if not gated_blocks(model):
            gate_model(model, clamp_max=self.clamp_max, squeeze_rate=self.squeeze_rate)
        saliency = self._last_saliency
        if not saliency and self._sal_count:  # steps taken after the last epoch end
            saliency = {n: (s / self._sal_count).cpu() for n, s in self._sal_sum.items()}
        if not saliency:
            if context.calibration is None:
                raise PruneTuneError("manidp: no saliency statistics (no training phase) and no calibration data")
            with _eval_mode(model):
                saliency = mean_saliency(model, context.calibration)
        pruned = copy.deepcopy(model)
        etas = self.gate_etas(saliency)
        set_thresholds(pruned, self._thresholds(saliency, lambda n: 1.0 - etas[n]))
        if self.min_channels > 0:
            self._cheap_cut(pruned, None if context.calibration is None else list(context.calibration), etas)
        return pruned

    def _cheap_cut(self, pruned: nn.Module, batches: list[Any] | None, etas: Mapping[str, float]) -> None:
        """The floor and the recalibrated thresholds where the paper's thresholds fall short
        (``prune``); without calibration batches, the floor alone where the plan holds gates at it."""
        short = [] if batches is None else sorted(
            n for n, (mean, _) in active_channels(pruned, batches).items() if mean < self.min_channels)
        if not short and not self._floored:
            return
        for _, gate in named_gates(pruned):
            gate.min_active = self.min_channels
        if batches is None:
            log.info("manidp: >= %d channels per gate per input; no calibration batches, so the epoch-mean "
                     "thresholds stand", self.min_channels)
            return
        calibrate_thresholds(pruned, batches, {n: 1.0 - eta for n, eta in etas.items()})
        log.info("manidp: thresholds recalibrated on the calibration batches with >= %d channels per gate per input "
                 "(%d gates had fewer on average with the epoch-mean thresholds%s)", self.min_channels, len(short),
                 ", and the plan holds some at the floor" if self._floored else "")
