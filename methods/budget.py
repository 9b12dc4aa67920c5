"""How many channels each group keeps, so the pruned model removes a target fraction of the dense MACs.

Every static method ends with the same question: given per-channel scores for each prunable group,
which widths remove ``prune_ratio`` of the dense model's MACs? ``allocate`` answers it by bisection
over one integer, exactly (``MacsModel`` computes the MACs of any width assignment without surgery):

* ``uniform``: every group loses the same fraction of its channels (Li et al.'s per-layer rule);
* ``global``: the lowest-scored channels of ALL groups are removed, so layers end with uneven
  widths. Scores on different scales per layer (filter L1 norms grow with fan-in) are divided by
  their group's mean first, as Torch-Pruning's global ranking does; scores already on one scale
  (slimming's |gamma|, scratch's gates, ThiNet's relative errors) are ranked raw, as their papers do.
  Beyond the plain ranking (``scope: all`` only): the residual-coupled groups (stem, block
  outputs, shortcuts: several producers summed into one stream) lose live channels only once
  every block-internal group is at its floor, and then at one rate across them
  (:func:`residual_last`, the order ISTA's cut uses too); a channel scored exactly 0 still goes
  first. The plain ranking cut the residual stream unevenly at 95-97% removed (at 97%, residual
  widths of 16/32/64: l1_norm 3/5/1, slimming 16/8/14; this order: 12/23/45, every internal group
  at 1). On the quickstart (ResNet-20 on 8x8 digits, 4-8 seeds, median val accuracy, plain ->
  residual last; benchmarks/RESULTS.md): l1_norm 0.95: 0.655 -> 0.933, 0.97: 0.330 -> 0.899;
  slimming 0.97: 0.475 -> 0.865; random 0.97: 0.720 -> 0.847; thinet 0.97: 0.877 -> 0.962. At
  50-90% it is better for l1_norm and random, the same widths for slimming (the rule does not
  bind), and medians within 0.01 (1-3 of ~360 validation images) for thinet and scratch.

Then, for either, each group keeps at least ``min_channels`` and a multiple of ``round_to``
(hardware-friendly widths: CPU and GPU convolution kernels pad channel counts to 8 or 16), or all
its channels when it is narrower than ``round_to``. The widths are monotone in the bisection
parameter, so the target is found in about log2(channels) MACs evaluations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .cost import module_macs
from .errors import ConfigError
from .graph import ChannelGroup, DependencyGraph

__all__ = ["MacsModel", "Allocation", "allocate", "keep_top", "round_width", "residual_coupled", "residual_last",
           "ALLOCATIONS"]

ALLOCATIONS = ("uniform", "global")


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
        #: Per group: residual-coupled (:func:`residual_coupled`)?
        self.coupled = [residual_coupled(g) for g in groups]
        per_module, self.total = module_macs(model, input_shape)
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
    """The widths ``allocate`` chose: ``kept[i]`` channels of group i, the MACs reduction they give
    (``1 - macs / reference``), the bisection point ``n`` (channels the ranking removed before
    rounding and the minimum-width guard) and the number of MACs evaluations it took."""

    kept: list[int]
    reduction: float
    n: int
    evaluations: int


def allocate(macs_model: MacsModel, scores: Sequence[torch.Tensor] | None, target: float, *,
             reference: float | None = None, allocation: str = "uniform", round_to: int = 1,
             min_channels: int = 1, normalise: bool = True, residual_last: bool = True) -> Allocation:
    """Widths per group whose MACs reduction against ``reference`` (default: the model's own MACs)
    is as close to ``target`` as the allocation rule allows.

    The rule is a function of one integer ``n`` in ``[0, N]`` (N = all channels of the groups):
    ``global`` removes the ``n`` lowest-scored channels over all groups (``scores``, one tensor per
    group, divided by their group's mean unless ``normalise`` is False), the residual-coupled groups'
    live channels last, at one rate (:func:`residual_last`; ``residual_last=False`` ranks the scores
    as given, for a caller that ordered them itself, as ISTA's cut does); ``uniform`` removes the
    fraction ``n / N`` of every group. The reduction never decreases with ``n``, so the smallest
    ``n`` reaching the target is found in ceil(log2(N + 1)) evaluations; it and ``n - 1`` are
    compared and the closer one is returned."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation: expected one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    reference = float(reference or macs_model.total)
    sizes = macs_model.sizes
    total = sum(sizes)
    if allocation == "global":
        if scores is None:
            raise ConfigError("allocation 'global' needs channel scores")
        coupled = getattr(macs_model, "coupled", None) if residual_last else None  # None: a bare MACs model
        widths_at = _global_widths(scores, sizes, normalise, coupled)
    else:
        def widths_at(n: int) -> list[int]:
            return [int(round(s * (1.0 - n / total))) for s in sizes]

    evaluations = 0

    def reduction(n: int) -> float:
        nonlocal evaluations
        evaluations += 1
        return 1.0 - macs_model.macs(kept_at(n)) / reference

    def kept_at(n: int) -> list[int]:
        return [round_width(k, s, round_to=round_to, min_channels=min_channels) for k, s in zip(widths_at(n), sizes)]

    lo, hi = 0, total  # the answer lies in [lo, hi]; reduction(hi) may still miss the target
    while lo < hi:
        mid = (lo + hi) // 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best, best_reduction = lo, reduction(lo)
    if lo > 0:
        below = reduction(lo - 1)
        if abs(below - target) < abs(best_reduction - target):
            best, best_reduction = lo - 1, below
    return Allocation(kept_at(best), best_reduction, best, evaluations)


def _global_widths(scores: Sequence[torch.Tensor], sizes: Sequence[int], normalise: bool,
                   coupled: Sequence[bool] | None = None) -> Callable[[int], list[int]]:
    """``n -> widths`` when the ``n`` lowest-scored channels of all groups are removed (scores
    normalised per group by their mean; ties broken by position); with ``coupled``, in
    :func:`residual_last`'s order, channels scored exactly 0 (dead by the method's own measure,
    the first ones the plain ranking removes) first."""
    normalised = []
    for s in scores:
        s = s.detach().double().flatten().cpu()
        mean = float(s.abs().mean())
        normalised.append(s / mean if normalise and mean > 0 else s)
    if coupled is not None:
        normalised = residual_last(normalised, coupled, first=[s == 0 for s in normalised])
    flat = torch.cat(normalised)
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    order = owner[flat.argsort(stable=True)]  # group of each channel, from least to most important

    def widths(n: int) -> list[int]:
        removed = torch.bincount(order[:n], minlength=len(sizes))
        return [s - int(r) for s, r in zip(sizes, removed.tolist())]

    return widths


def residual_coupled(group: ChannelGroup) -> bool:
    """True for a group several producers write into (stem, block outputs and shortcuts summed by
    residual adds): removing one of its channels narrows the residual stream itself."""
    return len(group.producers) > 1


def residual_last(scores: Sequence[torch.Tensor], coupled: Sequence[bool], *,
                  first: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Scores (float64, lowest removed first) that rank every channel of the groups not ``coupled``
    by its own score, then every channel of the ``coupled`` groups, ranked within its group by score
    and across those groups by the fraction of the group below it, so they lose channels at one
    rate; channels marked in ``first`` (boolean masks) precede everything (-1). The first channels
    are the plain ranking's as long as no coupled channel is reached."""
    top = 1.0 + max((float(s.max()) for s in scores if s.numel()), default=0.0)
    out = []
    for i, (s, is_coupled) in enumerate(zip(scores, coupled)):
        s = s.detach().double().flatten().cpu()
        if is_coupled:
            rank = torch.empty(s.numel(), dtype=torch.float64)
            rank[s.argsort(stable=True)] = torch.arange(s.numel(), dtype=torch.float64)
            s = top + (rank + 1.0) / s.numel()
        if first is not None:
            s = torch.where(first[i].flatten().cpu(), torch.full_like(s, -1.0), s)
        out.append(s)
    return out


def keep_top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Sorted indices of the ``kept`` highest scores (ties broken towards the lower index)."""
    s = scores.detach().flatten().cpu()
    order = s.double().neg().argsort(stable=True)
    return order[:kept].sort().values
