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

Cost and inference: ``ManiDP.measure_macs`` / ``average_macs(model, batches, input_shape)`` give the
MACs per sample averaged over real inputs; ``skipping_forward`` / ``SkippingView`` run the batch-1
path that computes only active filters (for measured latency). The exported model is the masked one.

Pure PyTorch; nothing here knows it is being tuned.
"""
from __future__ import annotations

import copy
import logging
import math
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
           "sparsity_loss", "similarity_loss", "keep_rate", "thresholds_from_saliency"]

log = logging.getLogger(__name__)

C_FACTOR = 0.5  # C = 0.5 x mean CE (official --thre_cls 0.5)
MAX_ETA = 0.99  # every gated layer keeps at least one channel on average


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
def eta_for_target(model: nn.Module, input_shape: Sequence[int], target: float, reference: float | None = None, *,
                   squeeze_rate: int = DEFAULT_SQUEEZE_RATE) -> float:
    """The channel prune rate ``eta`` whose final keep rate ``k = 1 - eta`` (the same in every gated
    layer) removes ``target`` of the dense MACs (``reference``; default: ``model``'s own) on average,
    with the gates' own fc layers counted: a block's first conv costs ``k`` of its dense MACs (its
    input is the ungated block input), every later conv ``k^2``. Thresholds are set per layer from
    mean saliencies, so what a real input uses varies around this; it is what the schedule aims at.
    ``model`` is the UNGATED network."""
    per_module, total = module_macs(model, input_shape)
    reference = float(reference or total)
    first, later, overhead = 0.0, 0.0, 0.0
    for name, block in model.named_modules():
        if not name or not _is_block(block):
            continue
        convs = [f"{name}.conv{i}" for i in range(1, 4) if hasattr(block, f"conv{i}")]
        first += per_module.get(convs[0], 0)
        later += sum(per_module.get(c, 0) for c in convs[1:])
        for c in convs:
            conv = model.get_submodule(c)
            hidden = hidden_width(conv.out_channels, squeeze_rate)
            overhead += conv.in_channels * hidden + hidden * conv.out_channels
    fixed = total + overhead - first - later

    def reduction(k: float) -> float:
        return 1.0 - (fixed + first * k + later * k * k) / reference

    lo, hi = 0.0, 1.0  # keep rate: reduction falls as k grows
    for _ in range(40):
        mid = (lo + hi) / 2
        if reduction(mid) >= target:
            lo = mid
        else:
            hi = mid
    return min(MAX_ETA, max(0.0, 1.0 - lo))


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

    # ---- phase hooks ----------------------------------------------------------------------------
    @property
    def eta(self) -> float:
        """The channel prune rate the keep-rate schedule ends at (from the MACs target)."""
        return self._eta if self._eta is not None else self.hparams["prune_ratio"]

    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        if context is not None and self._eta is None and not gated_blocks(model):
            self._eta = eta_for_target(model, context.input_shape, self.hparams["prune_ratio"], context.reference_macs,
                                       squeeze_rate=self.squeeze_rate)
            log.info("manidp: keep rate %.4f per gated layer aims at %.4f of the dense MACs removed",
                     1.0 - self._eta, self.hparams["prune_ratio"])
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
            rate = keep_rate(epoch, self.phase_epochs, self.eta)
            set_thresholds(model, thresholds_from_saliency(self._last_saliency, rate))
            log.info("manidp epoch %d: C=%.4f, keep rate %.3f", epoch, self._C, rate)

    # ---- checkpointed state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "C": self._C, "ce_sum": self._ce_sum, "ce_count": self._ce_count,
                "last_saliency": {n: s.tolist() for n, s in self._last_saliency.items()}, "eta": self._eta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._C = None if state.get("C") is None else float(state["C"])
        self._ce_sum, self._ce_count = float(state.get("ce_sum", 0.0)), int(state.get("ce_count", 0))
        self._last_saliency = {n: torch.tensor(v) for n, v in state.get("last_saliency", {}).items()}
        self._eta = None if state.get("eta") is None else float(state["eta"])

    # ---- the cut ----------------------------------------------------------------------------------------
    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        """A copy of the gated model with the final thresholds (keep rate 1 - eta)."""
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
        set_thresholds(pruned, thresholds_from_saliency(saliency, 1.0 - self.eta))
        return pruned
