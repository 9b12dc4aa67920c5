"""ThiNet (Luo, Wu, Lin, ICCV 2017 / TPAMI 2018): prune the channels of layer i that the NEXT layer
can best do without, judged on real activations.

For a channel group (layer i's output channels) and its consumer (layer i+1), sample ``m``
(image, output position, output filter) triples from the consumer's real input ``X_i`` (the
post-BN-ReLU activation, captured by a forward pre-hook on the consumer while the calibration
batches run through the model). The contribution of input channel ``c`` to sample ``s`` is
``xhat[s, c] = sum_{kh,kw} W_{i+1}[j_s, c, kh, kw] * X_i[n_s, c, patch_s]`` and the target is
``yhat[s] = sum_c xhat[s, c]`` (the consumer's output minus its bias). Then

1. selection (:func:`thinet_select`): choose the removed set ``T`` greedily, each time adding the
   channel that minimises ``|| sum_{c in T} xhat_c ||^2`` over the samples. With the Gram matrix
   ``G = xhat^T xhat`` the error of adding ``c`` is ``||r||^2 + 2 (xhat^T r)_c + G_cc`` for the
   running sum ``r``, so each greedy step is one O(C) vector update (no pass over the samples);
2. rescaling (:func:`least_squares_scale`): ``w = argmin || yhat - xhat_S w ||^2`` over the kept set
   ``S`` (``torch.linalg.lstsq``), multiplied into the kept input slices of layer i+1 by the surgery;
3. schedule: groups are pruned one at a time from the input side, each but the last followed by
   ``context.finetune(model, finetune_steps)`` (a recovery before the next layer is sampled); the
   trial's normal fine-tune is the final one.

Which groups: with ``scope: internal`` (the paper's) the block-internal ones: in a basic-block
ResNet each block's conv1 output, judged by conv2's reconstruction; in VGG every conv. With
``scope: all`` the residual-coupled groups too, each judged by EVERY conv that reads it (all the
blocks of a stage and the next stage's first block); option-A pad shortcuts only copy channels and
are not reconstructed. A group with several consumers is judged on the samples of all of them
stacked (one shared rescaling vector); a ``Linear`` consumer (the classifier after global pooling)
is handled like a 1x1 conv on its per-channel features. Only a consumer we cannot model (a grouped
conv, non-zero padding modes, a non-2-D linear input) makes the group fall back to the L1 norm of
the producers' filters (logged).

How many channels each group keeps is fixed before the first cut so that ``prune_ratio`` of the
dense MACs goes (``methods.budget``): the same fraction of every group (``allocation: uniform``),
or one ranking of every channel of every group by the relative reconstruction error at the greedy
step that would remove it (``global``, :func:`greedy_scores`).
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import PRUNE_RATIO, ROUND_TO, SCOPE, PruneContext, PruningMethod, allocation_hp
from .budget import keep_top
from .errors import ArgumentError, PruneTuneError
from .graph import ChannelGroup, DependencyGraph
from .hyperparameters import Hyperparameter
from .importance import l1_filter
from .layers import ChannelPadShortcut
from .registry import register_method
from .selection import plan_widths
from .surgery import prune_group

__all__ = ["ThiNet", "LayerSamples", "sample_contributions", "thinet_select", "removal_order", "greedy_scores",
           "group_scores", "least_squares_scale",
           "reconstruction_error", "supports_consumer", "calibration_inputs", "prune_layer"]

log = logging.getLogger(__name__)

#: The paper samples 10 random locations per image; the number of calibration images used for a
#: layer is therefore ceil(samples_per_layer / 10) (at least one batch, at most what is given).
LOCATIONS_PER_IMAGE = 10


# ---- sampling ------------------------------------------------------------------------------------------

@dataclass
class LayerSamples:
    """Sampled contributions of one channel group: ``contrib[s, c]`` is channel c's share of sample s."""

    contrib: torch.Tensor  # (m, C), float32

    @property
    def target(self) -> torch.Tensor:
        """``yhat``: the consumer outputs (minus bias) the samples reconstruct."""
        return self.contrib.sum(1)


def supports_consumer(m: nn.Module) -> bool:
    """Whether ThiNet can sample contributions through consumer ``m``."""
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return isinstance(m, nn.Linear)


class _Captured(Exception):
    """Raised by the capture hook once every consumer has been seen: the rest of the forward is waste."""


