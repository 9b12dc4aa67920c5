"""Centripetal SGD (Ding et al., CVPR 2019 / TNNLS, "Centripetal SGD for Pruning Very Deep
Convolutional Networks with Complicated Structure").

Instead of choosing which filters to drop, C-SGD makes filters *identical* during a training phase,
so that merging them afterwards loses nothing:

1. clustering (once, in ``prepare``): every prunable channel group of ``n`` channels is split into
   ``n'`` clusters, by a small seeded k-means on the flattened kernels (``clustering="kmeans"``) or
   evenly by index (``"even"``). ``n'`` comes from ``methods.budget`` (``allocation``, ``round_to``),
   chosen so the merged model removes ``prune_ratio`` of the dense MACs: ``uniform`` (the paper's,
   the default) the same fraction of every group; ``global`` the widths of the shared ranking of
   filter L1 norms (normalised per group, residual-coupled groups last; l1_norm's), so groups end
   uneven. Only the count comes from the ranking: which channels share a cluster is still the
   clustering's. A residual group (all convs whose outputs are added through the same shortcut,
   ``scope: all``) gets ONE clustering, from the concatenation of all its producers' kernels;
2. the centripetal update (``after_backward``), for every clustered parameter row ``j`` (conv or linear
   kernel, conv bias, and the BN gamma/beta following the producer) in cluster ``H``::

       g_j = mean_{k in H} dL/dW_k + eta * W_j + epsilon * (W_j - mean_{k in H} W_k)

   with ``eta`` the loop's weight decay (so the optimizer applies no decay to these parameters) and,
   for BN vectors, ``0.1 * epsilon`` and no decay. The averaged gradient is the same for every
   member, so within a cluster the differences only shrink: by ``(1 - lr*(eta+epsilon))`` per plain
   SGD step. The momentum SGD step is the loop's;
3. surgery (``prune``): the first channel of each cluster is kept, the rest dropped, and every
   consumer's input slices of the cluster are SUMMED into the kept slice
   (:func:`methods.surgery.prune_group` ``clusters``), exact once a cluster's filters, BN parameters
   and BN running statistics are identical.

Residual groups fed by an option-A ``ChannelPadShortcut`` (CIFAR ResNets, stages 2 and 3): the
shortcut adds a copy of the previous stage's channel ``source[j]`` (or zero) to channel ``j``, and
training cannot make two different copies equal. So channels may only share a cluster when their
shortcut inputs are equal by construction: both zero padding, or both copies of channels that are
themselves in one cluster of the previous stage's group. Each such class is clustered on its own,
with the ``n'`` clusters shared out in proportion to class sizes (at least one each). A group with
more classes than ``n'`` gets one cluster per class, rounded up to a multiple of ``round_to`` (so
the model then removes less than the target; with ``round_to`` 16 on a CIFAR ResNet, the 16-wide
first stage is never cut, so stage 2 has 17 classes and stays whole).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .base import PHASE_EPOCHS, PRUNE_RATIO, ROUND_TO, SCOPE, PruneContext, PruningMethod, allocation_hp
from .errors import ArgumentError, PruneTuneError
from .graph import ChannelGroup, DependencyGraph
from .hyperparameters import Hyperparameter
from .importance import l1_filter
from .layers import ChannelPadShortcut
from .registry import register_method
from .selection import plan_widths
from .surgery import group_size, prune_group

__all__ = ["CSGD", "kmeans"]

log = logging.getLogger(__name__)

_BN_EPSILON_FACTOR = 0.1  # BN vectors: 0.1 * epsilon, no weight decay (official code)


@dataclass
class _Clustering:
    """The clustering of one channel group; module names are the model's."""

    producers: list[str]
    followers: list[str]
    clusters: list[list[int]]

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.clusters)


