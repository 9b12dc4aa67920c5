"""One trial on several ranks under DistributedDataParallel, as one model on the global batch.

A rank runs :class:`DataParallelTrial` (``trainables.distributed`` starts the ranks through Ray
Train). Every rank builds the same trial as ``trainables.trial`` does, with the GLOBAL batch
(per-worker batch x workers) in its train loader, and trains on its own slice of each global batch
(:func:`shard`): the same seeded order and augmentation draws on every rank, each rank taking a
contiguous part. So ``workers`` ranks compute what one process computes on the global batch:

* gradients: DDP averages the ranks' gradients; a rank whose slice is smaller than the others
  (the last batch of an epoch) has its loss gradient weighted by its share (:class:`_Weighted`),
  so the average is the gradient of the mean loss over the global batch;
* batch norm: the stepping model normalises with the GLOBAL batch's statistics
  (:func:`global_batch_norm`: one all-reduce of per-channel sums per layer, differentiable), so
  its outputs, running statistics and gradients are those of the one-process model;
* the method's hooks (``extra_loss``, ``after_backward``, ``after_step``, ``on_epoch_end``) run on
  every rank on the unwrapped model, after the gradients are averaged: every rank changes its
  parameters the same way (ISTA's proximal step, C-SGD's centripetal update, slimming's L1
  subgradient);
* the cut runs once, on rank 0, with the global-batch loader (calibration batches and ThiNet's
  fine-tune steps are those of the one-process trial); the pruned model (architecture and
  weights) and the method's state are broadcast to the other ranks;
* evaluation, cost, final metrics, checkpoints and reports come from rank 0 only; the other ranks
  report nothing but still call ``report`` (Ray Train's report is a barrier).

The one-process result is reproduced up to the rounding of the all-reduced sums: floating-point
addition in another order (tests/test_distributed.py bounds it). Not for methods whose loss
couples the samples of a batch: ManiDP's similarity and complexity terms are computed on each
rank's slice (and its running mean of the loss from the rank's own samples), so its N-rank trial is
an approximation of the one-process one. Random draws during training (dropout; none in the
shipped models) are drawn per rank.
"""
from __future__ import annotations

import io
import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from methods.base import PruningMethod

from .device_data import DeviceLoader
from .settings import TrialSettings
from .train import EpochStats, NonFiniteLossError, train_epoch
from .trial import Reporter, _finetune_optimizer, _stage, _Trial

__all__ = ["DataParallelTrial", "global_batch_norm", "shard", "global_batch"]

log = logging.getLogger(__name__)


def global_batch(settings: TrialSettings, workers: int, method_name: str) -> TrialSettings:
    """``settings`` with the trial's train batch (given per worker) multiplied by ``workers``: the
    fine-tune's, and for a from-scratch method the base schedule's, which its training uses (a
    method that starts from the dense base keeps ``base`` as is: it names that base model)."""
    from methods import get_method_class

    out = replace(settings, finetune=replace(settings.finetune, batch_size=settings.finetune.batch_size * workers))
    if get_method_class(method_name).from_scratch:
        out = replace(out, base=replace(settings.base, batch_size=settings.base.batch_size * workers))
    return out


# ---- the rank's part of each global batch ------------------------------------------------------------
class ShardLoader:
    """Rank ``rank``'s contiguous slice of every batch of ``full`` (a :class:`DeviceLoader` with the
    global batch): the same order and augmentation draws on every rank (``full.generator``, which
    the trial reseeds per epoch), each rank normalising and augmenting only its own images. A last
    batch with fewer images than ranks is skipped (no rank may get an empty slice)."""

    def __init__(self, full: DeviceLoader, rank: int, world: int):
        self.full, self.rank, self.world = full, rank, world
        self.generator = full.generator

    def __len__(self) -> int:
        return len(self.full)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.full.batch_indices():
            b = index.numel()
            draws = self.full.draw(b)
            if b < self.world:
                log.debug("skipping a last batch of %d images for %d ranks", b, self.world)
                continue
            part = torch.tensor_split(torch.arange(b), self.world)[self.rank]
            lo, hi = int(part[0]), int(part[-1]) + 1
            yield self.full.batch(index[lo:hi], tuple(d[lo:hi] if d is not None else None for d in draws))


class _ShardBatches(torch.utils.data.Sampler):
    """Rank ``rank``'s slice of each global batch of ``sampler``'s order (the DataLoader path)."""

    def __init__(self, sampler, batch_size: int, rank: int, world: int):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world:
                continue
            yield [int(i) for i in torch.tensor_split(torch.tensor(batch), self.world)[self.rank]]


