"""How many channels each group keeps, so the pruned model removes a target fraction of the dense MACs.

Every static method ends with the same question: given per-channel scores for each prunable group,
which widths remove ``prune_ratio`` of the dense model's MACs? ``allocate`` answers it by bisection
over one scalar, exactly (``MacsModel`` computes the MACs of any width assignment without surgery):

* ``uniform``: every group loses the same fraction ``t`` of its channels (Li et al.'s per-layer rule);
* ``global``: the ``t``-quantile of ALL channels, ranked by score normalised per group (each group's
  scores divided by their mean, as Torch-Pruning's global ranking does), is removed, so layers end
  with uneven widths (network slimming, Pruning from Scratch).

Then, for either, each group keeps at least ``min_channels`` and a multiple of ``round_to``
(hardware-friendly widths: CPU and GPU convolution kernels pad channel counts to 8 or 16), or all
its channels when it is narrower than ``round_to``. The widths are monotone in ``t``, so the smallest
``t`` reaching the target is found in ~40 MACs evaluations; it and the closest point below are
compared and the nearer one wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .cost import _conv2d_macs, _linear_macs, profile
from .errors import ConfigError
from .graph import ChannelGroup, DependencyGraph

__all__ = ["MacsModel", "Allocation", "allocate", "keep_top", "round_width", "ALLOCATIONS"]

ALLOCATIONS = ("uniform", "global")
_BISECTION_STEPS = 40


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
        #: Per module: (MACs, group it reads or None, group it writes or None).
        self.terms = [t for t in terms if t[1] is not None or t[2] is not None]
        #: Everything the groups do not touch (modules with their own macs_hook included).
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


def round_width(kept: int, size: int, *, round_to: int = 1, min_channels: int = 1) -> int:
    """``kept`` moved to the nearest multiple of ``round_to`` (at least one multiple), at least
    ``min_channels``, at most ``size``; a group narrower than ``round_to`` keeps all ``size``."""
    if round_to > 1:
        if size < round_to:
            return size
        kept = max(round_to, round_to * int(math.floor(kept / round_to + 0.5)))
    return max(min(min_channels, size), min(size, kept))


@dataclass
class Allocation:
    """The widths ``allocate`` chose: ``kept[i]`` channels of group i; the MACs reduction they give
    (``1 - macs / reference``) and the bisection parameter ``t``."""

    kept: list[int]
    reduction: float
    t: float
    evaluations: int


def allocate(macs_model: MacsModel, scores: Sequence[torch.Tensor] | None, target: float, *,
             reference: float | None = None, allocation: str = "uniform", round_to: int = 1,
             min_channels: int = 1) -> Allocation:
    """Widths per group whose MACs reduction against ``reference`` (default: the model's own MACs)
    is as close to ``target`` as the allocation rule allows. ``scores`` (one tensor per group) are
    needed for ``global`` only."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation: expected one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    reference = float(reference or macs_model.total)
    sizes = macs_model.sizes
    if allocation == "global":
        if scores is None:
            raise ConfigError("allocation 'global' needs channel scores")
        widths_at = _global_widths(scores, sizes)
    else:
        def widths_at(t: float) -> list[int]:
            return [int(round(s * (1.0 - t))) for s in sizes]

    evaluations = 0

    def kept_at(t: float) -> list[int]:
        return [round_width(k, s, round_to=round_to, min_channels=min_channels) for k, s in zip(widths_at(t), sizes)]

    def reduction(kept: list[int]) -> float:
        nonlocal evaluations
        evaluations += 1
        return 1.0 - macs_model.macs(kept) / reference

    lo, hi = 0.0, 1.0
    if reduction(kept_at(hi)) < target:  # the target is out of reach: the most the rule can do
        kept = kept_at(hi)
        return Allocation(kept, reduction(kept), hi, evaluations)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if reduction(kept_at(mid)) >= target:
            hi = mid
        else:
            lo = mid
    above, below = kept_at(hi), kept_at(lo)
    r_above, r_below = reduction(above), reduction(below)
    if abs(r_below - target) < abs(r_above - target):
        return Allocation(below, r_below, lo, evaluations)
    return Allocation(above, r_above, hi, evaluations)


def _global_widths(scores: Sequence[torch.Tensor], sizes: Sequence[int]) -> Callable[[float], list[int]]:
    """``t -> widths`` when the lowest ``t`` fraction of all channels (scores normalised per group by
    their mean; ties broken by position) is removed."""
    normalised = []
    for s in scores:
        s = s.detach().double().flatten().cpu()
        mean = float(s.abs().mean())
        normalised.append(s / mean if mean > 0 else s)
    flat = torch.cat(normalised)
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    order = owner[flat.argsort(stable=True)]  # group of each channel, from least to most important
    total = flat.numel()

    def widths(t: float) -> list[int]:
        n = min(total, int(math.floor(t * total + 1e-9)))
        removed = torch.bincount(order[:n], minlength=len(sizes))
        return [s - int(r) for s, r in zip(sizes, removed.tolist())]

    return widths


def keep_top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Sorted indices of the ``kept`` highest scores (ties broken towards the lower index)."""
    s = scores.detach().flatten().cpu()
    order = s.double().neg().argsort(stable=True)
    return order[:kept].sort().values