class _Centripetal:
    """The centripetal gradient for every clustered parameter at once.

    All clustered gradients are flattened into one vector; every element gets a segment id
    (parameter, cluster, position inside the row), so one ``index_add_`` gives all cluster sums and
    one ``index_select`` spreads the means back: about ten tensor ops per step whatever the number
    of layers (a per-parameter loop costs three ops per parameter).
    """

    def __init__(self, entries: list[tuple[nn.Parameter, Sequence[Sequence[int]], bool]], epsilon: float, eta: float):
        entries = [e for e in entries if not e[2]] + [e for e in entries if e[2]]  # kernels, then BN vectors
        self.params = [p for p, _, _ in entries]
        self.kernel_numel = sum(p.numel() for p, _, is_vector in entries if not is_vector)
        segments, inverse, base = [], [], 0
        for p, clusters, _ in entries:
            n = p.shape[0]
            f = p.numel() // n
            assign = torch.empty(n, dtype=torch.long)
            for i, members in enumerate(clusters):
                assign[list(members)] = i
            segments.append((assign.view(n, 1) * f + torch.arange(f).view(1, f)).reshape(-1) + base)
            sizes = torch.tensor([len(c) for c in clusters], dtype=torch.float64)
            inverse.append((1.0 / sizes).repeat_interleave(f))
            base += len(clusters) * f
        device, dtype = self.params[0].device, self.params[0].dtype
        self.segment = torch.cat(segments).to(device)
        self.inverse = torch.cat(inverse).to(device=device, dtype=dtype)
        self.kernel_eps, self.vector_eps = epsilon, epsilon * _BN_EPSILON_FACTOR
        self.eta = eta

    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:  # an unused parameter still feels the centripetal and decay terms
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        g = _flatten_dense_tensors(grads)
        w = _flatten_dense_tensors([p.detach() for p in self.params])
        k = self.kernel_numel
        # M g + d w + e (w - M w)  ==  M (g - e w) + (d + e) w, with M the cluster-mean operator
        g[:k].sub_(w[:k], alpha=self.kernel_eps)
        g[k:].sub_(w[k:], alpha=self.vector_eps)
        sums = torch.zeros(self.inverse.numel(), device=g.device, dtype=g.dtype).index_add_(0, self.segment, g)
        new = sums.mul_(self.inverse).index_select(0, self.segment)
        new[:k].add_(w[:k], alpha=self.eta + self.kernel_eps)
        new[k:].add_(w[k:], alpha=self.vector_eps)
        # The new gradients are views of one buffer: no copy back (set_to_none=False zeroing then
        # accumulates into the views, which is just as correct).
        for p, view in zip(self.params, _unflatten_dense_tensors(new, grads)):
            p.grad = view