def shard(loader, rank: int, world: int):
    """The rank's view of a train loader with the global batch: a :class:`ShardLoader` for a
    :class:`DeviceLoader`, else a ``DataLoader`` over the same data set, order generator and workers
    that loads only the rank's slice of each global batch."""
    if isinstance(loader, DeviceLoader):
        return ShardLoader(loader, rank, world)
    sampler = torch.utils.data.RandomSampler(loader.dataset, generator=loader.generator)
    return torch.utils.data.DataLoader(
        loader.dataset, batch_sampler=_ShardBatches(sampler, loader.batch_size, rank, world),
        num_workers=loader.num_workers, generator=loader.generator, pin_memory=loader.pin_memory,
        persistent_workers=loader.num_workers > 0)


# ---- the stepping model ----------------------------------------------------------------------------
class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumAcrossRanks.apply(grad.contiguous(), ctx.group), None


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, group, x: torch.Tensor) -> torch.Tensor:
    """``bn``'s forward normalising in training with the statistics of the global batch: per-channel
    counts, sums and centred squares all-reduced over ``group`` in float64 (one all-reduce per
    layer and pass, differentiable); its running statistics updated with them. Eval mode: ``bn``'s own."""
    if not bn.training or not bn.track_running_stats:
        return type(bn).forward(bn, x)
    c, xf = x.shape[1], x.float()
    dims, n_local = [0, *range(2, x.dim())], xf.numel() // c
    # Per rank: mean and centred sum of squares (no cancellation); combined in float64 as
    # sum(n_r m_r) and sum(M2_r + n_r m_r^2), whose difference N mean^2 cancels only the ranks' means.
    local_mean = xf.mean(dims, keepdim=True)
    m2 = (xf - local_mean).square().sum(dims).double()
    m1 = local_mean.flatten().double() * n_local
    stats = _SumAcrossRanks.apply(torch.cat([m1, m2 + m1 * m1 / n_local, m1.new_full((1,), float(n_local))]), group)
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_((var * n / (n - 1).clamp_min(1)).to(bn.running_var.dtype), alpha=m)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (xf - mean.float().view(shape)) * torch.rsqrt(var + bn.eps).float().view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.weight, None


class _Weighted(nn.Module):
    """``net``'s outputs with their gradient scaled by this rank's share of the global batch times
    the rank count (1 when the slices are equal; the last batch of an epoch may split unevenly):
    DDP's average of the ranks' gradients is then the gradient of the global batch's mean loss."""

    def __init__(self, net: nn.Module, group):
        super().__init__()
        self.net, self.group = net, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        n = torch.tensor([x.shape[0]], dtype=torch.float64)
        dist.all_reduce(n, group=self.group)
        weight = x.shape[0] * dist.get_world_size(self.group) / float(n)
        return out if weight == 1.0 else _ScaleGrad.apply(out, weight)


def _global_view(model: nn.Module, group) -> nn.Module:
    """A copy of ``model``'s module tree sharing its parameters and buffers (the same tensors: the
    optimizer and the method's hooks see every update) whose batch norms run ``global_batch_norm``.
    The copies keep the modules' forward hooks (methods gate batch-norm outputs with them)."""
    import copy
    import functools

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo)
    for original, module in zip(model.modules(), view.modules()):
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):  # the same hook objects, not copies
            setattr(module, hooks, type(getattr(original, hooks))(getattr(original, hooks)))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = functools.partial(global_batch_norm, module, group)
    return view