def _per_sample_terms(m: nn.Module, x: torch.Tensor, channels: int, per_channel: int, count: int,
                      generator: torch.Generator) -> torch.Tensor:
    """(count, channels) contributions for ``count`` random (image, position, filter) triples of ``x``."""
    n_img = x.shape[0]
    dev = x.device

    def rand(high: int) -> torch.Tensor:
        return torch.randint(high, (count,), generator=generator).to(dev)

    n = rand(n_img)
    if isinstance(m, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        h_out = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w_out = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        h, w, j = rand(h_out), rand(w_out), rand(m.out_channels)
        xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
        rows = (h * sh).view(-1, 1) + torch.arange(kh, device=dev).mul(dh).view(1, -1)  # (S, kh)
        cols = (w * sw).view(-1, 1) + torch.arange(kw, device=dev).mul(dw).view(1, -1)  # (S, kw)
        c = torch.arange(channels, device=dev)
        patches = xp[n.view(-1, 1, 1, 1), c.view(1, -1, 1, 1), rows.view(-1, 1, kh, 1), cols.view(-1, 1, 1, kw)]
        weights = m.weight[j]  # (S, C, kh, kw)
        return (patches * weights).flatten(2).sum(2)
    # Linear: input (N, C * per_channel), channel c owns features [c*pc, (c+1)*pc).
    j = rand(m.out_features)
    feats = x.reshape(n_img, channels, per_channel)[n]
    weights = m.weight.view(m.out_features, channels, per_channel)[j]
    return (feats * weights).sum(2)


@torch.no_grad()
def sample_contributions(model: nn.Module, consumers: Sequence[tuple[str, int]], channels: int,
                         inputs: Sequence[torch.Tensor], samples: int, generator: torch.Generator) -> LayerSamples:
    """Run ``inputs`` (image batches) through ``model`` in eval mode and sample ``samples`` rows of
    per-channel contributions to the outputs of ``consumers`` (``(name, features per channel)``,
    each consuming the same ``channels`` input channels). Samples are spread over batches in
    proportion to their size and over consumers evenly; the forward stops as soon as every
    consumer's input has been seen."""
    modules = [(model.get_submodule(name), pc) for name, pc in consumers]
    sizes = [int(x.shape[0]) for x in inputs]
    total_imgs = sum(sizes)
    # Samples per (batch, consumer), summing exactly to ``samples``.
    quotas = []
    given = 0
    for b, size in enumerate(sizes):
        upto = round(samples * sum(sizes[: b + 1]) / total_imgs)
        per_batch, given = upto - given, upto
        base, extra = divmod(per_batch, len(modules))
        quotas.append([base + (1 if k < extra else 0) for k in range(len(modules))])

    rows: list[torch.Tensor] = []
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for b, x in enumerate(inputs):
            seen: set[int] = set()

            def make_hook(k: int):
                def hook(mod, args):
                    if k in seen:
                        return  # a consumer reused in the same forward: its first call is the one
                    seen.add(k)
                    count = quotas[b][k]
                    if count:
                        rows.append(_per_sample_terms(mod, args[0].detach(), channels, modules[k][1], count,
                                                      generator).float())
                    if len(seen) == len(modules):
                        raise _Captured
                return hook

            handles = [m.register_forward_pre_hook(make_hook(k)) for k, (m, _) in enumerate(modules)]
            try:
                model(x)
            except _Captured:
                pass
            finally:
                for h in handles:
                    h.remove()
    finally:
        for m, training in flags:
            m.training = training
    contrib = torch.cat(rows) if rows else torch.zeros(0, channels)
    return LayerSamples(contrib.cpu())


def calibration_inputs(calibration: Iterable[tuple[torch.Tensor, torch.Tensor]], samples: int,
                       device: torch.device) -> list[torch.Tensor]:
    """The image batches to sample from: enough for ``samples`` at LOCATIONS_PER_IMAGE per image."""
    need = max(1, math.ceil(samples / LOCATIONS_PER_IMAGE))
    out, have = [], 0
    for batch in calibration:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x[: need - have]  # every image costs a forward pass per layer: take no more than needed
        out.append(x.to(device))
        have += int(x.shape[0])
        if have >= need:
            break
    return out


# ---- selection and rescaling (pure functions on the sampled contributions) ----------------------------

def reconstruction_error(contrib: torch.Tensor, keep: Sequence[int] | torch.Tensor,
                         scale: torch.Tensor | None = None) -> float:
    """``|| yhat - xhat_S w ||^2`` summed over the samples (``w`` = 1 without ``scale``)."""
    x = contrib.double()
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    kept = x[:, keep_t]
    if scale is not None:
        kept = kept * scale.double().view(1, -1)
    return float((x.sum(1) - kept.sum(1)).pow(2).sum())


def removal_order(contrib: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ThiNet's greedy removal: the first ``count`` (default: all) channels in the order the greedy
    step removes them, each time the one whose addition to the removed set T gives the smallest
    ``|| sum_{c in T} xhat_c ||^2``, and that error after each removal. Runs on the Gram matrix
    (float64): O(m C^2) once, then O(C) per removal."""
    m, C = contrib.shape
    count = C if count is None else count
    x = contrib.double()
    gram = x.T @ x
    sq = gram.diagonal().clone()
    dot = torch.zeros(C, dtype=torch.float64)  # xhat^T r for the running removed sum r
    rr = torch.zeros((), dtype=torch.float64)  # ||r||^2
    removed = torch.zeros(C, dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    order, errors = [], []
    for _ in range(count):
        err = torch.where(removed, inf, rr + 2 * dot + sq)
        c = int(torch.argmin(err))
        removed[c] = True
        rr = err[c]
        dot += gram[:, c]
        order.append(c)
        errors.append(float(rr))
    return torch.tensor(order, dtype=torch.long), torch.tensor(errors, dtype=torch.float64)


def thinet_select(contrib: torch.Tensor, n_keep: int) -> torch.Tensor:
    """ThiNet's greedy selection: the sorted indices of the ``n_keep`` channels to KEEP (the ones
    :func:`removal_order` has not removed after ``C - n_keep`` steps)."""
    C = contrib.shape[1]
    if not 1 <= n_keep <= C:
        raise ArgumentError(f"n_keep must be in [1, {C}], got {n_keep}")
    order, _ = removal_order(contrib, C - n_keep)
    keep = torch.ones(C, dtype=torch.bool)
    keep[order] = False
    return keep.nonzero().flatten()


def greedy_scores(contrib: torch.Tensor) -> torch.Tensor:
    """Per channel: the relative reconstruction error (error / target energy) at the greedy step
    that removes it, made non-decreasing along the removal order. Higher = more important; the
    scale is comparable across layers, so a global allocation can rank all groups at once."""
    order, errors = removal_order(contrib)
    energy = float(contrib.double().sum(1).pow(2).sum()) or 1.0
    envelope = torch.cummax(errors / energy, dim=0).values
    scores = torch.empty(contrib.shape[1], dtype=torch.float64)
    scores[order] = envelope
    return scores


#: Ridge strengths tried when there are too few samples for a plain least-squares fit, as fractions
#: of ``trace(X^T X) / k`` (the mean squared column norm: the data's own scale). Each direction of
#: the fit keeps ``s^2 / (s^2 + lam)`` of itself, about ``k / (1000 m)`` at the largest (m < k
#: samples): in effect w = 1, so the choice spans "fit" to "leave alone".
RIDGE_FRACTIONS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def _ridge_towards_one(kept: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``w = argmin ||y - X w||^2 + lam ||w - 1||^2`` (float64). ``lam`` is a fraction of
    ``trace(X^T X) / k`` from RIDGE_FRACTIONS, picked by exact leave-one-out error with the
    one-standard-error rule: the strongest whose error is within one (paired) standard error of the
    lowest, since the lowest of several noisy estimates flatters a weak ``lam``. Returns ``(w,
    fraction, its leave-one-out error / that of w = 1)``. One SVD serves every ``lam``: with
    ``d = w - 1`` fitting ``r = y - X 1``, the fit is ``X d = U diag(s^2 / (s^2 + lam)) U^T r``."""
    m, k = kept.shape
    r = y - kept.sum(1)
    base = r.pow(2)
    if float(base.sum()) == 0.0:
        return torch.ones(k, dtype=torch.float64), 0.0, 1.0
    u, s, vh = torch.linalg.svd(kept, full_matrices=False)
    ur = u.T @ r
    scale = float(s.pow(2).sum()) / k
    errors = []
    for fraction in RIDGE_FRACTIONS:
        shrink = s.pow(2) / (s.pow(2) + fraction * scale)
        leverage = u.pow(2) @ shrink  # the hat matrix's diagonal, < 1 for lam > 0
        errors.append(((r - u @ (shrink * ur)) / (1 - leverage)).pow(2))
    means = [float(e.mean()) for e in errors]
    best = min(range(len(means)), key=means.__getitem__)
    pick = next(j for j in range(len(means) - 1, best - 1, -1)
                if j == best or means[j] - means[best] <= float((errors[j] - errors[best]).std()) / math.sqrt(m))
    lam = RIDGE_FRACTIONS[pick] * scale
    d = vh.T @ (s / (s.pow(2) + lam) * ur)
    return 1 + d, RIDGE_FRACTIONS[pick], means[pick] / float(base.mean())


def least_squares_scale(contrib: torch.Tensor, keep: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """ThiNet's rescaling ``w = argmin || yhat - xhat_S w ||^2`` for the kept channels (in ``keep``'s
    order), solved in float64 on the CPU.

    With at least twice as many samples as live kept channels: plain least squares (the paper), by
    the rank-revealing ``gelsd`` driver. With fewer, a plain fit would chase noise, so it is solved
    regularised towards the unscaled solution, ``min ||yhat - xhat_S w||^2 + lam ||w - 1||^2``, with
    ``lam`` chosen by leave-one-out error among fractions of the data scale (:func:`_ridge_towards_one`);
    an under-determined fit stays well-posed and shrinks towards ``w = 1`` as far as the samples say.
    The regime used is logged at INFO. Guards: channels that contribute nothing on the samples keep
    ``w = 1`` (the data say nothing about them); a non-finite solution, or one that does not lower
    the error, gives all ones. The returned ``w`` therefore never increases the sampled error.
    """
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    ones = torch.ones(keep_t.numel())
    x = contrib.double().cpu()
    m = x.shape[0]
    kept = x[:, keep_t]
    live = kept.abs().amax(0) > 0
    k = int(live.sum())
    if k == 0:
        return ones
    y = x.sum(1)
    if m >= 2 * k:
        sol = torch.linalg.lstsq(kept[:, live], y.view(-1, 1), driver="gelsd").solution.flatten()
        log.info("thinet: %d samples for %d kept channels: least-squares rescaling", m, k)
    else:
        sol, fraction, loo = _ridge_towards_one(kept[:, live], y)
        log.info("thinet: %d samples for %d kept channels (< 2x): ridge rescaling towards w = 1, lambda = "
                 "%g x trace(X^T X)/k by leave-one-out (its held-out error estimate: %.4f of w = 1's)",
                 m, k, fraction, loo)
    w = torch.ones(keep_t.numel(), dtype=torch.float64)
    w[live] = sol
    if not bool(torch.isfinite(w).all()):
        log.warning("thinet: least-squares rescaling gave non-finite weights; skipped")
        return ones
    if reconstruction_error(contrib, keep_t, w) > reconstruction_error(contrib, keep_t):
        return ones
    return w.float()


def _sampled_consumers(graph: DependencyGraph, group: ChannelGroup) -> list[tuple[str, int]] | None:
    """The consumers ThiNet reconstructs: every conv/linear reading the group. Pad shortcuts only copy
    channels (nothing to reconstruct by weights) and are left out; None when a consumer cannot be
    modelled or none is left."""
    model = graph.model
    consumers = [(n, pc) for n, pc in group.consumers if not isinstance(model.get_submodule(n), ChannelPadShortcut)]
    if not consumers or not all(supports_consumer(model.get_submodule(n)) for n, _ in consumers):
        return None
    return consumers


def group_scores(graph: DependencyGraph, group: ChannelGroup, inputs: Sequence[torch.Tensor], samples: int,
                 generator: torch.Generator) -> torch.Tensor:
    """:func:`greedy_scores` of ``group`` on freshly sampled contributions (the L1 filter norm,
    normalised to a mean of one, where the consumers cannot be sampled)."""
    consumers = _sampled_consumers(graph, group)
    if consumers is None:
        l1 = l1_filter(graph, group).double()
        return l1 / (l1.mean() or 1.0)
    return greedy_scores(sample_contributions(graph.model, consumers, group.size, inputs, samples, generator).contrib)


def prune_layer(graph: DependencyGraph, group: ChannelGroup, n_keep: int, inputs: Sequence[torch.Tensor],
                samples: int, generator: torch.Generator) -> dict | None:
    """One ThiNet step, in place: sample ``group``'s consumer(s) on ``inputs``, keep the ``n_keep``
    channels the greedy selection picks, rescale the kept consumer slices, cut. Returns the
    sampled relative errors (None when the group fell back to the L1 norm)."""
    size = group.size
    consumers = _sampled_consumers(graph, group)
    if consumers is None:
        log.info("thinet %s: consumers %s cannot be sampled; falling back to the L1 norm",
                 group.name, [n for n, _ in group.consumers])
        prune_group(graph, group, keep_top(l1_filter(graph, group), n_keep))
        return None
    data = sample_contributions(graph.model, consumers, size, inputs, samples, generator)
    keep = thinet_select(data.contrib, n_keep)
    scale = least_squares_scale(data.contrib, keep)
    before = reconstruction_error(data.contrib, keep)
    after = reconstruction_error(data.contrib, keep, scale)
    energy = float(data.target.double().pow(2).sum()) or 1.0
    log.info("thinet %s: %d -> %d channels, relative error %.4f (%.4f after rescaling)",
             group.name, size, n_keep, before / energy, after / energy)
    prune_group(graph, group, keep, scale=scale)
    return {"group": group.name, "kept": n_keep, "of": size, "error": before / energy,
            "rescaled_error": after / energy}


# ---- the method -------------------------------------------------------------------------------------

@register_method("thinet")
class ThiNet(PruningMethod):
    paper = "Luo et al., ICCV 2017"
    summary = ("greedy channel selection by next-layer reconstruction error + least squares "
               "(ridge towards w = 1 when samples < 2x kept channels)")
    hyperparameters = (
        PRUNE_RATIO,
        Hyperparameter("samples_per_layer", 512, 64, 4096, kind="int",
                       doc="sampled (image, position, filter) outputs of the next layer per pruned layer"),
        Hyperparameter("finetune_steps", 20, 0, 500, kind="int",
                       doc="fine-tune steps after each pruned layer but the last (the trial's fine-tune follows it)"),
        SCOPE, allocation_hp("uniform"), ROUND_TO,
    )

    #: Also run the ``finetune_steps`` recovery after the LAST cut (before issue 12's ThiNet work it
    #: did). Off: nothing samples the model after it and the trial's own fine-tune starts right away;
    #: every selection and rescaled weight is the same either way (benchmarks/bench_thinet_selection.py
    #: times both).
    recover_after_last = False

    def __init__(self, **hparams):
        super().__init__(**hparams)
        #: Per pruned layer of the last ``prune``: kept/of channels and the sampled relative errors.
        self.layer_report: list[dict] = []

    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        if context.calibration is None:
            raise PruneTuneError("thinet needs calibration batches (PruneContext.calibration) to sample activations")
        samples = self.hparams["samples_per_layer"]
        steps = self.hparams["finetune_steps"]
        model = copy.deepcopy(model)
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        inputs = calibration_inputs(context.calibration, samples, device)
        if not inputs:
            raise PruneTuneError("thinet: the calibration iterable yielded no batches")
        graph = DependencyGraph(model)
        generator = torch.Generator().manual_seed(context.seed)
        groups = graph.prunable_groups(scope=self.hparams["scope"])
        # Widths are fixed up front on the dense model; global allocation ranks every group's
        # greedy reconstruction errors (relative, so comparable across layers).
        scores = ([group_scores(graph, g, inputs, samples, generator) for g in groups]
                  if self.hparams["allocation"] == "global" else None)
        plan = plan_widths(model, graph, groups, context, self.hparams, scores, owner=self.name, normalise=False)
        self.layer_report = []
        cuts = [(g, k) for g, k in zip(groups, plan.kept) if k < g.size]  # graph order: from the input side
        for i, (group, n_keep) in enumerate(cuts):
            stats = prune_layer(graph, group, n_keep, inputs, samples, generator)
            if stats:
                self.layer_report.append(stats)
            # A recovery serves the next layer's sampling; after the last cut the trial's own fine-tune follows.
            if steps and context.finetune is not None and (i + 1 < len(cuts) or self.recover_after_last):
                context.finetune(model, steps)
        return model