@register_method("csgd")
class CSGD(PruningMethod):
    paper = "Ding et al., CVPR 2019"
    summary = "Centripetal SGD makes clustered filters identical, then merges them"
    hyperparameters = (
        PRUNE_RATIO,
        # Up to 1, not the paper's 0.1: its phases ran for many epochs, a 1-3 epoch phase at lr 0.01
        # leaves clusters apart at 0.05 (the merge then costs accuracy: at 97% removed 0.82 median
        # with 0.05, 0.88-0.90 with 1; benchmarks/RESULTS.md). Momentum SGD contracts stably while
        # lr * (eta + epsilon) < 2 * (1 + momentum), far above 1 for any lr here.
        Hyperparameter("epsilon", 0.05, 1e-4, 1.0, log=True, doc="centripetal strength"),
        Hyperparameter("clustering", "kmeans", choices=("kmeans", "even"), kind="categorical",
                       doc="how each layer's filters are split into clusters"),
        PHASE_EPOCHS, SCOPE, allocation_hp("uniform"), ROUND_TO,
    )

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self._clusterings: list[_Clustering] | None = None
        self._eta: float | None = None
        self._bound_model: nn.Module | None = None
        self._update: _Centripetal | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, context: PruneContext | None = None) -> nn.Module:
        if self._clusterings is None:
            self._clusterings = self.compute_clusterings(model, context)
        return model

    @torch.no_grad()
    def compute_clusterings(self, model: nn.Module, context: PruneContext | None) -> list[_Clustering]:
        """One clustering per prunable group that loses channels, in graph order."""
        if context is None:
            raise PruneTuneError("csgd: prepare(model, context) needs the input shape to size its clusters "
                                 "for the MACs target")
        graph = DependencyGraph(model)
        groups = graph.prunable_groups(scope=self.hparams["scope"])
        # global: how MANY clusters each group gets comes from the shared ranking of filter L1 norms
        # (as l1_norm's); WHICH channels share a cluster stays the k-means / even split below.
        scores = [l1_filter(graph, g) for g in groups] if self.hparams["allocation"] == "global" else None
        plan = plan_widths(model, graph, groups, context, self.hparams, scores, owner=self.name)
        out: list[_Clustering] = []
        by_group: dict[int, list[list[int]]] = {}
        for index, (group, kept) in enumerate(zip(groups, plan.kept)):
            n = group_size(graph, group)
            classes = _shortcut_classes(graph, group, n, by_group)
            k = kept
            if len(classes) > kept:  # one cluster per class at least, still a multiple of round_to
                k = min(n, -(-len(classes) // self.hparams["round_to"]) * self.hparams["round_to"])
                log.info("csgd: %s: %d shortcut classes need %d clusters, %d allocated", group.producers[0],
                         len(classes), k, kept)
            if k >= n:
                continue
            features = _kernel_features(graph.model, group, n)
            clusters = []
            for members, k_c in zip(classes, _share(k, [len(c) for c in classes])):
                if self.hparams["clustering"] == "kmeans":
                    labels = kmeans(features[members], k_c, seed=index)
                    parts = [[members[i] for i in range(len(members)) if labels[i] == c] for c in range(k_c)]
                else:
                    parts = [list(chunk) for chunk in _split_evenly(members, k_c)]
                clusters += [sorted(p) for p in parts]
            clusters.sort(key=lambda c: c[0])
            by_group[group.id] = clusters
            out.append(_Clustering(list(group.producers), list(group.followers), clusters))
        log.info("csgd: %d groups clustered (%s)", len(out), ", ".join(f"{c.producers[0]}: {c.size}->{len(c.clusters)}" for c in out))
        return out

    def make_optimizer(self, model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        """Momentum SGD as the loop asks, except that clustered parameters get no weight decay from
        the optimizer: ``eta = weight_decay`` is part of the centripetal gradient."""
        self._eta = weight_decay
        clustered = {id(p) for p, _, _ in self._entries(model)}
        others = [p for p in model.parameters() if id(p) not in clustered]
        mine = [p for p in model.parameters() if id(p) in clustered]
        return torch.optim.SGD([{"params": others, "weight_decay": weight_decay}, {"params": mine, "weight_decay": 0.0}],
                               lr=lr, momentum=momentum)

    def _entries(self, model: nn.Module) -> list[tuple[nn.Parameter, list[list[int]], bool]]:
        """(parameter, its clusters, is a BN vector) for every clustered parameter of ``model``."""
        if self._clusterings is None:
            raise PruneTuneError("csgd: no clusters yet; call prepare(model, context) first")
        out = []
        for c in self._clusterings:
            for name in c.producers + c.followers:
                m = model.get_submodule(name)
                is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, nn.Parameter) and p.requires_grad:
                        out.append((p, c.clusters, is_bn))
        return out

    # ---- the phase -----------------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        eta = self._eta or 0.0
        update = self._update
        if (update is None or self._bound_model is not model or update.eta != eta
                or update.segment.device != update.params[0].device):  # rebuilt after model.to(device)
            entries = self._entries(model)
            self._update = _Centripetal(entries, self.hparams["epsilon"], eta) if entries else None
            self._bound_model = model
        if self._update is not None:
            self._update()

    def on_epoch_end(self, model: nn.Module, epoch: int, mean_loss: float) -> None:
        if log.isEnabledFor(logging.INFO):
            distance = self.cluster_distance(model)
            log.info("csgd: epoch %d: loss %.4f, largest within-cluster distance %.3g",
                     epoch, mean_loss, max(distance.values(), default=0.0))

    @torch.no_grad()
    def cluster_distance(self, model: nn.Module) -> dict[str, float]:
        """Per clustered parameter (``module.param``): ``||W - mean_H W||``, the distance of the
        rows from their cluster centres (zero once the clusters have collapsed)."""
        names = {id(p): n for n, p in model.named_parameters()}
        out = {}
        for p, clusters, _ in self._entries(model):
            x = p.detach().reshape(p.shape[0], -1)
            centre = torch.empty_like(x)
            for members in clusters:
                centre[members] = x[members].mean(0)
            out[names[id(p)]] = float((x - centre).norm())
        return out

    # ---- checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clusterings": None if self._clusterings is None else [asdict(c) for c in self._clusterings],
                "eta": self._eta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        cl = state.get("clusterings")
        self._clusterings = None if cl is None else [
            _Clustering(list(c["producers"]), list(c["followers"]), [list(map(int, m)) for m in c["clusters"]]) for c in cl]
        self._eta = state.get("eta")
        self._bound_model, self._update = None, None

    # ---- the cut -------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, model: nn.Module, context: PruneContext) -> nn.Module:
        clusterings = self._clusterings if self._clusterings is not None else self.compute_clusterings(model, context)
        model = copy.deepcopy(model)
        graph = DependencyGraph(model)
        for c in clusterings:  # graph order: a stage's group is merged before the stage that copies it
            prune_group(graph, graph.group_of(c.producers[0]), clusters=c.clusters)
        return model


# ---- clustering helpers ----------------------------------------------------------------------------
def _kernel_features(model: nn.Module, group: ChannelGroup, n: int) -> torch.Tensor:
    """(n x f): each channel's kernels of every weighted producer, concatenated."""
    parts = []
    for name in group.producers:
        m = model.get_submodule(name)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parts.append(m.weight.detach().reshape(n, -1).float().cpu())
    return torch.cat(parts, 1) if parts else torch.zeros(n, 1)


def _shortcut_classes(graph: DependencyGraph, group: ChannelGroup, n: int,
                      clustered: dict[int, list[list[int]]]) -> list[list[int]]:
    """Channels that may share a cluster (see the module docstring); one class without shortcuts."""
    keys: list[tuple] = [() for _ in range(n)]
    for name in group.producers:
        m = graph.model.get_submodule(name)
        if not isinstance(m, ChannelPadShortcut):
            continue
        source_group = next((g for g in graph.groups if any(c == name for c, _ in g.consumers)), None)
        cluster_of: dict[int, int] = {}
        for i, members in enumerate(clustered.get(source_group.id, []) if source_group is not None else []):
            for ch in members:
                cluster_of[ch] = i
        for j, s in enumerate(m.source.tolist()):
            keys[j] += (("pad",) if s < 0 else ("src", cluster_of.get(s, -1 - s)),)
    classes: dict[tuple, list[int]] = {}
    for j, key in enumerate(keys):
        classes.setdefault(key, []).append(j)
    return sorted(classes.values(), key=lambda c: c[0])


def _share(k: int, sizes: list[int]) -> list[int]:
    """Split ``k`` clusters over classes of ``sizes`` in proportion (each gets 1..size)."""
    n = sum(sizes)
    quotas = [k * s / n for s in sizes]
    out = [min(s, max(1, math.floor(q))) for s, q in zip(sizes, quotas)]
    order = sorted(range(len(sizes)), key=lambda i: quotas[i] - math.floor(quotas[i]), reverse=True)
    while sum(out) < k:
        grew = False
        for i in order:
            if sum(out) < k and out[i] < sizes[i]:
                out[i] += 1
                grew = True
        if not grew:
            break
    while sum(out) > k:
        i = max((i for i in range(len(sizes)) if out[i] > 1), key=lambda i: out[i] - quotas[i])
        out[i] -= 1
    return out


def _split_evenly(members: list[int], k: int) -> list[list[int]]:
    base, extra = divmod(len(members), k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(members[start:start + size])
        start += size
    return out


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 50) -> list[int]:
    """Cluster the rows of ``x`` into exactly ``k`` non-empty clusters; returns a label per row.

    k-means++ seeding from a generator seeded with ``seed``, then Lloyd iterations; an emptied
    cluster takes the row farthest from its centre. Deterministic for a given input and seed.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ArgumentError(f"kmeans: need 1 <= k <= {n} rows, got k={k}")
    if k == n:
        return list(range(n))
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(n, (1,), generator=g))]
    d2 = ((x - x[centres[0]]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # all remaining rows coincide with a centre: pick any unused row
            unused = [i for i in range(n) if i not in centres]
            nxt = unused[0]
        else:
            nxt = int(torch.multinomial(d2, 1, generator=g))
        centres.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    c = x[centres].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(new, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():
            dist = (x - c[new]).norm(dim=1)
            dist[counts[new] <= 1] = -1  # never take a row that is alone in its cluster
            far = int(dist.argmax())
            counts[new[far]] -= 1
            new[far] = empty
            counts[empty] = 1
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.zeros_like(c).index_add_(0, labels, x) / torch.bincount(labels, minlength=k).view(-1, 1).to(x.dtype)
    return labels.tolist()