class _HooksOn:
    """The per-step hooks ``train_step`` calls, for the DDP-wrapped model: the method's (phase only,
    ``method`` None in the fine-tune) are given the unwrapped model, since they bind to its own
    modules and parameters; before them, the gradients of the tensors the optimizer updates that
    are not the model's parameters (scratch's gates), which DDP does not see, are averaged too."""

    def __init__(self, method: PruningMethod | None, model: nn.Module, outside: list[torch.Tensor], group):
        self.method, self.model, self.outside, self.group = method, model, outside, group

    def extra_loss(self, model, inputs, logits, targets):
        return None if self.method is None else self.method.extra_loss(self.model, inputs, logits, targets)

    def after_backward(self, model) -> None:
        grads = [t.grad for t in self.outside if t.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat /= dist.get_world_size(self.group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        if self.method is not None:
            self.method.after_backward(self.model)

    def after_step(self, model) -> None:
        if self.method is not None:
            self.method.after_step(self.model)


# ---- the trial on one rank -----------------------------------------------------------------------------
class DataParallelTrial(_Trial):
    """``_Trial`` on rank ``rank`` of ``world`` (see the module docstring). ``train_loader`` is the
    global-batch loader (rank 0 cuts with it; every rank's slice comes from its draws)."""

    rank: int = 0
    world: int = 1
    shard_loader: Any = None
    groups: tuple = ()
    _ddp: tuple | None = None  # (the model it wraps, the DDP module)

    @classmethod
    def start_rank(cls, settings: TrialSettings, method_name: str, hparams: dict[str, Any], report: Reporter,
                   resume_from: Path | None) -> "DataParallelTrial":
        """Every rank builds the same trial (same base model or checkpoint) with the global batch."""
        rank, world = dist.get_rank(), dist.get_world_size()
        trial = cls.start(global_batch(settings, world, method_name), method_name, hparams, report, resume_from)
        trial.rank, trial.world = rank, world
        trial.shard_loader = shard(trial.train_loader, rank, world)
        # Batch-norm sums on the trial's device; the per-step image counts on the CPU.
        trial.groups = (dist.new_group(), dist.new_group(backend="gloo"))
        return trial

    def prune(self) -> None:
        """Rank 0 cuts (as the one-process trial would); the others receive its pruned model and
        the method's state."""
        payload: list[Any] = [None, None]
        if self.rank == 0:
            super().prune()
            buffer = io.BytesIO()
            torch.save(self.model, buffer)
            payload = [buffer.getvalue(), self.method.state_dict()]
        t0 = time.perf_counter()
        dist.broadcast_object_list(payload, src=0)
        if self.rank != 0:
            self.model = torch.load(io.BytesIO(payload[0]), map_location=self.device, weights_only=False)
            self.method.load_state_dict(payload[1])
            self.pruned = True
            self.optimizer = _finetune_optimizer(self.method, self.model, self.plan)
        log.info("rank %d: pruned model shared in %.2fs", self.rank, time.perf_counter() - t0)

    def failed(self, exc: NonFiniteLossError) -> dict[str, Any]:
        """Raise ``exc`` with the metrics the one-process trial reports (``exc.failure``): other
        ranks may wait in a collective, and raising ends the whole worker group; the driver
        (``trainables.distributed``) reports them."""
        epoch = self.state["epoch"]
        exc.failure = {"epoch": epoch + 1, "stage": _stage(epoch, self.plan), "nonfinite": 1,
                       "failure_reason": str(exc), "accuracy": math.nan, "macs": math.nan, "params": math.nan}
        raise exc

    def _train(self, stage: str) -> EpochStats:
        stepping = self._wrapped()
        managed = {id(p) for p in stepping.parameters()}
        outside = [p for group in self.optimizer.param_groups for p in group["params"] if id(p) not in managed]
        hooks = _HooksOn(self.method if stage == "phase" else None, self.model, outside, self.groups[0])
        stats = train_epoch(stepping, self.shard_loader, self.optimizer, device=self.device, method=hooks)
        totals = torch.tensor([stats.loss * stats.images, stats.accuracy * stats.images, stats.images],
                              dtype=torch.float64)
        dist.all_reduce(totals, group=self.groups[1])
        n = max(1.0, float(totals[2]))
        return EpochStats(float(totals[0]) / n, float(totals[1]) / n, stats.seconds, stats.steps, int(totals[2]))

    def _wrapped(self) -> nn.Module:
        """DDP over a global-batch-norm view of the current model (built again after the cut); the
        view alone while no model parameter trains (scratch's phase trains only its gates)."""
        if self._ddp is None or self._ddp[0] is not self.model:
            net = _Weighted(_global_view(self.model, self.groups[0]), self.groups[1])
            if any(p.requires_grad for p in net.parameters()):
                ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
                with warnings.catch_warnings():  # newer torch renames it; the buffers are equal on every rank
                    warnings.simplefilter("ignore", FutureWarning)
                    net = DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)
            self._ddp = (self.model, net)
        return self._ddp[1]

    def _epoch_metrics(self, epoch: int, stage: str, stats: EpochStats) -> dict[str, Any]:
        if self.rank != 0:  # only rank 0 evaluates and reports
            return {"epoch": epoch + 1, "stage": stage}
        return super()._epoch_metrics(epoch, stage, stats)

    def report_final(self) -> dict[str, Any]:
        if self.rank != 0:
            metrics = {"epoch": self.state["epoch"], "stage": _stage(self.state["epoch"] - 1, self.plan)}
            self._report(metrics)
            return metrics
        return super().report_final()
